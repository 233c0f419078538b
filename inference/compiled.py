"""The served network compiled ahead of time (AOTInductor) on the CPU, built beside the server.

Why: on a CPU the eager pass over a few images pays Python and oneDNN overhead per layer, and
the service's batches are small (16 clients x 1 image on 2 workers: about 4 images a pass).
TorchInductor with frozen weights fuses each conv with its ReLU and residual add and pre-packs
the weights. Measured on a 2-core AMD EPYC (Zen 3, AVX2), fp32, one torch thread
(`bench.forward --threads 1`): batch 1 10.0 -> 7.4 ms, batch 4 33.2 -> 26.0, batch 32
124.7 -> 120.8. With two threads and OMP_WAIT_POLICY=PASSIVE, batch 1 took 35.6 ms against
10.1 (an OpenMP region per layer, each waking a sleeping thread), and the runner holds the GIL
for the whole pass; so it is opt-in, and `auto` keeps a package only where it times faster
(docs/benchmarks.md).

How: two packages, one for batch 1 (a fixed shape lets Inductor choose the best kernels; with
a dynamic batch, batch 1 gained nothing) and one for batch 2 .. BATCH_MAX_IMAGES. Larger
batches run eagerly. A child process (`python -m inference.compiled`) builds them from the
served copy's weights: torch.export patches torch.nn.Module calls for the whole process while
it traces, and eager passes in the server's other threads then failed ("module is not
installed as a submodule"), so it never runs in the server. The child runs at a lower CPU
priority and exits with its parent. The worker loads the packages, checks each against the
eager pass (TOLERANCE below), times both ways and keeps a package only where it
is the faster. Until then, tens of seconds on 2 cores, the version serves eagerly: a reload
still takes effect within its 3 s. Any failure (no C++ compiler, out of memory) leaves the
version eager with one warning line; it never refuses a version.
"""

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

from inference.graphs import TOLERANCE as REPLAY_TOLERANCE
from shared.model import build_model, for_inference
from shared.precision import fastest_seconds

log = logging.getLogger(__name__)

# Seconds the child may take before it is stopped (2 cores: 31-47 s seen).
CHILD_TIMEOUT_S = 900.0
# Largest difference of a package's class probabilities from the eager pass accepted. fp32: as
# for a CUDA graph replay. bf16: Inductor fuses ops and rounds intermediates to bf16 at other
# places than eager does, so the same bf16 network answers less alike: 1.23e-2 was seen (AMD
# EPYC Zen 5; the tests' random model, whose head is sharpened, on random inputs). A broken
# package is off by far more.
TOLERANCE = {torch.bfloat16: 5e-2, torch.float32: REPLAY_TOLERANCE[torch.float32]}
# Batch sizes timed eager vs compiled: the single-image package at 1, the batched one at this.
TIMED_BATCH = 16


class CompiledNet:
    """Callable like the network: the batch-1 package for one image, the batched package for
    2 .. max_batch, the eager network otherwise (and where a package was not the faster)."""

    def __init__(self, eager: nn.Module, single, batched, max_batch: int) -> None:
        self.eager = eager
        self.single = single
        self.batched = batched
        self.max_batch = max_batch

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        name = "single" if n == 1 else "batched" if 2 <= n <= self.max_batch else None
        package = getattr(self, name) if name else None
        if package is None:
            return self.eager(x)
        try:
            out = package(x)
            if out.shape[0] != n:
                raise RuntimeError(f"answered {out.shape[0]} rows for {n} images")
            return out
        except Exception:  # noqa: BLE001 - a package that fails is dropped, never retried
            log.exception("compiled %s package failed on a batch of %d: eager from now on", name, n)
            setattr(self, name, None)
            return self.eager(x)


def _example(n: int, image_size: int, bf16: bool, channels_last: bool) -> torch.Tensor:
    x = torch.randn(n, 3, image_size, image_size)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(torch.bfloat16 if bf16 else torch.float32).contiguous(memory_format=fmt)


def _best_ms(run, x: torch.Tensor, repeats: int = 5) -> float:
    """`run(x)`'s fastest of `repeats` calls, ms."""
    with torch.inference_mode():
        return fastest_seconds(lambda: run(x), torch.device("cpu"), repeats) * 1000


def _agrees(package, eager: nn.Module, x: torch.Tensor, tolerance: float) -> float:
    """Largest difference of the package's class probabilities from the eager pass's."""
    with torch.inference_mode():
        got = package(x).float().softmax(dim=1)
        want = eager(x).float().softmax(dim=1)
    diff = (got - want).abs().max().item()
    if not diff <= tolerance:  # also catches NaN
        raise RuntimeError(f"differs from the eager pass by {diff:.2e} (> {tolerance:g})")
    return diff


