"""The run folder: config, per-epoch metrics, plots, resumable state and the best weights."""

import csv
import io
import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display in containers or CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from shared.store import atomic_torch_save, atomic_write_bytes, atomic_write_json  # noqa: E402
from trainer import TrainerError  # noqa: E402

METRIC_FIELDS = [
    "epoch",
    "lr",
    "train_loss",
    "train_acc",
    "valid_loss",
    "valid_acc",
    "examples_per_sec",
    "seconds",
]


class RunDir:
    """Files of one training run under RUNS_DIR/<run_id>/."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.run_id = self.path.name

    @classmethod
    def create(cls, runs_dir: Path) -> "RunDir":
        """Make a new run folder named by UTC time."""
        run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
        path = Path(runs_dir) / run_id
        try:
            path.mkdir(parents=True)
        except OSError as exc:
            raise TrainerError(f"cannot create run folder {path}: {exc.strerror}") from None
        return cls(path)

    @classmethod
    def find_unfinished(cls, runs_dir: Path, run_id: str | None) -> "RunDir":
        """The named run, or the newest run in runs_dir that has not finished."""
        runs_dir = Path(runs_dir)
        if run_id:
            run = cls(runs_dir / run_id)
            if not (run.path / "config.json").is_file():
                raise TrainerError(f"no run {run_id} in {runs_dir}")
            if run.finished:
                raise TrainerError(f"run {run_id} already finished")
            return run
        candidates = sorted(p for p in runs_dir.glob("*/config.json")) if runs_dir.is_dir() else []
        for config in reversed(candidates):
            run = cls(config.parent)
            if not run.finished:
                return run
        raise TrainerError(f"no unfinished run in {runs_dir} to resume")

    @classmethod
    def newest_of_job(cls, runs_dir: Path, job: str) -> "RunDir | None":
        """The newest run that torchrun job `job` created or resumed, finished or not."""
        configs = sorted(Path(runs_dir).glob("*/config.json"), reverse=True)
        for config in configs:
            run = cls(config.parent)
            try:
                if run.read_config().get("torchrun_job") == job:
                    return run
            except ValueError:  # a config.json that is not JSON belongs to no job
                continue
        return None

    @contextmanager
    def _writing(self, name: str) -> Iterator[None]:
        """Turn a failed write (disk full, read-only folder) into a one-line TrainerError."""
        try:
            yield
        except OSError as exc:
            # Every file is replaced atomically, so the previous epoch's state is still whole.
            hint = "" if name == "config.json" else f"; free space, then --resume {self.run_id}"
            raise TrainerError(
                f"cannot write {self.path / name}: {exc.strerror or exc}{hint}"
            ) from None

    @property
    def finished(self) -> bool:
        return (self.path / "result.json").is_file()

    def write_config(self, config: dict) -> None:
        with self._writing("config.json"):
            atomic_write_json(self.path / "config.json", config)

    def read_config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    def save_state(self, state: dict) -> None:
        """Rewrite last.pt atomically: a kill at any moment leaves the previous epoch's state."""
        with self._writing("last.pt"):
            atomic_torch_save(state, self.path / "last.pt")

    def load_state(self) -> dict | None:
        path = self.path / "last.pt"
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def save_best(self, state_dict: dict) -> None:
        with self._writing("best.pt"):
            atomic_torch_save(state_dict, self.path / "best.pt")

    def load_best(self) -> dict:
        return torch.load(self.path / "best.pt", map_location="cpu", weights_only=True)

    def write_metrics(self, history: list[dict]) -> None:
        """metrics.csv and curves.png from the full history (so each epoch appears once)."""
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=METRIC_FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in history:
            writer.writerow({k: row[k] for k in METRIC_FIELDS})
        with self._writing("metrics.csv"):
            atomic_write_bytes(self.path / "metrics.csv", text.getvalue().encode())
        self._plot_curves(history)

    def _plot_curves(self, history: list[dict]) -> None:
        epochs = [r["epoch"] for r in history]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(epochs, [r["train_loss"] for r in history], label="train loss")
        ax.plot(epochs, [r["train_acc"] for r in history], "--", label="train acc")
        if any(r["valid_acc"] is not None for r in history):  # none with --valid-ratio 0
            ax.plot(epochs, [r["valid_acc"] for r in history], "-.", label="valid acc")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
        self._save_figure(fig, "curves.png")

    def plot_confusion(self, matrix: torch.Tensor, class_names: list[str]) -> None:
        """confusion.png: rows are true classes, columns predictions, cells normalized per row."""
        rates = matrix.float() / matrix.sum(dim=1, keepdim=True).clamp(min=1)
        fig, ax = plt.subplots(figsize=(6, 5))
        image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
        ticks = range(len(class_names))
        ax.set_xticks(ticks, class_names, rotation=45, ha="right")
        ax.set_yticks(ticks, class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        fig.colorbar(image)
        self._save_figure(fig, "confusion.png")

    def _save_figure(self, fig, name: str) -> None:
        buffer = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        with self._writing(name):
            atomic_write_bytes(self.path / name, buffer.getvalue())

    def read_result(self) -> dict:
        return json.loads((self.path / "result.json").read_text())

    def write_result(self, result: dict) -> None:
        """result.json marks the run finished."""
        with self._writing("result.json"):
            atomic_write_json(self.path / "result.json", result)
