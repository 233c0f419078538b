import torch

from tests.conftest import make_image_folders
from trainer import TrainerError
from trainer.data import load_folders, stratified_split


def test_split_is_stratified_disjoint_and_seeded():
    labels = torch.arange(10).repeat_interleave(50)
    train, valid = stratified_split(labels, 0.1, seed=3)
    assert set(train.tolist()).isdisjoint(valid.tolist())
    assert len(train) + len(valid) == 500
    assert torch.bincount(labels[valid]).tolist() == [5] * 10
    again_train, again_valid = stratified_split(labels, 0.1, seed=3)
    assert torch.equal(valid, again_valid) and torch.equal(train, again_train)
    assert not torch.equal(valid, stratified_split(labels, 0.1, seed=4)[1])


def test_split_keeps_one_image_per_class_on_each_side():
    labels = torch.tensor([0, 0, 1, 1, 1])
    train, valid = stratified_split(labels, 0.01, seed=0)
    assert sorted(labels[valid].tolist()) == [0, 1]
    assert sorted(set(labels[train].tolist())) == [0, 1]


def test_folders_decode_once_into_uint8_with_sorted_classes(tmp_path):
    root = make_image_folders(tmp_path, per_class=4, splits=("train", "test"), classes=["b", "a"])
    data = load_folders(root, image_size=16, valid_ratio=0.25, seed=0)
    assert data.class_names == ["a", "b"]
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (3, 16, 16)
    assert len(data.train) == 6 and len(data.valid) == 2 and len(data.test) == 8
    assert data.valid_from_train


def test_valid_folder_with_other_classes_is_refused(tmp_path):
    root = make_image_folders(tmp_path, per_class=2, classes=["a", "b"])
    make_image_folders(tmp_path, per_class=2, splits=("valid",), classes=["a", "c"])
    try:
        load_folders(root, 16, 0.1, 0)
    except TrainerError as exc:
        assert "don't match" in str(exc) and "'c'" in str(exc)
    else:
        raise AssertionError("mismatched class folders were accepted")
