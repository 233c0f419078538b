"""Build the network named by `arch`; the one place model construction lives."""

from torch import nn
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
