"""Load generator for any deployment of the inference service, plus the two reference points.

    python -m bench.load --url http://localhost:3000 --images DIR \\
        --concurrency 1,4,16 --images-per-request 1,8,32 --duration 20

Each of `concurrency` connections sends, back to back, multipart uploads built exactly like the
original client's: files=[('file', (name, bytes, 'image/jpeg')), ...], from Debian's wrk with
bench/wrk/predict.lua (default where wrk is found, also in .bin/) or from Python threads
(--generator python); bench/generator.py. Per setting (concurrency x images per request):
requests/s, images/s, p50/p95/p99 latency and errors, over `--duration` seconds after
`--warmup` seconds. Only --url is needed.

The generator's own ceiling is measured in the same run, at every setting: the same generator,
bodies and connections against HAProxy answering 200 by itself (bench/balancer.py, trivial).
Each HTTP figure gets its headroom = ceiling req/s / its req/s; under 3 it is flagged (`!`):
that figure may measure the generator, not the server.

With --models-dir (the store the server under test serves), the same run also measures:
  --inprocess  (d) the in-process limit: decode + preprocess + one batched forward per
               images-per-request through the service's own ServedModel, no HTTP, one thread,
               at the layout and precision measured fastest the server's way, compiled
               as the server compiles (AMP, CHANNELS_LAST, CPU_COMPILE from --server-env,
               else the server's defaults);
  --baseline   (e) bench/original_server.py (Flask's development server, one forward per
               file) on a free port, started and stopped here, under the same grid.
--start-server serves --models-dir with this checkout's Gunicorn instead of --url.
"""

import argparse
import contextlib
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

# Before torch loads OpenMP: the in-process limit (d) and the original-style server (e, which
# inherits this environment) run torch with the setting inference/gunicorn.conf.py gives the
# service. Spinning OpenMP threads on a busy 2-core box turn 10 ms forwards into 500 ms ones.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import requests  # noqa: E402
import torch  # noqa: E402

