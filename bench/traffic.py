"""Load for the benchmarks and the tests: request kinds, a pool of client threads, outcomes.

Each request kind knows how to send itself and what a correct answer looks like; the pool
records one Outcome per request, so a test can assert "zero 5xx, zero dropped connections" and a
benchmark can compute rates and latencies from the same records. No pytest here.
"""

import itertools
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import requests

# A request that got no HTTP answer (reset, refused, timed out) is recorded with this status.
DROPPED = 0
CLIENT_TIMEOUT_S = 60  # generous: the machine running CI is shared and slow


@dataclass
class Kind:
    """One kind of request: how to send it, which statuses are correct, what else to check.

    `send(session, url)` returns the response. `fresh_connection` kinds are sent without the
    thread's keep-alive session: the server may close the connection after answering them
    (a 413 leaves the rest of the body unread), which is correct but would race a reused one.
    """

    name: str
    weight: float
    send: Callable[[requests.Session, str], requests.Response]
    statuses: tuple[int, ...]
    check: Callable[[requests.Response], str | None] = lambda response: None
    fresh_connection: bool = False


@dataclass
class Outcome:
    """What one request got: status (DROPPED if none) and the problem, if any."""

    kind: str
    status: int
    problem: str | None
    started: float
    seconds: float
    version: str | None = None
    served_by: str | None = None  # a load balancer's X-Served-By: the replica that answered


@dataclass
class Load:
    """`concurrency` threads sending a weighted random mix of `kinds` until stopped."""

    url: str
    kinds: list[Kind]
    concurrency: int
    seed: int = 0
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self) -> "Load":
        """Start the client threads."""
        for i in range(self.concurrency):
            thread = threading.Thread(target=self._client, args=(self.seed + i,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> list[Outcome]:
        """Let every thread finish its request in flight, then return all outcomes."""
        self._stop.set()
        for thread in self._threads:
            thread.join(CLIENT_TIMEOUT_S + 10)
        assert not any(t.is_alive() for t in self._threads), "a client thread hung"
        return self.outcomes

    def _client(self, seed: int) -> None:
        rng = random.Random(seed)
        weights = [kind.weight for kind in self.kinds]
        session = requests.Session()
        while not self._stop.is_set():
            kind = rng.choices(self.kinds, weights)[0]
            started = time.monotonic()
            try:
                if kind.fresh_connection:
                    with requests.Session() as once:
                        response = kind.send(once, self.url)
                else:
                    response = kind.send(session, self.url)
            except requests.RequestException as exc:
                outcome = Outcome(kind.name, DROPPED, repr(exc)[:300], started, 0.0)
                session = requests.Session()  # start over on a clean connection
            else:
                outcome = Outcome(
                    kind.name,
                    response.status_code,
                    judge(kind, response),
                    started,
                    time.monotonic() - started,
                    version_of(response),
                    response.headers.get("X-Served-By"),
                )
            with self._lock:
                self.outcomes.append(outcome)
        session.close()


def judge(kind: Kind, response: requests.Response) -> str | None:
    """None if `response` is a correct answer to a `kind` request, else what is wrong."""
    if response.status_code not in kind.statuses:
        return f"status {response.status_code}, expected {kind.statuses}: {response.text[:200]}"
    if not response.headers.get("Content-Type", "").startswith("application/json"):
        return f"not JSON: {response.headers.get('Content-Type')}"
    try:
        body = response.json()
    except ValueError:
        return f"unparseable JSON: {response.text[:200]}"
    if response.status_code >= 400 and "code" not in body.get("error", {}):
        return f"error without a code: {response.text[:200]}"
    return kind.check(response)


def version_of(response: requests.Response) -> str | None:
    """The model_version of a JSON answer, if it has one."""
    try:
        return response.json().get("model_version")
    except ValueError:
        return None


def summary(outcomes: list[Outcome]) -> str:
    """Counts by kind and status, then the first problems: for assertion messages."""
    counts = Counter((o.kind, o.status) for o in outcomes)
    lines = [f"{kind:<22} {status}: {n}" for (kind, status), n in sorted(counts.items())]
    problems = [f"{o.kind}: {o.problem}" for o in outcomes if o.problem][:8]
    return "\n".join(lines + ["problems:", *problems])


def predict_kind(
    images: list[tuple[str, bytes]],
    per_request: int,
    timeout: float = CLIENT_TIMEOUT_S,
    check_predictions: bool = True,
) -> Kind:
    """POST /predict with `per_request` of `images` in turn, built as the original client did.

    `check_predictions=False` accepts any 200 JSON answer (a trivial endpoint's, for a ceiling).
    """
    turn = itertools.count()  # shared by the threads: next() on it is atomic under the GIL

    def send(session: requests.Session, url: str) -> requests.Response:
        first = next(turn) * per_request
        batch = [images[(first + j) % len(images)] for j in range(per_request)]
        files = [("file", (name, data, "image/jpeg")) for name, data in batch]
        return session.post(url + "/predict", files=files, timeout=timeout)

    def check(response: requests.Response) -> str | None:
        predictions = response.json().get("predictions", [])
        if len(predictions) != per_request or not all("category" in p for p in predictions):
            return f"expected {per_request} predictions: {response.text[:200]}"
        return None

    return Kind("predict", 1.0, send, (200,), check if check_predictions else lambda r: None)


def records(outcomes: list[Outcome]) -> list[tuple]:
    """(sent, received, ok, status or exception name, model_version) per outcome."""
    return [
        (
            o.started,
            o.started + o.seconds,
            o.problem is None,
            o.status or (o.problem or "dropped").split("(")[0],
            o.version,
        )
        for o in outcomes
    ]
