"""One interface over every kind of model store: `open_store(location) -> Store`.

Trainer, server and CLI call a Store and never branch on the medium. Two backends share the
layout and the checks of shared.store: a folder (LocalStore) and S3-compatible object storage
(shared.s3store.S3Store, for `s3://bucket/prefix`).
"""

from abc import ABC, abstractmethod
from pathlib import Path

import torch

from shared import store
from shared.store import LoadedModel

S3_SCHEME = "s3://"


class Store(ABC):
    """A model store: versions (model.pt + model.json) and LATEST, the one to serve."""

    location: str  # what the user gave: a folder or s3://bucket/prefix

    @abstractmethod
    def list_versions(self) -> list[str]:
        """Complete versions, oldest first."""

    @abstractmethod
    def version_names(self) -> list[str]:
        """Every version name in the store, oldest first, complete or not (for reports)."""

    @abstractmethod
    def read_latest(self) -> str | None:
        """The version LATEST names, or None when there is no LATEST yet."""

    @abstractmethod
    def read_meta(self, version: str) -> dict:
        """The validated model.json of `version`."""

    @abstractmethod
    def load_version(self, version: str, device: str | torch.device = "cpu") -> LoadedModel:
        """`version` as a ready eval-mode model (sha256 checked, weights_only, strict fit)."""

    @abstractmethod
    def publish(self, state_dict: dict, meta: dict, make_latest: bool = True) -> str:
        """Write a new version completely, then (by default) point LATEST at it; its name."""

    @abstractmethod
    def set_latest(self, version: str) -> None:
        """Point LATEST at an existing, complete version."""

    @abstractmethod
    def prune(self, keep: int, dry_run: bool = False) -> list[str]:
        """Remove all but the newest `keep` versions, never LATEST's; the names removed."""

    def rollback(self) -> str:
        """Point LATEST at the version published before the current one; return it."""
        target = store.rollback_target(self.list_versions(), self.read_latest(), self.location)
        self.set_latest(target)
        return target

    def __str__(self) -> str:
        return self.location


class LocalStore(Store):
    """A model store in a folder (the functions of shared.store)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.location = str(root)

    def list_versions(self) -> list[str]:
        """Complete versions, oldest first."""
        return store.list_versions(self.root)

    def version_names(self) -> list[str]:
        """Every folder named like a version, usable or not."""
        return store.version_folders(self.root)

    def read_latest(self) -> str | None:
        """The version LATEST names, or None."""
        return store.read_latest(self.root)

    def read_meta(self, version: str) -> dict:
        """The validated model.json of `version`."""
        return store.read_meta(self.root, version)

    def load_version(self, version: str, device: str | torch.device = "cpu") -> LoadedModel:
        """`version` as a ready eval-mode model."""
        return store.load_version(self.root, version, device)

    def publish(self, state_dict: dict, meta: dict, make_latest: bool = True) -> str:
        """Publish a new version into the folder."""
        return store.publish(self.root, state_dict, meta, make_latest=make_latest)

    def set_latest(self, version: str) -> None:
        """Point LATEST at `version`."""
        store.set_latest(self.root, version)

    def rollback(self) -> str:
        """Point LATEST at the version before the current one."""
        return store.rollback(self.root)

    def prune(self, keep: int, dry_run: bool = False) -> list[str]:
        """Remove old versions and the temporary folders of killed publishers."""
        return store.prune(self.root, keep, dry_run=dry_run)


def open_store(location: str | Path, cache_dir: str | Path | None = None) -> Store:
    """The store at `location`: a folder, or `s3://bucket/prefix` (credentials, endpoint and
    region from the standard AWS environment variables). `cache_dir` keeps downloaded weights
    of a remote store (None: no cache); a folder store reads its files in place.
    """
    text = str(location)
    if text.startswith(S3_SCHEME):
        # Imported here: boto3 costs a second of start-up that folder users need not pay.
        from shared.s3store import S3Store

        return S3Store.from_url(text, cache_dir=cache_dir)
    return LocalStore(location)
