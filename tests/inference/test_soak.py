"""Soak: a real Gunicorn under 16 concurrent clients, good uploads mixed with hostile ones.

Promises checked over the whole run: no 5xx, no dropped connection, every answer correct for
what was sent, no worker lost, and server memory (master + workers) flat after warm-up.
"""

import json
import time
import unicodedata
from pathlib import Path

import pytest

from tests import hostile
from tests.inference.serving import image_bytes, publish_model, run_server, wait_ready
from tests.inference.traffic import DROPPED, Kind, Load, MemorySampler, process_tree, summary

SOAK_SECONDS = 60
WARM_UP_SECONDS = 20  # every kind of request has run on every thread by then
CONCURRENCY = 16
MAX_MEMORY_GROWTH = 0.15
MAX_UPLOAD_MB = 2
MAX_FILES = 24
TIMEOUT_S = 60

GOOD = [image_bytes(fmt="PNG"), image_bytes(size=(64, 48), color=(20, 200, 90), fmt="JPEG")]


def files(*items: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes]]]:
    """requests' files= list with every part in the `file` field."""
    return [("file", item) for item in items]


def expect_predictions(count: int, bad: tuple[int, ...] = (), top_k: int = 0):
    """A check: `count` entries, those at `bad` with an invalid_image error, others predicted."""

    def check(response) -> str | None:
        entries = response.json().get("predictions", [])
        if len(entries) != count:
            return f"{len(entries)} predictions for {count} files"
        for i, entry in enumerate(entries):
            if i in bad and entry.get("error", {}).get("code") != "invalid_image":
                return f"file {i} should be refused: {entry}"
            if i not in bad and ("category" not in entry or len(entry.get("top_k", [])) != top_k):
                return f"file {i} should be predicted: {entry}"
        return None

    return check


def safe_echo(response) -> str | None:
    """File names come back without control or format characters, at most 255 long."""
    for entry in response.json().get("predictions", []):
        name = entry.get("filename", "")
        if len(name) > 255 or any(unicodedata.category(c)[0] == "C" for c in name):
            return f"unsafe file name echoed: {name!r}"
    return None


def post(path: str = "/predict", **kwargs):
    """A `send` function posting `kwargs` (rebuilt per request: generators are single-use)."""

    def send(session, url):
        built = {k: v() if callable(v) else v for k, v in kwargs.items()}
        return session.post(url + path, timeout=TIMEOUT_S, **built)

    return send


def soak_kinds(marker_dir: Path) -> list[Kind]:
    """The mix: about half good requests, the rest every hostile upload of the issue."""
    good, jpeg = GOOD
    bombs = list(hostile.BOMBS.values())
    evil = [n.replace(b"{marker}", marker_dir.name.encode()) for n in hostile.EVIL_FILENAMES]
    raw = {"Content-Type": hostile.MULTIPART}
    big_name = hostile.form(hostile.file_part(b"n" * 400_000 + b".png", good))
    many_header_lines = b"\r\n".join(b"X-Filler-%d: v" % i for i in range(40_000))
    huge_headers = hostile.form(
        hostile.part(
            b'Content-Disposition: form-data; name="file"; filename="h.png"\r\n'
            + many_header_lines,
            good,
        )
    )
    evil_form = hostile.form(*(hostile.file_part(name, good) for name in evil))
    return [
        Kind("one_good", 20, post(files=files(("a.png", good))), (200,), expect_predictions(1)),
        Kind(
            "three_good_top_k",
            15,
            post("/predict?top_k=3", files=files(("a.png", good), ("b.jpg", jpeg), ("c", good))),
            (200,),
            expect_predictions(3, top_k=3),
        ),
        Kind(
            "good_mixed_with_bad",
            15,
            lambda s, url: s.post(
                url + "/predict",
                files=files(
                    ("ok.png", good),
                    ("bomb.png", bombs[int(time.monotonic() * 1000) % len(bombs)]),
                    ("cut.jpg", hostile.truncated_jpeg()),
                    ("noise.bin", bytes(range(256)) * 20),
                    ("ok.jpg", jpeg),
                ),
                timeout=TIMEOUT_S,
            ),
            (200,),
            expect_predictions(5, bad=(1, 2, 3)),
        ),
        Kind(
            "only_bombs",
            8,
            post(files=files(*((f"bomb{i}", b) for i, b in enumerate(bombs)))),
            (422,),
            expect_predictions(len(bombs), bad=tuple(range(len(bombs)))),
        ),
        Kind(
            "oversize_chunked",
            5,
            post(
                data=lambda: hostile.chunks(hostile.oversize_form(MAX_UPLOAD_MB + 1)), headers=raw
            ),
            (413,),
            fresh_connection=True,
        ),
        Kind(
            "oversize_with_length",
            3,
            post(data=hostile.oversize_form(MAX_UPLOAD_MB + 1), headers=raw),
            (413,),
            fresh_connection=True,
        ),
        Kind(
            "tiny_parts",
            5,
            post(data=hostile.tiny_parts_form(3000), headers=raw),
            (413,),
            fresh_connection=True,
        ),
        Kind(
            "huge_filename_header",
            5,
            post(data=big_name, headers=raw),
            (200,),
            lambda r: safe_echo(r) or expect_predictions(1)(r),
        ),
        Kind(
            "huge_part_headers",
            4,
            post(data=huge_headers, headers=raw),
            (413,),
            fresh_connection=True,
        ),
        Kind(
            "evil_filenames",
            8,
            post(data=evil_form, headers=raw),
            (200,),
            lambda r: safe_echo(r) or expect_predictions(len(evil))(r),
        ),
        Kind(
            "random_body",
            5,
            post(data=bytes(range(256)) * 40, headers=raw),
            (400,),
        ),
    ]


