"""Build the network named by `arch`; the one place model construction lives."""

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models import resnet18

# "resnet18": torchvision's ResNet-18 as is. At 32 px its stem (stride-2 conv + max-pool) leaves
#   8x8 maps in layer1 and 1x1 in layer4: fast, but little room to learn.
# "resnet18_nomaxpool": the same network without the max-pool, so layer1 sees 16x16 maps
#   (about 3x the compute). Its state_dict has exactly resnet18's keys and shapes, so ImageNet
#   weights fit whole and model.pt loads into torchvision's resnet18 (set maxpool=Identity).
# "resnet18_cifar": a 3x3 stride-1 first conv and no max-pool, the usual small-image stem:
#   32x32 maps in layer1 (about 16x the compute); conv1 no longer fits ImageNet weights.
ARCHS: tuple[str, ...] = ("resnet18", "resnet18_nomaxpool", "resnet18_cifar")


def build_model(arch: str, num_classes: int) -> nn.Module:
    """Return an untrained `arch` network with a `num_classes`-way head."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    model = resnet18(num_classes=num_classes)
    if arch in ("resnet18_nomaxpool", "resnet18_cifar"):
        model.maxpool = nn.Identity()
    if arch == "resnet18_cifar":
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    return model


def use_bf16(amp: str, device: torch.device) -> bool:
    """Whether to compute in bf16: "bf16", "off", or "auto" (CUDA, or CPUs with bf16 units).

    Training (autocast) and serving (bf16 weights) both decide here, so on the same kind of
    machine a model is served at the precision it was validated in.
    """
    if amp != "auto":
        return amp == "bf16"
    # CPUs without native bf16 (no AVX512-BF16/AMX) run bf16 slower than fp32.
    return device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _fold_batchnorms(module: nn.Module) -> None:
    """Fold every BatchNorm2d that directly follows a Conv2d into it, in place (eval only).

    ResNet's pairs are (conv1, bn1), (conv2, bn2) and downsample = Sequential(conv, bn). Done by
    walking the modules rather than with torch.fx: fx tracing patches nn.Module.__call__ for
    the whole process, which broke forward passes running meanwhile in other threads (seen as
    500s while a new version was prepared next to the served one).
    """
    for child in module.children():
        _fold_batchnorms(child)
    for conv_name, bn_name in (("conv1", "bn1"), ("conv2", "bn2"), ("0", "1")):
        conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(module, bn_name, nn.Identity())


def for_inference(model: nn.Module, bf16: bool = False, channels_last: bool = True) -> nn.Module:
    """An eval-only copy for serving: each BatchNorm folded into its conv, channels_last (or
    contiguous), and with `bf16` its weights in bfloat16 (inputs must then be bfloat16 too).

    Folding removes a pass over every activation map; channels_last is oneDNN's and cuDNN's
    native conv layout; bf16 weights give autocast's arithmetic without its per-op casts.
    Measured on 2 CPU cores with bf16 units (docs/benchmarks.md): a batch of 8 in 8.2 ms,
    against 15.1 ms for the model as loaded (fp32) and 11.6 ms with autocast.
    """
    served = copy.deepcopy(model).eval()
    _fold_batchnorms(served)
    served = served.to(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    return served.to(torch.bfloat16) if bf16 else served
