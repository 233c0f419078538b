"""shared.device: the DEVICE names trainer and server share, and the usable CPU cores."""

import os

import pytest
import torch

from shared.device import (
    DeviceError,
    check_device_name,
    nvidia_gpu_visible,
    resolve_device,
    usable_cpu_count,
)


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_names_auto_cpu_cuda_and_cuda_n_are_accepted(name):
    assert check_device_name(name) == name


@pytest.mark.parametrize("name", ["", "gpu", "tpu", "CPU", "cuda:", "cuda0", "cuda:-1", "mps"])
def test_other_device_names_are_refused_with_the_accepted_ones_named(name):
    with pytest.raises(DeviceError, match="auto, cpu, cuda or cuda:N"):
        check_device_name(name)


def test_cuda_device_this_machine_lacks_is_refused_with_a_clear_error():
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last device, on any machine
    expected = "CUDA device" if torch.cuda.is_available() else "CUDA is not available"
    with pytest.raises(DeviceError, match=f"^{missing}: .*{expected}"):
        resolve_device(missing)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_usable_cpu_count_works_without_sched_getaffinity(monkeypatch):
    # macOS and Windows have neither sched_getaffinity nor (before 3.13) process_cpu_count.
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.delattr(os, "process_cpu_count", raising=False)
    usable_cpu_count.cache_clear()
    try:
        assert usable_cpu_count() == os.cpu_count()
    finally:
        usable_cpu_count.cache_clear()


@pytest.mark.parametrize(
    "proc_gpus, dev_files, visible, expected",
    [
        (["0000:17:00.0"], ["nvidia0", "nvidiactl"], None, True),
        (["0000:17:00.0"], [], "0,1", True),
        ([], ["nvidia0", "nvidiactl"], None, True),  # no /proc/driver/nvidia (some containers)
        ([], ["nvidiactl", "nvidia-uvm", "null"], None, False),  # driver files, no GPU
        (["0000:17:00.0"], ["nvidia0"], "", False),  # CUDA_VISIBLE_DEVICES hides every GPU
        (["0000:17:00.0"], ["nvidia0"], "-1", False),
        ([], [], None, False),
    ],
)
def test_nvidia_gpu_is_found_without_torch_and_hidden_by_cuda_visible_devices(
    tmp_path, proc_gpus, dev_files, visible, expected
):
    gpus, dev = tmp_path / "gpus", tmp_path / "dev"
    for name in proc_gpus:
        (gpus / name).mkdir(parents=True)
    dev.mkdir()
    for name in dev_files:
        (dev / name).touch()
    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert nvidia_gpu_visible(environ, gpus, dev) is expected


def test_nvidia_gpu_detection_misses_no_gpu_that_torch_sees():
    # A GPU found while torch sees none is allowed (a CPU-only torch build); the reverse is not.
    assert nvidia_gpu_visible() or not torch.cuda.is_available()
