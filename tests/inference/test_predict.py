"""POST /predict with good images, against a real Gunicorn."""

import io
import shutil
import subprocess

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from shared.classes import CIFAR10_CLASSES
from shared.model import use_bf16
from shared.preprocess import eval_transform, load_rgb
from shared.store import load_version
from tests.conftest import publish_random_model
from tests.inference.serving import image_bytes, run_server, wait_ready


def noise_image(seed: int, size: tuple[int, int], fmt: str) -> bytes:
    """A random-noise-and-gradient image: varied enough that the model's answers differ."""
    rng = np.random.default_rng(seed)
    width, height = size
    gradient = np.linspace(0, 255, width)[None, :, None] * rng.random(3)[None, None, :]
    pixels = rng.integers(0, 256, (height, width, 3)) * rng.random() + gradient
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


def test_original_client_three_files_in_upload_order(server, served_models, tmp_path):
    _, version = served_models
    paths = []
    for name, color in [("cavalo.jpg", "brown"), ("cachorro.jpg", "gray"), ("sapo.png", "green")]:
        path = tmp_path / name
        Image.new("RGB", (64, 48), color).save(path)
        paths.append(path)
    # Exactly the original project's client call.
    response = requests.post(
        server.url + "/predict",
        files=[
            ("file", open(paths[0], "rb")),  # noqa: SIM115 - the original client's exact code
            ("file", open(paths[1], "rb")),  # noqa: SIM115
            ("file", open(paths[2], "rb")),  # noqa: SIM115
        ],
    )
    assert response.status_code == 200
    body = response.json()
    assert body["model_version"] == version
    assert [p["filename"] for p in body["predictions"]] == [
        "cavalo.jpg",
        "cachorro.jpg",
        "sapo.png",
    ]
    for entry in body["predictions"]:
        assert list(entry) == ["category", "category_index", "confidence", "filename"]
        assert entry["category"] == CIFAR10_CLASSES[entry["category_index"]]
        assert 0.0 < entry["confidence"] <= 1.0


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_form_upload(server, tmp_path):
    (tmp_path / "a.jpg").write_bytes(image_bytes(fmt="JPEG"))
    (tmp_path / "b.png").write_bytes(image_bytes(color=(0, 0, 255)))
    out = subprocess.run(
        ["curl", "-s", "-F", "file=@a.jpg", "-F", "file=@b.png", server.url + "/predict"],
        cwd=tmp_path,
        capture_output=True,
        check=True,
        text=True,
        timeout=60,
    ).stdout
    assert '"filename":"a.jpg"' in out and '"filename":"b.png"' in out


def test_top_k_lists_classes_by_falling_probability(server):
    files = [("file", ("a.png", image_bytes())), ("file", ("b.png", image_bytes(color=(9, 9, 9))))]
    body = server.post("/predict?top_k=3", files=files).json()
    for entry in body["predictions"]:
        top = entry["top_k"]
        assert len(top) == 3
        assert list(top[0]) == ["category", "category_index", "probability"]
        assert top[0]["category"] == entry["category"]
        assert top[0]["probability"] == entry["confidence"]
        probabilities = [t["probability"] for t in top]
        assert probabilities == sorted(probabilities, reverse=True)


def test_top_k_beyond_the_class_count_lists_every_class(server):
    body = server.post("/predict?top_k=50", files={"file": ("a.png", image_bytes())}).json()
    top = body["predictions"][0]["top_k"]
    assert sorted(t["category_index"] for t in top) == list(range(10))
    assert sum(t["probability"] for t in top) == pytest.approx(1.0, abs=1e-4)


def test_top_k_zero_adds_no_list(server):
    body = server.post("/predict?top_k=0", files={"file": ("a.png", image_bytes())}).json()
    assert "top_k" not in body["predictions"][0]


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "1e3"])
def test_top_k_rejects_malformed_values(server, value):
    response = server.post(f"/predict?top_k={value}", files={"file": ("a.png", image_bytes())})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_top_k"


