"""Layout and precision by measurement: timings recorded, explicit settings obeyed."""

import torch

from shared.model import build_model, for_inference
from shared.precision import measure_serving

CPU = torch.device("cpu")


def test_serving_auto_times_each_layout_and_keeps_the_fastest():
    model = build_model("resnet18", 10).eval()
    choice = measure_serving(model, 16, CPU, "auto", "auto", batch=4)
    assert {"fp32/channels_last", "fp32/contiguous"} <= set(choice.timings_ms)
    fastest = min(choice.timings_ms, key=choice.timings_ms.get)
    assert f"{choice.precision}/{choice.memory_format}" == fastest
    assert choice.reason.startswith("fastest forward at batch 1 + 4")


def test_serving_explicit_settings_are_obeyed_untimed():
    model = build_model("resnet18", 10).eval()
    choice = measure_serving(model, 16, CPU, "off", "off")
    assert (choice.precision, choice.memory_format, choice.timings_ms) == ("fp32", "contiguous", {})
    choice = measure_serving(model, 16, CPU, "bf16", "on")
    assert (choice.precision, choice.memory_format) == ("bf16", "channels_last")


def test_served_outputs_agree_across_layouts():
    torch.manual_seed(0)
    model = build_model("resnet18_nomaxpool", 10).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        last = for_inference(model, channels_last=True)(
            x.contiguous(memory_format=torch.channels_last)
        )
        plain = for_inference(model, channels_last=False)(x)
        bf16 = for_inference(model, bf16=True, channels_last=False)(x.bfloat16()).float()
    assert torch.allclose(last, plain, atol=1e-4)
    assert torch.allclose(bf16.softmax(1), plain.softmax(1), atol=0.05)
