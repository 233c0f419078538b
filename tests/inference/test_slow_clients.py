"""A client that stalls mid-upload holds one request thread for CLIENT_TIMEOUT_SECONDS at most."""

import socket
import time

import pytest

from tests.inference.serving import image_bytes, publish_model, run_server, wait_ready


@pytest.mark.slow
def test_stalled_uploads_time_out_with_408_and_do_not_block_others(tmp_path):
    models_dir = tmp_path / "models"
    publish_model(models_dir)
    with run_server(models_dir, tmp_path, CLIENT_TIMEOUT_SECONDS="1", THREADS="4") as server:
        wait_ready(server)
        head = (
            b"POST /predict HTTP/1.1\r\nHost: test\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n"
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
        )
        stalled = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
        try:
            for sock in stalled:
                sock.sendall(head + b"\x89PNG")  # ...and nothing more
            start = time.monotonic()
            response = server.post("/predict", files={"file": ("a.png", image_bytes())})
            assert response.status_code == 200
            assert time.monotonic() - start < 5
            for sock in stalled:
                sock.settimeout(15)
                answer = b""
                while chunk := sock.recv(65536):  # the server closes after answering
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
                assert b'"client_timeout"' in answer
        finally:
            for sock in stalled:
                sock.close()


@pytest.mark.slow
def test_client_that_keeps_its_socket_open_after_connection_close_blocks_no_one(tmp_path):
    # Gunicorn lingers up to 2 s on a closing connection until the client closes its side; on
    # the gthread worker's main loop that froze every other client for those 2 s.
    models_dir = tmp_path / "models"
    publish_model(models_dir)
    with run_server(models_dir, tmp_path) as server:
        wait_ready(server)
        lingering = []
        waited = 0.0
        try:
            for _ in range(8):
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                assert sock.recv(65536).startswith(b"HTTP/1.1 200")
                lingering.append(sock)  # answered, and left open on our side
                start = time.monotonic()
                assert server.get("/health/live").status_code == 200
                waited += time.monotonic() - start
            # Blocked, each of the 8 would wait ~2 s; unblocked they take milliseconds.
            assert waited < 4.0, f"other clients waited {waited:.1f} s in all"
        finally:
            for sock in lingering:
                sock.close()