class Compilation:
    """Builds the packages of one served network in a child process, then checks and times
    them in this one. `cancel()` stops the child (a newer version replaced this one)."""

    def __init__(
        self,
        net: nn.Module,
        arch: str,
        num_classes: int,
        image_size: int,
        bf16: bool,
        channels_last: bool,
        max_batch: int,
        only_if_faster: bool = True,
    ) -> None:
        self.net = net
        self.only_if_faster = only_if_faster
        self.spec = (arch, num_classes, image_size, bf16, channels_last)
        self.max_batch = max_batch
        self._cancelled = threading.Event()
        self._child: subprocess.Popen | None = None

    def cancel(self) -> None:
        """Stop building (the result is discarded)."""
        self._cancelled.set()
        child = self._child
        if child is not None and child.poll() is None:
            child.kill()

    def run(self) -> tuple[CompiledNet | None, str]:
        """(the compiled network or None, a one-line note for GET /model and the log)."""
        start = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix=f"compile-{os.getpid()}-"))
        try:
            single, batched = self._build(work)
            if self._cancelled.is_set():
                return None, "cancelled (version replaced)"
            return self._check_and_time(single, batched, time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - any failure: serve eagerly
            if self._cancelled.is_set():  # the child was stopped on purpose
                return None, "cancelled (version replaced)"
            return None, f"off (compile failed: {str(exc).strip().splitlines()[-1][:200]})"
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _build(self, work: Path):
        compiler = os.environ.get("CXX") or "g++"
        if shutil.which(compiler) is None:
            raise RuntimeError(f"no C++ compiler ({compiler}): install g++ or set CXX")
        arch, num_classes, image_size, bf16, channels_last = self.spec
        torch.save(self.net.state_dict(), work / "weights.pt")
        # fmt: off
        command = [
            sys.executable, "-m", "inference.compiled", "--weights", str(work / "weights.pt"),
            "--arch", arch, "--num-classes", str(num_classes), "--image-size", str(image_size),
            "--max-batch", str(self.max_batch), "--out", str(work), "--parent", str(os.getpid()),
        ]
        # fmt: on
        command += (["--bf16"] if bf16 else []) + (["--channels-last"] if channels_last else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self._child = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        if self._cancelled.is_set():
            self._child.kill()
        try:
            output, _ = self._child.communicate(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.communicate()
            raise RuntimeError(f"took over {CHILD_TIMEOUT_S:.0f} s") from None
        if self._child.returncode != 0:
            lines = [line for line in output.splitlines() if line.strip()] or ["no output"]
            raise RuntimeError(f"exit {self._child.returncode}: {lines[-1]}")
        # Imported here, in the background: Inductor takes seconds to import.
        from torch._inductor import aoti_load_package as load

        single = load(str(work / "single.pt2"))
        batched = load(str(work / "batched.pt2")) if self.max_batch >= 2 else None
        return single, batched

    def _check_and_time(self, single, batched, seconds: float) -> tuple[CompiledNet | None, str]:
        _, _, image_size, bf16, channels_last = self.spec
        tolerance = TOLERANCE[torch.bfloat16 if bf16 else torch.float32]
        parts = []
        kept = {}
        sizes = {"single": 1, "batched": min(TIMED_BATCH, self.max_batch)}
        for name, package in (("single", single), ("batched", batched)):
            if package is None:
                continue
            x = _example(sizes[name], image_size, bf16, channels_last)
            _agrees(package, self.net, x, tolerance)
            eager_ms, compiled_ms = _best_ms(self.net, x), _best_ms(package, x)
            use = compiled_ms < eager_ms or not self.only_if_faster
            kept[name] = package if use else None
            parts.append(
                f"batch {sizes[name]}: {compiled_ms:.1f} ms vs eager {eager_ms:.1f} ms "
                f"({'compiled' if use else 'eager'})"
            )
        if not any(kept.values()):
            return None, f"off (not faster here: {'; '.join(parts)})"
        net = CompiledNet(self.net, kept.get("single"), kept.get("batched"), self.max_batch)
        span = "1" if self.max_batch == 1 else f"1-{self.max_batch}"
        return net, f"batch sizes {span}, built in {seconds:.0f} s; {'; '.join(parts)}"


def _exit_with_parent(parent: int, work: Path) -> None:
    """Exit when the server worker that started this child is gone, removing the folder it
    made for this build (its own cleanup died with it)."""
    while os.getppid() == parent:
        time.sleep(1)
    shutil.rmtree(work, ignore_errors=True)
    os._exit(3)


def main(argv: list[str] | None = None) -> int:
    """Child process: rebuild the served copy, export and compile it, write the packages."""
    p = argparse.ArgumentParser(prog="python -m inference.compiled", description=__doc__)
    p.add_argument("--weights", required=True, help="state_dict of the served (folded) copy")
    p.add_argument("--arch", required=True)
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--max-batch", type=int, required=True)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--out", required=True, help="folder for single.pt2 and batched.pt2")
    p.add_argument("--parent", type=int, default=0, help="exit when this pid is gone")
    args = p.parse_args(argv)
    if args.parent:
        watch = (args.parent, Path(args.out))
        threading.Thread(target=_exit_with_parent, args=watch, daemon=True).start()
    os.nice(10)  # serving comes first
    torch.set_num_threads(1)
    # The same copy the server built: fold a fresh network, then load the served weights.
    net = for_inference(build_model(args.arch, args.num_classes), args.bf16, args.channels_last)
    net.load_state_dict(torch.load(args.weights, weights_only=True))
    from torch._inductor import aoti_compile_and_package

    options = {"freezing": True, "compile_threads": 1}
    out = Path(args.out)
    with torch.no_grad():
        x = _example(1, args.image_size, args.bf16, args.channels_last)
        exported = torch.export.export(net, (x,))
        aoti_compile_and_package(
            exported, package_path=str(out / "single.pt2"), inductor_configs=options
        )
        if args.max_batch >= 2:
            # Batch sizes 0 and 1 are specialised by export: the dynamic range starts at 2.
            batch = torch.export.Dim("batch", min=2, max=max(args.max_batch, 3))
            x = _example(2, args.image_size, args.bf16, args.channels_last)
            exported = torch.export.export(net, (x,), dynamic_shapes=({0: batch},))
            aoti_compile_and_package(
                exported, package_path=str(out / "batched.pt2"), inductor_configs=options
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
