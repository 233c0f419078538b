"""The machine the model runs on: the device named by DEVICE / --device, and the usable CPU cores.

The trainer and the inference server read the same DEVICE variable, so both accept the same
names (auto, cpu, cuda, cuda:N) through this one module. Nothing here imports torch at module
level: the Gunicorn master checks DEVICE through inference/config.py and must not load torch.
"""

import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICE_NAMES = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
# What the NVIDIA driver shows without CUDA: one folder per GPU (also inside containers run with
# the NVIDIA runtime), and the device files /dev/nvidia0, /dev/nvidia1, ...
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")
DEV = Path("/dev")


class DeviceError(ValueError):
    """A device name that is malformed, or names a CUDA device this machine does not have."""


def check_device_name(name: str) -> str:
    """Return `name` when it is auto, cpu, cuda or cuda:N; raise DeviceError otherwise."""
    if not _DEVICE.fullmatch(name):
        raise DeviceError(f"{name!r} is not a device: use {DEVICE_NAMES}")
    return name


def resolve_device(name: str) -> "torch.device":
    """The torch device for `name`; auto is CUDA when available. DeviceError if it is not here."""
    import torch  # here, not at the top: see the module docstring

    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"{name}: CUDA is not available on this machine (use cpu or auto)")
    device = torch.device(name)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(
            f"{name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        )
    return device


@functools.cache
def usable_cpu_count() -> int:
    """CPU cores this process may run on, on any OS (computed once; tests clear the cache)."""
    if hasattr(os, "process_cpu_count"):  # Python 3.13+: honours affinity where the OS has it
        return os.process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):  # Linux: a container's or taskset's CPU set
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1  # macOS, Windows


def nvidia_gpu_visible(
    environ: Mapping[str, str] | None = None, gpus: Path = NVIDIA_GPUS, dev: Path = DEV
) -> bool:
    """Whether this process sees an NVIDIA GPU, found without torch (no CUDA initialised).

    CUDA_VISIBLE_DEVICES="" or "-1" hides every GPU, as CUDA reads it. A GPU found here may
    still be unusable (a CPU-only torch build): the worker's DEVICE=auto then picks the CPU.
    """
    environ = os.environ if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and (not visible.strip() or visible.strip().startswith("-")):
        return False
    try:
        if gpus.is_dir() and any(gpus.iterdir()):
            return True
        return any(re.fullmatch(r"nvidia[0-9]+", entry.name) for entry in dev.iterdir())
    except OSError:  # no /dev (Windows), or a folder this user may not list
        return False
