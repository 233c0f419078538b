"""The model store: publish, list, point LATEST at, and load self-describing model versions.

Layout of MODELS_DIR:
    <version>/model.pt     state_dict only (tensors), loadable with weights_only=True
    <version>/model.json   format_version, arch, class names, preprocessing, metrics, sha256, ...
    LATEST                 one line: the version to serve, replaced atomically
A version folder is written as `.tmp-<version>` and renamed into place only when complete.
Its publisher holds an flock on that folder while it writes, so the temporary folders of
killed publishers (unlocked) can be told from live ones and removed (`remove_stale_temp_folders`).
"""

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from shared.model import ARCHS, build_model

FORMAT_VERSION = 1
LATEST = "LATEST"
TMP_PREFIX = ".tmp-"
WEIGHTS_FILE = "model.pt"
META_FILE = "model.json"
# 20261128T201500123Z-3f9a1c: UTC time to the millisecond, then a random suffix so that
# concurrent publishers never collide; names sort by creation time.
VERSION_RE = re.compile(r"^\d{8}T\d{9}Z-[0-9a-f]{6}$")
# Accepted model.json image_size, in pixels: a hostile value must not make a server allocate
# a gigantic warm-up batch.
IMAGE_SIZE_RANGE = (8, 1024)
# Largest files a reader accepts. Another process writes the store: a LATEST or model.json
# that is a link to /dev/zero, or simply huge, must not make a server read without end.
MAX_LATEST_BYTES = 256
MAX_META_BYTES = 1 << 20  # model.json is a few kB
MAX_WEIGHTS_BYTES = 2 << 30  # ResNet-18 is 45 MB
REQUIRED_META = (
    "format_version",
    "version",
    "arch",
    "num_classes",
    "class_names",
    "image_size",
    "mean",
    "std",
    "sha256",
    "metrics",
)
# model.json keys that publish() writes itself; a caller's meta may not set them.
STORE_KEYS = ("format_version", "version", "created_at", "num_classes", "sha256")


class StoreError(Exception):
    """A model store operation failed; the message names the cause."""


class StoreUnreachable(StoreError):
    """The store did not answer (network, server down): worth retrying, unlike a bad version."""


@dataclass
class LoadedModel:
    """A published version turned into an eval-mode model on a device."""

    version: str
    meta: dict
    model: nn.Module
    device: torch.device


def default_models_dir() -> str:
    """MODELS_DIR from the environment, else ./volumes/models (a str: s3:// URLs stay whole)."""
    return os.environ.get("MODELS_DIR", "volumes/models")


def new_version_name(now: datetime | None = None) -> str:
    """A fresh version name that sorts by UTC time (millisecond resolution)."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z-{secrets.token_hex(3)}"


def _next_version_name(models_dir: Path) -> str:
    """A new name that sorts after every version already in the store (rollback relies on it)."""
    return version_name_after(p.name for p in Path(models_dir).iterdir())


def version_name_after(names: Iterable[str]) -> str:
    """A new version name that sorts after every version name among `names`."""
    newest = max((name for name in names if VERSION_RE.match(name)), default="")
    while True:
        name = new_version_name()
        # Same millisecond as the newest (or a clock step back): wait for the clock to pass it.
        if name[:18] > newest[:18]:
            return name
        time.sleep(0.001)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A unique temporary path beside `path`: the file the block writes there is fsynced and
    renamed to `path` when the block ends without error, else removed. Readers see the old
    file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:  # also writes the pages that writers changed through a shared memory map
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        # Usually gone (renamed); on a read-only folder unlink fails too, and must not hide
        # the error that matters.
        with contextlib.suppress(OSError):
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, *chunks: bytes | memoryview) -> None:
    """Write `chunks` to `path` so readers see the old file or the whole new one, never a part."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for chunk in chunks:  # several buffers: a large array is written without a copy
            f.write(chunk)


def atomic_write_json(path: Path, obj: dict) -> None:
    """Atomically write `obj` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def torch_bytes(obj: object) -> bytes:
    """What torch.save writes for `obj`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def atomic_torch_save(obj: object, path: Path) -> None:
    """torch.save through a temporary file: a crash never leaves a half-written checkpoint."""
    atomic_write_bytes(path, torch_bytes(obj))


def weights_bytes(state_dict: dict) -> bytes:
    """The model.pt bytes of a state_dict: its tensors, detached, on the CPU."""
    return torch_bytes({k: v.detach().cpu() for k, v in state_dict.items()})


