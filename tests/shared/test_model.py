"""shared.model: the architectures and the serving copy."""

import threading

import pytest
import torch
from torch import nn

from shared.model import ARCHS, build_model, for_inference


def trained_like(arch: str) -> nn.Module:
    """A model whose BatchNorm layers hold non-trivial running statistics, as after training."""
    torch.manual_seed(0)
    model = build_model(arch, 10)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32) * 2 + 0.5)
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_for_inference_folds_every_batchnorm_and_keeps_the_outputs(arch):
    model = trained_like(arch)
    served = for_inference(model)
    assert not [m for m in served.modules() if isinstance(m, nn.BatchNorm2d)]
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "the original is intact"
    x = torch.randn(5, 3, 32, 32)
    with torch.inference_mode():
        expected = model(x)
        assert torch.allclose(
            served(x.contiguous(memory_format=torch.channels_last)), expected, atol=1e-4, rtol=1e-4
        )
        bf16 = for_inference(model, bf16=True)
        got = bf16(x.bfloat16().contiguous(memory_format=torch.channels_last)).float()
    assert got.argmax(1).tolist() == expected.argmax(1).tolist()
    assert torch.allclose(got.softmax(1), expected.softmax(1), atol=0.05)


def test_preparing_a_model_does_not_disturb_forward_passes_in_other_threads():
    """The server prepares a new version while the batcher runs the served one."""
    model = trained_like("resnet18")
    served = for_inference(model)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    errors: list[BaseException] = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                with torch.inference_mode():
                    served(x)
            except Exception as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        for _ in range(20):
            for_inference(model)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[:1]
