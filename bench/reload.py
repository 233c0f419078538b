"""Hot reload under load: seconds from LATEST changing to the first answer from the new version.

    python -m bench.reload [--repeats 5]
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
import threading
import time
from pathlib import Path

import requests
import torch

from bench import servers
from bench.common import WORK_DIR, OtherLoad, header, print_table, write_result
from bench.load import load_images
from shared import store
from shared.classes import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD
from shared.model import build_model

# model.json keys that publish() writes itself.
OWN_KEYS = ("format_version", "version", "created_at", "num_classes", "sha256")


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
    a("--out", help="JSON path (default bench/results/reload.json)")
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
    torch.manual_seed(0)
    meta = {
        "run_id": "bench-reload",
        "arch": "resnet18",
        "class_names": list(CIFAR10_CLASSES),
        "image_size": 32,
        "mean": list(CIFAR10_MEAN),
        "std": list(CIFAR10_STD),
        "metrics": {"valid_acc": 0.0},
        "config": {"note": "random init, published by bench.reload"},
    }
    print(f"{models_dir} has no model: publishing a random-init resnet18")
    store.publish(models_dir, build_model("resnet18", 10).state_dict(), meta)


def republish(models_dir: Path) -> str:
    """Publish the served version's weights and metadata as a new version, LATEST untouched."""
    current = store.read_latest(models_dir)
    meta = store.read_meta(models_dir, current)
    weights = store.version_dir(models_dir, current) / store.WEIGHTS_FILE
    state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    meta = {k: v for k, v in meta.items() if k not in OWN_KEYS}
    meta["republished_from"] = current
    # Version names sort by the second they are made in: keep successive ones in order.
    while store.new_version_name() <= current:
        time.sleep(0.05)
    return store.publish(models_dir, state_dict, meta, make_latest=False)


class Load:
    """Client threads posting back to back and recording every response."""

    def __init__(self, url: str, images, concurrency: int, per_request: int) -> None:
        self.url, self.images, self.per_request = url, images, per_request
        self.records: list[tuple] = []  # (sent, received, ok, status, model_version)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._client, args=(k,)) for k in range(concurrency)
        ]

    def _client(self, k: int) -> None:
        session = requests.Session()
        i = k * 101
        while not self.stop.is_set():
            batch = [self.images[(i + j) % len(self.images)] for j in range(self.per_request)]
            i += self.per_request
            files = [("file", (name, data, "image/jpeg")) for name, data in batch]
            sent = time.perf_counter()
            version = None
            try:
                response = session.post(self.url + "/predict", files=files, timeout=60)
                status = response.status_code
                version = response.json().get("model_version")
                ok = status == 200
            except (requests.RequestException, ValueError) as exc:
                ok, status = False, type(exc).__name__
            with self.lock:
                self.records.append((sent, time.perf_counter(), ok, status, version))
        session.close()

    def since(self, t: float) -> list[tuple]:
        """Records of responses received after `t`."""
        with self.lock:
            return [r for r in self.records if r[1] >= t]

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def swap(load: Load, models_dir: Path, settle: float, jitter: float, max_wait: float) -> dict:
    """Publish, move LATEST, and time how long until the new version answers."""
    old = store.read_latest(models_dir)
    new = republish(models_dir)
    # Let the load settle after writing the weights. The random part moves the change to a
    # different point of the server's poll cycle each time: with a fixed cycle every swap
    # would land at the same phase (seen: five swaps in a row just after a poll).
    time.sleep(settle + random.uniform(0, jitter))
    changed = time.perf_counter()  # an upper bound: LATEST changes inside set_latest
    store.set_latest(models_dir, new)
    set_seconds = time.perf_counter() - changed
    first_new = None
    while time.perf_counter() - changed < max_wait:
        news = [r for r in load.since(changed) if r[4] == new]
        if news:
            first_new = min(r[1] for r in news)
            break
        time.sleep(0.01)
    time.sleep(settle)  # keep the load on: requests after the swap must not fail either
    after = load.since(changed)
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
        with Load(url, images, args.concurrency, args.images_per_request) as load:
            time.sleep(args.settle)
            for n in range(args.repeats):
                row = swap(load, models_dir, args.settle, args.jitter, args.max_wait)
                swaps.append(row)
                print(
                    f"swap {n + 1}: first new answer {row['first_new_s']} s after LATEST "
                    f"changed, {row['failed_after_change']} failed",
                    flush=True,
                )
        result["others_cores"] = gauge.stop()
        failed = [r for r in load.records if not r[2]]
        return swaps, len(load.records), failed

    try:
        if args.url:
            swaps, total, failed = measure(args.url.rstrip("/"))
        else:
            log = WORK_DIR / "logs" / "reload-gunicorn.log"
            with servers.gunicorn(models_dir, log, server_env) as url:
                swaps, total, failed = measure(url)
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
