"""Using a version outside the server: `python -m shared export --onnx` (run with onnxruntime)
and the README's plain-torchvision snippet."""

import json
import random
import subprocess
import sys

import numpy as np
import onnxruntime
import pytest
import torch

from shared import store
from shared.__main__ import main, parse_args
from shared.preprocess import eval_transform, load_rgb
from tests.conftest import REPO, class_image, publish_random_model

# fp32 logits of onnxruntime against PyTorch on the CPU: different kernels, same arithmetic.
ATOL = RTOL = 1e-4


def give_batchnorms_statistics(models, version):
    """Untrained BatchNorm statistics are the identity; give them values the export must keep."""
    weights = models / version / store.WEIGHTS_FILE
    state = torch.load(weights, weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for key, value in state.items():
        if key.endswith("running_mean"):
            value.normal_(0, 0.1, generator=generator)
        elif key.endswith("running_var"):
            value.uniform_(0.5, 2.0, generator=generator)
    torch.save(state, weights)
    meta_path = models / version / store.META_FILE
    meta = json.loads(meta_path.read_text())
    meta["sha256"] = store.sha256_file(weights)
    meta_path.write_text(json.dumps(meta))


@pytest.mark.slow  # exports a ResNet-18 in a real `python -m shared` process
def test_exported_onnx_runs_in_onnxruntime_with_pytorchs_answers_and_any_batch(tmp_path):
    models = tmp_path / "models"
    version = publish_random_model(models, arch="resnet18_nomaxpool", seed=3)
    give_batchnorms_statistics(models, version)
    loaded = store.load_version(models, version)
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()

    result = subprocess.run(
        [
            *(sys.executable, "-m", "shared", "--models-dir", str(models)),
            *("export", version, "--onnx", str(out)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{out}: {version}") and "mean [0.4914" in result.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # no temp file left

    session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map
    meta = loaded.meta
    assert props["version"] == version and props["arch"] == meta["arch"]
    assert json.loads(props["class_names"]) == meta["class_names"]
    assert int(props["image_size"]) == meta["image_size"]
    assert json.loads(props["mean"]) == meta["mean"] and json.loads(props["std"]) == meta["std"]
    assert "(x - mean) / std" in props["preprocessing"]

    # A user's images through the server's preprocessing, at batch sizes 1 and 5.
    rng = random.Random(0)
    transform = eval_transform(meta)
    images = torch.stack([transform(class_image(label, rng, size=48)) for label in range(5)])
    with torch.no_grad():
        expected = loaded.model(images).numpy()
    for batch in (images[:1], images):
        (logits,) = session.run(["logits"], {"image": batch.numpy()})
        assert logits.shape == (len(batch), 10)
        np.testing.assert_allclose(logits, expected[: len(batch)], atol=ATOL, rtol=RTOL)
        assert (logits.argmax(1) == expected[: len(batch)].argmax(1)).all()


def test_export_to_a_missing_folder_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    version = publish_random_model(tmp_path / "models")
    target = tmp_path / "missing" / "model.onnx"
    argv = ["--models-dir", str(tmp_path / "models"), "export", version, "--onnx", str(target)]
    assert main(parse_args(argv)) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"error: cannot write {target}: No such file or directory\n")
    assert not target.parent.exists()


def test_readme_plain_torchvision_snippet_gives_the_servers_answers(tmp_path, capsys):
    """The README's snippet, run as written (paths swapped), on a non-square JPEG: the same
    input tensor and logits as the server's path (load_rgb, eval_transform, load_version)."""
    models = tmp_path / "models"
    version = publish_random_model(models, arch="resnet18_nomaxpool", seed=1)
    photo = tmp_path / "cat.jpg"
    class_image(3, random.Random(0), size=50).resize((70, 50)).save(photo)
    readme = (REPO / "README.md").read_text()
    blocks = [block.split("```")[0] for block in readme.split("```python\n")[1:]]
    (snippet,) = [block for block in blocks if "torchvision.models.resnet18(" in block]
    snippet = snippet.replace("volumes/models/<version>", f"{models}/{version}")
    namespace = {}
    exec(snippet.replace('"cat.jpg"', repr(str(photo))), namespace)  # noqa: S102 - our README
    loaded = store.load_version(models, version)
    x = eval_transform(loaded.meta)(load_rgb(photo.read_bytes())).unsqueeze(0)
    assert torch.equal(namespace["x"], x)
    with torch.no_grad():
        assert torch.allclose(namespace["model"](x), loaded.model(x), atol=1e-5)
    assert capsys.readouterr().out.strip() in loaded.meta["class_names"]
