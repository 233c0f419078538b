"""The benchmark scripts run end to end on tiny data and write the results they promise.

Their figures are meaningless at this size: docs/benchmarks.md has the real ones. These tests
only keep the scripts working (real trainer, real Gunicorn, real original-style server).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, make_image_folders, publish_random_model

pytestmark = pytest.mark.slow


def bench(module: str, *args: str, cwd: Path, timeout: float = 300) -> dict:
    """Run `python -m bench.<module> --out cwd/<module>.json ...`; return the JSON it wrote."""
    out = cwd / f"{module}.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            f"bench.{module}",
            "--out",
            str(out),
            *args,
        ],  # args may end in "-- ..."
        cwd=cwd,  # the scripts keep their state in ./volumes/bench
        # This checkout's bench/, wherever the package is installed from.
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == module and result["machine"]["cores"] >= 1
    return result


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folders(tmp_path_factory.mktemp("bench-data") / "data", per_class=8)


def test_train_throughput_measures_the_three_pipelines(data, tmp_path):
    result = bench(
        "train_throughput",
        *("--data-dir", str(data), "--batch-size", "8", "--steps", "2", "--warmup-steps", "1"),
        *("--repeats", "1", "--workers", "0"),
        cwd=tmp_path,
    )
    assert result["settings"]["batch_size"] == 8
    assert result["ratios"]["a_over_b"] > 0 and result["ratios"]["a_over_c"] > 0


def test_time_to_accuracy_runs_the_trainer_and_times_each_epoch(data, tmp_path):
    result = bench(
        "time_to_accuracy",
        *("--data-dir", str(data), "--epochs", "2", "--device", "cpu"),
        *("--", "--batch-size", "16"),
        cwd=tmp_path,
    )
    assert [row["epoch"] for row in result["epochs"]] == [1, 2]
    walls = [row["wall_seconds"] for row in result["epochs"]]
    assert 0 < walls[0] < walls[1] <= result["total_wall_seconds"]
    assert result["published_version"]
    assert (tmp_path / "volumes/bench/models" / result["published_version"] / "model.pt").is_file()


def test_forward_load_reload_and_report(data, tmp_path):
    models = tmp_path / "models"
    publish_random_model(models)
    forward = bench(
        "forward",
        "--models-dir",
        str(models),
        "--batch-sizes",
        "1,2",
        "--rounds",
        "1",
        cwd=tmp_path,
    )
    assert {row["batch"] for row in forward["rows"]} == {1, 2}

    load = bench(
        "load",
        *("--start-server", "--models-dir", str(models), "--images", str(data / "train")),
        *("--concurrency", "2", "--images-per-request", "1,4", "--duration", "1"),
        *("--warmup", "0", "--inprocess", "--baseline"),
        cwd=tmp_path,
    )
    rows = {(r["server"], r["concurrency"], r["images_per_request"]): r for r in load["rows"]}
    assert set(rows) == {
        (server, c, n)
        for n in (1, 4)
        for server, c in (("inprocess", 1), ("service", 2), ("original", 2), ("ceiling", 2))
    }
    for (server, _, _), row in rows.items():
        assert row["errors"] == 0 and row["images_per_sec"] > 0, row
        # Both servers' figures, and only theirs, are weighed against the generator's ceiling.
        assert ("headroom" in row) == (server in ("service", "original")), row
        if server == "service":  # started here: where its time goes, from its own counters
            assert row["mean_batch"] >= 1 and row["server_cpu_ms_per_image"] > 0, row

    reload = bench("reload", "--repeats", "1", "--settle", "0.5", "--jitter", "0", cwd=tmp_path)
    assert len(reload["swaps"]) == 1 and reload["failed"] == 0
    assert reload["worst_first_new_s"] < 30

    report = subprocess.run(
        [sys.executable, "-m", "bench.report", *(str(p) for p in tmp_path.glob("*.json"))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert report.returncode == 0, report.stderr
    assert report.stdout.count("### ") == 3


def test_decode_times_the_first_the_cached_and_the_uncached_load(data, tmp_path):
    cache = tmp_path / "cache"
    result = bench("decode", "--data-dir", str(data), "--cache-dir", str(cache), cwd=tmp_path)
    times = result["decode"]
    assert min(times["first_seconds"], times["cached_seconds"], times["off_seconds"]) > 0
    assert len(list(cache.iterdir())) == 1  # the file the cached load read


def test_gpu_bench_cpu_smoke_runs_every_step_and_writes_one_json(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--cpu-smoke", "--out", str(out)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "gpu" and result["mode"] == "cpu-smoke"
    assert result["decode"]["first_seconds"] > 0 and result["decode"]["cached_seconds"] > 0
    assert result["train_throughput"]["ratios"]["a_over_b"] > 0
    assert [r["epoch"] for r in result["time_to_accuracy"]["epochs"]] == [1]
    graphs = result["cuda_graphs"]
    assert graphs["graphs"] == "off (CPU)" and graphs["failed"] == []
    assert [row["batch"] for row in graphs["forward"]] == [1, 8]
    # On the CPU both copies run the same eager pass: identical answers.
    assert graphs["agreement"] and all(c["max_abs_diff"] == 0.0 for c in graphs["agreement"])
    assert set(result["serving"]) == {"workers_1", "workers_2"}
    for grid in result["serving"].values():
        assert {(r["server"], r["concurrency"], r["images_per_request"]) for r in grid["rows"]} == {
            (server, 2, n) for server in ("service", "ceiling") for n in (1, 4)
        }
