"""SIGTERM: readiness turns 503, the request in flight finishes, then Gunicorn exits cleanly."""

import signal
import socket
import time

import pytest
import requests

from tests.inference.serving import image_bytes, publish_model, run_server, wait_ready


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
