"""The model store on a real S3-compatible server (SeaweedFS): same layout, same guarantees and
the same refusals as the folder store."""

import hashlib
import io
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from bench.servers import model_meta
from shared import s3store, store
from shared.model import build_model
from shared.stores import open_store
from tests.conftest import REPO, publish_random_model
from tests.s3.seaweed import ACCESS_KEY, REGION, SECRET_KEY, free_ports
from tests.shared.test_store import Payload


def bucket_and_prefix(url: str) -> tuple[str, str]:
    """('bucket', 'prefix') of s3://bucket/prefix."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return bucket, prefix


def put(seaweed, url: str, key: str, data: bytes) -> None:
    """Plant an object under the store's prefix, as a hostile writer would."""
    bucket, prefix = bucket_and_prefix(url)
    seaweed.client().put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=data)


def get(seaweed, url: str, key: str) -> bytes:
    """An object under the store's prefix."""
    bucket, prefix = bucket_and_prefix(url)
    return seaweed.client().get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m shared ARGS` for real (the AWS variables come from the environment)."""
    return subprocess.run(
        [sys.executable, "-m", "shared", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_s3_publish_and_load_round_trip(s3_url, seaweed, cache_dir):
    models = open_store(s3_url, cache_dir=cache_dir)
    version = publish_random_model(s3_url, seed=3)
    assert models.list_versions() == [version] and models.read_latest() == version
    # The folder store's layout, as keys under the prefix.
    meta = json.loads(get(seaweed, s3_url, f"{version}/model.json"))
    weights = get(seaweed, s3_url, f"{version}/model.pt")
    assert meta["sha256"] == hashlib.sha256(weights).hexdigest()
    assert get(seaweed, s3_url, "LATEST").decode().strip() == version
    loaded = models.load_version(version)
    expected = torch.load(io.BytesIO(weights), weights_only=True)
    assert expected.keys() == loaded.model.state_dict().keys()
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    # Downloaded once, kept under its sha256; a second load reads the cache.
    assert (cache_dir / f"{meta['sha256']}.pt").read_bytes() == weights


def test_s3_cache_is_checked_by_sha256_before_use(s3_url, cache_dir, clone_version):
    models = open_store(s3_url, cache_dir=cache_dir)
    version = clone_version()
    sha = models.read_meta(version)["sha256"]
    models.load_version(version)
    cached = cache_dir / f"{sha}.pt"
    good = cached.read_bytes()
    cached.write_bytes(good[:1000])  # truncated or tampered: a miss, not an error
    assert models.load_version(version).version == version
    assert cached.read_bytes() == good  # downloaded again and rewritten


@pytest.mark.parametrize("conditional", [True, False], ids=["if-none-match", "head-check"])
def test_s3_existing_version_is_never_overwritten(
    s3_url, seaweed, monkeypatch, clone_version, conditional
):
    first = clone_version()
    before = get(seaweed, s3_url, f"{first}/model.pt")
    models = open_store(s3_url)
    models.conditional_writes = conditional
    # A writer that picks an existing name (a clock step back, a clash with another
    # publisher): the PUT is refused and the next name is used.
    names = iter([first])
    real = s3store.version_name_after
    monkeypatch.setattr(
        s3store, "version_name_after", lambda taken: next(names, None) or real(taken)
    )
    second = models.publish(build_model("resnet18", 10).state_dict(), model_meta())
    assert second != first and models.list_versions() == [first, second]
    assert get(seaweed, s3_url, f"{first}/model.pt") == before


def test_s3_server_supports_conditional_writes(s3_url, seaweed):
    """SeaweedFS answers If-None-Match: * with 412 on an existing key, so publish relies on it."""
    models = open_store(s3_url)
    key = models._key("probe")
    assert models._create(key, b"one") and not models._create(key, b"two")
    assert models.conditional_writes and get(seaweed, s3_url, "probe") == b"one"


def _hostile(seaweed, url, tmp_path, case, version) -> tuple[str, str]:
    """Make `version` hostile as `case` says; return (version to load, expected message)."""
    meta = json.loads(get(seaweed, url, f"{version}/model.json"))
    if case == "pickle payload":
        data = store.torch_bytes({"conv1.weight": Payload(tmp_path / "pwned")})
        put(seaweed, url, f"{version}/model.pt", data)
        meta["sha256"] = hashlib.sha256(data).hexdigest()  # the attacker writes both
        put(seaweed, url, f"{version}/model.json", json.dumps(meta).encode())
        return version, "refused model.pt"
    if case == "wrong sha256":
        put(
            seaweed, url, f"{version}/model.json", json.dumps({**meta, "sha256": "0" * 64}).encode()
        )
        return version, "sha256"
    if case == "bad meta":
        put(seaweed, url, f"{version}/model.json", json.dumps({**meta, "num_classes": 9}).encode())
        return version, "class_names does not match"
    if case == "meta not json":
        put(seaweed, url, f"{version}/model.json", b"\xff{")
        return version, "unreadable model.json"
    if case == "missing model.json":
        bucket, prefix = bucket_and_prefix(url)
        seaweed.client().delete_object(Bucket=bucket, Key=f"{prefix}/{version}/model.json")
        return version, "has no model.json"
    if case == "missing version":
        return "20991231T000000000Z-abcdef", "has no model.json"
    raise AssertionError(case)


HOSTILE = [
    "pickle payload",
    "wrong sha256",
    "bad meta",
    "meta not json",
    "missing model.json",
    "missing version",
]


@pytest.mark.parametrize("case", HOSTILE)
def test_s3_hostile_version_is_refused(s3_url, seaweed, tmp_path, clone_version, case):
    version, reason = _hostile(seaweed, s3_url, tmp_path, case, clone_version())
    with pytest.raises(store.StoreError, match=reason):
        open_store(s3_url).load_version(version)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("latest", [b"../x", b"/etc/passwd", b"", b"x" * 300])
def test_s3_malformed_latest_is_refused(s3_url, seaweed, latest):
    put(seaweed, s3_url, "LATEST", latest)
    with pytest.raises(store.StoreError):
        open_store(s3_url).read_latest()


def test_s3_oversized_object_is_refused_by_content_length(s3_url, monkeypatch, clone_version):
    version = clone_version()
    monkeypatch.setattr(s3store, "MAX_WEIGHTS_BYTES", 1000)
    # "is N bytes": judged by the Content-Length header, before the body is read.
    with pytest.raises(store.StoreError, match=r"model\.pt is \d+ bytes, more than the 1000"):
        open_store(s3_url).load_version(version)


def test_s3_unreachable_store_is_reported_as_such(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")
    for name, value in (
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        ("AWS_DEFAULT_REGION", REGION),
    ):
        monkeypatch.setenv(name, value)
    start = time.monotonic()
    with pytest.raises(store.StoreUnreachable, match="unreachable"):
        open_store("s3://nobody-listens/models").read_latest()
    assert time.monotonic() - start < 15  # fails fast: a server's poll must not hang


@pytest.mark.slow  # real subprocesses importing torch: 20-90 s on a busy 2-core machine
def test_s3_cli_lists_promotes_and_rolls_back(s3_url):
    first = publish_random_model(s3_url, seed=0)
    second = publish_random_model(s3_url, seed=1)
    listing = run_cli("--models-dir", s3_url, "list")
    assert listing.returncode == 0, listing.stderr
    assert f"* {second}" in listing.stdout and f"  {first}" in listing.stdout
    # MODELS_DIR alone (as compose sets it) names the same store: the URL is kept whole.
    assert run_cli("list", env={"MODELS_DIR": s3_url}).stdout == listing.stdout
    assert run_cli("--models-dir", s3_url, "rollback").returncode == 0
    assert open_store(s3_url).read_latest() == first
    assert run_cli("--models-dir", s3_url, "promote", second).returncode == 0
    assert open_store(s3_url).read_latest() == second
    bad = run_cli("--models-dir", s3_url, "promote", "20990101T000000000Z-000000")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr


RACER = """
import sys
from tests.conftest import publish_random_model
print("ready", flush=True)
sys.stdin.readline()
print(publish_random_model(sys.argv[1], seed=int(sys.argv[2])), flush=True)
"""


@pytest.mark.slow  # real subprocesses importing torch: 20-90 s on a busy 2-core machine
def test_s3_two_publishers_racing_make_two_complete_versions(s3_url, seaweed):
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, s3_url, str(seed)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    # Both import torch first; then both are told to publish at once.
    for racer in racers:
        assert racer.stdout.readline().strip() == "ready"
    for racer in racers:
        racer.stdin.write("go\n")
        racer.stdin.flush()
    outputs = [racer.communicate(timeout=120) for racer in racers]
    assert all(racer.returncode == 0 for racer in racers), outputs
    published = [out.strip().splitlines()[-1] for out, _ in outputs]
    models = open_store(s3_url)
    assert len(set(published)) == 2 and models.list_versions() == sorted(published)
    assert models.read_latest() in published
    for version, seed in zip(published, (1, 2), strict=True):
        loaded = models.load_version(version)  # complete: its sha256 matches
        assert loaded.meta["config"]["seed"] == seed
