"""CUDA graphs of the serving pass: the bucketing (everywhere), capture and replay (GPU only).

The GPU tests skip on machines without CUDA; `make bench-gpu` (bench/graphs.py) checks the same
agreement and measures the speed on a GPU host.
"""

import logging
import threading

import pytest
import torch

from inference.graphs import capture, graph_sizes, padded_size
from inference.predictor import ServedModel
from shared.precision import Choice
from shared.store import load_version
from tests.conftest import publish_random_model

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_graph_sizes_are_powers_of_two_then_the_max_batch():
    assert graph_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert graph_sizes(48) == (1, 2, 4, 8, 16, 32, 48)
    assert graph_sizes(1) == (1,)
    assert graph_sizes(2) == (1, 2)
    with pytest.raises(ValueError, match="max_batch"):
        graph_sizes(0)


def test_a_batch_pads_to_the_smallest_captured_size_that_holds_it():
    sizes = graph_sizes(48)
    padded = [padded_size(n, sizes) for n in (1, 2, 3, 5, 16, 17, 33, 48)]
    assert padded == [1, 2, 4, 8, 16, 32, 48, 48]
    for n in range(1, 49):
        size = padded_size(n, sizes)
        smaller = [s for s in sizes if s < size]
        assert size >= n and all(s < n for s in smaller), n
    assert padded_size(49, sizes) is None  # larger than every graph: the caller runs eagerly


def test_failed_capture_gives_no_graphs_and_one_warning(caplog):
    def broken(images: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    # On a CPU-only machine capture fails before calling `broken`; on a GPU inside it.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with caplog.at_level(logging.WARNING, logger="inference.graphs"):
        graphs, note = capture(broken, (3, 8, 8), device, 4, torch.float32)
    assert graphs is None and note.startswith("failed, serving eagerly: ")
    assert len([r for r in caplog.records if r.name == "inference.graphs"]) == 1


def served(tmp_path, device: str, cuda_graphs: str, bf16: bool = False, **meta) -> ServedModel:
    """A published random model served on `device` in fp32/bf16, channels_last."""
    models = tmp_path / f"models-{cuda_graphs}"
    version = publish_random_model(models, **meta)
    loaded = load_version(models, version, device)
    tta = meta.get("tta", "off")
    return ServedModel(loaded, Choice(bf16, True, "test"), tta, cuda_graphs, max_batch=16)


def test_the_cpu_path_has_no_graphs_and_says_so(tmp_path):
    model = served(tmp_path, "cpu", "auto")
    assert model.graphs is None and model.graphs_note == "off (CPU)"
    probs = model.probabilities(torch.zeros(3, 3, 32, 32, dtype=torch.uint8))
    assert probs.shape == (3, 10) and torch.allclose(probs.sum(1), torch.ones(3))


@cuda_only
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("tta", ["off", "hflip"])
def test_graphed_probabilities_equal_eager_at_every_batch_size(tmp_path, bf16, tta):
    graphed = served(tmp_path, "cuda", "auto", bf16, tta=tta)
    eager = served(tmp_path, "cuda", "off", bf16, tta=tta)
    assert graphed.graphs is not None, graphed.graphs_note
    assert eager.graphs is None and eager.graphs_note == "off (CUDA_GRAPHS=off)"
    torch.manual_seed(0)
    for n in [*range(1, 18), 16, 3, 1]:  # 17: above the largest graph, eager; then back again
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
        probs = graphed.probabilities(images)
        assert probs.device.type == "cpu" and probs.shape == (n, 10)
        # Eager on the padded batch the graph computed: same shapes, same cuDNN kernels.
        size = padded_size(n, graphed.graphs.sizes) or n
        padded = torch.cat([images, images.new_zeros((size - n, 3, 32, 32))])
        assert (probs - eager.probabilities(padded)[:n]).abs().max().item() < (
            1e-2 if bf16 else 1e-4
        ), n
        # Unpadded, cuDNN may pick other kernels (TF32 in fp32): close, not equal.
        assert (probs - eager.probabilities(images)).abs().max().item() < 5e-2, n


@cuda_only
def test_capture_while_another_version_serves_spoils_neither(tmp_path):
    old = served(tmp_path, "cuda", "off")
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    expected = old.probabilities(images)
    errors: list[BaseException] = []
    stop = threading.Event()

    def serve() -> None:  # the batcher thread on the old version, eager: syncs and allocations
        try:
            while not stop.is_set():
                assert torch.allclose(old.probabilities(images), expected, atol=1e-6)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        new = served(tmp_path, "cuda", "auto")
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert new.graphs is not None, new.graphs_note
