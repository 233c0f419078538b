"""Each torchrun attempt meets in its own part of torchrun's store (trainer/distributed.py).

torchrun's agent serves one TCPStore for the whole job; without a prefix per attempt, a
restarted process could read the address a killed process left under the same key and wait on
it (gloo's connect, pytorch#135712). Here the agent's store is a real TCPStore on loopback.
"""

from datetime import timedelta

import pytest
import torch.distributed as dist

from trainer.distributed import attempt_store


@pytest.fixture
def agent_store(monkeypatch):
    """A TCPStore server as torchrun's agent runs it, and the variables it gives workers."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    return server


def test_a_restarted_attempt_does_not_see_the_keys_of_the_killed_one(agent_store, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    first = attempt_store()
    first.set("0", "address of a process that is killed")  # gloo's key for rank 0
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    second = attempt_store()
    assert not second.check(["0"])  # rank 1 of the restart waits for rank 0's new address
    second.set("0", "new address")
    assert first.get("0") == b"address of a process that is killed"
    assert second.get("0") == b"new address"


def test_without_torchruns_shared_store_torchruns_default_is_used(monkeypatch):
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, or an older torchrun: a fresh store per attempt.
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    assert attempt_store() is None
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE")
    assert attempt_store() is None
