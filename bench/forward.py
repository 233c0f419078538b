"""Forward-pass cost per batch size: as the service runs it, and the variants worth considering.

    python -m bench.forward [--models-dir volumes/bench/models] [--batch-sizes 1,8,16,32,64]

The service's forward (inference/predictor.py) is fp32 on contiguous tensors. The variants are
channels_last, and bf16 autocast with channels_last (what the trainer uses on CPUs with bf16
units). Variants are timed interleaved, `--rounds` times; the table shows the fastest round.
"""

import argparse
import copy
import os
import sys
import time

# As inference/gunicorn.conf.py sets it for the service, before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch.fx.experimental.optimization import fuse  # noqa: E402

from bench.common import header, print_table, write_result  # noqa: E402
from bench.load import int_list  # noqa: E402
from shared.model import build_model  # noqa: E402
from shared.store import load_version, read_latest  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options."""
    p = argparse.ArgumentParser(prog="python -m bench.forward", description=__doc__)
    p.add_argument("--models-dir", help="serve LATEST of this store (default: random resnet18)")
    p.add_argument("--batch-sizes", type=int_list, default=[1, 8, 16, 32, 64])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: cores)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--out", help="JSON path (default bench/results/forward-cpu.json)")
    return p.parse_args(argv)


def variants(model: torch.nn.Module) -> dict:
    """name -> function(normalized float batch) -> logits."""
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    # BatchNorm folded into the preceding conv (eval only): one op less per layer.
    folded = fuse(copy.deepcopy(model)).to(memory_format=torch.channels_last)

    def channels_last(net):
        return lambda x: net(x.contiguous(memory_format=torch.channels_last))

    def bf16(net):
        def run(x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return net(x.contiguous(memory_format=torch.channels_last)).float()

        return run

    return {
        "fp32 (as served)": model,
        "fp32 channels_last": channels_last(cl),
        "fp32 channels_last, BN folded": channels_last(folded),
        "bf16 channels_last": bf16(cl),
        "bf16 channels_last, BN folded": bf16(folded),
    }


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.models_dir:
        loaded = load_version(args.models_dir, read_latest(args.models_dir))
        model, size, arch = loaded.model, loaded.meta["image_size"], loaded.meta["arch"]
    else:
        model, size, arch = build_model("resnet18", 10).eval(), 32, "resnet18"
    result = header("forward")
    fns = variants(model)
    times: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for n in args.batch_sizes:
                x = torch.randn(n, 3, size, size)
                for name, fn in fns.items():
                    fn(x)  # warm-up: oneDNN picks its kernels for this shape
                    iters = max(3, 128 // n)
                    start = time.perf_counter()
                    for _ in range(iters):
                        fn(x)
                    ms = (time.perf_counter() - start) / iters * 1000
                    times.setdefault((name, n), []).append(ms)
    rows = []
    for name in fns:
        for n in args.batch_sizes:
            best = min(times[(name, n)])
            rows.append(
                {"variant": name, "batch": n, "ms": best, "images_per_sec": n / best * 1000}
            )
    print(f"{arch} at {size} px, {torch.get_num_threads()} torch threads, fastest of {args.rounds}")
    print_table(
        rows,
        [("variant", "forward"), ("batch", "batch"), ("ms", "ms"), ("images_per_sec", "img/s")],
    )
    result.update({"settings": vars(args) | {"arch": arch, "image_size": size}, "rows": rows})
    print(f"wrote {write_result(result, args.out, 'forward-cpu.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
