"""Decoding image files into one uint8 (N, 3, S, S) array, with every core.

Worker processes, not threads: per image, reading the file and the Python around the decoder
cost as much as decoding a 32 px JPEG, and they hold the GIL. Each worker maps the output file
(the cache's temporary file, or an unnamed temporary one) and writes its chunks of images
straight into it, so no pixel travels through a pipe and nothing goes through /dev/shm
(64 MB in a default Docker container).
"""

import ctypes
import multiprocessing
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
from torchvision.io import ImageReadMode, decode_jpeg

from shared.device import usable_cpu_count
from shared.preprocess import ImageError, load_rgb, resize_crop
from trainer import TrainerError

# Images per task: large enough to amortise a task's cost, small enough to balance the cores.
CHUNK = 512
# With --decode-workers 0 (auto), fewer images than this decode in this process: starting
# the workers (~1 s) costs more than it saves.
POOL_MIN_IMAGES = 2 * CHUNK
PR_SET_PDEATHSIG = 1  # linux/prctl.h: the signal a process gets when its parent ends


def _read(path: str) -> bytearray:
    """The file's bytes, writable (torch.frombuffer warns about read-only buffers)."""
    with open(path, "rb", buffering=0) as f:
        return bytearray(f.readall())


def decode_chunk(out: np.ndarray, paths: list[str], image_size: int) -> str | None:
    """Decode `paths` into `out` (len(paths), 3, S, S); the first unreadable file's message."""
    # Fast path: JPEGs already at image_size (CIFAR at 32 px) decode straight to pixels in
    # libjpeg-turbo through torchvision, about 2x cheaper than PIL per image with no resize
    # work; the pixels are identical to PIL's (checked on all 50,000 CIFAR-10 JPEGs).
    # Anything else, or a batch with one bad file, takes the serving path (PIL) per file.
    fast = [i for i, p in enumerate(paths) if p.lower().endswith((".jpg", ".jpeg"))]
    done = set()
    if fast:
        try:
            data = [torch.frombuffer(_read(paths[i]), dtype=torch.uint8) for i in fast]
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except (RuntimeError, OSError):
            decoded = []
        for i, image in zip(fast, decoded, strict=False):
            if image.shape == (3, image_size, image_size):
                out[i] = image.numpy()
                done.add(i)
    to_tensor = resize_crop(image_size) if len(done) < len(paths) else None
    for i, path in enumerate(paths):
        if i not in done:
            try:
                with open(path, "rb") as f:
                    out[i] = to_tensor(load_rgb(f, draft_size=image_size)).numpy()
            except (ImageError, OSError) as exc:
                return f"{path}: {exc}"
    return None


def _slice(target: str, offset: int, start: int, count: int, image_size: int) -> np.ndarray:
    """Images start..start+count of the uint8 (N, 3, S, S) array at `offset` in `target`."""
    size = 3 * image_size * image_size
    shape = (count, 3, image_size, image_size)
    return np.memmap(target, dtype=np.uint8, mode="r+", offset=offset + start * size, shape=shape)


def _decode_task(
    target: str, offset: int, start: int, paths: list[str], image_size: int
) -> str | None:
    """In a worker: decode one chunk into its place in the file; the error message, if any."""
    # Dirty pages of a shared mapping belong to the file: the parent's fsync writes them.
    return decode_chunk(_slice(target, offset, start, len(paths), image_size), paths, image_size)


def start_method() -> str:
    """How worker processes start: "fork" while it is safe, else "forkserver"."""
    # fork: a worker inherits the imported modules and starts at once; forkserver imports
    # torch and torchvision once more before the first worker runs (measured on 2 busy cores,
    # the 50,000 CIFAR-10 JPEGs: 25 s with fork, 53 s with forkserver). Before CUDA or a
    # process group (torchrun) has started, the only other threads are idle BLAS/OpenMP
    # pools, as when a DataLoader forks its workers; after, threads of theirs may hold locks
    # that a forked child would wait on forever, so the workers come from a clean forkserver.
    started = torch.cuda.is_initialized() or (dist.is_available() and dist.is_initialized())
    return "forkserver" if started else "fork"


def _init_worker(parent: int | None) -> None:
    """Workers leave Ctrl-C to the trainer, which stops them (SIGTERM: the default, quiet
    end, not the trainer's handler they inherit); they end with a trainer killed outright."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform == "linux":  # a forked worker holds the task pipe open: it would wait forever
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if parent is not None and os.getppid() != parent:  # the trainer died before prctl
        os._exit(1)


def pool_size(count: int, workers: int) -> int:
    """Worker processes for `count` images: `workers`, or one per usable core when 0 (none
    for small sets); 1 means decoding in this process."""
    if workers == 0:
        workers = usable_cpu_count() if count >= POOL_MIN_IMAGES else 1
    return max(1, min(workers, count))


def decode_into(out: np.ndarray, paths: list[str], image_size: int, workers: int = 0) -> None:
    """Decode `paths` into `out` (N, 3, S, S) uint8; TrainerError naming the first unreadable
    file. Worker processes need `out` to be a file mapping (np.memmap): they write the file."""
    n = pool_size(len(paths), workers) if isinstance(out, np.memmap) else 1
    # Several chunks per worker, so that one slow chunk does not leave the others idle.
    chunk = max(1, min(CHUNK, -(-len(paths) // (4 * n))))
    starts = range(0, len(paths), chunk)
    if n == 1:
        errors = [
            decode_chunk(out[s : s + chunk], paths[s : s + chunk], image_size) for s in starts
        ]
    else:
        errors = _in_pool(n, out.filename, out.offset, starts, chunk, paths, image_size)
    bad = [e for e in errors if e]
    if bad:
        more = f" (and errors in {len(bad) - 1} more chunks)" if len(bad) > 1 else ""
        raise TrainerError(f"unreadable image {bad[0]}{more}")


def _in_pool(n, target, offset, starts, chunk, paths, image_size) -> list[str | None]:
    """Run the chunks on `n` worker processes; on any exception (Ctrl-C) stop them at once."""
    context = multiprocessing.get_context(start_method())
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload([__name__])  # the server imports torch once for all
    parent = os.getpid() if context.get_start_method() == "fork" else None
    pool = ProcessPoolExecutor(n, mp_context=context, initializer=_init_worker, initargs=(parent,))
    try:
        futures = [
            pool.submit(_decode_task, target, offset, s, paths[s : s + chunk], image_size)
            for s in starts
        ]
        errors = [f.result() for f in futures]
    except BaseException:
        # No public way to stop busy workers before Python 3.14 (terminate_workers).
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
        raise
    pool.shutdown()
    return errors
