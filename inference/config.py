"""Every setting of the inference service: defaults, then environment variables, then overrides.

One table for the app and for Gunicorn: gunicorn.conf.py reads PORT, WORKERS, THREADS and the
timeouts through `load_config` too. It does so in the Gunicorn master, so this module imports
neither torch nor the app (shared.device checks DEVICE names, counts cores and looks for a GPU
without torch). Master and workers resolve WORKERS=auto alike, from the same machine.
"""

import ipaddress
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

from shared.device import DEVICE_NAMES, check_device_name, nvidia_gpu_visible, usable_cpu_count


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not math.isfinite(value) or value <= 0:
            raise ValueError("must be positive")
        return value

    return parse


def _non_negative(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not math.isfinite(value) or value < 0:
            raise ValueError("must be zero or more")
        return value

    return parse


def _log_level(text: str) -> str:
    if text.lower() not in ("debug", "info", "warning", "error", "critical"):
        raise ValueError("must be debug, info, warning, error or critical")
    return text.lower()


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return text

    return parse


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ValueError("must be auto or a whole number >= 1")
    return int(text)


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError("must be a TCP port, 1 to 65535")
    return value


def _address(text: str) -> str:
    if text == "localhost":
        return text
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(
            "must be an IP address (0.0.0.0, 127.0.0.1, ::, ::1) or localhost"
        ) from None


# name: (default, parser, meaning). Every entry is also read from the environment variable of
# the same name; README.md (Inference service, Settings) documents the same table.
SETTINGS: dict[str, tuple[Any, Callable[[str], Any], str]] = {
    "MODELS_DIR": (
        "./volumes/models",
        str,
        "model store to serve from: a folder or s3://bucket/prefix (AWS_* variables)",
    ),
    "MODEL_CACHE_DIR": (
        os.path.join(tempfile.gettempdir(), "model-cache"),
        str,
        "folder keeping weights downloaded from an s3:// store, by sha256",
    ),
    "DEVICE": ("auto", check_device_name, f"{DEVICE_NAMES}; auto: cuda when available"),
    "AMP": (
        "auto",
        _choice("auto", "bf16", "off"),
        "bf16 weights for the forward pass; auto: bf16 or fp32, whichever is faster, timed at "
        "each model load (fp32 on CPUs without bf16 units)",
    ),
    "CHANNELS_LAST": (
        "auto",
        _choice("auto", "on", "off"),
        "memory layout of the forward pass: on (channels_last), off (contiguous), auto: the "
        "faster, timed at each model load",
    ),
    "TTA": (
        "auto",
        _choice("auto", "off"),
        "test-time augmentation: auto applies what model.json names (hflip: mean of the image "
        "and its mirror, as the published accuracy), off never",
    ),
    # Off by default: the compiled pass is faster (1.03-1.36x on one core), but the service as
    # a whole was not measurably faster (16 clients x 1 image: 154.2 vs 150.2 img/s on a 2-core
    # EPYC), and its runner holds the GIL for the whole pass (docs/benchmarks.md).
    "CPU_COMPILE": (
        "off",
        _choice("auto", "on", "off"),
        "auto: on a CPU, compile each model version with AOTInductor in a background process "
        "once it serves (eager until then; needs a C++ compiler, else eager) and use it where "
        "it times faster; on: use it wherever it builds; off: always eager. Unused on a GPU",
    ),
    "CUDA_GRAPHS": (
        "auto",
        _choice("auto", "off"),
        "auto: on a GPU, capture the forward pass as CUDA graphs for batch sizes 1, 2, 4, ... up "
        "to BATCH_MAX_IMAGES at each model load (eager if capture fails); off: always eager. "
        "Unused on the CPU",
    ),
    "MAX_UPLOAD_MB": (10.0, _positive(float), "largest request body, MiB (413 above)"),
    "MAX_FILES": (64, _positive(int), "most `file` parts in one request (413 above)"),
    "MODEL_POLL_SECONDS": (2.0, _positive(float), "seconds between reads of LATEST in MODELS_DIR"),
    "TOP_K": (0, _non_negative(int), "top_k used when a request has no ?top_k= (0: no list)"),
    "BATCH_MAX_IMAGES": (64, _positive(int), "images per forward pass before a batch closes"),
    "BATCH_WAIT_MS": (
        5.0,
        _non_negative(float),
        "longest wait, ms, for requests being decoded to join a batch",
    ),
    # 16 threads x 64 files: every request the default worker holds fits, so 16 clients
    # sending 32 images each are queued, not refused (with 256 they got 1632 503s in 20 s,
    # docs/benchmarks.md). Lower it to shed load sooner; THREADS bounds the rest.
    "QUEUE_MAX_IMAGES": (
        1024,
        _positive(int),
        "images waiting for the model before /predict answers 503 + Retry-After",
    ),
    "PREDICT_TIMEOUT_SECONDS": (
        30.0,
        _positive(float),
        "longest wait, s, of a request for its batch (503 beyond)",
    ),
    "CLIENT_TIMEOUT_SECONDS": (
        30.0,
        _positive(float),
        "longest pause, s, of a client sending its body or reading the answer (408 / cut)",
    ),
    "UPLOAD_TIMEOUT_SECONDS": (
        120.0,
        _positive(float),
        "longest time, s, to receive a whole request body (408 beyond)",
    ),
    "TORCH_THREADS": (
        0,
        _non_negative(int),
        "torch intra-op threads per worker (0: CPU cores / WORKERS)",
    ),
    "LOG_LEVEL": ("info", _log_level, "debug, info, warning or error"),
    # Read by gunicorn.conf.py, in the master.
    "PORT": (3000, _port, "TCP port the server listens on"),
    "BIND_ADDRESS": (
        "0.0.0.0",
        _address,
        "address the server listens on: 0.0.0.0 every interface, 127.0.0.1 this machine only",
    ),
    "WORKERS": (
        "auto",
        _workers,
        "Gunicorn worker processes, each with its own model copy; auto: from the device and "
        "the CPU cores (also sizes TORCH_THREADS)",
    ),
    "THREADS": (16, _positive(int), "request threads per worker"),
    "TIMEOUT": (60, _positive(int), "seconds without a heartbeat before a worker is restarted"),
    "GRACEFUL_TIMEOUT": (30, _positive(int), "seconds in-flight requests get after SIGTERM"),
    "KEEPALIVE": (5, _non_negative(int), "seconds an idle client connection stays open"),
    "ACCESS_LOG": ("-", str, "access log destination: - for stdout, empty for none"),
}
# Settings whose empty value means something (no access log) rather than "the default".
EMPTY_ALLOWED = {"ACCESS_LOG"}

# WORKERS=auto. Each worker is a process with its own interpreter, model copy and batcher, so
# decoding uploads and parsing HTTP stop sharing one GIL with the forward pass. Measured
# (docs/benchmarks.md, issue 11):
# - GPU: on an NVIDIA H200 host with 16 cores, 64 clients x 32 images, 4 workers served 5,738.7
#   img/s against 1,354.7 for 1 (the GPU idled behind one worker's Python). The workers share
#   the GPU, and each needs a core of its own for that Python: 4, fewer on fewer cores.
# - CPU: on a 2-core AMD EPYC, 2 workers (1 torch thread each) beat 1 worker (2 threads) by
#   +13 % to +49 % at 1 image per request with 1, 4 and 16 clients, and by +28 % and +43 % at
#   4 and 16 clients x 32 images; a single client sending 32 images lost 26 % (its forward pass
#   ran on one core). So one worker per core, at most 4 on bigger CPUs: not measured above 2
#   cores, the cap keeps memory at 4 model copies and each forward pass on cores / 4 threads.
# Both rules give min(cores, 4) today; the device is named in the reason because the figures
# behind them are different machines', and a re-measurement may part them.
AUTO_MAX_WORKERS = 4


def resolve_workers(workers: int | str, device: str) -> tuple[int, str]:
    """WORKERS as a count, and why: an integer as set, `auto` by the rule above (no torch)."""
    if workers != "auto":
        return int(workers), "set by WORKERS"
    cores = usable_cpu_count()
    count = min(cores, AUTO_MAX_WORKERS)
    if device.startswith("cuda") or (device == "auto" and nvidia_gpu_visible()):
        where = f"NVIDIA GPU (DEVICE={device}), {cores} cores: workers sharing the GPU"
    else:
        where = f"CPU (DEVICE={device}), {cores} cores: one worker per core"
    return count, f"auto: {where}, at most {AUTO_MAX_WORKERS}"


def load_config(
    environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Resolve every setting: default, then `environ` (os.environ by default), then overrides.

    WORKERS comes back as a count (auto resolved), WORKERS_REASON says why. Raises ValueError
    naming the variable when an environment value does not parse.
    """
    environ = os.environ if environ is None else environ
    config = {}
    for name, (default, parse, meaning) in SETTINGS.items():
        config[name] = default
        text = environ.get(name, "").strip()
        if text or (name in EMPTY_ALLOWED and name in environ):
            try:
                config[name] = parse(text)
            except ValueError as exc:
                # int("x") and float("x") say "invalid literal ...": say it in a user's words.
                reason = "not a number" if "literal" in str(exc) or "convert" in str(exc) else exc
                raise ValueError(f"{name}={text!r}: {reason} ({meaning})") from None
    config.update(overrides or {})
    config["WORKERS"], config["WORKERS_REASON"] = resolve_workers(
        config["WORKERS"], config["DEVICE"]
    )
    if config["QUEUE_MAX_IMAGES"] < config["MAX_FILES"]:
        raise ValueError("QUEUE_MAX_IMAGES must be at least MAX_FILES (one full request)")
    return config