def check_publish_meta(meta: dict) -> None:
    """Refuse a publisher's `meta` that sets the keys publish writes itself (STORE_KEYS)."""
    reserved = [key for key in STORE_KEYS if key in meta]
    if reserved:
        raise StoreError(f"meta may not set {', '.join(reserved)}: publish writes them itself")


def full_meta(version: str, meta: dict, sha256: str) -> dict:
    """The model.json of a new version: the publisher's `meta` plus what the store adds."""
    return {
        **meta,
        "format_version": FORMAT_VERSION,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "num_classes": len(meta["class_names"]),
        "sha256": sha256,
    }


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_store_file(path: Path, limit: int) -> bytes:
    """The bytes of a store file, which must be a regular file (no symlink, FIFO or device)
    of at most `limit` bytes: StoreError otherwise. A missing file raises FileNotFoundError.
    """
    path = Path(path)
    try:
        # O_NOFOLLOW: a symlink is refused, not followed. O_NONBLOCK: opening a FIFO does not
        # wait for a writer (it is then refused as not a regular file).
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreError(
                f"{path} is a symbolic link; store files must be plain files"
            ) from None
        raise
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise StoreError(f"{path} is not a regular file")
        if info.st_size > limit:
            raise StoreError(f"{path} is {info.st_size} bytes, more than the {limit} bytes allowed")
        data = f.read(limit + 1)
    if len(data) > limit:  # grew while we read
        raise StoreError(f"{path} is more than the {limit} bytes allowed")
    return data


def check_version_name(version: str) -> str:
    """Return `version` if it is a well-formed version name, else raise StoreError."""
    if not VERSION_RE.match(version):
        raise StoreError(
            f"{version!r} is not a version name (expected like 20261128T201500123Z-3f9a1c)"
        )
    return version


def version_dir(models_dir: Path, version: str) -> Path:
    """The folder of `version`, refusing names or symlinks that lead outside `models_dir`."""
    models_dir = Path(models_dir)
    path = models_dir / check_version_name(version)
    if path.is_symlink():
        raise StoreError(f"version {version} is a symbolic link; versions must be folders")
    if not path.is_dir():
        raise StoreError(f"version {version} does not exist in {models_dir}")
    return path


def list_versions(models_dir: Path) -> list[str]:
    """Complete versions in the store, oldest first (hidden temporary folders excluded)."""
    models_dir = Path(models_dir)
    return [
        v
        for v in version_folders(models_dir)
        if (models_dir / v).is_dir()
        and not (models_dir / v).is_symlink()
        and (models_dir / v / META_FILE).is_file()
    ]


