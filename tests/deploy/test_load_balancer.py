"""Three real Gunicorn replicas behind a real HAProxy run from deploy/haproxy/haproxy.cfg.

One cluster for the module: replicas 1 and 2 serve one models folder, replica 3 a folder of its
own (so it alone can be handed a corrupt version), replica 4 an empty one (no model, ever).
The tests run in file order and the last two stop replicas 1 and 2.
"""

import os
import shutil
import signal
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from bench.balancer import haproxy
from bench.servers import STOP_TIMEOUT_S, gunicorn
from shared.store import read_latest, set_latest
from tests.inference.serving import image_bytes, publish_model, wait_ready
from tests.inference.traffic import DROPPED, Kind, Load, summary

pytestmark = pytest.mark.slow

POLL_SECONDS = 1.0
RELOAD_SLACK_S = 3.0  # the promise: every replica serves a new version within poll + 3 s
CONCURRENCY = 6
SERVING = ["inference1", "inference2", "inference3"]
EMPTY = "inference4"


def check_version_header(response: requests.Response) -> str | None:
    """The header and the body must name the same version."""
    header, body = response.headers.get("X-Model-Version"), response.json().get("model_version")
    return None if header and header == body else f"X-Model-Version {header!r}, body {body!r}"


PREDICT = Kind(
    "predict",
    1,
    lambda session, url: session.post(
        url + "/predict", files={"file": ("a.png", image_bytes())}, timeout=60
    ),
    (200,),
    check_version_header,
)


def copy_version(src: Path, dst: Path, version: str) -> None:
    """Copy a published version folder into another store, renamed into place when complete."""
    tmp = dst / f".tmp-{version}"
    shutil.copytree(src / version, tmp)
    os.rename(tmp, dst / version)


def run_load(url: str, seconds: float, during=None) -> list:
    """CONCURRENCY clients for `seconds`; `during()` runs once a third of the way in."""
    load = Load(url, [PREDICT], CONCURRENCY).start()
    time.sleep(seconds / 3)
    marks = during() if during else None
    time.sleep(seconds * 2 / 3)
    return load.stop(), marks


