"""The model store on S3-compatible object storage (AWS S3, MinIO, SeaweedFS): s3://bucket/prefix.

The folder store's layout, as object keys under the prefix:
    <prefix>/<version>/model.pt, <prefix>/<version>/model.json, <prefix>/LATEST
Endpoint, region and credentials come from the standard AWS environment variables
(AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), read by boto3.

A version is complete when its model.json exists: publish uploads model.pt, then model.json
(with model.pt's sha256), then replaces LATEST, each object with a single PUT that readers see
whole or not at all. Objects of a version are created with `If-None-Match: *`, so an existing
one is never overwritten; on a server without conditional writes (501) a HEAD check precedes
the PUT instead. Readers go through shared.store's checks (parse_meta, model_from_bytes) and
size limits, refusing an oversized object by its Content-Length before downloading it. S3 has
no symbolic links, FIFOs or devices, so the folder store's refusals of those have no analogue.
"""

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

import boto3
import torch
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as S3ConnectionError

from shared.store import (
    LATEST,
    MAX_LATEST_BYTES,
    MAX_META_BYTES,
    MAX_WEIGHTS_BYTES,
    META_FILE,
    VERSION_RE,
    WEIGHTS_FILE,
    LoadedModel,
    StoreError,
    StoreUnreachable,
    atomic_write_bytes,
    check_publish_meta,
    check_version_name,
    full_meta,
    model_from_bytes,
    parse_meta,
    read_store_file,
    version_name_after,
    versions_to_prune,
    weights_bytes,
)
from shared.stores import S3_SCHEME, Store

