"""CUDA graphs of the serving forward pass, one per batch size, captured before a version serves.

On a GPU a ResNet-18 pass over a few 32x32 images is bound by kernel launches (about 60 of
them, each costing the CPU more than the GPU takes to run it), not by arithmetic. A CUDA graph
replays the whole pass, normalization and softmax included, with one launch. A graph has fixed
shapes, so a few batch sizes are captured (1, 2, 4, ... up to the batcher's largest batch); a
batch is padded up to the next captured size, replayed, and its own rows read back. Batches
larger than the largest captured size run eagerly.

CPU: no graphs (CUDA graphs are a CUDA feature, and a CPU forward pass is bound by arithmetic,
not by launches); ServedModel never calls this module there.
"""

import bisect
import logging
import time
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

# Largest difference of a replay from the eager pass on the same input accepted at capture
# (class probabilities): bf16 weights round to ~3 significant digits, fp32 to ~7.
TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 1e-4}


def graph_sizes(max_batch: int) -> tuple[int, ...]:
    """The batch sizes to capture: powers of two below `max_batch`, then `max_batch` itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return (*sizes, max_batch)


def padded_size(n: int, sizes: tuple[int, ...]) -> int | None:
    """The smallest of the ascending `sizes` that holds `n` images; None when none does."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


class GraphedForward:
    """Captured graphs of `forward` (uint8 images on the device -> float32 probabilities on the
    device) for each of `sizes`; `run` replays the one that fits a batch."""

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        image_shape: tuple[int, int, int],
        device: torch.device,
        sizes: tuple[int, ...],
        tolerance: float,
    ) -> None:
        start = time.perf_counter()
        self.sizes = sizes
        self.device = device
        largest = sizes[-1]
        with torch.inference_mode(), torch.cuda.device(device):
            # One input buffer for all graphs (graph b reads its first b rows: fixed addresses),
            # filled from pinned host memory so the upload is one asynchronous DMA.
            self._input = torch.empty((largest, *image_shape), dtype=torch.uint8, device=device)
            self._staging = torch.empty(self._input.shape, dtype=torch.uint8, pin_memory=True)
            probe = torch.randint(0, 256, self._input.shape, dtype=torch.uint8, device=device)
            self._input.copy_(probe)
            stream = torch.cuda.Stream(device)
            # Warm up on a side stream, as the CUDA graphs docs require: cuDNN picks its kernels
            # and lazy initialisations run outside the capture. Each size's eager output on the
            # probe is kept to check the replay against.
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                eager = {b: forward(self._input[:b]).clone() for b in sizes}
            torch.cuda.current_stream(device).wait_stream(stream)
            # One memory pool for all sizes, largest first so the smaller ones reuse its blocks:
            # safe because replays never overlap and each output is read before the next replay.
            pool = torch.cuda.graph_pool_handle()
            self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
            for b in reversed(sizes):
                graph = torch.cuda.CUDAGraph()
                # thread_local: the batcher thread may be serving the previous version while
                # this one is captured; its CUDA calls must neither fail nor spoil the capture.
                with torch.cuda.graph(
                    graph, pool=pool, stream=stream, capture_error_mode="thread_local"
                ):
                    output = forward(self._input[:b])
                self._graphs[b] = (graph, output)
            for b in sizes:
                graph, output = self._graphs[b]
                graph.replay()
                diff = (output - eager[b]).abs().max().item()  # one sync per size, at capture
                if not diff <= tolerance:  # also catches NaN
                    raise RuntimeError(f"batch {b} replay differs from eager by {diff:.3g}")
        self.capture_seconds = time.perf_counter() - start

    def run(self, images: torch.Tensor) -> torch.Tensor | None:
        """Probabilities, float32 (n, classes) on the CPU, for uint8 images (n, 3, S, S) on the
        CPU; None when the batch is larger than every captured size (the caller runs eagerly).

        Not for concurrent calls: the batcher thread is the only caller once the model serves.
        """
        n = len(images)
        size = padded_size(n, self.sizes)
        if size is None:
            return None
        graph, output = self._graphs[size]
        with torch.inference_mode(), torch.cuda.device(self.device):
            # Rows n..size keep earlier images: their outputs are computed and never read.
            self._staging[:n].copy_(images)
            self._input[:n].copy_(self._staging[:n], non_blocking=True)
            graph.replay()
            # The one device->host copy; it waits for the replay, and so the upload has finished
            # reading the staging buffer before the next call overwrites it.
            return output[:n].cpu()


def capture(
    forward: Callable[[torch.Tensor], torch.Tensor],
    image_shape: tuple[int, int, int],
    device: torch.device,
    max_batch: int,
    dtype: torch.dtype,
) -> tuple[GraphedForward | None, str]:
    """Graphs for batch sizes up to `max_batch`, and a note for GET /model; (None, why) when
    capture fails for any reason: the version then serves eagerly, never refused for this."""
    sizes = graph_sizes(max_batch)
    try:
        graphed = GraphedForward(forward, image_shape, device, sizes, TOLERANCE[dtype])
    except Exception as exc:  # noqa: BLE001 - graphs are an optimization: serve eagerly instead
        note = f"failed, serving eagerly: {type(exc).__name__}: {exc}"[:300]
        log.warning("CUDA graphs %s", note)
        return None, note
    note = (
        f"batch sizes {', '.join(map(str, sizes))} captured in {graphed.capture_seconds:.2f} s"
        f"; larger batches eager"
    )
    return graphed, note
