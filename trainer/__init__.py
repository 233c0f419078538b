"""`python -m trainer`: fine-tune ResNet-18 on CIFAR-10 and publish to the model store."""


class TrainerError(Exception):
    """A user-facing failure: printed as one line, exit code 2, nothing published."""
