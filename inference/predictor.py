"""The served model: background reload from the model store, warm-up, atomic swap, prediction.

A `ModelHolder` polls MODELS_DIR/LATEST. A new version is loaded by the store's load_version
(sha256 checked, weights_only=True), warmed up with one forward pass, then published by a
single reference assignment: requests that already hold the old `ServedModel` finish on it,
and it is freed when the last of them lets go. A version that fails is never served, and is not
tried again until LATEST names something else. An unreachable store is not a refusal: the
current model keeps serving, `store_error` says why, and the next poll tries again.
"""

import gc
import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from inference import metrics
from inference.batcher import MicroBatcher
from inference.compiled import Compilation
from inference.graphs import GraphedForward, capture
from shared.device import resolve_device, usable_cpu_count
from shared.model import for_inference
from shared.precision import Choice, measure_serving, memory_format
from shared.preprocess import load_rgb, normalize_batch, resize_crop
from shared.store import LoadedModel, StoreError, StoreUnreachable
from shared.stores import open_store

log = logging.getLogger(__name__)


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class ServedModel:
    """A loaded version together with the preprocessing its model.json describes."""

    loaded: LoadedModel
    # The layout and precision to serve in, and why (measured or as set).
    choice: Choice = field(default_factory=lambda: Choice(False, True, "as set"))
    # "hflip": average each image's probabilities with its mirror's, as the published accuracy
    # did (model.json "tta"); "off" otherwise.
    tta: str = "off"
    # CUDA_GRAPHS ("auto": capture on a GPU, "off": never) and the largest batch to capture.
    cuda_graphs: str = "auto"
    max_batch: int = 64
    # CPU_COMPILE: on a CPU, AOTInductor packages built in the background and used where they time
    # faster ("auto") or always ("on"); "off": eager (inference/compiled.py).
    compile: str = "off"
    loaded_at: str = field(default_factory=now_iso)

    def __post_init__(self) -> None:
        meta = self.loaded.meta
        self.image_size: int = meta["image_size"]
        self.class_names: list[str] = list(meta["class_names"])
        # The same two stages the trainer uses: resize_crop per image, normalize per batch.
        self._to_tensor = resize_crop(self.image_size)
        self._normalize = normalize_batch(meta["mean"], meta["std"])
        # BatchNorm folded into the convs, channels_last, bf16 weights when asked: the same
        # classes for less work per pass (shared.model.for_inference). The serving copy takes
        # the loaded model's place: keeping both would hold every served version twice.
        bf16, channels_last = self.choice.bf16, self.choice.channels_last
        self.loaded.model = for_inference(self.loaded.model, bf16, channels_last)
        self._dtype = torch.bfloat16 if bf16 else torch.float32
        self._format = memory_format(channels_last)
        # What computes the network: the eager copy, replaced by the compiled packages once
        # they are built and checked (start_compile); one assignment, so no lock.
        self.net = self.loaded.model
        self._compilation: Compilation | None = None
        self._retired = False
        if self.compile == "off":
            self.compiled_note = "off (CPU_COMPILE=off)"
        elif self.loaded.device.type != "cpu":
            self.compiled_note = "off (not a CPU: CUDA_GRAPHS instead)"
        else:
            self.compiled_note = "pending"
        # On a GPU, graphs of the whole pass are captured here, before the version serves.
        # CPU: eager, as before (see inference/graphs.py).
        self.graphs: GraphedForward | None = None
        if self.loaded.device.type != "cuda":
            self.graphs_note = "off (CPU)"
        elif self.cuda_graphs == "off":
            self.graphs_note = "off (CUDA_GRAPHS=off)"
        else:
            shape = (3, self.image_size, self.image_size)
            self.graphs, self.graphs_note = capture(
                self._forward, shape, self.loaded.device, self.max_batch, self._dtype
            )

    @property
    def version(self) -> str:
        """The version name."""
        return self.loaded.version

    def prepare(self, data: bytes) -> torch.Tensor:
        """Decode one uploaded file to uint8 (3, S, S); raises ImageError for unusable files."""
        return self._to_tensor(load_rgb(data, draft_size=self.image_size))

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        """Probabilities, float32 (n, classes), for uint8 images (n, 3, S, S) on the device;
        the whole pass a graph captures (no host copy, no sync in it)."""
        x = self._normalize(images).to(self._dtype).contiguous(memory_format=self._format)
        probs = self.net(x).float().softmax(dim=1)
        if self.tta == "hflip":
            # Made contiguous in the served layout again: compiled packages assume its strides.
            mirror = x.flip(3).contiguous(memory_format=self._format)
            probs = (probs + self.net(mirror).float().softmax(dim=1)) / 2
        return probs

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities, float32 (n, classes) on the CPU, for uint8 images (n, 3, S, S)."""
        if self.graphs is not None:
            probs = self.graphs.run(images)
            if probs is not None:
                return probs
        with torch.inference_mode():
            # Move uint8 (4x smaller than float) to the device, normalize there; one copy back.
            return self._forward(images.to(self.loaded.device, non_blocking=True)).cpu()

    def compile_now(self) -> None:
        """Build, check and time the compiled packages (minutes at most), then use them where
        they are faster; on any failure stay eager. No-op unless compiled_note is "pending"."""
        if self.compiled_note != "pending":
            return
        meta = self.loaded.meta
        self._compilation = Compilation(
            self.loaded.model,
            meta["arch"],
            len(self.class_names),
            self.image_size,
            self.choice.bf16,
            self.choice.channels_last,
            self.max_batch,
            only_if_faster=self.compile == "auto",
        )
        if self._retired:  # replaced before the compile began (retire saw no compilation)
            self._compilation.cancel()
        self.compiled_note = "compiling (serving eagerly meanwhile)"
        net, note = self._compilation.run()
        self.compiled_note = note
        if net is not None:
            self.net = net
            log.info("version %s: compiled: %s", self.version, note)
        elif self._retired:
            log.info("version %s: compile stopped: a newer version serves", self.version)
        else:
            log.warning("version %s: not compiled, serving eagerly: %s", self.version, note)

    def start_compile(self) -> None:
        """compile_now in a background thread (the version serves eagerly until it is done)."""
        if self.compiled_note == "pending":
            threading.Thread(target=self.compile_now, name="compile", daemon=True).start()

    def retire(self) -> None:
        """No longer served: stop compiling it."""
        self._retired = True
        if self._compilation is not None:
            self._compilation.cancel()

    def warm_up(self) -> None:
        """Run one forward pass; raise StoreError if the output is not what the meta promises."""
        probs = self.probabilities(torch.zeros(1, 3, self.image_size, self.image_size).byte())
        if probs.shape != (1, len(self.class_names)) or not torch.isfinite(probs).all():
            raise StoreError(f"{self.version}: warm-up forward pass gave unusable output")


class ModelHolder:
    """Keeps the served model in step with MODELS_DIR/LATEST."""

    def __init__(
        self,
        models_dir: str | Path,
        device: str,
        poll_seconds: float,
        amp: str = "auto",
        cache_dir: str | Path | None = None,
        channels_last: str = "auto",
        tta: str = "auto",
        cuda_graphs: str = "auto",
        max_batch: int = 64,
        compile: str = "off",
    ) -> None:
        self.store = open_store(models_dir, cache_dir=cache_dir)
        self.models_dir = self.store.location
        self.device_name = device
        self.amp = amp
        self.channels_last = channels_last
        self.tta = tta
        self.cuda_graphs = cuda_graphs
        self.max_batch = max_batch
        self.compile = compile
        self.poll_seconds = poll_seconds
        self.current: ServedModel | None = None  # replaced, never mutated: reads need no lock
        self.latest: str | None = None  # what LATEST said at the last poll
        self.last_error: dict[str, Any] | None = None
        # Why the last poll could not reach the store (None: it answered), since when.
        self.store_error: dict[str, Any] | None = None
        self._attempted: str | None = None  # the LATEST value last loaded or refused
        self._poll_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Set once the first poll is over: a model loaded, or none published, or refused.
        self.first_poll_done = threading.Event()
        # Measured layout/precision per (arch, image size, device): a new version of the same
        # network runs at the same speed, so only the first load of a kind pays for the timing
        # (about 0.3-2 s on 2 cores) and hot reloads stay within their 3 s.
        self._choices: dict[tuple, Choice] = {}

    def start(self) -> None:
        """Start the poller thread; its first poll loads the model in the background."""
        self._stop.clear()
        self.first_poll_done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="model-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling (the served model stays)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - the poller must outlive any surprise
                log.exception("model poll failed")
            self.first_poll_done.set()
            self._stop.wait(self.poll_seconds)

    def _refuse(self, version: str | None, message: str) -> None:
        log.error(
            "refused model version %s: %s; still serving %s",
            version,
            message,
            self.current.version if self.current else "nothing",
        )
        self.last_error = {"version": version, "message": message, "at": now_iso()}
        metrics.MODEL_RELOADS.labels("refused").inc()

    def _prepare(self, loaded: LoadedModel, device: torch.device) -> ServedModel:
        """The serving copy at the layout and precision measured fastest here (or set)."""
        key = (loaded.meta["arch"], loaded.meta["image_size"], str(device))
        choice = self._choices.get(key)
        if choice is None:
            choice = measure_serving(
                loaded.model, loaded.meta["image_size"], device, self.amp, self.channels_last
            )
            self._choices[key] = choice
        tta = loaded.meta.get("tta", "off") if self.tta == "auto" else "off"
        served = ServedModel(
            loaded, choice, tta, self.cuda_graphs, self.max_batch, compile=self.compile
        )
        log.info(
            "version %s: %s %s, tta %s: %s; CUDA graphs %s",
            loaded.version,
            choice.precision,
            choice.memory_format,
            tta,
            choice.reason,
            served.graphs_note,
        )
        return served

    def _unreachable(self, exc: StoreUnreachable) -> None:
        if self.store_error is None:
            log.warning("model store unreachable: %s; still serving what is loaded", exc)
            self.store_error = {"message": str(exc), "since": now_iso()}
        else:
            self.store_error["message"] = str(exc)

    def poll_once(self) -> bool:
        """Read LATEST and, if it names a version not yet tried, load and swap; True if swapped."""
        with self._poll_lock:
            try:
                latest = self.store.read_latest()
            except StoreUnreachable as exc:
                self._unreachable(exc)
                return False
            except StoreError as exc:
                if self._attempted != f"!{exc}":
                    self._attempted = f"!{exc}"
                    self._refuse(None, str(exc))
                return False
            self.store_error = None
            self.latest = latest
            if latest is None or latest == self._attempted:
                return False
            self._attempted = latest
            previous = self.current
            if previous is not None and previous.version == latest:
                return False
            try:
                device = resolve_device(self.device_name)
                loaded = self.store.load_version(latest, device)
                served = self._prepare(loaded, device)
                served.warm_up()
            except StoreUnreachable as exc:
                self._attempted = None  # not the version's fault: try it again next poll
                self._unreachable(exc)
                return False
            except StoreError as exc:
                self._refuse(latest, str(exc))
                return False
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory: refuse, keep serving
                self._refuse(latest, f"{latest}: {type(exc).__name__}: {exc}"[:300])
                return False
            self.current = served
            served.start_compile()
            if previous is not None:
                previous.retire()
            self.last_error = None
            metrics.MODEL_RELOADS.labels("loaded").inc()
            metrics.set_served_version(latest, previous.version if previous else None)
            log.info(
                "serving model version %s (was %s)",
                latest,
                previous.version if previous else "nothing",
            )
            # Drop our reference to the old model; requests still using it keep it alive.
            previous = None
            gc.collect()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()
            return True


class Predictor:
    """What the routes use: the model holder, the micro-batcher, and the process lifecycle."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.holder = ModelHolder(
            config["MODELS_DIR"],
            config["DEVICE"],
            config["MODEL_POLL_SECONDS"],
            config["AMP"],
            config["MODEL_CACHE_DIR"],
            config["CHANNELS_LAST"],
            config["TTA"],
            config["CUDA_GRAPHS"],
            config["BATCH_MAX_IMAGES"],
            config["CPU_COMPILE"],
        )
        self.batcher = MicroBatcher(
            run_batch=lambda served, images: served.probabilities(images),
            max_images=config["BATCH_MAX_IMAGES"],
            max_wait_s=config["BATCH_WAIT_MS"] / 1000,
            max_queue_images=config["QUEUE_MAX_IMAGES"],
            on_batch=metrics.observe_batch,
        )
        self.shutting_down = False
        self._pid: int | None = None
        self._start_lock = threading.Lock()

    def ensure_started(self) -> None:
        """Start the poller and batcher threads in this process, once (and again after a fork).

        Called by Gunicorn's post_worker_init and before each request, never at import or in
        create_app: with --preload the app is built in the master, which must not load models.
        """
        if self._pid == os.getpid():
            return
        with self._start_lock:
            if self._pid == os.getpid():
                return
            threads = self.config["TORCH_THREADS"] or max(
                1, usable_cpu_count() // self.config["WORKERS"]
            )
            torch.set_num_threads(threads)
            log.info(
                "worker %d: %d torch threads, models from %s",
                os.getpid(),
                threads,
                self.holder.models_dir,
            )
            self.batcher.start()
            self.holder.start()
            self._pid = os.getpid()

    def begin_shutdown(self) -> None:
        """Mark the process as stopping: readiness answers 503 from now on."""
        self.shutting_down = True

    def stop(self) -> None:
        """Stop the background threads (tests; Gunicorn workers simply exit)."""
        self.holder.stop()
        self.batcher.stop()
        self._pid = None

    @property
    def current(self) -> ServedModel | None:
        """The model new requests use, or None before any version loaded."""
        return self.holder.current
