"""SIGTERM: readiness turns 503, the request in flight finishes, then Gunicorn exits cleanly.
SIGHUP: workers are replaced without a failed request."""

import signal
import socket
import time

import pytest
import requests

from tests.inference.serving import image_bytes, publish_model, run_server, wait_ready
from tests.inference.traffic import Kind, Load, process_tree, summary

KIND = Kind(
    "one_image",
    1,
    lambda session, url: session.post(
        url + "/predict", files={"file": ("a.png", image_bytes())}, timeout=60
    ),
    (200,),
)


def multipart(boundary: str, data: bytes) -> bytes:
    """A one-file multipart body."""
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight_and_exits(tmp_path):
    models_dir = tmp_path / "models"
    publish_model(models_dir)
    with run_server(models_dir, tmp_path, GRACEFUL_TIMEOUT="20") as server:
        wait_ready(server)
        session = requests.Session()  # a kept-alive connection, as a load balancer's probe has
        assert session.get(server.url + "/health/ready", timeout=10).status_code == 200

        body = multipart("b", image_bytes())
        head = (
            "POST /predict HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            # The request is in flight: headers and half the body sent.
            sock.sendall(head + body[: len(body) // 2])
            time.sleep(0.5)
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)

            ready = session.get(server.url + "/health/ready", timeout=10)
            assert ready.status_code == 503
            assert ready.json()["error"]["code"] == "shutting_down"

            sock.sendall(body[len(body) // 2 :])
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert b'"model_version"' in answer

        assert server.proc.wait(30) == 0
        assert "Traceback" not in server.log()


@pytest.mark.slow
def test_sighup_reload_under_load_fails_no_request(tmp_path):
    # On SIGHUP Gunicorn starts new workers and stops the old ones at once: a new worker
    # must not take requests before its model is loaded (they would get 503 no_model). Two
    # workers: SIGHUP re-reads gunicorn.conf.py, and the master must still remove the metrics
    # folder it made (in TMPDIR) when it exits.
    models_dir = tmp_path / "models"
    version = publish_model(models_dir)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with run_server(models_dir, tmp_path, WORKERS="2", TMPDIR=str(tmp)) as server:
        wait_ready(server)
        old_workers = set(process_tree(server.proc.pid)) - {server.proc.pid}
        load = Load(server.url, [KIND], concurrency=4).start()
        time.sleep(1.0)
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for(
            lambda: not old_workers & set(process_tree(server.proc.pid)), 60, "old worker gone"
        )
        time.sleep(1.0)
        outcomes = load.stop()
    assert len(outcomes) > 20, summary(outcomes)
    assert not [o for o in outcomes if o.problem], summary(outcomes)
    assert {o.version for o in outcomes} == {version}
    assert server.proc.returncode == 0
    assert not list(tmp.glob("inference-metrics-*"))
