"""bench.load against a real Gunicorn on a tiny store: the figures, the generator's ceiling and
each figure's headroom are reported, and a server's error answers are counted, not hidden.

One short setting per run (1 s, no warm-up); the figures mean nothing at this size, only their
presence and the error counts are checked. wrk is Debian's (.ci/run installs it).
"""

import json
import os

import pytest

from bench import load
from bench.servers import gunicorn
from bench.tools import find_tool
from tests.conftest import make_image_folders, publish_random_model

WRK = find_tool("wrk")
needs_wrk = pytest.mark.skipif(
    WRK is None and not os.environ.get("CI"), reason="wrk is not installed (apt-get install wrk)"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The service as deployed, serving a random-init model."""
    root = tmp_path_factory.mktemp("load")
    publish_random_model(root / "models")
    with gunicorn(root / "models", root, {"THREADS": "4", "ACCESS_LOG": ""}) as running:
        yield running


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folders(tmp_path_factory.mktemp("images"), per_class=2) / "train"


def run_load(url: str, images, tmp_path, monkeypatch, *options: str) -> dict:
    """python -m bench.load for one 1-second setting (2 connections x 2 images): its result."""
    monkeypatch.chdir(tmp_path)  # its logs go to ./volumes/bench
    out = tmp_path / "load.json"
    args = ["--url", url, "--images", str(images), "--concurrency", "2"]
    args += ["--images-per-request", "2", "--duration", "1", "--warmup", "0", "--out", str(out)]
    assert load.main(load.parse_args([*args, *options])) == 0
    return json.loads(out.read_text())


@needs_wrk
def test_wrk_load_reports_rates_percentiles_ceiling_and_headroom(
    server, images, tmp_path, monkeypatch, capsys
):
    result = run_load(server.url, images, tmp_path, monkeypatch, "--generator", "wrk")
    printed = capsys.readouterr().out
    rows = {row["server"]: row for row in result["rows"]}
    assert set(rows) == {"service", "ceiling"}
    service, ceiling = rows["service"], rows["ceiling"]
    assert service["generator"] == "wrk" and result["settings"]["generator"] == "wrk"
    assert service["requests_per_sec"] > 0 and service["errors"] == 0, service
    assert service["images_per_sec"] == pytest.approx(2 * service["requests_per_sec"])
    assert 0 < service["p50_ms"] <= service["p95_ms"] <= service["p99_ms"], service
    assert ceiling["requests_per_sec"] > 0 and ceiling["errors"] == 0, ceiling
    expected = round(ceiling["requests_per_sec"] / service["requests_per_sec"], 2)
    assert service["headroom"] == expected
    assert service["headroom_flag"] == (expected < load.MIN_HEADROOM)
    assert "headroom" in printed and f"{expected:.1f}" in printed


@pytest.mark.parametrize("generator", [pytest.param("wrk", marks=needs_wrk), "python"])
def test_error_answers_are_counted(server, images, tmp_path, monkeypatch, generator):
    # A real server answering 404: the service has no /missing/predict.
    url = server.url + "/missing"
    result = run_load(url, images, tmp_path, monkeypatch, "--generator", generator)
    rows = {row["server"]: row for row in result["rows"]}
    service, ceiling = rows["service"], rows["ceiling"]
    assert ceiling["requests_per_sec"] > 0 and ceiling["errors"] == 0, ceiling
    assert service["errors"] > 0 and service["requests_per_sec"] == 0, service
    assert set(service["error_kinds"]) == {"404"}, service
    # No good answer, no headroom to speak of: flagged, never a figure that looks fine.
    assert service["headroom"] is None and service["headroom_flag"] is True
