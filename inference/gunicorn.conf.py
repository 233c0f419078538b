"""Gunicorn settings for the inference service: `gunicorn -c inference/gunicorn.conf.py`.

Run from the repo root inside the project's venv. Read by the Gunicorn master, so nothing here
imports torch or the app: each worker builds the app (`preload_app = False`) and loads the model
in its own background thread (post_worker_init below).

Workers and threads: WORKERS=auto (the default) runs one worker per core, at most 4, on a CPU
and on a GPU host alike (the measurements behind it: inference/config.py, resolve_workers).
Each worker has its own model copy, batcher and interpreter, and its torch uses cores / WORKERS
threads; within a worker, threads decode uploads and wait for the batcher.
"""

import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

import gunicorn.util
from gunicorn.errors import HaltServer

# Imports neither torch nor the app (the package imports inference/app.py only on first use).
from inference import worker as balanced
from inference.config import load_config


def _load_settings() -> dict:
    """Every setting through inference/config.py's table; a bad value stops the master here."""
    try:
        return load_config()
    except ValueError as exc:
        sys.exit(f"error: {exc}")


SETTINGS = _load_settings()
WORKERS = SETTINGS["WORKERS"]
_host = SETTINGS["BIND_ADDRESS"]

wsgi_app = "inference.app:create_served_app()"
bind = [f"[{_host}]:{SETTINGS['PORT']}" if ":" in _host else f"{_host}:{SETTINGS['PORT']}"]
workers = WORKERS
# Gunicorn's gthread worker, accepting least-loaded first across workers (inference/worker.py).
worker_class = "inference.worker.BalancedThreadWorker"
if WORKERS > 1:
    balanced.SLOTS = balanced.make_slots(WORKERS)
# Concurrent requests per worker: they decode in parallel (PIL releases the GIL) and then
# wait for the shared batcher, so threads are cheap; match the clients you expect.
threads = SETTINGS["THREADS"]
preload_app = False  # the app and model must be created in the worker, not the master
# Seconds without a heartbeat before the master kills a worker (the gthread main loop beats
# independently of requests, so a long batch does not trip it).
timeout = SETTINGS["TIMEOUT"]
# Seconds a SIGTERM'd worker gets to finish in-flight requests before it is killed.
graceful_timeout = SETTINGS["GRACEFUL_TIMEOUT"]
keepalive = SETTINGS["KEEPALIVE"]  # seconds an idle client connection stays open
accesslog = SETTINGS["ACCESS_LOG"] or None  # "-": stdout; empty: off
errorlog = "-"
# No gunicornc control socket: nothing uses it, and in $HOME it collides between instances
# (tests run several) and fails on read-only or non-root homes.
control_socket_disable = True
loglevel = SETTINGS["LOG_LEVEL"]

# OpenMP threads that spin while they wait steal the cores a batch needs as soon as anything
# else runs on the machine: on a busy 2-core box a 5 ms forward pass took 500 ms with 2 torch
# threads. Sleeping threads avoid that cliff. Set here, before any worker imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Several workers: prometheus_client must write its values to files that /metrics merges. It
# chooses its storage when first imported, so the variable is set before any import of it.
# A folder made here is marked as this master's in INFERENCE_OWN_METRICS_DIR: a SIGHUP runs
# this file again, with the variable already set, and the master must still remove it at exit.
if WORKERS > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="inference-metrics-")
    os.environ["INFERENCE_OWN_METRICS_DIR"] = os.environ["PROMETHEUS_MULTIPROC_DIR"]


def _write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """Gunicorn's own errors (malformed HTTP, oversized headers) as JSON, like the app's."""
    code = reason.lower().replace(" ", "_")
    body = json.dumps({"error": {"code": code, "message": mesg}}).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    gunicorn.util.write_nonblock(sock, head.encode("latin-1") + body)


# Closing a connection "gracefully" (RFC 9112 9.6), Gunicorn half-closes it, then reads until
# the client closes its side, for up to 2 s. The gthread worker does that on its main loop,
# which also accepts and dispatches every request: a client that kept its socket open after a
# "Connection: close" answer, or after a 413 left its body unread, froze the whole worker for
# 2 s (in a soak test, a few of them a second stalled every client and reset connections).
# The linger runs in a thread of its own; past LINGER_MAX at once, sockets close at once.
LINGER_MAX = 64
_linger_close = gunicorn.util.close_graceful
_lingering: set = set()
_lingering_lock = threading.Lock()


def _close_graceful_in_background(sock, *args, **kwargs) -> None:
    """gunicorn.util.close_graceful, run off the caller's thread (at most LINGER_MAX at once)."""
    with _lingering_lock:
        if sock in _lingering:  # closed twice (an error path): the first linger handles it
            return
        if len(_lingering) >= LINGER_MAX:
            gunicorn.util.close(sock)
            return
        _lingering.add(sock)

    def linger() -> None:
        try:
            _linger_close(sock, *args, **kwargs)
        finally:
            with _lingering_lock:
                _lingering.discard(sock)

    threading.Thread(target=linger, name="linger-close", daemon=True).start()


def _stop_past_other_failed_workers(arbiter) -> None:
    """Let Arbiter.stop finish when several workers failed to load the app.

    The first worker that exits with "App failed to load" (a DEVICE this machine lacks) halts
    the master; reaping the next one while stopping raised the same HaltServer again, out of
    halt(): a traceback and exit code 1 instead of one line and 4 (Gunicorn 27, WORKERS > 1).
    """
    stop = arbiter.stop

    def stop_all(graceful: bool = True) -> None:
        while True:  # each HaltServer has reaped one worker: this ends
            try:
                return stop(graceful)
            except HaltServer:
                continue

    arbiter.stop = stop_all


def on_starting(server) -> None:
    """Master start: worker count logged, JSON error pages, calm stops, lingering, fresh metrics."""
    server.log.info("workers: %d (%s)", WORKERS, SETTINGS["WORKERS_REASON"])
    _stop_past_other_failed_workers(server)
    gunicorn.util.write_error = _write_json_error
    gunicorn.util.close_graceful = _close_graceful_in_background
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if metrics_dir:
        Path(metrics_dir).mkdir(parents=True, exist_ok=True)
        for stale in Path(metrics_dir).glob("*.db"):
            stale.unlink()


def post_worker_init(worker) -> None:
    """In the worker: load the model before accepting requests; readiness off on SIGTERM."""
    predictor = getattr(worker.wsgi, "extensions", {}).get("inference")
    if predictor is None:
        return
    predictor.ensure_started()
    stop = worker.handle_exit  # gthread: stop accepting, finish in-flight requests, exit

    def handle_exit(sig, frame) -> None:
        predictor.begin_shutdown()
        stop(sig, frame)

    signal.signal(signal.SIGTERM, handle_exit)
    # Accept requests only once the first look at the store is over (model loaded, or none
    # published, or refused). On SIGHUP, or when a worker is replaced, Gunicorn stops the old
    # worker at once: the new one answered 503 no_model until its model loaded. Meanwhile
    # connections wait in the listen backlog. Bounded well inside the heartbeat timeout.
    predictor.holder.first_poll_done.wait(worker.cfg.timeout / 2)


def child_exit(server, worker) -> None:
    """A worker is gone: free its connection slot, drop its live gauges from the metrics."""
    balanced.release(worker.pid)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:
    """Master exit: remove the metrics folder this master created."""
    own = os.environ.get("INFERENCE_OWN_METRICS_DIR")
    if own and own == os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        shutil.rmtree(own, ignore_errors=True)
