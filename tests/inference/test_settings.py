"""Settings the server is started with: refused at start with one line, honoured when valid."""

import io
import os
import socket
import subprocess
import sys

import pytest
import torch

from inference import create_app
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
    assert (
        output.strip() == "error: WORKERS='two': not a number (Gunicorn worker processes "
        "(also sizes TORCH_THREADS))"
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
        assert torch.get_num_threads() == os.cpu_count()  # cores / WORKERS, WORKERS = 1
        app.extensions["inference"].holder.first_poll_done.wait(60)
        response = client.post("/predict", data={"file": (io.BytesIO(image_bytes()), "a.png")})
        assert response.status_code == 200, response.json
    finally:
        app.extensions["inference"].stop()
        torch.set_num_threads(threads)
        usable_cpu_count.cache_clear()


def test_gunicorn_config_reads_the_settings_without_importing_torch_or_the_app(tmp_path):
    # The master must not load torch (no CUDA before the fork, a small master): the config
    # reads every setting through inference/config.py's table, as Gunicorn loads the file.
    code = (
        "import runpy, sys; s = runpy.run_path('inference/gunicorn.conf.py'); "
        "assert s['workers'] == 3 and s['threads'] == 5 and s['bind'] == ['127.0.0.1:3005'], s; "
        "loaded = {'torch', 'flask', 'inference.app'} & set(sys.modules); "
        "assert not loaded, loaded"
    )
    env = {
        **os.environ,
        "WORKERS": "3",
        "THREADS": "5",
        "PORT": "3005",
        "BIND_ADDRESS": "127.0.0.1",
    }
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
