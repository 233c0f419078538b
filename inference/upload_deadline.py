"""A deadline for receiving a whole request body, however slowly the client trickles it.

The socket timeout (CLIENT_TIMEOUT_SECONDS) bounds each pause, but Gunicorn reads a body until
it has all the bytes asked for: a client sending a byte a second never pauses long enough and
would hold a request thread for as long as it likes. One thread per worker watches the bodies
being received; at a body's deadline it shuts the read side of its socket, the blocked read
returns short, and the route answers 408 (the response can still be written).
"""

import contextlib
import os
import socket
import threading
import time
from dataclasses import dataclass


@dataclass(eq=False)
class Watch:
    """One request body being received: its socket, deadline, and whether it ran out."""

    sock: socket.socket
    deadline: float
    expired: bool = False


class UploadDeadlines:
    """Cuts off request bodies that take longer than `seconds` to arrive."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        # How often the deadlines are checked: a body is cut off at most this late.
        self.tick = min(1.0, seconds / 4)
        self._watched: set[Watch] = set()
        self._lock = threading.Lock()
        self._pid: int | None = None  # the process whose thread is running (forks lose it)

    def watch(self, sock: socket.socket) -> Watch:
        """Start the clock on the body arriving on `sock`; call `release` once it is read."""
        entry = Watch(sock, time.monotonic() + self.seconds)
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="upload-deadlines", daemon=True).start()
            self._watched.add(entry)
        return entry

    def release(self, entry: Watch) -> bool:
        """Stop watching a body that has been read (or never will be); True if it was cut off."""
        with self._lock:
            self._watched.discard(entry)
            return entry.expired

    def _run(self) -> None:
        while True:
            time.sleep(self.tick)
            now = time.monotonic()
            # Under the lock: a body released meanwhile is never cut off afterwards.
            with self._lock:
                overdue = [entry for entry in self._watched if entry.deadline <= now]
                self._watched.difference_update(overdue)
                for entry in overdue:
                    entry.expired = True
                    with contextlib.suppress(OSError):  # the client may be gone already
                        entry.sock.shutdown(socket.SHUT_RD)