# A server poll must fail fast when the store is down, not hang a reload for minutes.
CONNECT_TIMEOUT_S = 3
READ_TIMEOUT_S = 30
MAX_ATTEMPTS = 2  # botocore's standard retry mode: one retry of a throttled or failed call
NAME_TRIES = 5  # fresh version names tried when a name is taken (a concurrent publisher)
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class S3Store(Store):
    """A model store under `s3://bucket/prefix`; downloaded weights are kept in `cache_dir`."""

    def __init__(self, bucket: str, prefix: str, cache_dir: str | Path | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.location = f"{S3_SCHEME}{bucket}/{self.prefix}".rstrip("/")
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.conditional_writes = True  # until the server answers 501 to If-None-Match
        self._client = None
        self._client_pid: int | None = None

    @classmethod
    def from_url(cls, url: str, cache_dir: str | Path | None = None) -> "S3Store":
        """The store at `s3://bucket[/prefix]`."""
        bucket, _, prefix = url.removeprefix(S3_SCHEME).partition("/")
        if not bucket:
            raise StoreError(f"{url!r} names no bucket (expected s3://bucket/prefix)")
        return cls(bucket, prefix, cache_dir)

    @property
    def client(self):
        """A boto3 S3 client of this process (Gunicorn forks: a client is never shared)."""
        if self._client is None or self._client_pid != os.getpid():
            config = Config(
                connect_timeout=CONNECT_TIMEOUT_S,
                read_timeout=READ_TIMEOUT_S,
                retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
            )
            try:
                self._client = boto3.session.Session().client("s3", config=config)
            except BotoCoreError as exc:  # e.g. a malformed AWS_ENDPOINT_URL
                raise StoreError(f"{self.location}: {exc}") from None
            self._client_pid = os.getpid()
        return self._client

    def _key(self, *parts: str) -> str:
        return "/".join([self.prefix, *parts] if self.prefix else parts)

    def _url(self, key: str) -> str:
        return f"{S3_SCHEME}{self.bucket}/{key}"

    def _call(self, what: str, method: str, **kwargs) -> dict:
        """One S3 call; failures become StoreUnreachable (worth retrying) or StoreError."""
        try:
            return getattr(self.client, method)(Bucket=self.bucket, **kwargs)
        except (S3ConnectionError, HTTPClientError) as exc:  # refused, reset, timed out
            raise StoreUnreachable(f"{self.location} unreachable ({what}): {exc}") from None
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status >= 500 and status != 501:
                raise StoreUnreachable(f"{self.location} unreachable ({what}): {exc}") from None
            raise
        except BotoCoreError as exc:  # no credentials, bad endpoint, ...
            raise StoreError(f"{self.location}: {what}: {exc}") from None

    def _get(self, key: str, limit: int) -> bytes | None:
        """An object's bytes (at most `limit`, judged by Content-Length first), None if absent."""
        try:
            response = self._call(f"get {key}", "get_object", Key=key)
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise StoreError(f"cannot read {self._url(key)}: {_message(exc)}") from None
        body = response["Body"]
        with contextlib.closing(body):
            size = response.get("ContentLength", 0)
            if size > limit:
                raise StoreError(
                    f"{self._url(key)} is {size} bytes, more than the {limit} bytes allowed"
                )
            try:
                data = body.read(limit + 1)
            except (S3ConnectionError, HTTPClientError) as exc:
                raise StoreUnreachable(f"{self.location} unreachable (get {key}): {exc}") from None
        if len(data) > limit:  # a Content-Length that lied
            raise StoreError(f"{self._url(key)} is more than the {limit} bytes allowed")
        return data

    def _exists(self, key: str) -> bool:
        try:
            self._call(f"head {key}", "head_object", Key=key)
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                return False
            raise StoreError(f"cannot read {self._url(key)}: {_message(exc)}") from None
        return True

    def _create(self, key: str, data: bytes) -> bool:
        """PUT a new object; False (nothing written) if `key` exists already."""
        if self.conditional_writes:
            try:
                self._call(f"put {key}", "put_object", Key=key, Body=data, IfNoneMatch="*")
                return True
            except ClientError as exc:
                if _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    return False
                if _code(exc) not in ("NotImplemented", "501"):
                    raise StoreError(f"cannot write {self._url(key)}: {_message(exc)}") from None
                self.conditional_writes = False
        # No conditional writes on this server: a check first (a race between the check and
        # the PUT remains possible; version names carry a random suffix, so it needs a clash).
        if self._exists(key):
            return False
        self._put(key, data)
        return True

    def _put(self, key: str, data: bytes) -> None:
        try:
            self._call(f"put {key}", "put_object", Key=key, Body=data)
        except ClientError as exc:
            raise StoreError(f"cannot write {self._url(key)}: {_message(exc)}") from None

    def _keys(self) -> list[str]:
        """Every key under the prefix, relative to it."""
        base = self._key("")
        keys: list[str] = []
        token: dict = {}
        while True:
            try:
                page = self._call("list", "list_objects_v2", Prefix=base, **token)
            except ClientError as exc:
                raise StoreError(f"cannot list {self.location}: {_message(exc)}") from None
            keys += [item["Key"][len(base) :] for item in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return keys
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def list_versions(self) -> list[str]:
        """Complete versions (those with a model.json), oldest first."""
        return sorted(
            key.partition("/")[0]
            for key in self._keys()
            if key.count("/") == 1
            and key.endswith(f"/{META_FILE}")
            and VERSION_RE.match(key.partition("/")[0])
        )

    def version_names(self) -> list[str]:
        """Every version name with an object under it, complete or not."""
        return sorted(
            {k.partition("/")[0] for k in self._keys() if VERSION_RE.match(k.partition("/")[0])}
        )

    def read_latest(self) -> str | None:
        """The version LATEST names, or None when there is no LATEST yet."""
        data = self._get(self._key(LATEST), MAX_LATEST_BYTES)
        if data is None:
            return None
        return check_version_name(data.decode("utf-8", errors="replace").strip())

    def read_meta(self, version: str) -> dict:
        """Download and validate `version`'s model.json."""
        data = self._get(self._key(check_version_name(version), META_FILE), MAX_META_BYTES)
        if data is None:
            raise StoreError(
                f"version {version} has no {META_FILE} in {self.location} (absent or incomplete)"
            )
        return parse_meta(version, data)

    def load_version(self, version: str, device: str | torch.device = "cpu") -> LoadedModel:
        """`version` as a ready model: weights from the cache when their sha256 matches."""
        meta = self.read_meta(version)
        return model_from_bytes(version, meta, self._weights(version, meta), device)

    def _weights(self, version: str, meta: dict) -> bytes:
        # The cache is keyed by the sha256 model.json declares and checked against it: a
        # missing, partial or tampered file is a miss, never an error.
        sha = meta["sha256"]
        cached = self.cache_dir / f"{sha}.pt" if self.cache_dir and SHA256_RE.match(sha) else None
        if cached is not None:
            with contextlib.suppress(OSError, StoreError):
                data = read_store_file(cached, MAX_WEIGHTS_BYTES)
                if hashlib.sha256(data).hexdigest() == sha:
                    return data
        data = self._get(self._key(version, WEIGHTS_FILE), MAX_WEIGHTS_BYTES)
        if data is None:
            raise StoreError(f"{version}: no {WEIGHTS_FILE} in {self.location}")
        if cached is not None and hashlib.sha256(data).hexdigest() == sha:
            with contextlib.suppress(OSError):  # a read-only or full cache costs a download
                cached.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(cached, data)
        return data

    def publish(self, state_dict: dict, meta: dict, make_latest: bool = True) -> str:
        """Upload model.pt, then model.json, under a new name; then point LATEST at it."""
        check_publish_meta(meta)
        weights = weights_bytes(state_dict)
        sha = hashlib.sha256(weights).hexdigest()
        taken = [key.partition("/")[0] for key in self._keys()]
        for _ in range(NAME_TRIES):
            version = version_name_after(taken)
            if self._create(self._key(version, WEIGHTS_FILE), weights):
                break
            taken.append(version)  # another publisher got this name first
        else:
            raise StoreError(f"cannot publish to {self.location}: no free version name")
        try:
            document = (json.dumps(full_meta(version, meta, sha), indent=2) + "\n").encode()
            if not self._create(self._key(version, META_FILE), document):
                raise StoreError(f"{version}/{META_FILE} appeared in {self.location} meanwhile")
            if make_latest:
                self.set_latest(version)
        except StoreError:
            # All or nothing: take the version away again (best effort: the store may be gone).
            with contextlib.suppress(StoreError):
                self._delete(version)
            raise
        return version

    def _delete(self, version: str) -> None:
        # model.json first: the version stops being complete before its weights go.
        for name in (META_FILE, WEIGHTS_FILE):
            try:
                self._call("delete", "delete_object", Key=self._key(version, name))
            except ClientError as exc:
                raise StoreError(f"cannot delete {version}/{name}: {_message(exc)}") from None

    def prune(self, keep: int, dry_run: bool = False) -> list[str]:
        """Delete all but the newest `keep` complete versions, never the one LATEST names.

        Objects of unfinished publishes (model.pt without model.json) are left alone: a
        publisher may be uploading them right now.
        """
        doomed = versions_to_prune(self.list_versions(), self.read_latest(), keep)
        removed = []
        for version in doomed:
            # Re-read LATEST right before each removal: a promote may have moved it meanwhile.
            if not dry_run:
                if self.read_latest() == version:
                    continue
                self._delete(version)
            removed.append(version)
        return removed

    def set_latest(self, version: str) -> None:
        """Point LATEST at an existing, complete version (one PUT: readers see old or new)."""
        if not self._exists(self._key(check_version_name(version), META_FILE)):
            raise StoreError(f"version {version} does not exist in {self.location}")
        self._put(self._key(LATEST), f"{version}\n".encode())


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _message(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    return f"{error.get('Code', '?')}: {error.get('Message', '')}".strip()
