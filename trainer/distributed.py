"""Training under torchrun: process group, shards, reductions, and what only rank 0 does.

`torchrun --nproc-per-node N -m trainer` starts N copies of the trainer with RANK, WORLD_SIZE
and LOCAL_RANK set. Without torchrun (or with one process) every function here is the plain
case: rank 0 of 1, no process group; reductions and broadcasts return their input.

--batch-size is the global batch: each of the N ranks takes batch_size / N images of every
step's batch, so N processes with the same flags take the same steps, see the same images per
step and follow the same learning-rate schedule as one process.
"""

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from shared.device import DeviceError, resolve_device
from shared.store import atomic_write_json
from trainer import TrainerError
from trainer.loop import STOP, shard_batches

# Each rank writes DEBUG_DIR/rank<r>-epoch<e>.json (its shard, pid, and a sha256 of its
# weights) after every epoch's training step: observation only, used by the tests.
DEBUG_DIR_ENV = "TRAINER_DEBUG_DIR"


@dataclass
class Dist:
    """Where this process stands: its rank among world_size, and the device it trains on."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # Stop flags and Python objects travel over gloo (CPU) even when training uses NCCL, so
    # checking for a signal at every step never waits for the GPU.
    control: object = None

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run folder and publishes."""
        return self.rank == 0


def init_distributed_mode(device_choice: str) -> Dist:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU); one process: nothing to join."""
    try:
        device = resolve_device(device_choice)
    except DeviceError as exc:
        raise TrainerError(f"--device (env DEVICE) {exc}") from None
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise TrainerError(
                f"{os.environ['LOCAL_WORLD_SIZE']} processes on this node but only "
                f"{torch.cuda.device_count()} GPUs visible (--nproc-per-node at most that)"
            )
        device = torch.device("cuda", local_rank)  # one GPU per process, whatever cuda:N said
        torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl", device_id=device, store=attempt_store(), rank=rank, world_size=world_size
        )
        control = dist.new_group(backend="gloo")
    else:
        dist.init_process_group("gloo", store=attempt_store(), rank=rank, world_size=world_size)
        control = None  # the default group is gloo already
    return Dist(device, rank, world_size, local_rank, control)


def attempt_store() -> dist.Store | None:
    """The store this attempt of the worker group meets in; None: torchrun's env:// default.

    torchrun (2.5 and later) serves one TCPStore from its agent for the whole job and hands it
    to every restart unprefixed, so a restarted group would read the addresses the killed one
    left there (gloo's `rank_N` keys) and wait on a dead process for the whole timeout
    (pytorch#135712). A prefix per restart keeps each attempt's keys apart. The restart count
    is per agent: on several nodes, set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 instead
    (torchrun then starts a fresh store for every attempt and this returns None).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False
    )
    return dist.PrefixStore(f"trainer/attempt{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def close(d: Dist) -> None:
    """Leave the process group (no-op for one process)."""
    if d.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    """Wait until every rank gets here."""
    if d.world_size > 1:
        dist.barrier(group=d.control)


@contextlib.contextmanager
def local_main_first(d: Dist) -> Iterator[None]:
    """The first rank of each node runs the block first (downloads, caches), then the others."""
    if d.local_rank != 0:
        barrier(d)
    yield
    if d.local_rank == 0:
        barrier(d)


def broadcast_object(d: Dist, obj: object) -> object:
    """Rank 0's `obj` on every rank (pickled; tensors inside travel too)."""
    if d.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=d.control)
    return box[0]


def on_main(d: Dist, fn, *args):
    """fn(*args) on rank 0, its result (or its TrainerError, raised again) on every rank."""
    result, error = None, None
    if d.is_main:
        try:
            result = fn(*args)
        except TrainerError as exc:
            error = str(exc)
    result, error = broadcast_object(d, (result, error))
    if error is not None:
        raise TrainerError(error)
    return result


def agree_stop(d: Dist) -> int:
    """The signal any rank received (0: none), now also this rank's STOP.signum.

    Every rank must call it at the same point: a rank cannot leave a collective alone.
    """
    if d.world_size > 1:
        flag = torch.tensor([STOP.signum])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=d.control)
        STOP.signum = int(flag)
    return STOP.signum