@pytest.mark.slow
def test_soak_16_clients_hostile_mix_no_5xx_no_drops_flat_memory(tmp_path):
    models_dir = tmp_path / "models"
    version = publish_model(models_dir)
    marker_dir = Path("/tmp") / f"soak-marker-{tmp_path.name}-{time.time_ns()}"
    marker_dir.mkdir()
    try:
        with run_server(
            models_dir,
            tmp_path,
            THREADS=str(CONCURRENCY),
            MAX_UPLOAD_MB=str(MAX_UPLOAD_MB),
            MAX_FILES=str(MAX_FILES),
        ) as server:
            wait_ready(server)
            workers_before = process_tree(server.proc.pid)
            sampler = MemorySampler(server.proc.pid, interval=1.0).start()
            start = time.monotonic()
            load = Load(server.url, soak_kinds(marker_dir), CONCURRENCY, seed=1).start()
            time.sleep(SOAK_SECONDS)
            outcomes = load.stop()
            end = time.monotonic()
            sampler.stop()
            workers_after = process_tree(server.proc.pid)
            assert server.get("/health/ready").status_code == 200
            log = server.log()
        written = list(marker_dir.rglob("*"))
    finally:
        for path in sorted(marker_dir.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        marker_dir.rmdir()

    report = summary(outcomes)
    print(report)
    assert len(outcomes) > 200, report  # the load really ran
    assert not [o for o in outcomes if o.status >= 500], report
    assert not [o for o in outcomes if o.status == DROPPED], report
    assert not [o for o in outcomes if o.problem], report
    assert {o.version for o in outcomes if o.version} == {version}
    assert {k.name for k in soak_kinds(marker_dir)} == {o.kind for o in outcomes}, report
    assert not written, f"an uploaded file name was used as a path: {written}"
    assert workers_after == workers_before, "a worker died or was restarted during the soak"
    assert "Traceback" not in log

    # Memory: median of the last 5 s against the 5 s that end the warm-up.
    warm = sampler.median_between(start + WARM_UP_SECONDS - 5, start + WARM_UP_SECONDS)
    final = sampler.median_between(end - 5, end)
    growth = final / warm - 1
    trace = json.dumps([round(b / 2**20) for _, b in sampler.samples])
    print(f"server RSS after warm-up {warm / 2**20:.0f} MiB, at the end {final / 2**20:.0f} MiB")
    print(f"server RSS every second (MiB): {trace}")
    assert growth < MAX_MEMORY_GROWTH, f"memory grew {growth:.1%} after warm-up (MiB): {trace}"