def version_folders(models_dir: Path) -> list[str]:
    """Every entry named like a version, oldest first, usable or not (for reports)."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return []
    return sorted(p.name for p in models_dir.iterdir() if VERSION_RE.match(p.name))


def read_latest(models_dir: Path) -> str | None:
    """The version LATEST names, or None when there is no LATEST yet."""
    try:
        data = read_store_file(Path(models_dir) / LATEST, MAX_LATEST_BYTES)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot read {LATEST}: {exc.strerror}") from None
    return check_version_name(data.decode("utf-8", errors="replace").strip())


def set_latest(models_dir: Path, version: str) -> None:
    """Point LATEST at an existing, complete version (atomic replace)."""
    meta_path = version_dir(models_dir, version) / META_FILE
    if not meta_path.is_file():
        raise StoreError(f"version {version} has no {META_FILE}")
    try:
        atomic_write_bytes(Path(models_dir) / LATEST, f"{version}\n".encode())
    except OSError as exc:
        raise StoreError(
            f"cannot point {LATEST} at {version} in {models_dir}: {exc.strerror or exc}"
        ) from None


def rollback(models_dir: Path) -> str:
    """Point LATEST at the version published before the current one; return it."""
    target = rollback_target(list_versions(models_dir), read_latest(models_dir), models_dir)
    set_latest(models_dir, target)
    return target


def rollback_target(versions: list[str], current: str | None, where: object) -> str:
    """The version before `current` among `versions` (oldest first), or StoreError."""
    if not versions:
        raise StoreError(f"no versions in {where}: nothing to roll back to")
    older = [v for v in versions if current is None or v < current]
    if not older:
        raise StoreError(f"{current} is the oldest version: nothing older to roll back to")
    return older[-1]


def _lock_folder(path: Path, block: bool) -> int | None:
    """A descriptor holding an exclusive flock on folder `path`, or None if another holds it.

    A publisher holds this lock on its temporary folder while it writes; the kernel releases it
    when the publisher dies, however it dies, so an unlocked temporary folder is abandoned.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if block else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _still_at(fd: int, path: Path) -> bool:
    """Whether `path` still leads to the folder open as `fd` (not removed or replaced)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
    except FileNotFoundError:
        return False


def _new_locked_temp_folder(models_dir: Path) -> tuple[str, Path, int]:
    """A fresh version name, its empty `.tmp-<version>` folder, and the lock held on it."""
    while True:
        version = _next_version_name(models_dir)
        tmp = models_dir / f"{TMP_PREFIX}{version}"
        tmp.mkdir()
        fd = _lock_folder(tmp, block=True)
        # Between mkdir and flock the folder was unlocked: a cleaner may have removed it (it
        # held the lock meanwhile, so ours waited). It is ours only if still in place.
        if _still_at(fd, tmp):
            return version, tmp, fd
        os.close(fd)


def remove_stale_temp_folders(models_dir: Path, dry_run: bool = False) -> list[str]:
    """Remove the `.tmp-<version>` folders no live publisher holds (killed ones); their names.

    A live publisher's folder is locked and never touched. With `dry_run`, only report.
    """
    try:
        entries = sorted(p for p in Path(models_dir).iterdir() if p.name.startswith(TMP_PREFIX))
    except FileNotFoundError:
        return []
    removed = []
    for path in entries:
        try:
            fd = _lock_folder(path, block=False)
        except OSError:  # gone meanwhile, or not a plain folder: not ours to remove
            continue
        if fd is None:  # a publisher is writing it
            continue
        try:
            if _still_at(fd, path):
                if not dry_run:
                    shutil.rmtree(path)
                removed.append(path.name)
        finally:
            os.close(fd)
    return removed


def prune(models_dir: Path, keep: int, dry_run: bool = False) -> list[str]:
    """Remove all but the newest `keep` complete versions, never the one LATEST names, and the
    temporary folders of killed publishers; return the names removed (with `dry_run`, would be).
    """
    models_dir = Path(models_dir)
    # An unreadable LATEST stops here: nothing is removed.
    doomed = versions_to_prune(list_versions(models_dir), read_latest(models_dir), keep)
    removed = []
    try:
        for version in doomed:
            # Re-read LATEST right before each removal: a promote may have moved it meanwhile.
            if not dry_run and read_latest(models_dir) != version:
                # Out of sight first (atomic): a prune killed mid-way leaves a temporary
                # folder for the next clean-up, never half a version. Locked, so that a
                # publisher's clean-up does not remove it at the same time.
                lock = _lock_folder(models_dir / version, block=True)
                try:
                    hidden = models_dir / f"{TMP_PREFIX}{version}"
                    os.rename(models_dir / version, hidden)
                    shutil.rmtree(hidden)
                finally:
                    os.close(lock)
            if dry_run or not (models_dir / version).exists():
                removed.append(version)
        removed += remove_stale_temp_folders(models_dir, dry_run=dry_run)
    except OSError as exc:
        raise StoreError(f"cannot prune {models_dir}: {exc.strerror or exc}") from None
    return removed


def versions_to_prune(versions: list[str], latest: str | None, keep: int) -> list[str]:
    """The versions (oldest first) a prune keeping the newest `keep` removes: never LATEST's."""
    if keep < 0:
        raise StoreError(f"keep must be 0 or more, not {keep}")
    kept = set(versions[len(versions) - keep :] if keep else []) | {latest}
    return [v for v in versions if v not in kept]


def _latest_may_name(models_dir: Path, version: str) -> bool:
    """Whether LATEST names `version`, or cannot be read (then it might)."""
    try:
        return read_latest(models_dir) == version
    except (OSError, StoreError):
        return True