def _sum(d: Dist, values: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(values, group=d.control)
    return values


def reduce_mean(d: Dist, loss: float, acc: float, seen: int) -> tuple[float, float, int]:
    """An epoch's mean loss and accuracy over every rank's images, and their number."""
    if d.world_size == 1:
        return loss, acc, seen
    totals = torch.tensor([loss * seen, acc * seen, seen], dtype=torch.float64)
    loss_sum, correct, seen = _sum(d, totals).tolist()
    return loss_sum / seen, correct / seen, int(seen)


def reduce_evaluation(d: Dist, loss: float, acc: float, confusion: torch.Tensor):
    """evaluate()'s (loss, accuracy, confusion) over every rank's shard of a split."""
    if d.world_size == 1:
        return loss, acc, confusion
    loss_sum = _sum(d, torch.tensor([loss * int(confusion.sum())], dtype=torch.float64))
    confusion = _sum(d, confusion.clone())
    n = max(int(confusion.sum()), 1)
    return float(loss_sum) / n, confusion.diag().sum().item() / n, confusion


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, d: Dist) -> torch.Tensor:
    """This rank's indices for each step of an epoch: (steps, batch_size / world_size).

    Rank 0 draws the permutation from its RNG (exactly as one process does) and broadcasts it,
    so every rank shards the same permutation.
    """
    order = torch.randperm(n) if d.is_main else torch.empty(n, dtype=torch.int64)
    if d.world_size > 1:
        dist.broadcast(order, src=0, group=d.control)
        # Ranks > 0 did not draw the permutation: reseed them per (rank, epoch), so their
        # augmentation differs from rank 0's and a resumed run draws the same again.
        if not d.is_main:
            torch.manual_seed(seed + 1_000_003 * d.rank + epoch)
    return shard_batches(order, batch_size, d.rank, d.world_size)


def wrap_model(net: torch.nn.Module, d: Dist, sync_bn: bool) -> torch.nn.Module:
    """DistributedDataParallel around net (SyncBatchNorm first if asked); one process: net."""
    if sync_bn and d.device.type != "cuda":
        raise TrainerError("--sync-bn needs CUDA (SyncBatchNorm has no CPU kernels)")
    if d.world_size == 1:
        return net
    if sync_bn:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    device_ids = [d.device.index] if d.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=device_ids)


def sync_buffers(net: torch.nn.Module, d: Dist) -> None:
    """Copy rank 0's BatchNorm running statistics to every rank.

    DDP broadcasts them at the start of each forward pass, so after the last step each rank
    holds its own update; validation and the checkpoint use rank 0's.
    """
    if d.world_size > 1:
        for buffer in net.buffers():
            dist.broadcast(buffer, src=0)


def weights_digest(net: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer, in state_dict order."""
    digest = hashlib.sha256()
    for name, tensor in net.state_dict().items():
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().flatten().contiguous().view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


def debug_record(d: Dist, epoch: int, batches: torch.Tensor, net: torch.nn.Module) -> None:
    """With TRAINER_DEBUG_DIR set: this rank's shard and weights digest after an epoch."""
    folder = os.environ.get(DEBUG_DIR_ENV)
    if not folder:
        return
    record = {
        "rank": d.rank,
        "world_size": d.world_size,
        "pid": os.getpid(),
        "epoch": epoch,
        "shard": batches.flatten().tolist(),
        "weights_sha256": weights_digest(net),
    }
    Path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(folder) / f"rank{d.rank}-epoch{epoch}.json", record)


def describe(d: Dist) -> str:
    """One log line's worth: how many processes, which backend."""
    if d.world_size == 1:
        return f"1 process on {d.device}"
    return f"{d.world_size} processes ({dist.get_backend()}), rank 0 on {d.device}"
