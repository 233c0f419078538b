"""Two Gunicorn workers behind one port: each is ready, reloads and drains on its own, and
/metrics adds them up.

One server with WORKERS=2 serves every test here (module fixture; one start keeps CI short).
It starts on an empty store, so readiness is seen from the first answer. The tests run in file
order: the first publishes the first version (the others publish one if run alone), the last
stops the server with SIGTERM.

Which worker answered: a kept-alive connection stays with the worker that accepted it for
every request on it, and GET /model names that worker's pid (`worker_pid`).
"""

import http.client
import json
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import requests

from shared import store
from tests.inference.serving import (
    Server,
    image_bytes,
    metric_sample,
    publish_model,
    run_server,
)

WORKERS = 2
POLL_S = 1.0
RELOAD_DEADLINE_S = POLL_S + 3  # every worker serves a new version within a poll + 3 s
READY_TIMEOUT_S = 60  # the first load also times bf16/channels_last: slow on 2 busy cores
IMAGE = image_bytes()


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, dict[str, str]]:
    """A /predict body with `file` parts, and its headers."""
    prepared = requests.Request(
        "POST", "http://x/predict", files=[("file", f) for f in files]
    ).prepare()
    return prepared.body, {"Content-Type": prepared.headers["Content-Type"]}


def code(body: dict) -> str | None:
    """The error code of a JSON answer (None for a success)."""
    return body.get("error", {}).get("code")


class Pinned:
    """A kept-alive connection and the worker that accepted it, which answers all its requests."""

    def __init__(self, server: Server) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        self.conn.connect()
        self.conn.auto_open = 0  # never reconnect silently: that could reach another worker
        self.pid = self.request("GET", "/model")[1]["worker_pid"]

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, dict]:
        """Send one request on this connection: (status, JSON body)."""
        self.conn.request(method, path, body=body, headers=headers or {})
        response = self.conn.getresponse()
        return response.status, json.loads(response.read())

    def predict(self) -> tuple[int, dict]:
        """POST one good image to /predict."""
        return self.request("POST", "/predict", *multipart([("a.png", IMAGE)]))


def pinned_to_each_worker(server: Server, each: int = 1) -> dict[int, list[Pinned]]:
    """`each` kept-alive connections to every worker, by worker pid."""
    found: dict[int, list[Pinned]] = {}
    deadline = time.monotonic() + 60  # a worker still importing torch accepts nothing yet
    while time.monotonic() < deadline:
        pinned = Pinned(server)  # the kernel hands each new connection to either worker
        if len(found.setdefault(pinned.pid, [])) < each:
            found[pinned.pid].append(pinned)
        else:
            pinned.conn.close()
            time.sleep(0.05)
        if len(found) == WORKERS and all(len(c) == each for c in found.values()):
            return found
    raise AssertionError(f"60 s of new connections did not reach {WORKERS} workers: {found}")


def every_worker_serving(server: Server) -> list[Pinned]:
    """A connection to each worker, once each serves a model (published here if none is)."""
    if server.models_dir is not None and not (server.models_dir / store.LATEST).exists():
        publish_model(server.models_dir, seed=1)  # this test runs alone (-k)
    pinned = [conns[0] for conns in pinned_to_each_worker(server).values()]
    for conn in pinned:
        server.wait_for(
            lambda conn=conn: conn.request("GET", "/health/ready")[0] == 200,
            READY_TIMEOUT_S,
            f"worker {conn.pid} ready",
        )
    return pinned


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory) -> Iterator[Server]:
    """A Gunicorn with 2 workers on a store that is empty at first."""
    root = tmp_path_factory.mktemp("workers")
    env = {
        "WORKERS": str(WORKERS),
        "MODEL_POLL_SECONDS": str(POLL_S),
        "KEEPALIVE": "60",  # pinned connections outlive the pauses between requests
        "GRACEFUL_TIMEOUT": "20",
    }
    with run_server(root / "models", root, **env) as server:
        yield server
    if "Traceback" in server.log():
        pytest.fail(f"the server logged a traceback:\n{server.log()[-5000:]}")


