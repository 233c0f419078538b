"""The training loop: device and dtype, optimizer and schedule, one epoch, evaluation.

The trainer and bench/train_throughput.py both build from these, so the benchmark measures the
very step the trainer runs.
"""

import torch
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock

from shared.preprocess import augment_batch
from trainer import TrainerError
from trainer.data import Split


def lr_factor(config: dict, steps_per_epoch: int):
    """LR multiplier as a function of the global step, for LambdaLR."""
    total = config["epochs"] * steps_per_epoch
    if config["schedule"] == "step":
        return lambda step: config["lr_decay"] ** (step // steps_per_epoch // config["lr_period"])
    warm = max(1, int(total * config["warmup"]))
    # LambdaLR also asks for step == total; with a single step in all, warm == total.
    decay = max(1, total - warm)
    floor = config.get("lr_floor") or 0.0  # runs from before --lr-floor have none
    return lambda step: (
        (step + 1) / warm if step < warm else floor + (1 - floor) * max(0.0, (total - step) / decay)
    )


def make_optimizer(model, config: dict, steps_per_epoch: int):
    """SGD (Nesterov when momentum > 0) and its per-step LambdaLR schedule."""
    # No weight decay on BatchNorm and biases: it only fights their scale.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [
            {"params": decay, "weight_decay": config["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config["lr"],
        momentum=config["momentum"],
        nesterov=config["momentum"] > 0,
    )
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(config, steps_per_epoch))


def shard_batches(order: torch.Tensor, batch_size: int, rank: int = 0, world_size: int = 1):
    """Rank's part of each global batch of a permutation: (steps, batch_size / world_size).

    Rank r takes columns r*b..(r+1)*b of every batch, so the ranks' shards are disjoint and
    cover the epoch. A ragged last batch is dropped (BatchNorm on 1 image fails), unless it is
    the only batch.
    """
    n = len(order)
    steps = max(1, n // batch_size)
    per_rank = min(batch_size, n) // world_size
    if per_rank == 0:
        raise TrainerError(f"{n} training images cannot be shared by {world_size} processes")
    return order[: steps * per_rank * world_size].view(steps, world_size, per_rank)[:, rank]


def zero_init_residual(model) -> None:
    """Zero the last BatchNorm's scale in each residual block: every block starts as identity."""
    for module in model.modules():
        if isinstance(module, BasicBlock):
            torch.nn.init.zeros_(module.bn2.weight)


def as_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """x in the memory layout the model runs in."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=fmt)


def train_step(model, opt, x, y, config, device, bf16, channels_last, normalize):
    """Augment, forward, backward and update on one uint8 batch; (loss, logits), on device."""
    x = augment_batch(x, pad=config["crop_padding"], mode=config.get("crop_mode", "zeros"))
    x = as_layout(normalize(x), channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=config["label_smoothing"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), logits.detach()


def train_one_epoch(
    model,
    opt,
    sched,
    train: Split,
    batches,
    config,
    device,
    bf16,
    normalize,
    bar,
    stop=None,
    channels_last=True,
    ema=None,
):
    """One pass over `batches` (rows of indices into train), augmenting each batch on the device.

    `stop()` is asked after every step (default: this process's signal flag); a non-zero
    answer raises Interrupted. `ema` (trainer.ema.EMA) follows the weights after each step.
    """
    model.train()
    stop = stop or (lambda: STOP.signum)
    batches = batches.to(train.images.device)
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    for step, index in enumerate(batches):
        x, y = train.images[index], train.labels[index]
        loss, logits = train_step(model, opt, x, y, config, device, bf16, channels_last, normalize)
        sched.step()
        if ema is not None:
            ema.update(model)
        # Accumulate on the device: no host sync per step.
        total_loss += loss * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        bar.update(len(y))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.4f}")
        if stop():
            raise Interrupted
    return total_loss.item() / seen, correct.item() / seen, seen


@torch.inference_mode()
def evaluate(
    model, split: Split, device, bf16, normalize, batch_size=512, channels_last=True, tta="off"
):
    """Loss, accuracy and confusion matrix over a split, through the serving transform tail.

    tta "hflip": the class probabilities are the mean of the image's and its mirror's, as the
    server computes them for a model.json with "tta": "hflip".
    """
    model.eval()
    k = max(int(split.labels.max()) + 1 if len(split) else 1, model.fc.out_features)
    confusion = torch.zeros(k, k, dtype=torch.int64)
    total_loss = 0.0
    for start in range(0, len(split), batch_size):
        x = split.images[start : start + batch_size]
        y = split.labels[start : start + batch_size]
        x = as_layout(normalize(x), channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            probs = model(x).float().softmax(1)
            if tta == "hflip":
                probs = (probs + model(x.flip(3)).float().softmax(1)) / 2
        total_loss += F.nll_loss(probs.clamp_min(1e-12).log(), y, reduction="sum").item()
        pred = probs.argmax(1)
        confusion += torch.bincount(y.cpu() * k + pred.cpu(), minlength=k * k).view(k, k)
    n = max(len(split), 1)
    return total_loss / n, confusion.diag().sum().item() / n, confusion


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived: stop after the current batch."""


class STOP:
    """The signal received (0: none). While `immediate`, the handler raises Interrupted at once
    (loading data: nothing to save); during training it only sets the flag, which the loop
    checks between steps, so a checkpoint or a publish is never cut in half."""

    signum = 0
    immediate = True


def on_signal(signum, _frame):
    """SIGINT/SIGTERM handler: remember the signal; raise at once while nothing is at stake."""
    STOP.signum = signum
    if STOP.immediate:
        raise Interrupted


def replan(sched) -> None:
    """Apply the scheduler's (new) lambdas at its current step, e.g. after --epochs changed."""
    pairs = zip(sched.lr_lambdas, sched.base_lrs, strict=True)
    lrs = [base * f(sched.last_epoch) for f, base in pairs]
    for group, lr in zip(sched.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    sched._last_lr = lrs  # what get_last_lr() reports