def publish(models_dir: Path, state_dict: dict, meta: dict, make_latest: bool = True) -> str:
    """Write a new version (weights + model.json) and, by default, point LATEST at it.

    All or nothing: the version appears under its name only once both files are complete and
    synced, and on any error it is removed again and LATEST is untouched -- unless LATEST
    already names it (the folder sync after moving LATEST failed): a served version stays.
    `meta` may not set the keys publish writes itself (STORE_KEYS).
    """
    check_publish_meta(meta)
    models_dir = Path(models_dir)
    tmp: Path | None = None
    lock: int | None = None
    renamed = False
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # housekeeping never fails a publish
            remove_stale_temp_folders(models_dir)
        version, tmp, lock = _new_locked_temp_folder(models_dir)
        weights = tmp / WEIGHTS_FILE
        atomic_write_bytes(weights, weights_bytes(state_dict))
        atomic_write_json(tmp / META_FILE, full_meta(version, meta, sha256_file(weights)))
        os.rename(tmp, models_dir / version)
        renamed = True
        _fsync_dir(models_dir)
        if make_latest:
            set_latest(models_dir, version)
    except (OSError, StoreError) as exc:
        if isinstance(exc, StoreError):
            reason = str(exc)
        else:
            reason = f"cannot publish to {models_dir}: {exc.strerror or exc}"
        if renamed and _latest_may_name(models_dir, version):
            raise StoreError(f"{reason} ({version} is kept: {LATEST} names it)") from None
        if tmp is not None:
            # Out of sight first (a rename is atomic), then removed.
            if renamed:
                with contextlib.suppress(OSError):
                    os.rename(models_dir / version, tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        raise StoreError(reason) from None
    finally:
        if lock is not None:
            os.close(lock)
    return version


def read_meta(models_dir: Path, version: str) -> dict:
    """Read and validate a version's model.json."""
    path = version_dir(models_dir, version) / META_FILE
    try:
        data = read_store_file(path, MAX_META_BYTES)
    except OSError as exc:
        raise StoreError(f"{version}: unreadable {META_FILE} ({exc})") from None
    return parse_meta(version, data)


def parse_meta(version: str, data: bytes) -> dict:
    """Validate the bytes of `version`'s model.json (every store's readers use this check)."""
    try:
        meta = json.loads(data.decode("utf-8"))
    except ValueError as exc:
        raise StoreError(f"{version}: unreadable {META_FILE} ({exc})") from None
    if not isinstance(meta, dict):
        raise StoreError(f"{version}: {META_FILE} is not an object")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise StoreError(f"{version}: {META_FILE} lacks {', '.join(missing)}")
    if meta["version"] != version:
        # A folder copied or renamed by hand: the server would report the wrong version.
        raise StoreError(f"{version}: {META_FILE} names version {meta['version']!r}")
    if meta["format_version"] != FORMAT_VERSION:
        raise StoreError(f"{version}: unsupported format_version {meta['format_version']}")
    if meta["arch"] not in ARCHS:
        raise StoreError(f"{version}: unknown arch {meta['arch']!r}")
    names = meta["class_names"]
    if not isinstance(names, list) or len(names) != meta["num_classes"] or len(names) < 2:
        raise StoreError(f"{version}: class_names does not match num_classes")
    if not all(isinstance(name, str) for name in names):
        raise StoreError(f"{version}: class_names must be strings")
    low, high = IMAGE_SIZE_RANGE
    size = meta["image_size"]
    if type(size) is not int or not low <= size <= high:
        raise StoreError(f"{version}: image_size must be an integer from {low} to {high}")
    for key in ("mean", "std"):
        values = meta[key]
        if not (
            isinstance(values, list)
            and len(values) == 3
            and all(type(v) in (int, float) and math.isfinite(v) for v in values)
        ):
            raise StoreError(f"{version}: {key} must be a list of 3 numbers")
    if min(meta["std"]) <= 0:
        raise StoreError(f"{version}: std must be positive")
    return meta


def load_version(models_dir: Path, version: str, device: str | torch.device = "cpu") -> LoadedModel:
    """Turn a published version into a ready eval-mode model: the one loader everyone uses.

    Checks model.json, the sha256 of model.pt, loads tensors only (weights_only=True, so no
    pickled code can run), and requires the state_dict to fit the declared arch exactly.
    """
    meta = read_meta(models_dir, version)
    weights = version_dir(models_dir, version) / WEIGHTS_FILE
    try:
        # Read once: the bytes that pass the checksum are the bytes that get loaded.
        data = read_store_file(weights, MAX_WEIGHTS_BYTES)
    except OSError as exc:
        raise StoreError(f"{version}: cannot read {WEIGHTS_FILE} ({exc.strerror})") from None
    return model_from_bytes(version, meta, data, device)


def model_from_bytes(
    version: str, meta: dict, data: bytes, device: str | torch.device = "cpu"
) -> LoadedModel:
    """The model from model.pt's bytes and the validated meta: sha256, weights_only, strict fit."""
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise StoreError(f"{version}: sha256 of {WEIGHTS_FILE} does not match {META_FILE}")
    try:
        state_dict = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for refused payloads
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreError(f"{version}: refused {WEIGHTS_FILE}: {first_line[:200]}") from None
    model = build_model(meta["arch"], meta["num_classes"])
    try:
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise StoreError(
            f"{version}: weights do not fit {meta['arch']}: {first_line[:200]}"
        ) from None
    device = torch.device(device)
    model.to(device).eval()
    return LoadedModel(version=version, meta=meta, model=model, device=device)