from bench import balancer, servers  # noqa: E402
from bench.common import (  # noqa: E402
    WORK_DIR,
    OtherLoad,
    add_noise_options,
    header,
    print_table,
    wait_for_quiet,
    write_result,
)
from bench.generator import (  # noqa: E402
    MIN_HEADROOM,
    add_headroom,
    run_http,
    run_wrk,
    shown_headroom,
    summarize,
)
from bench.tools import find_tool  # noqa: E402
from inference.predictor import ServedModel  # noqa: E402
from shared.precision import measure_serving  # noqa: E402
from shared.store import load_version, read_latest  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def int_list(text: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16]."""
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers like 1,4,16")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options."""
    p = argparse.ArgumentParser(
        prog="python -m bench.load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a("--url", help="base URL of the deployment, e.g. http://localhost:3000")
    a("--images", required=True, help="folder searched recursively for image files")
    a("--max-files", type=int, default=1000, help="images loaded, spread over DIR (default 1000)")
    a(
        "--concurrency",
        type=int_list,
        default=[1, 4, 16],
        help="connections kept busy (Python: client threads) (default 1,4,16)",
    )
    a("--images-per-request", type=int_list, default=[1, 8, 32], help="default 1,8,32")
    a("--duration", type=float, default=20, help="measured seconds per setting (default 20)")
    a("--warmup", type=float, default=3, help="unmeasured seconds first (default 3)")
    a("--timeout", type=float, default=60, help="per-request timeout, s (default 60)")
    a(
        "--generator",
        choices=["wrk", "python"],
        default=os.environ.get("LOAD_GENERATOR") or ("wrk" if find_tool("wrk") else "python"),
        help="wrk (Debian's, on PATH or in .bin/) or python (threads); default wrk where found, "
        "else python (env LOAD_GENERATOR)",
    )
    a(
        "--wrk-threads",
        type=int,
        default=os.environ.get("WRK_THREADS")
        or "2",  # a string: argparse checks it as --wrk-threads
        help="wrk threads (at most one per connection; default 2, env WRK_THREADS)",
    )
    a("--models-dir", help="the served model store, for --inprocess, --baseline, --start-server")
    a("--inprocess", action="store_true", help="also measure (d), the in-process limit")
    a("--baseline", action="store_true", help="also measure (e), the original-style server")
    a("--start-server", action="store_true", help="serve --models-dir with Gunicorn here")
    a(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="setting for --start-server's Gunicorn (repeatable), e.g. THREADS=32",
    )
    add_noise_options(p, "setting", retries=0)
    a("--label", default="", help="name for this run in the JSON file name")
    a("--out", help="JSON file or folder (default bench/results/load[-LABEL].json)")
    args = p.parse_args(argv)
    if not args.url and not args.start_server:
        p.error("give --url, or --start-server with --models-dir")
    if (args.inprocess or args.baseline or args.start_server) and not args.models_dir:
        p.error("--inprocess, --baseline and --start-server need --models-dir")
    if any("=" not in item for item in args.server_env):
        p.error("--server-env takes NAME=VALUE")
    args.server_env = dict(item.split("=", 1) for item in args.server_env)
    if args.generator not in ("wrk", "python"):  # from LOAD_GENERATOR, which argparse trusts
        p.error(f"LOAD_GENERATOR={args.generator}: expected wrk or python")
    args.wrk = find_tool("wrk")
    if args.generator == "wrk" and args.wrk is None:
        p.error(
            "--generator wrk: no wrk on PATH or in .bin/ (apt-get install wrk; "
            "docs/benchmarks.md says how to carry it)"
        )
    if args.wrk_threads < 1:
        p.error("--wrk-threads must be at least 1")
    return args


def image_paths(folder: Path, limit: int) -> list[Path]:
    """Up to `limit` image files spread evenly over `folder` (sorted walk)."""
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"error: no image files under {folder}")
    step = max(1, len(paths) // limit)
    return paths[::step][:limit]


def load_images(folder: Path, limit: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of the image_paths()."""
    return [(p.name, p.read_bytes()) for p in image_paths(folder, limit)]


def run_inprocess(
    models_dir, images, per_request, duration, warmup, amp, channels_last, compile
) -> dict:
    """(d): the service's own ServedModel (decode, resize, normalize, forward) without HTTP, at
    its own best layout and precision (timed by the server's `measure_serving`, at the batch
    size measured here), compiled as the server compiles (CPU_COMPILE)."""
    loaded = load_version(models_dir, read_latest(models_dir))
    choice = measure_serving(
        loaded.model, loaded.meta["image_size"], loaded.device, amp, channels_last, per_request
    )
    served = ServedModel(loaded, choice, compile=compile)
    served.compile_now()  # as the server does in the background (CPU_COMPILE), before timing
    gauge = OtherLoad().start()
    t0 = time.monotonic()
    window = (t0 + warmup, t0 + warmup + duration)
    done = []
    i = 0
    while time.monotonic() < window[1]:
        batch = [images[(i + j) % len(images)] for j in range(per_request)]
        i += per_request
        sent = time.monotonic()
        probs = served.probabilities(torch.stack([served.prepare(data) for _, data in batch]))
        ok = probs.shape == (per_request, loaded.meta["num_classes"])
        done.append((sent, time.monotonic(), ok, "wrong shape", loaded.version))
    result = summarize(done, per_request, window)
    result["others_cores"] = gauge.stop()
    result.update(choice.as_dict())
    return result


def served_version(url: str) -> str | None:
    """The version GET /model reports (None when the deployment has no such route)."""
    try:
        return requests.get(url + "/model", timeout=10).json().get("version")
    except (requests.RequestException, ValueError):
        return None


def where_time_goes(before: dict, after: dict) -> dict:
    """From two Server.usage() readings: the service's CPU per image, the cores it kept busy,
    and the mean images per forward pass (warm-up included: the same span for all three)."""
    images = after["images"] - before["images"]
    cpu = after["cpu_s"] - before["cpu_s"]
    return {
        "server_cpu_ms_per_image": round(cpu / images * 1000, 2) if images else None,
        "server_cores": round(cpu / max(after["at"] - before["at"], 1e-9), 2),
        "mean_batch": round(images / (after["batches"] - before["batches"]), 2) if images else None,
    }


def measure(
    targets: dict[str, str], images, image_list, ceiling_url, models_dir, args, server=None
) -> list:
    """Every setting, interleaved: per images-per-request n, (d) then each concurrency against
    every target in turn and then the ceiling, so that a burst of load from elsewhere skews no
    single comparison. `server`: the service when started here, for where its time goes."""
    rows = []
    amp = args.server_env.get("AMP") or os.environ.get("AMP") or "auto"
    layout = args.server_env.get("CHANNELS_LAST") or os.environ.get("CHANNELS_LAST") or "auto"
    compile = args.server_env.get("CPU_COMPILE") or os.environ.get("CPU_COMPILE") or "off"

    def generate(url: str, c: int, n: int, warmup: float, check: bool = True) -> dict:
        if args.generator == "wrk":
            run = (args.wrk, url, image_list, c, n, args.duration, warmup, args.timeout)
            return run_wrk(*run, args.wrk_threads)
        return run_http(url, images, c, n, args.duration, warmup, args.timeout, check)

    def sample(name: str, concurrency: int, per_request: int, run, pause: bool = True) -> None:
        # Only servers this script started count as its own CPU use: with --url the server's
        # work shows up as "others", and re-measuring on that basis would never end.
        judged = name != "service" or args.start_server
        attempts = []
        for attempt in range(1 + args.retries):
            if args.quiet_wait:
                wait_for_quiet(args.max_others, args.quiet_wait)
            usage = server.usage() if server and name == "service" else None
            row = run()
            if usage:
                row.update(where_time_goes(usage, server.usage()))
            row.update(server=name, concurrency=concurrency, images_per_request=per_request)
            row["attempt"] = attempt + 1
            if name != "inprocess":
                row["generator"] = args.generator
            print(
                f"{name:>9} c={concurrency:<3} n={per_request:<3} "
                f"{row['images_per_sec']:8.1f} img/s  p99 {row['p99_ms'] or 0:7.1f} ms  "
                f"errors {row['errors']}  other processes {row['others_cores']} cores",
                flush=True,
            )
            attempts.append(row)
            if not judged or (row["others_cores"] or 0) <= args.max_others:
                break
        # Keep the least disturbed attempt.
        rows.append(min(attempts, key=lambda r: r["others_cores"] or 0))
        if pause:
            time.sleep(1)

    for n in args.images_per_request:
        if args.inprocess:
            sample(
                "inprocess",
                1,
                n,
                lambda n=n: run_inprocess(
                    models_dir, images, n, args.duration, args.warmup, amp, layout, compile
                ),
            )
        for c in args.concurrency:
            for name, url in targets.items():
                sample(name, c, n, lambda url=url, c=c, n=n: generate(url, c, n, args.warmup))
            if ceiling_url:
                # The generator alone: the same bodies and connections, an answer that costs
                # nothing. No warm-up: there is nothing to warm.
                run = functools.partial(generate, ceiling_url, c, n, 0, check=False)
                sample("ceiling", c, n, run, pause=False)
    add_headroom(rows)
    return rows


COLUMNS = [
    ("server", "server"),
    ("concurrency", "conc"),
    ("images_per_request", "img/req"),
    ("requests_per_sec", "req/s"),
    ("images_per_sec", "img/s"),
    ("p50_ms", "p50 ms"),
    ("p95_ms", "p95 ms"),
    ("p99_ms", "p99 ms"),
    ("errors", "errors"),
    ("headroom", "headroom"),
    ("client_cpu_cores", "client cores"),
    ("server_cores", "server cores"),
    ("server_cpu_ms_per_image", "server cpu ms/img"),
    ("mean_batch", "img/pass"),
    ("others_cores", "others cores"),
]


def find(rows, server, concurrency, per_request) -> dict | None:
    """The row of one setting, if measured."""
    for row in rows:
        if (row["server"], row["images_per_request"]) == (server, per_request) and (
            concurrency is None or row["concurrency"] == concurrency
        ):
            return row
    return None


def ratios(rows: list[dict]) -> dict:
    """The issue's targets: ours / original at 1 img, conc 16; ours / in-process at 32, conc 4."""
    out = {}
    ours, base = find(rows, "service", 16, 1), find(rows, "original", 16, 1)
    if ours and base and base["images_per_sec"]:
        out["c16_n1_service_over_original"] = ours["images_per_sec"] / base["images_per_sec"]
    ours, limit = find(rows, "service", 4, 32), find(rows, "inprocess", None, 32)
    if ours and limit:
        out["c4_n32_service_over_inprocess"] = ours["images_per_sec"] / limit["images_per_sec"]
    return out


def main(args: argparse.Namespace) -> int:
    paths = image_paths(Path(args.images), args.max_files)
    images = [(p.name, p.read_bytes()) for p in paths]
    print(f"{len(images)} images from {args.images}, {sum(len(d) for _, d in images)} bytes")
    wrk = args.generator == "wrk"
    print(f"load generator: {args.generator}" + (f" ({args.wrk.path})" if wrk else ""))
    result = header("load")
    logs = WORK_DIR / "logs"
    models_dir = Path(args.models_dir) if args.models_dir else None
    with contextlib.ExitStack() as stack:
        # The list of images bench/wrk/predict.lua reads: the same files as the Python clients.
        image_list = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "images.txt"
        image_list.write_text("".join(f"{p.resolve()}\n" for p in paths))
        # Both servers are up for the whole run; the one not being measured sits idle.
        if args.start_server:
            server = stack.enter_context(servers.gunicorn(models_dir, logs, args.server_env))
            seconds = server.wait_compiled()
            print(f"service settled (compiled or eager) {seconds:.1f} s after ready")
            url = server.url
        else:
            url = args.url.rstrip("/")
            server = None
        targets = {"service": url}
        if args.baseline:
            targets["original"] = stack.enter_context(servers.original(models_dir, logs)).url
        try:
            ceiling_url = stack.enter_context(balancer.trivial(logs)).url
        except RuntimeError as exc:  # no haproxy here: every figure is flagged, none hidden
            print(f"warning: the generator's ceiling is not measured: {exc}".splitlines()[0])
            ceiling_url = None
        version = served_version(url)
        if models_dir and version and version != read_latest(models_dir):
            print(f"warning: the server serves {version}, {models_dir}/LATEST names another")
        rows = measure(targets, images, image_list, ceiling_url, models_dir, args, server)

    print()
    print_table([{**row, "headroom": shown_headroom(row)} for row in rows], COLUMNS)
    if any(row.get("headroom_flag") for row in rows):
        print(
            f"! headroom under {MIN_HEADROOM} (or unknown): the load generator's own ceiling is "
            "close, so that figure may measure the generator, not the server"
        )
    summary = ratios(rows)
    if "c16_n1_service_over_original" in summary:
        print(
            f"1 image/request, concurrency 16: service / original = "
            f"{summary['c16_n1_service_over_original']:.2f} (target >= 5, issue 11)"
        )
    if "c4_n32_service_over_inprocess" in summary:
        print(
            f"32 images/request, concurrency 4: service / in-process = "
            f"{summary['c4_n32_service_over_inprocess']:.2f} (target >= 1.0, issue 11)"
        )
    result.update(
        {
            "settings": {
                "url": None if args.start_server else args.url,
                "started_server": args.start_server,
                "server_env": args.server_env,
                "images": args.images,
                "image_files": len(images),
                "concurrency": args.concurrency,
                "images_per_request": args.images_per_request,
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "generator": args.generator,
                "wrk": args.wrk.path if wrk else None,
                "wrk_threads": args.wrk_threads if wrk else None,
                "ceiling": "haproxy answering 200 itself" if ceiling_url else None,
                "min_headroom": MIN_HEADROOM,
                "models_dir": args.models_dir,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "max_others": args.max_others,
                "retries": args.retries,
                "quiet_wait_s": args.quiet_wait,
            },
            "served_version": version,
            "rows": rows,
            "ratios": summary,
        }
    )
    name = f"load-{args.label}.json" if args.label else "load.json"
    print(f"wrote {write_result(result, args.out, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
