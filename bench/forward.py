"""Forward-pass cost per batch size: as the service runs it, and the variants worth considering.

    python -m bench.forward [--models-dir volumes/bench/models] [--batch-sizes 1,8,16,32,64]

The service serves shared.model.for_inference: BatchNorm folded into the convs, channels_last,
and bf16 weights where AMP picks bf16, compiled ahead of time on a CPU (CPU_COMPILE). The other
rows show what each step buys: the model as loaded, channels_last alone, and bf16 autocast
(what the trainer validates with). Variants are
timed interleaved, `--rounds` times; the table shows the fastest round.
"""

import argparse
import copy
import os
import sys
import time

# As inference/gunicorn.conf.py sets it for the service, before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from bench.common import header, print_table, write_result  # noqa: E402
from bench.load import int_list  # noqa: E402
from inference.compiled import Compilation  # noqa: E402
from shared.model import build_model, for_inference  # noqa: E402
from shared.store import load_version, read_latest  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options."""
    p = argparse.ArgumentParser(prog="python -m bench.forward", description=__doc__)
    p.add_argument("--models-dir", help="serve LATEST of this store (default: random resnet18)")
    p.add_argument("--batch-sizes", type=int_list, default=[1, 8, 16, 32, 64])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: cores)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument(
        "--compile",
        choices=["auto", "off"],
        default=os.environ.get("CPU_COMPILE") or "off",
        help="also time the service's compiled pass (about a minute to build on 2 cores); "
        "default env CPU_COMPILE, else off",
    )
    p.add_argument("--out", help="JSON file or folder (default bench/results/forward-cpu.json)")
    return p.parse_args(argv)


def compiled(model: torch.nn.Module, arch: str, size: int, max_batch: int):
    """The fp32 folded channels_last copy as the service compiles it (CPU_COMPILE), used at every
    batch size (as CPU_COMPILE=on); None, with the reason printed, where it does not build."""
    net = for_inference(model)
    classes = model.fc.out_features
    compilation = Compilation(
        net, arch, classes, size, False, True, max_batch, only_if_faster=False
    )
    built, note = compilation.run()
    print(f"compiled: {note}")
    return built


def variants(model: torch.nn.Module, arch: str, size: int, args) -> dict:
    """name -> function(normalized float batch) -> logits."""
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    folded = for_inference(model)
    folded_bf16 = for_inference(model, bf16=True)
    packages = None
    if args.compile != "off":
        packages = compiled(model, arch, size, max(args.batch_sizes))

    def channels_last(net, dtype=torch.float32):
        return lambda x: net(x.to(dtype).contiguous(memory_format=torch.channels_last)).float()

    def autocast(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return cl(x.contiguous(memory_format=torch.channels_last)).float()

    return {
        "fp32 as loaded": model,
        "fp32 channels_last": channels_last(cl),
        "fp32 folded, channels_last (AMP=off)": channels_last(folded),
        "bf16 autocast, channels_last": autocast,
        "bf16 weights folded, channels_last (AMP=bf16)": channels_last(folded_bf16, torch.bfloat16),
    } | (
        {"fp32 folded, channels_last, compiled (CPU_COMPILE)": channels_last(packages)}
        if packages
        else {}
    )


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.models_dir:
        loaded = load_version(args.models_dir, read_latest(args.models_dir))
        model, size, arch = loaded.model, loaded.meta["image_size"], loaded.meta["arch"]
    else:
        model, size, arch = build_model("resnet18", 10).eval(), 32, "resnet18"
    result = header("forward")
    fns = variants(model, arch, size, args)
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
