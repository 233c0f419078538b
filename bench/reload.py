"""Hot reload under load: seconds from LATEST changing to the first answer from the new version.

    python -m bench.reload [--repeats 8]
    python -m bench.reload --url http://localhost:3000 --models-dir /path/the/server/reads

Client threads post images back to back (the original client's multipart upload) while this
script publishes new versions with shared.store.publish and points LATEST at them. Each new
version holds the weights of the version being served (so a real deployment keeps answering the
same), written and loaded in full. Per swap: time to the first response carrying the new
model_version, time until no request sent after the change is answered by the old one, and
every failed request (any status but 200, any connection error) from start to end.
Without --url a Gunicorn from this checkout serves --models-dir on a free loopback port; by
default that is a throwaway store under volumes/bench/ holding a random-init ResNet-18.
"""

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import servers
from bench.common import WORK_DIR, OtherLoad, header, print_table, write_result
from bench.load import load_images
from bench.traffic import Load, predict_kind, records
from shared import store


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options."""
    p = argparse.ArgumentParser(
        prog="python -m bench.reload",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a("--url", help="a running server that reads --models-dir (default: start one)")
    a(
        "--models-dir",
        help="store the server reads and this script publishes into (needed with --url; "
        "default without: a throwaway store, removed at the end)",
    )
    a("--images", help="folder of images to send (default: generated 32x32 PNGs)")
    a("--concurrency", type=int, default=4, help="client threads (default %(default)s)")
    a("--images-per-request", type=int, default=1, help="default %(default)s")
    a("--repeats", type=int, default=8, help="versions published (default %(default)s)")
    a("--settle", type=float, default=3, help="seconds of load before each swap (default 3)")
    a(
        "--jitter",
        type=float,
        default=2,
        help="random extra wait, s, before each change of LATEST: spreads the changes over "
        "the server's poll cycle (default 2, MODEL_POLL_SECONDS' default)",
    )
    a("--max-wait", type=float, default=30, help="give up on a swap after this many seconds")
    a(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="setting for the started Gunicorn (repeatable), e.g. MODEL_POLL_SECONDS=1",
    )
    a("--out", help="JSON file or folder (default bench/results/reload.json)")
    args = p.parse_args(argv)
    if args.url and not args.models_dir:
        p.error("--url needs --models-dir: the store that server reads")
    return args


def generated_images(count: int = 64) -> list[tuple[str, bytes]]:
    """Small random PNGs, when no image folder is given."""
    import io

    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    images = []
    for i in range(count):
        pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=generator)
        buffer = io.BytesIO()
        Image.fromarray(pixels.numpy()).save(buffer, "PNG")
        images.append((f"random-{i}.png", buffer.getvalue()))
    return images


def ensure_model(models_dir: Path) -> None:
    """Publish a random-init ResNet-18 when the store has no LATEST yet."""
    if store.read_latest(models_dir):
        return
    print(f"{models_dir} has no model: publishing a random-init resnet18")
    servers.publish_model(
        models_dir,
        run_id="bench-reload",
        metrics={"valid_acc": 0.0},
        config={"note": "random init, published by bench.reload"},
    )


def republish(models_dir: Path) -> str:
    """Publish the served version's weights and metadata as a new version, LATEST untouched."""
    current = store.read_latest(models_dir)
    meta = store.read_meta(models_dir, current)
    weights = store.version_dir(models_dir, current) / store.WEIGHTS_FILE
    state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    meta = {k: v for k, v in meta.items() if k not in store.STORE_KEYS}
    meta["republished_from"] = current
    # Version names sort by the second they are made in: keep successive ones in order.
    while store.new_version_name() <= current:
        time.sleep(0.05)
    return store.publish(models_dir, state_dict, meta, make_latest=False)


def since(load: Load, t: float) -> list[tuple]:
    """Records (sent, received, ok, status, version) of the responses received after `t`."""
    # A copy: the client threads keep appending (list() of a list is atomic under the GIL).
    return [r for r in records(list(load.outcomes)) if r[1] >= t]