@pytest.mark.slow
def test_each_worker_is_ready_once_it_has_a_model_and_not_before(two_workers):
    server = two_workers
    pinned = [c for conns in pinned_to_each_worker(server).values() for c in conns]
    for conn in pinned:
        for status, body in (conn.request("GET", "/health/ready"), conn.predict()):
            assert (status, code(body)) == (503, "no_model"), (conn.pid, body)

    version = publish_model(server.models_dir, seed=1)
    ready: dict[int, float] = {}
    start = time.monotonic()
    while len(ready) < WORKERS and time.monotonic() - start < READY_TIMEOUT_S:
        for conn in pinned:
            status, body = conn.request("GET", "/health/ready")
            if status == 503:
                assert code(body) == "no_model", body
                assert conn.pid not in ready, f"worker {conn.pid} was ready, now {body}"
                continue
            assert (status, body["worker_pid"], body["version"]) == (200, conn.pid, version)
            ready.setdefault(conn.pid, time.monotonic() - start)
            # Ready means this worker predicts: no 503 no_model from it from now on.
            status, body = conn.predict()
            assert (status, body["model_version"]) == (200, version), (conn.pid, body)
        time.sleep(0.05)
    assert len(ready) == WORKERS, f"ready after {READY_TIMEOUT_S} s: {ready}"


@pytest.mark.slow
def test_new_version_reaches_every_worker_within_poll_plus_3s(two_workers):
    server = two_workers
    pinned = every_worker_serving(server)
    old = {conn.predict()[1]["model_version"] for conn in pinned}
    assert len(old) == 1, old

    new = publish_model(server.models_dir, seed=2)
    start = time.monotonic()
    switched: dict[int, float] = {}  # worker pid: seconds until it first served `new`
    while len(switched) < WORKERS and time.monotonic() - start < 30:
        for conn in pinned:  # readiness names the version this worker's /predict uses
            status, body = conn.request("GET", "/health/ready")
            assert status == 200, body
            if body["version"] == new:
                switched.setdefault(conn.pid, time.monotonic() - start)
                status, body = conn.predict()
                assert (status, body["model_version"]) == (200, new), (conn.pid, body)
            else:  # a worker never goes back to the old version once it served the new one
                assert body["version"] in old and conn.pid not in switched, body
        time.sleep(0.05)
    print(f"seconds from LATEST to each worker serving {new}: {switched}")
    assert len(switched) == WORKERS, f"workers serving {new} after 30 s: {switched}"
    assert max(switched.values()) <= RELOAD_DEADLINE_S, switched
    # Every answer, from any worker, is the new version now.
    answers = [requests.post(server.url + "/predict", files={"file": IMAGE}) for _ in range(12)]
    assert {(a.status_code, a.json()["model_version"]) for a in answers} == {(200, new)}


@pytest.mark.slow
def test_bad_input_gets_a_4xx_from_every_worker(two_workers):
    text_file = multipart([("notes.txt", b"not an image")])
    for conn in every_worker_serving(two_workers):
        for (method, path, body, headers), expected in (
            (("POST", "/predict", b"x=1", {"Content-Type": "text/plain"}), (400, "not_multipart")),
            (("POST", "/predict", *text_file), (422, "no_usable_image")),
            (("POST", "/predict?top_k=-1", *multipart([("a.png", IMAGE)])), (400, "invalid_top_k")),
            (("GET", "/no-such-page", None, None), (404, "not_found")),
        ):
            status, answer = conn.request(method, path, body, headers)
            assert (status, code(answer)) == expected, (conn.pid, path, answer)
    # Malformed HTTP, answered by Gunicorn itself, on new connections (either worker).
    for _ in range(6):
        with socket.create_connection(("127.0.0.1", two_workers.port), timeout=30) as sock:
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 400 "), "no 400 for malformed HTTP"


