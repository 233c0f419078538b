"""Initial weights: ImageNet through torchvision's cache, none, or a local state_dict."""

import os
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet18_Weights

from trainer import TrainerError

OFFLINE_HINT = (
    "use --weights none to train from scratch, or --weights PATH to start from a local state_dict"
)


def _load_into(model: nn.Module, state_dict: dict, source: str) -> None:
    """Copy every tensor whose name and shape fit; the head (and a replaced stem) may differ."""
    own = model.state_dict()
    fitting = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(own) - set(fitting))
    allowed = ("fc.", "conv1.")
    if not fitting or any(not k.startswith(allowed) for k in skipped):
        raise TrainerError(
            f"weights from {source} don't fit the model (missing or mismatched: {skipped[:4]})"
        )
    model.load_state_dict(fitting, strict=False)


def load_initial_weights(model: nn.Module, weights: str) -> None:
    """Apply --weights: 'imagenet', 'none' or a path to a state_dict saved by torch.save."""
    if weights == "none":
        return
    if weights == "imagenet":
        # torchvision caches downloads under $TORCH_HOME/hub/checkpoints; keep them in volumes/.
        os.environ.setdefault("TORCH_HOME", "volumes/cache")
        try:
            state_dict = ResNet18_Weights.IMAGENET1K_V1.get_state_dict(
                progress=False, weights_only=True
            )
        except Exception as exc:  # noqa: BLE001 - urllib, ssl and hash errors all mean "no weights"
            raise TrainerError(
                f"cannot get the ImageNet weights ({type(exc).__name__}: {exc}); {OFFLINE_HINT}"
            ) from None
        _load_into(model, state_dict, "ImageNet")
        return
    path = Path(weights)
    if not path.is_file():
        raise TrainerError(f"--weights {weights}: no such file (or use 'imagenet' or 'none')")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any refusal means the file is unusable
        # Only the exception's name: torch's message spans several lines and advises
        # weights_only=False, which would run the file's code.
        raise TrainerError(
            f"--weights {weights}: not a loadable state_dict ({type(exc).__name__})"
        ) from None
    if not isinstance(state_dict, dict):
        raise TrainerError(f"--weights {weights}: expected a state_dict, got {type(state_dict)}")
    _load_into(model, state_dict, str(path))
