"""Replicas behind the load balancer: throughput of 1 vs N replicas, and reload propagation.

    python -m bench.replicas --images DIR [--replicas 1,3] [--duration 15]

For each replica count: that many Gunicorn replicas on one store (this checkout's, on loopback)
behind HAProxy run from deploy/haproxy/haproxy.cfg (bench/balancer.py), the same closed-loop
load as bench.load through the balancer, then `--reloads` new versions published one after the
other, each timed from the LATEST change until every replica's GET /model names it.
"""

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

from bench import servers
from bench.balancer import haproxy
from bench.common import WORK_DIR, header, print_table, write_result
from bench.generator import run_http
from bench.load import int_list, load_images
from shared.device import usable_cpu_count
from shared.store import set_latest

COLUMNS = [
    ("replicas", "replicas"),
    ("images_per_sec", "images/s"),
    ("requests_per_sec", "req/s"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("errors", "errors"),
    ("answered_by", "replicas answering"),
    ("reload_max_s", "reload, worst s"),
    ("client_cpu_cores", "client cores"),
    ("others_cores", "others cores"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--images", required=True, help="folder searched recursively for image files")
    a("--max-files", type=int, default=1000, help="images loaded (default 1000)")
    a("--replicas", type=int_list, default=[1, 3], help="replica counts (default 1,3)")
    a("--concurrency", type=int, default=8, help="client threads (default 8)")
    a("--images-per-request", type=int, default=8, help="default 8")
    a("--duration", type=float, default=15, help="measured seconds per count (default 15)")
    a("--warmup", type=float, default=3, help="unmeasured seconds first (default 3)")
    a("--reloads", type=int, default=3, help="versions published per count (default 3)")
    a("--poll-seconds", type=float, default=2.0, help="MODEL_POLL_SECONDS (default 2)")
    a("--torch-threads", type=int, default=0, help="TORCH_THREADS per replica (0: cores / N)")
    a("--out", help="JSON file or folder (default bench/results/replicas.json)")
    return p.parse_args(argv)


def time_reload(replicas: list[servers.Server], models_dir: Path, seed: int) -> float:
    """Publish a new version; seconds from the LATEST change until every replica serves it."""
    version = servers.publish_model(models_dir, seed=seed, make_latest=False)
    start = time.monotonic()
    set_latest(models_dir, version)
    for replica in replicas:
        replica.wait_for(lambda r=replica: r.model_version() == version, 60, version)
    return time.monotonic() - start


def run_count(count: int, images, args: argparse.Namespace, work: Path) -> dict:
    """One row: `count` replicas behind HAProxy, measured."""
    models_dir = work / f"models-{count}"
    servers.publish_model(models_dir, seed=0)
    cores = usable_cpu_count()
    threads = args.torch_threads or max(1, cores // count)
    env = {"MODEL_POLL_SECONDS": str(args.poll_seconds), "TORCH_THREADS": str(threads)}
    # One worker per replica: the replicas already split the cores (WORKERS=auto would run
    # several in each, every one with a model copy and TORCH_THREADS threads).
    env |= {"ACCESS_LOG": "", "WORKERS": "1"}
    with contextlib.ExitStack() as stack:
        replicas = [
            stack.enter_context(servers.gunicorn(models_dir, work / "logs", env, wait=None))
            for _ in range(count)
        ]
        for replica in replicas:
            replica.wait_answering("/health/ready")
        balancer = stack.enter_context(haproxy([r.port for r in replicas], work / "lb"))
        time.sleep(2)  # the first health checks
        row = run_http(
            balancer.url,
            images,
            args.concurrency,
            args.images_per_request,
            args.duration,
            args.warmup,
            60,
        )
        # HAProxy's request log names the server of every request: how many replicas answered.
        row["answered_by"] = sum(
            f"inference/inference{n} " in balancer.log() for n in range(1, count + 1)
        )
        reloads = [time_reload(replicas, models_dir, seed) for seed in range(1, args.reloads + 1)]
    row.update(
        replicas=count,
        torch_threads=threads,
        reload_s=[round(r, 2) for r in reloads],
        reload_max_s=round(max(reloads), 2) if reloads else None,
    )
    return row


def main(args: argparse.Namespace) -> int:
    """Measure each replica count and write the result file."""
    images = load_images(Path(args.images), args.max_files)
    result = header("replicas")
    work = Path(tempfile.mkdtemp(prefix="replicas-", dir=WORK_DIR if WORK_DIR.exists() else None))
    rows = [run_count(count, images, args, work) for count in args.replicas]
    print()
    print_table(rows, COLUMNS)
    result.update(settings=vars(args), rows=rows)
    print(f"wrote {write_result(result, args.out, 'replicas.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))
