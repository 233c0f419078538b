"""Exponential moving average of the weights: what is evaluated and published when --ema is on."""

import copy

import torch
from torch import nn


class EMA:
    """A shadow copy of `model` whose parameters and BatchNorm buffers trail the live ones.

    ema = decay * ema + (1 - decay) * live after each step, with the decay ramped up as
    (1 + n) / (10 + n) over the first steps: a short run has few steps, and a fixed 0.999 would
    still remember the random initialisation at its end. BatchNorm's running statistics are
    averaged the same way (they belong to the averaged weights, not the live ones);
    num_batches_tracked is copied.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)
        self.updates = 0

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ours = self.model.state_dict()
        theirs = model.state_dict()
        keys = [k for k, v in ours.items() if v.is_floating_point()]
        return [ours[k] for k in keys], [theirs[k].detach() for k in keys]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards `model` (DDP- or compile-wrapped: its inside)."""
        model = getattr(model, "_orig_mod", model)  # torch.compile
        model = getattr(model, "module", model)  # DistributedDataParallel
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ours, theirs = self._pairs(model)
        torch._foreach_lerp_(ours, theirs, 1 - decay)
        for name, buf in model.named_buffers():
            if not buf.is_floating_point():
                self.model.get_buffer(name).copy_(buf)

    def state_dict(self) -> dict:
        """The averaged weights and the update count, for resumable state."""
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned."""
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]