def assert_served_like_in_process(server, models_dir, version, precision):
    """Same model, same images: same classes as a plain fp32 forward, confidences within the
    rounding of the served precision."""
    images = [
        noise_image(i, size, fmt)
        for i, (size, fmt) in enumerate(
            [((32, 32), "PNG"), ((48, 40), "PNG"), ((300, 200), "JPEG"), ((31, 77), "PNG")] * 5
        )
    ]
    labels = [i % 10 for i in range(len(images))]  # arbitrary "ground truth" for an accuracy
    files = [("file", (f"img{i}.png", data)) for i, data in enumerate(images)]
    response = server.post("/predict", files=files)
    assert response.status_code == 200
    served = response.json()["predictions"]
    assert server.get("/model").json()["precision"] == precision

    loaded = load_version(models_dir, version)
    transform = eval_transform(loaded.meta)
    size = loaded.meta["image_size"]
    with torch.inference_mode():
        batch = torch.stack([transform(load_rgb(data, draft_size=size)) for data in images])
        probs = loaded.model(batch).softmax(dim=1)
    expected = probs.argmax(dim=1).tolist()

    # Folding BatchNorm into the convs only reorders fp32 sums; bf16 keeps 8 mantissa bits
    # (measured: at most 0.016 apart on these images).
    tolerance = 1e-4 if precision == "fp32" else 0.05
    assert [p["category_index"] for p in served] == expected
    for entry, row in zip(served, probs, strict=True):
        assert entry["confidence"] == pytest.approx(float(row.max()), abs=tolerance)
    assert len(set(expected)) > 1, "the test images should not all land in one class"
    served_acc = np.mean([p["category_index"] == y for p, y in zip(served, labels, strict=True)])
    local_acc = np.mean([e == y for e, y in zip(expected, labels, strict=True)])
    assert served_acc == local_acc


def test_predictions_equal_in_process_evaluation_of_the_same_model(server, served_models):
    """Serving and training can't drift; AMP=auto serves at the precision it timed fastest."""
    models_dir, version = served_models
    info = server.get("/model").json()
    allowed = {"fp32", "bf16"} if use_bf16("auto", torch.device("cpu")) else {"fp32"}
    assert info["precision"] in allowed
    assert info["memory_format"] in ("channels_last", "contiguous")
    assert "fastest forward" in info["precision_reason"] and "ms" in info["precision_reason"]
    if info["device"] == "cpu":
        assert info["cuda_graphs"] == "off (CPU)"
    else:
        assert info["cuda_graphs"].startswith("batch sizes 1, 2, 4"), info["cuda_graphs"]
    assert_served_like_in_process(server, models_dir, version, info["precision"])


def test_explicit_layout_is_obeyed_and_answers_equal_across_layouts(served_models, tmp_path):
    models_dir, version = served_models
    with run_server(models_dir, tmp_path, AMP="off", CHANNELS_LAST="off") as srv:
        wait_ready(srv)
        info = srv.get("/model").json()
        assert (info["precision"], info["memory_format"]) == ("fp32", "contiguous")
        assert info["precision_reason"].startswith("as set")
        assert_served_like_in_process(srv, models_dir, version, "fp32")


def test_model_json_tta_is_applied_by_default_and_off_on_request(tmp_path):
    models_dir = tmp_path / "models"
    version = publish_random_model(models_dir, tta="hflip")
    images = [noise_image(i, (32, 32), "PNG") for i in range(4)]
    files = [("file", (f"{i}.png", data)) for i, data in enumerate(images)]
    loaded = load_version(models_dir, version)
    with torch.inference_mode():
        x = torch.stack([eval_transform(loaded.meta)(load_rgb(d)) for d in images])
        plain = loaded.model(x).softmax(1)
        mirrored = (plain + loaded.model(x.flip(3)).softmax(1)) / 2
    for env, expected, tta in [({}, mirrored, "hflip"), ({"TTA": "off"}, plain, "off")]:
        with run_server(models_dir, tmp_path, AMP="off", **env) as srv:
            wait_ready(srv)
            assert srv.get("/model").json()["tta"] == tta
            served = srv.post("/predict", files=files).json()["predictions"]
        for entry, row in zip(served, expected, strict=True):
            assert entry["category_index"] == int(row.argmax())
            assert entry["confidence"] == pytest.approx(float(row.max()), abs=1e-4)


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_amp_setting_chooses_the_served_precision(served_models, tmp_path, amp):
    models_dir, version = served_models
    with run_server(models_dir, tmp_path, AMP=amp) as srv:
        wait_ready(srv)
        assert_served_like_in_process(srv, models_dir, version, "fp32" if amp == "off" else "bf16")


def test_every_predict_answer_a_model_took_part_in_names_its_version(server, served_models):
    """X-Model-Version on a success, on per-file errors and on a 422; none on a request error."""
    _, version = served_models
    good = ("file", ("a.png", image_bytes()))
    bad = ("file", ("b.png", b"not an image"))
    for files, status in [([good], 200), ([good, bad], 200), ([bad, bad], 422)]:
        response = server.post("/predict", files=files)
        assert response.status_code == status
        assert response.headers["X-Model-Version"] == version
        assert response.json()["model_version"] == version
    # Refused before any model looked at it: no version to name.
    response = server.post("/predict", data={"file": "text"})
    assert response.status_code == 400
    assert "X-Model-Version" not in response.headers
    assert "X-Model-Version" not in server.get("/model").headers
