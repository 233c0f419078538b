"""Settings the server is started with: refused at start with one line, honoured when valid."""

import io
import os
import socket
import subprocess
import sys

import pytest
import torch

from inference import create_app
from inference.config import AUTO_MAX_WORKERS, load_config, resolve_workers
from shared.device import usable_cpu_count
from tests.inference.serving import REPO, free_port, gunicorn_command, image_bytes, publish_model


def start_and_wait_for_exit(tmp_path, **env: str) -> tuple[int, str]:
    """Start Gunicorn with `env`; it must exit by itself. (exit code, everything it printed)."""
    full_env = {**os.environ, "MODELS_DIR": str(tmp_path), "PORT": str(free_port()), **env}
    full_env["BIND_ADDRESS"] = "127.0.0.1"
    result = subprocess.run(
        gunicorn_command(), cwd=REPO, env=full_env, capture_output=True, text=True, timeout=180
    )
    return result.returncode, result.stdout + result.stderr


def test_malformed_setting_stops_the_server_at_start_with_one_line(tmp_path):
    # Read by gunicorn.conf.py in the master, through the same table as the app's settings.
    code, output = start_and_wait_for_exit(tmp_path, WORKERS="two")
    assert code != 0
    assert output.strip() == (
        "error: WORKERS='two': must be auto or a whole number >= 1 (Gunicorn worker processes, "
        "each with its own model copy; auto: from the device and the CPU cores (also sizes "
        "TORCH_THREADS))"
    )


@pytest.mark.slow  # the worker imports torch before it can refuse: ~30 s on a busy 2-core box
def test_device_the_machine_lacks_stops_the_server_at_start_with_one_line(tmp_path):
    missing = f"cuda:{torch.cuda.device_count()}"
    code, output = start_and_wait_for_exit(tmp_path, DEVICE=missing)
    assert code == 4  # Gunicorn's "App failed to load": the master stops, no respawn loop
    assert f"error: DEVICE={missing}: " in output
    assert "Traceback" not in output


@pytest.mark.skipif(sys.platform != "linux", reason="127.0.0.2 is a loopback address on Linux")
def test_bind_address_limits_the_addresses_the_server_answers_on(server):
    # The test runner starts Gunicorn with BIND_ADDRESS=127.0.0.1: another loopback address of
    # this machine, which 0.0.0.0 would answer on, must be refused.
    assert server.get("/health/live").status_code == 200
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", server.port), timeout=5).close()


def test_predictor_starts_where_os_has_no_sched_getaffinity(monkeypatch, tmp_path):
    # macOS and Windows have no os.sched_getaffinity (nor, before 3.13, process_cpu_count).
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.delattr(os, "process_cpu_count", raising=False)
    usable_cpu_count.cache_clear()
    threads = torch.get_num_threads()
    publish_model(tmp_path)
    app = create_app({"MODELS_DIR": str(tmp_path), "MODEL_POLL_SECONDS": 0.1})
    try:
        client = app.test_client()
        assert client.get("/health/live").status_code == 200  # starts the predictor
        # cores / WORKERS, both counted without sched_getaffinity (WORKERS=auto uses the cores)
        assert torch.get_num_threads() == max(1, os.cpu_count() // app.config["WORKERS"])
        app.extensions["inference"].holder.first_poll_done.wait(60)
        response = client.post("/predict", data={"file": (io.BytesIO(image_bytes()), "a.png")})
        assert response.status_code == 200, response.json
    finally:
        app.extensions["inference"].stop()
        torch.set_num_threads(threads)
        usable_cpu_count.cache_clear()


@pytest.mark.parametrize(
    "cores, device, count, named",
    [
        (2, "cpu", 2, "CPU (DEVICE=cpu), 2 cores: one worker per core"),
        (1, "cpu", 1, "CPU (DEVICE=cpu), 1 cores"),
        (64, "cpu", AUTO_MAX_WORKERS, "CPU (DEVICE=cpu), 64 cores"),
        (16, "cuda", 4, "NVIDIA GPU (DEVICE=cuda), 16 cores: workers sharing the GPU"),
        (2, "cuda:1", 2, "NVIDIA GPU (DEVICE=cuda:1), 2 cores"),
    ],
)
def test_workers_auto_follows_the_device_and_the_cores(monkeypatch, cores, device, count, named):
    monkeypatch.setattr("inference.config.usable_cpu_count", lambda: cores)
    workers, reason = resolve_workers("auto", device)
    assert workers == count
    assert reason.startswith("auto: ") and named in reason


def test_workers_set_to_a_number_is_obeyed_whatever_the_machine():
    for value, count in (("1", 1), ("7", 7)):
        config = load_config({"WORKERS": value, "DEVICE": "cuda"})
        assert (config["WORKERS"], config["WORKERS_REASON"]) == (count, "set by WORKERS")
    for bad in ("0", "-2", "2.5", "many"):
        with pytest.raises(ValueError, match="must be auto or a whole number >= 1"):
            load_config({"WORKERS": bad})


def test_server_reports_its_worker_count_and_why_in_the_log_and_get_model(server):
    # The shared test server runs the defaults: WORKERS=auto, resolved in the master.
    workers, reason = resolve_workers("auto", "auto")
    assert f"workers: {workers} ({reason})" in server.log()
    info = server.get("/model").json()
    assert (info["workers"], info["workers_reason"]) == (workers, reason)


def gunicorn_settings_without_torch(
    tmp_path, env: dict[str, str], cpus: set[int] | None = None
) -> None:
    """Load gunicorn.conf.py as Gunicorn does, with `env` on `cpus`; check torch stayed out."""
    code = (
        "import runpy, sys; s = runpy.run_path('inference/gunicorn.conf.py'); "
        f"assert s['workers'] == {env.pop('expect')}, s['workers']; "
        "assert s['threads'] == 5 and s['bind'] == ['127.0.0.1:3005'], s; "
        "loaded = {'torch', 'flask', 'inference.app'} & set(sys.modules); "
        "assert not loaded, loaded"
    )
    env = {**os.environ, "THREADS": "5", "PORT": "3005", "BIND_ADDRESS": "127.0.0.1", **env}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)  # else the config makes one in /tmp
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
    )
    assert result.returncode == 0, result.stderr


def test_gunicorn_config_reads_the_settings_without_importing_torch_or_the_app(tmp_path):
    # The master must not load torch (no CUDA before the fork, a small master): the config
    # reads every setting through inference/config.py's table, as Gunicorn loads the file.
    gunicorn_settings_without_torch(tmp_path, {"WORKERS": "3", "expect": "3"})
    # WORKERS=auto too, with the GPU looked for without torch.
    expected = str(resolve_workers("auto", "auto")[0])
    gunicorn_settings_without_torch(tmp_path, {"WORKERS": "auto", "expect": expected})


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_workers_auto_counts_the_cores_the_server_may_use(tmp_path):
    # A container's or taskset's CPU set, not the machine's cores: one CPU, one worker.
    one_cpu = {min(os.sched_getaffinity(0))}
    env = {"WORKERS": "auto", "DEVICE": "cpu", "expect": "1"}
    gunicorn_settings_without_torch(tmp_path, env, one_cpu)
