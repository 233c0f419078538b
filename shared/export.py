"""Export a published version to ONNX, preprocessing included as metadata (`python -m shared
export VERSION --onnx FILE`).

The file takes float32 images (batch, 3, image_size, image_size), any batch size, already
preprocessed as the server does (`shared/preprocess.py`), and returns logits. Its
metadata_props carry what a user needs to reproduce the server's answers: version, arch,
class_names, image_size, mean, std (JSON values) and the preprocessing in words.
"""

import io
import json
import warnings
from pathlib import Path

import onnx
import torch

from shared import store
from shared.stores import Store

# ONNX opset 17: read by every onnxruntime since 1.14 (2023).
OPSET = 17
INPUT, OUTPUT = "image", "logits"
PREPROCESSING = (
    "RGB image; shorter side resized to image_size (bilinear, antialiased), centre square "
    "cropped; values scaled to [0, 1]; then (x - mean) / std per channel; NCHW float32"
)


def export_onnx(models: Store, version: str, path: Path) -> dict:
    """Write `version` to `path` as one ONNX file (atomically); return the version's model.json."""
    loaded = models.load_version(version)  # the checked loader, like the server
    meta = loaded.meta
    size = meta["image_size"]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter (dynamo=False) is deprecated but exact for a ResNet; the
        # dynamo one needs onnxscript on top, is much slower, and by default writes the
        # weights to a second file.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            loaded.model,
            (torch.zeros(2, 3, size, size),),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
        )
    model = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(
        model,
        {
            "version": version,
            "arch": meta["arch"],
            "class_names": json.dumps(meta["class_names"]),
            "image_size": str(size),
            "mean": json.dumps(meta["mean"]),
            "std": json.dumps(meta["std"]),
            "preprocessing": PREPROCESSING,
        },
    )
    onnx.checker.check_model(model)
    try:
        store.atomic_write_bytes(Path(path), model.SerializeToString())
    except OSError as exc:
        raise store.StoreError(f"cannot write {path}: {exc.strerror or exc}") from None
    return meta
