"""Layout and precision chosen by timing the real work on the device at hand.

Whether bf16 or channels_last is faster depends on the CPU (with or without bf16 units, oneDNN's
kernels for the shape), the batch size and the network: on one 2-core Xeon bf16 + channels_last
trained at 182 img/s and fp32 contiguous at 240, on an AMD EPYC bf16 was the faster. So the
trainer (`--amp auto`, `--channels-last auto`) and the server (`AMP=auto`, `CHANNELS_LAST=auto`)
time each candidate a few times and keep the fastest (the minimum of the repetitions: noise from
other work only ever adds time).
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from shared.model import for_inference


@dataclass
class Choice:
    """The chosen layout and precision, and why."""

    bf16: bool
    channels_last: bool
    reason: str
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def precision(self) -> str:
        """ "bf16" or "fp32"."""
        return "bf16" if self.bf16 else "fp32"

    @property
    def memory_format(self) -> str:
        """ "channels_last" or "contiguous"."""
        return "channels_last" if self.channels_last else "contiguous"

    def as_dict(self) -> dict:
        """Plain values for config.json and GET /model."""
        return {
            "precision": self.precision,
            "memory_format": self.memory_format,
            "precision_reason": self.reason,
            "precision_timings_ms": self.timings_ms,
        }


def variant_name(bf16: bool, channels_last: bool) -> str:
    """Short name of a candidate, e.g. "bf16/channels_last"."""
    return f"{'bf16' if bf16 else 'fp32'}/{'channels_last' if channels_last else 'contiguous'}"


def candidates(amp: str, channels_last: str, device: torch.device) -> list[tuple[bool, bool]]:
    """(bf16, channels_last) pairs allowed by the settings: "auto" tries both, else obeyed."""
    if amp not in ("auto", "bf16", "off") or channels_last not in ("auto", "on", "off"):
        raise ValueError(f"amp {amp!r} / channels_last {channels_last!r} not understood")
    # CPUs without native bf16 (no AVX512-BF16/AMX) emulate it: several times slower, never
    # worth timing.
    has_bf16 = device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    precisions = {"bf16": [True], "off": [False]}.get(amp, [False, True] if has_bf16 else [False])
    layouts = {"on": [True], "off": [False]}.get(channels_last, [True, False])
    return [(p, lay) for p in precisions for lay in layouts]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fastest_seconds(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    """One warm-up call of `run` (oneDNN/cuDNN pick and cache kernels on the first), then the
    minimum of `repeats` timed calls: noise only ever adds time."""
    run()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def choose(
    run: Callable[[bool, bool], object],
    options: list[tuple[bool, bool]],
    device: torch.device,
    repeats: int = 3,
    what: str = "",
) -> Choice:
    """Time `run(bf16, channels_last)` for each option (one warm-up, then the minimum of
    `repeats`) and return the fastest. A single option is timed too: callers plan with it."""
    timings: dict[str, float] = {}
    for bf16, cl in options:
        best = fastest_seconds(lambda bf16=bf16, cl=cl: run(bf16, cl), device, repeats)
        timings[variant_name(bf16, cl)] = round(best * 1000, 2)
    bf16, cl = min(options, key=lambda o: timings[variant_name(*o)])
    if len(options) == 1:
        reason = f"as set; {what} {timings[variant_name(bf16, cl)]} ms"
    else:
        listed = ", ".join(f"{k} {v} ms" for k, v in sorted(timings.items(), key=lambda i: i[1]))
        reason = f"fastest {what} (min of {repeats}): {listed}"
    return Choice(bf16, cl, reason, timings)


def memory_format(channels_last: bool) -> torch.memory_format:
    """The torch memory format for a layout choice."""
    return torch.channels_last if channels_last else torch.contiguous_format


def measure_serving(
    model: nn.Module,
    image_size: int,
    device: torch.device,
    amp: str,
    channels_last: str,
    batch: int = 32,
) -> Choice:
    """Time the serving forward pass (BatchNorm folded) at batch 1 and `batch` for each allowed
    precision and layout; settings that leave one option are obeyed without timing."""
    options = candidates(amp, channels_last, device)
    if len(options) == 1:
        return Choice(*options[0], reason="as set (AMP, CHANNELS_LAST)")
    copies: dict[tuple[bool, bool], nn.Module] = {}

    def forward(bf16: bool, layout: bool) -> None:
        if (bf16, layout) not in copies:
            copies[bf16, layout] = for_inference(model, bf16=bf16, channels_last=layout)
        dtype = torch.bfloat16 if bf16 else torch.float32
        with torch.inference_mode():
            for n in (1, batch):
                x = torch.zeros(n, 3, image_size, image_size, device=device, dtype=dtype)
                copies[bf16, layout](x.contiguous(memory_format=memory_format(layout)))

    return choose(forward, options, device, repeats=3, what=f"forward at batch 1 + {batch}")
