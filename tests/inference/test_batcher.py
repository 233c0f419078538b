"""MicroBatcher in-process: batching, the queue bound, model separation, timeouts, failures."""

import threading
import time

import pytest
import torch

from inference.batcher import BatchFailed, BatchTimeout, MicroBatcher, QueueFull


class FakeModel:
    """Returns each image's first pixel as its 'probability' and records batch sizes."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[int] = []
        self.delay = delay
        self.release = threading.Event()
        self.release.set()

    def __call__(self, model, images: torch.Tensor) -> torch.Tensor:
        self.release.wait(10)
        time.sleep(self.delay)
        self.batches.append(len(images))
        return images[:, 0, 0, :1].float()


def images(n: int, value: int) -> torch.Tensor:
    """n tiny uint8 images whose first pixel is `value`."""
    return torch.full((n, 3, 2, 2), value, dtype=torch.uint8)


@pytest.fixture
def make_batcher():
    """Build and start batchers; stop them after the test."""
    started = []

    def make(run, **kwargs) -> MicroBatcher:
        options = {"max_images": 64, "max_wait_s": 0.05, "max_queue_images": 256, **kwargs}
        batcher = MicroBatcher(run, **options)
        batcher.start()
        started.append(batcher)
        return batcher

    yield make
    for batcher in started:
        batcher.stop()


def test_lone_request_runs_at_once_and_gets_its_own_rows(make_batcher):
    fake = FakeModel()
    batcher = make_batcher(fake, max_wait_s=5.0)
    start = time.perf_counter()
    job = batcher.submit("m", images(3, 7), timeout=5)
    assert time.perf_counter() - start < 2.0  # no one else announced: no batching wait
    assert job.probs.flatten().tolist() == [7.0, 7.0, 7.0]
    assert fake.batches == [3]


def test_concurrent_requests_share_one_forward_pass(make_batcher):
    fake = FakeModel()
    batcher = make_batcher(fake, max_wait_s=2.0)
    results = {}

    def request(value: int) -> None:
        with batcher.ticket() as ticket:
            time.sleep(0.05 * value)  # "decoding", staggered
            job = ticket.submit("m", images(value, value), timeout=10)
            results[value] = job.probs.flatten().tolist()

    threads = [threading.Thread(target=request, args=(v,)) for v in (1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fake.batches == [6]
    assert results == {1: [1.0], 2: [2.0, 2.0], 3: [3.0, 3.0, 3.0]}


def test_jobs_for_different_models_never_share_a_batch(make_batcher):
    fake = FakeModel()
    fake.release.clear()  # hold the first batch so the others queue up behind it
    batcher = make_batcher(fake)
    jobs = {}

    def request(name: str, model: str) -> None:
        jobs[name] = batcher.submit(model, images(2, 1), timeout=10)

    threads = [threading.Thread(target=request, args=("first", "old"))]
    threads[0].start()
    time.sleep(0.2)
    for queued, (name, model) in enumerate([("a", "old"), ("b", "new"), ("c", "old")], 1):
        threads.append(threading.Thread(target=request, args=(name, model)))
        threads[-1].start()
        # Queue them in this order: threads started together may submit in any order.
        deadline = time.monotonic() + 10
        while batcher.queued_images < 2 * queued and time.monotonic() < deadline:
            time.sleep(0.01)
    fake.release.set()
    for thread in threads:
        thread.join()
    assert fake.batches == [2, 4, 2]  # first alone; then a+c (old model); then b (new model)
    assert jobs["a"].batch_images == jobs["c"].batch_images == 4


def test_full_queue_rejects_at_once(make_batcher):
    fake = FakeModel()
    fake.release.clear()
    batcher = make_batcher(fake, max_queue_images=4)
    running = threading.Thread(target=batcher.submit, args=("m", images(1, 1), 10))
    running.start()
    time.sleep(0.2)  # taken by the batcher: no longer queued
    waiting = threading.Thread(target=batcher.submit, args=("m", images(3, 1), 10))
    waiting.start()
    time.sleep(0.2)
    assert batcher.queued_images == 3
    with pytest.raises(QueueFull):
        batcher.submit("m", images(2, 1), timeout=10)
    fake.release.set()
    running.join()
    waiting.join()
    assert batcher.queued_images == 0


def test_request_gives_up_after_its_timeout(make_batcher):
    fake = FakeModel()
    fake.release.clear()
    batcher = make_batcher(fake)
    blocker = threading.Thread(target=batcher.submit, args=("m", images(1, 1), 10))
    blocker.start()
    time.sleep(0.2)
    with pytest.raises(BatchTimeout):
        batcher.submit("m", images(2, 1), timeout=0.2)
    assert batcher.queued_images == 0  # the abandoned job left the queue
    fake.release.set()
    blocker.join()
    assert fake.batches == [1]


def test_forward_failure_reaches_every_request_of_the_batch(make_batcher):
    def broken(model, batch):
        raise RuntimeError("out of memory")

    batcher = make_batcher(broken)
    with pytest.raises(BatchFailed, match="out of memory"):
        batcher.submit("m", images(1, 1), timeout=5)
    # The batcher thread survives and serves the next request.
    batcher._run_batch = FakeModel()
    assert batcher.submit("m", images(1, 5), timeout=5).probs.item() == 5.0


def test_a_pass_waits_for_a_client_just_answered_and_a_lone_client_never_waits(make_batcher):
    # Keep-alive clients come back right after their answer: the next pass waits for them (up
    # to max_wait_s) instead of leaving without them, so clients don't split into alternating
    # halves. A client alone is never waited for: its own request is the one that came back.
    fake = FakeModel()
    batcher = make_batcher(fake, max_wait_s=2.0)
    start = time.perf_counter()
    for _ in range(3):
        batcher.submit("m", images(1, 1), timeout=5, client="alone")
    assert time.perf_counter() - start < 1.0  # three passes, none waited the 2 s
    assert fake.batches == [1, 1, 1]

    batcher.submit("m", images(1, 1), timeout=5, client="a")  # answered: "a" will be back
    again = threading.Thread(
        target=lambda: (time.sleep(0.2), batcher.submit("m", images(1, 2), timeout=5, client="a"))
    )
    again.start()
    batcher.submit("m", images(1, 3), timeout=5, client="b")  # waits for "a"
    again.join()
    assert fake.batches == [1, 1, 1, 1, 2]
