"""Gunicorn's gthread worker, accepting connections least-loaded first across the workers.

Every worker waits on the same listening socket, and whichever wakes first takes the
connection. Clients that keep their connections (wrk, connection pools, a load balancer) then
stay where that race put them: 16 connections opened at once split 8/8, 5/11 or 3/13 between 2
workers. Each worker computes on its own core, so the busy one queues while the other idles:
on a 2-core AMD EPYC (Zen 5), 16 clients x 1 image, 8/8 splits served 576-709 req/s and 3/13 or
11/5 splits 455-463 (docs/benchmarks.md).

So each worker publishes its open connections in memory shared by all workers (made in the
Gunicorn master, before the fork), and listens for new ones only while no other live worker
holds fewer. The worker with the fewest always listens, so a connection is never left waiting.
"""

import multiprocessing
import os

from gunicorn.workers.gthread import ThreadWorker

# Set by gunicorn.conf.py in the master when there are several workers (None: one worker):
# per slot, the pid of the worker in it (0: free) and its open connections.
SLOTS: tuple | None = None


def make_slots(workers: int) -> tuple:
    """Shared (pids, connections) arrays for `workers` slots; call before the workers fork.

    A slot is freed by `release` when its worker exits; a replacement takes a free one.
    """
    return (multiprocessing.Array("l", workers), multiprocessing.Array("l", workers))


def release(pid: int) -> None:
    """Free the slot of a worker that exited (the master calls it from child_exit)."""
    if SLOTS is None:
        return
    pids, conns = SLOTS
    with pids.get_lock():
        for i, held in enumerate(pids):
            if held == pid:
                pids[i] = 0
                conns[i] = 0


class BalancedThreadWorker(ThreadWorker):
    """ThreadWorker that accepts only while no other worker has fewer open connections."""

    _slot: int | None = None

    def run(self) -> None:
        """Take a free slot, then serve. Not before: a worker still loading its model
        (post_worker_init) must not count as the least loaded, or the others would stop
        accepting while it cannot."""
        if SLOTS is not None:
            pids, _ = SLOTS
            with pids.get_lock():
                free = [i for i, held in enumerate(pids) if held == 0]
                if free:  # none: more workers than slots (TTIN); this one accepts freely
                    self._slot = free[0]
                    pids[self._slot] = os.getpid()
        super().run()

    def _publish(self) -> None:
        if self._slot is not None:
            SLOTS[1][self._slot] = self.nr_conns

    def accept(self, listener) -> None:
        """Accept one connection, and count it where the other workers see it at once."""
        super().accept(listener)
        self._publish()

    def notify(self) -> None:
        """The heartbeat, once per event-loop turn (just before the loop decides whether to
        accept): publish this worker's connections and listen only if it has the fewest."""
        super().notify()
        self._publish()
        if self._slot is None:
            return
        pids, conns = SLOTS
        others = [conns[i] for i, held in enumerate(pids) if held and i != self._slot]
        fewest = min(others, default=self.nr_conns)
        # The loop accepts while nr_conns < worker_connections (Gunicorn's cap otherwise).
        self.worker_connections = self.cfg.worker_connections if self.nr_conns <= fewest else 0