@pytest.mark.slow
def test_metrics_add_up_requests_answered_by_both_workers(two_workers):
    server = two_workers
    every_worker_serving(server)
    by_worker = pinned_to_each_worker(server, each=2)
    before = server.get("/metrics").text
    for conns in by_worker.values():  # 3 requests on each of 2 connections per worker
        for conn in conns:
            for _ in range(3):
                assert conn.predict()[0] == 200
    after = server.get("/metrics").text  # answered by one worker, counted for both
    sent = 3 * 2 * WORKERS

    def delta(name: str, **labels: str) -> float:
        return metric_sample(after, name, **labels) - metric_sample(before, name, **labels)

    assert delta("inference_requests_total", route="/predict", status="200") == sent, after
    assert delta("inference_images_total", outcome="predicted") == sent, after
    served = server.model_version()
    assert metric_sample(after, "inference_model_info", version=served) == 1, after


def opened_at_once(server: Server, count: int) -> Counter:
    """Open `count` kept-alive connections at once; how many each worker took (then closed)."""
    conns: list[Pinned] = []
    threads = [threading.Thread(target=lambda: conns.append(Pinned(server))) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    taken = Counter(conn.pid for conn in conns)
    for conn in conns:
        conn.conn.close()
    time.sleep(0.5)  # the workers see the closes before the next round
    return taken


@pytest.mark.slow
def test_connections_opened_at_once_split_evenly_also_after_a_worker_is_replaced(two_workers):
    # Whichever worker wakes first used to take each connection: 16 opened at once split 5/11
    # or 3/13 as often as 8/8, and the fuller worker queued while the other idled.
    server = two_workers
    for conn in every_worker_serving(server):
        conn.conn.close()
    time.sleep(0.5)
    for _ in range(5):  # a random split is within one of 8/8 about half the time
        taken = opened_at_once(server, 16)
        assert sorted(taken.values()) == [8, 8], taken
    # While a worker's replacement loads its model, the other takes every new connection, even
    # holding more (the replacement counts only once it serves)...
    victim, survivor = list(taken)
    kept = pinned_to_each_worker(server)[survivor][0]
    os.kill(victim, signal.SIGKILL)
    time.sleep(1.5)  # the replacement has started (it imports torch and loads for seconds)
    fresh = []
    for _ in range(2):  # the second after the survivor's event loop has looked again
        start = time.monotonic()
        fresh.append(Pinned(server))
        assert (fresh[-1].pid, time.monotonic() - start < 2) == (survivor, True)
    for conn in [kept, *fresh]:
        conn.conn.close()
    # ...and once it serves, it takes the place of the one that died (else it would take all).
    pinned = pinned_to_each_worker(server)
    assert victim not in pinned
    for conns in pinned.values():
        server.wait_for(
            lambda conn=conns[0]: conn.request("GET", "/health/ready")[0] == 200,
            READY_TIMEOUT_S,
            "the new worker ready",
        )
        conns[0].conn.close()
    time.sleep(0.5)
    for _ in range(3):
        taken = opened_at_once(server, 16)
        assert sorted(taken.values()) == [8, 8], taken


@pytest.mark.slow
def test_sigterm_lets_each_workers_requests_in_flight_finish(two_workers):
    # Last in this module: it stops the server.
    server = two_workers
    every_worker_serving(server)
    by_worker = pinned_to_each_worker(server, each=2)
    body, headers = multipart([("a.png", IMAGE)])
    in_flight = [conns[0] for conns in by_worker.values()]
    for conn in in_flight:  # headers and half the body sent, on every worker
        conn.conn.putrequest("POST", "/predict")
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            conn.conn.putheader(name, value)
        conn.conn.endheaders(body[: len(body) // 2])
    time.sleep(0.5)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)

    for conn in (conns[1] for conns in by_worker.values()):  # within Gunicorn's 2 s linger
        status, answer = conn.request("GET", "/health/ready")
        assert (status, code(answer)) == (503, "shutting_down"), (conn.pid, answer)
    for conn in in_flight:
        conn.conn.send(body[len(body) // 2 :])
        response = conn.conn.getresponse()
        answer = json.loads(response.read())
        assert response.status == 200 and answer["model_version"], (conn.pid, answer)
    assert server.proc.wait(30) == 0
