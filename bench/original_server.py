"""The original project's kind of server, kept only as the benchmarks' baseline (e).

    python -m bench.original_server --models-dir volumes/bench/models --port 5000

Flask's development server (`app.run(threaded=True)`), PIL + torchvision transforms per image
and one forward pass per uploaded file, as the original API did. It loads the same model as the
real service (LATEST of --models-dir through shared.store.load_version) so that the comparison
measures serving, not models. Never deploy it: bench/load.py starts and stops it.
"""

import argparse

import torch
from flask import Flask, jsonify, request
from PIL import Image
from torchvision import transforms

from shared import store


def create_app(models_dir: str) -> Flask:
    """A Flask app that predicts file by file with the version LATEST names."""
    loaded = store.load_version(models_dir, store.read_latest(models_dir))
    meta = loaded.meta
    size = meta["image_size"]
    transform = transforms.Compose(
        [
            transforms.Resize(size),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(meta["mean"], meta["std"]),
        ]
    )
    app = Flask(__name__)

    @app.post("/predict")
    def predict():
        predictions = []
        for upload in request.files.getlist("file"):
            image = Image.open(upload.stream).convert("RGB")
            with torch.no_grad():
                probs = loaded.model(transform(image).unsqueeze(0)).softmax(dim=1)[0]
            confidence, index = probs.max(dim=0)
            predictions.append(
                {
                    "category": meta["class_names"][int(index)],
                    "category_index": int(index),
                    "confidence": float(confidence),
                    "filename": upload.filename,
                }
            )
        return jsonify({"predictions": predictions, "model_version": loaded.version})

    @app.get("/health/ready")
    def ready():
        return jsonify({"status": "ready", "version": loaded.version})

    return app


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.original_server", description=__doc__)
    p.add_argument("--models-dir", required=True, help="model store whose LATEST is served")
    p.add_argument("--host", default="127.0.0.1", help="address (default %(default)s)")
    p.add_argument("--port", type=int, default=5000, help="port (default %(default)s)")
    args = p.parse_args()
    create_app(args.models_dir).run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()