def swap(load: Load, models_dir: Path, settle: float, jitter: float, max_wait: float) -> dict:
    """Publish, move LATEST, and time how long until the new version answers."""
    old = store.read_latest(models_dir)
    new = republish(models_dir)
    # Let the load settle after writing the weights. The random part moves the change to a
    # different point of the server's poll cycle each time: with a fixed cycle every swap
    # would land at the same phase (seen: five swaps in a row just after a poll).
    time.sleep(settle + random.uniform(0, jitter))
    changed = time.monotonic()  # an upper bound: LATEST changes inside set_latest
    store.set_latest(models_dir, new)
    set_seconds = time.monotonic() - changed
    first_new = None
    while time.monotonic() - changed < max_wait:
        news = [r for r in since(load, changed) if r[4] == new]
        if news:
            first_new = min(r[1] for r in news)
            break
        time.sleep(0.01)
    time.sleep(settle)  # keep the load on: requests after the swap must not fail either
    after = since(load, changed)
    # Requests sent after the change but answered by the old model (several workers swap
    # independently): the last of them marks when the whole server had switched.
    stale = [r[1] for r in after if r[0] >= changed and r[4] == old]
    return {
        "from": old,
        "to": new,
        "first_new_s": None if first_new is None else round(first_new - changed, 3),
        "last_old_s": round(max(stale) - changed, 3) if stale else None,
        "set_latest_s": round(set_seconds, 4),
        "requests_after_change": len(after),
        "failed_after_change": sum(not r[2] for r in after),
    }


def main(args: argparse.Namespace) -> int:
    throwaway = None
    if args.models_dir:
        models_dir = Path(args.models_dir)
    else:
        WORK_DIR.mkdir(parents=True, exist_ok=True)
        models_dir = throwaway = Path(tempfile.mkdtemp(prefix="reload-models-", dir=WORK_DIR))
    images = load_images(Path(args.images), 500) if args.images else generated_images()
    result = header("reload")
    random.seed(0)
    server_env = dict(item.split("=", 1) for item in args.server_env)
    if not args.url:
        models_dir.mkdir(parents=True, exist_ok=True)
        ensure_model(models_dir)

    def measure(url: str) -> tuple[list[dict], int, list[tuple]]:
        swaps = []
        gauge = OtherLoad().start()
        load = Load(url, [predict_kind(images, args.images_per_request)], args.concurrency)
        load.start()
        try:
            time.sleep(args.settle)
            for n in range(args.repeats):
                row = swap(load, models_dir, args.settle, args.jitter, args.max_wait)
                swaps.append(row)
                print(
                    f"swap {n + 1}: first new answer {row['first_new_s']} s after LATEST "
                    f"changed, {row['failed_after_change']} failed",
                    flush=True,
                )
        finally:
            done = records(load.stop())
        result["others_cores"] = gauge.stop()
        failed = [r for r in done if not r[2]]
        return swaps, len(done), failed

    try:
        if args.url:
            swaps, total, failed = measure(args.url.rstrip("/"))
        else:
            with servers.gunicorn(models_dir, WORK_DIR / "logs", server_env) as server:
                swaps, total, failed = measure(server.url)
    finally:
        if throwaway:
            shutil.rmtree(throwaway, ignore_errors=True)
    print()
    print_table(
        [{"n": i + 1, **s} for i, s in enumerate(swaps)],
        [
            ("n", "swap"),
            ("to", "new version"),
            ("first_new_s", "first new answer, s"),
            ("last_old_s", "last old answer, s"),
            ("requests_after_change", "requests"),
            ("failed_after_change", "failed"),
        ],
    )
    firsts = [s["first_new_s"] for s in swaps if s["first_new_s"] is not None]
    worst = max(firsts) if len(firsts) == len(swaps) else None
    print(
        f"worst {worst} s (target <= 3), {len(failed)} failed of {total} requests in the run "
        "(target 0)"
    )
    result.update(
        {
            "settings": {
                "url": args.url,
                "models_dir": None if throwaway else str(models_dir),
                "server_env": server_env,
                "concurrency": args.concurrency,
                "images_per_request": args.images_per_request,
                "repeats": args.repeats,
                "settle_s": args.settle,
                "jitter_s": args.jitter,
                "images": args.images or "generated",
            },
            "swaps": swaps,
            "worst_first_new_s": worst,
            "requests": total,
            "failed": len(failed),
            "failures": [{"status": str(r[3])} for r in failed][:50],
        }
    )
    print(f"wrote {write_result(result, args.out, 'reload.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
