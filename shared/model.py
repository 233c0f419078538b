"""Build the network named by `arch`; the one place model construction lives."""

from torch import nn
from torchvision.models import resnet18

# "resnet18": torchvision's ResNet-18 as is (loads into resnet18(num_classes=10) unchanged).
# "resnet18_cifar": the same weights layout but a 3x3 stride-1 first conv and no max-pool, the
# usual small-image stem: 32 px inputs keep 32x32 feature maps in layer1 instead of 8x8.
ARCHS: tuple[str, ...] = ("resnet18", "resnet18_cifar")


def build_model(arch: str, num_classes: int) -> nn.Module:
    """Return an untrained `arch` network with a `num_classes`-way head."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
    model = resnet18(num_classes=num_classes)
    if arch == "resnet18_cifar":
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model