def served_by(balancer, count: int) -> list[requests.Response]:
    """`count` sequential /predict answers through the balancer."""
    with requests.Session() as session:
        return [PREDICT.send(session, balancer.url) for _ in range(count)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Four replicas (three with a model, one without) and HAProxy in front of them."""
    root = tmp_path_factory.mktemp("lb")
    shared, own, empty = root / "shared-models", root / "own-models", root / "empty-models"
    for folder in (shared, own, empty):
        folder.mkdir()
    v1 = publish_model(shared, seed=0)
    copy_version(shared, own, v1)
    set_latest(own, v1)
    # One worker of one torch thread each: replicas sharing a host split its cores
    # (docs/scaling.md).
    env = {"MODEL_POLL_SECONDS": str(POLL_SECONDS), "TORCH_THREADS": "1", "THREADS": "8"}
    env |= {"WORKERS": "1"}
    env |= {"GRACEFUL_TIMEOUT": "15", "ACCESS_LOG": ""}
    with ExitStack() as stack:
        # Started side by side: each one's torch import overlaps the others'.
        replicas = [
            stack.enter_context(gunicorn(folder, root, env, wait=None))
            for folder in (shared, shared, own, empty)
        ]
        # Stopped side by side too: every replica gets SIGTERM before the first is waited for.
        stack.callback(lambda: [r.proc.send_signal(signal.SIGTERM) for r in alive(replicas)])
        for replica in replicas:
            replica.wait_answering("/health/live")
        for replica in replicas[:3]:
            wait_ready(replica)
        balancer = stack.enter_context(haproxy([r.port for r in replicas], root))
        # Up once the checks have seen each replica (1 s apart) and the empty one is out.
        deadline = time.monotonic() + 15
        while f"{EMPTY} is DOWN" not in balancer.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        yield SimpleNamespace(replicas=replicas, balancer=balancer, shared=shared, own=own, v1=v1)


def alive(replicas: list) -> list:
    """The replicas whose process is still running."""
    return [r for r in replicas if r.proc.poll() is None]


def test_three_replicas_share_the_load(cluster):
    outcomes, _ = run_load(cluster.balancer.url, 4)
    assert outcomes and all(o.status == 200 and not o.problem for o in outcomes), summary(outcomes)
    counts = Counter(o.served_by for o in outcomes)
    assert set(counts) == set(SERVING), counts
    assert min(counts.values()) >= len(outcomes) / 10, counts
    assert {o.version for o in outcomes} == {cluster.v1}


def test_replica_without_a_model_gets_no_traffic(cluster):
    empty = cluster.replicas[3]
    assert empty.get("/health/ready").json()["error"]["code"] == "no_model"
    answers = served_by(cluster.balancer, 30)
    assert all(r.status_code == 200 for r in answers)
    assert EMPTY not in {r.headers["X-Served-By"] for r in answers}
    assert f"{EMPTY} is DOWN" in cluster.balancer.log()


def test_new_version_reaches_every_replica_within_poll_plus_3s(cluster):
    v2 = publish_model(cluster.shared, seed=1, make_latest=False)
    copy_version(cluster.shared, cluster.own, v2)
    published = time.monotonic()
    set_latest(cluster.shared, v2)
    set_latest(cluster.own, v2)
    limit = POLL_SECONDS + RELOAD_SLACK_S
    reached: dict[str, float] = {}  # replica URL -> seconds until its /model named v2
    while len(reached) < 3 and time.monotonic() - published < 4 * limit:
        for replica in cluster.replicas[:3]:
            if replica.url not in reached and replica.model_version() == v2:
                reached[replica.url] = round(time.monotonic() - published, 2)
        time.sleep(0.05)
    print(f"{v2} reached the replicas after {sorted(reached.values())} s")
    assert len(reached) == 3 and max(reached.values()) <= limit, reached
    answers = served_by(cluster.balancer, 30)
    assert {r.headers["X-Model-Version"] for r in answers} == {v2}
    assert {r.headers["X-Served-By"] for r in answers} == set(SERVING)


def test_replica_refusing_a_version_keeps_serving_its_old_one(cluster):
    refusing = cluster.replicas[2]
    old = read_latest(cluster.own)
    refusing.wait_for(lambda: refusing.model_version() == old, 30, f"{old} on the third replica")
    v3 = publish_model(cluster.shared, seed=2, make_latest=False)
    copy_version(cluster.shared, cluster.own, v3)
    with open(cluster.own / v3 / "model.pt", "r+b") as weights:  # sha256 no longer matches
        weights.seek(-100, os.SEEK_END)
        weights.write(b"\0" * 100)
    set_latest(cluster.shared, v3)
    set_latest(cluster.own, v3)
    for replica in cluster.replicas[:2]:
        replica.wait_for(lambda r=replica: r.model_version() == v3, 10, f"{v3} on {replica.url}")
    refusing.wait_for(lambda: refusing.get("/model").json()["last_error"], 10, "the refusal")
    info = refusing.get("/model").json()
    assert info["version"] == old and info["latest"] == v3
    assert info["last_error"]["version"] == v3 and "sha256" in info["last_error"]["message"]
    answers = served_by(cluster.balancer, 30)
    assert all(r.status_code == 200 for r in answers)
    versions = {(r.headers["X-Served-By"], r.headers["X-Model-Version"]) for r in answers}
    assert versions == {("inference1", v3), ("inference2", v3), ("inference3", old)}


def test_sigterm_of_a_replica_under_load_loses_no_request(cluster):
    stopping = cluster.replicas[0]

    def terminate() -> float:
        stopping.proc.send_signal(signal.SIGTERM)  # what `docker stop` sends
        return time.monotonic()

    outcomes, stopped_at = run_load(cluster.balancer.url, 6, terminate)
    assert stopping.proc.wait(STOP_TIMEOUT_S) == 0
    failed = [o for o in outcomes if o.status != 200 or o.problem]
    assert not failed, summary(outcomes)
    # Out of the pool once the checks saw it stop (2 failed checks, 1 s apart).
    counts = Counter(o.served_by for o in outcomes if o.started > stopped_at + 2.5)
    assert counts["inference1"] == 0 and counts["inference2"] and counts["inference3"], counts


def test_sigkill_of_a_replica_under_load_loses_no_request(cluster):
    """Even requests in flight on the killed replica are answered: HAProxy sends them again
    to another replica (retry-on empty-response), /predict having no side effect."""
    killed = cluster.replicas[1]

    def kill() -> float:
        os.killpg(killed.proc.pid, signal.SIGKILL)  # master and worker: a crashed container
        return time.monotonic()

    outcomes, killed_at = run_load(cluster.balancer.url, 6, kill)
    killed.proc.wait(STOP_TIMEOUT_S)
    dropped = [o for o in outcomes if o.status == DROPPED]
    failed = [o for o in outcomes if o.status != 200 or o.problem]
    assert not failed, f"{len(dropped)} dropped\n{summary(outcomes)}"
    in_flight = [o for o in outcomes if o.started < killed_at < o.started + o.seconds]
    assert len(in_flight) > 0, "no request was in flight when the replica was killed"
    counts = Counter(o.served_by for o in outcomes if o.started > killed_at)
    assert set(counts) == {"inference3"}, counts
