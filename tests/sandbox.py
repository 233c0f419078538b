"""Real write failures for tests that run as root (as CI does), where chmod stops nothing.

- `small_filesystem(mb)`: a size-limited tmpfs, so writes fail with ENOSPC (disk full).
- `read_only_view(folder)`: a read-only bind mount of `folder`, so writes fail with EROFS.
- `permissions_enforced()`: run a subprocess as root without CAP_DAC_OVERRIDE, so a folder
  chmod'ed read-only refuses its writes with EACCES, as it would for any other user.

The mounts live in a private mount namespace held by a sleeping child process: nothing
changes for the rest of the machine, and the mounts vanish with the child, even if the test
process is killed. Tests reach them through /proc/<child>/root, which resolves paths in the
child's namespace, so any process (the trainer, the store CLI) can write there by path.
"""

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE = 1
# Root with CAP_SYS_ADMIN mounts directly; otherwise a user namespace may allow it.
UNSHARE_COMMANDS = (
    ["unshare", "--mount", "--propagation", "private"],
    ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"],
)


def skip_unless_ci(reason: str) -> None:
    """Skip where the machine cannot give the failure; under CI (env CI set) fail instead.

    CI runs as root with mount rights: a skip there would hide that a guarantee went unchecked.
    """
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test: {reason}")
    pytest.skip(reason)


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the test process dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@contextmanager
def _private_mount(script: str, target: Path) -> Iterator[Path]:
    """Run `script` (sh, $0 = target) in a new mount namespace; yield target as seen there."""
    errors = []
    for unshare in UNSHARE_COMMANDS:
        try:
            holder = subprocess.Popen(
                [*unshare, "sh", "-c", f"{script} && echo mounted && exec sleep 3600", target],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                preexec_fn=_die_with_parent,
            )
        except FileNotFoundError:
            skip_unless_ci("no `unshare` command (util-linux) to make a private mount namespace")
        if holder.stdout.readline().strip() == "mounted":
            break
        holder.kill()
        errors.append(f"{' '.join(unshare)}: {holder.communicate()[1].strip()}")
    else:
        skip_unless_ci(f"cannot mount in a private mount namespace here: {'; '.join(errors)}")
    try:
        yield Path(f"/proc/{holder.pid}/root") / target.relative_to("/")
    finally:
        holder.kill()
        holder.wait()


@contextmanager
def small_filesystem(megabytes: int) -> Iterator[Path]:
    """An empty tmpfs of `megabytes` MiB: writes beyond it fail with ENOSPC."""
    mountpoint = Path(tempfile.mkdtemp(prefix="small-fs-"))
    try:
        with _private_mount(f'mount -t tmpfs -o size={megabytes}m tmpfs "$0"', mountpoint) as path:
            yield path
    finally:
        mountpoint.rmdir()


@contextmanager
def read_only_view(folder: Path) -> Iterator[Path]:
    """`folder` through a read-only bind mount: reads work, every write fails with EROFS."""
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0"'
    with _private_mount(script, Path(folder).resolve()) as path:
        yield path


def fill(folder: Path) -> None:
    """Write a file into `folder` until its filesystem is full."""
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass


def _drop_write_override() -> None:
    """In the child before exec: lose CAP_DAC_OVERRIDE, the capability that lets root write
    where permissions forbid it. Root keeps the rest (reading its private files included)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE) failed")


@cache
def _permission_check_works() -> str | None:
    """None if a child without CAP_DAC_OVERRIDE is refused a write to a 0o555 folder."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "read-only"
        folder.mkdir(mode=0o555)
        probe = f"open({str(folder / 'x')!r}, 'w')"
        try:
            result = subprocess.run(
                [sys.executable, "-c", probe],
                preexec_fn=_drop_write_override,
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return f"cannot drop CAP_DAC_OVERRIDE for a child process ({exc})"
        finally:
            folder.chmod(0o755)
    if "PermissionError" not in result.stderr:
        return "a child without CAP_DAC_OVERRIDE could still write to a read-only folder"
    return None


def permissions_enforced() -> Callable[[], None] | None:
    """A preexec_fn under which file permissions bind a root child as they bind any user.

    As root (CI), chmod alone stops nothing: the child loses CAP_DAC_OVERRIDE. As another
    user, permissions already apply: None. Skips the test, with the reason, where the
    capability cannot be dropped (fails under CI).
    """
    if os.geteuid() != 0:
        return None
    reason = _permission_check_works()
    if reason:
        skip_unless_ci(reason)
    return _drop_write_override
