"""Data sources: class folders or torchvision's CIFAR-10, decoded once into uint8 tensors."""

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shared.classes import CIFAR10_CLASSES
from shared.preprocess import resize_crop
from trainer import TrainerError
from trainer.cache import load_or_decode
from trainer.decode import decode_into

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


@dataclass
class Split:
    """Images of one split as uint8 (N, 3, S, S) with int64 labels, and where they came from."""

    images: torch.Tensor
    labels: torch.Tensor
    paths: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> "Split":
        """The same split with its tensors on `device`."""
        return Split(self.images.to(device), self.labels.to(device), self.paths)

    def subset(self, index: torch.Tensor) -> "Split":
        """The images at `index`, in that order."""
        # index_select copies whole rows (memcpy); images[index] costs twice the CPU time
        # (measured on the 45,000 CIFAR-10 training rows of a cache hit).
        images = self.images.index_select(0, index.to(self.images.device))
        return Split(images, self.labels[index], [self.paths[i] for i in index.tolist()])


@dataclass
class Dataset:
    """Train, valid and optional test splits sharing one class list."""

    class_names: list[str]
    train: Split
    valid: Split
    test: Split | None
    valid_from_train: bool

    def to(self, device: torch.device) -> "Dataset":
        """The same dataset with every split's tensors on `device`."""
        test = self.test.to(device) if self.test is not None else None
        return Dataset(
            self.class_names,
            self.train.to(device),
            self.valid.to(device),
            test,
            self.valid_from_train,
        )


def _is_image(name: str) -> bool:
    """Whether a file name has an image suffix (as os.path.splitext finds it, at a third of
    the cost: 50,000 names are checked at every start)."""
    dot = name.rfind(".")
    return name[dot:].lower() in IMAGE_SUFFIXES and name[:dot].lstrip(".") != ""


def _class_folders(split_dir: Path) -> dict[str, list[os.DirEntry]]:
    """Image files per class folder, sorted by name; os.scandir, so listing 50,000 files
    costs one stat each (for the cache key) and no path objects."""
    with os.scandir(split_dir) as it:
        folders = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    files = {}
    for name in folders:
        with os.scandir(split_dir / name) as it:
            entries = [e for e in it if _is_image(e.name) and e.is_file()]
        files[name] = sorted(entries, key=lambda e: e.name)
    return files


def _decode_folder(
    split_dir: Path,
    files: dict[str, list[os.DirEntry]],
    class_names: list[str],
    image_size: int,
    cache_dir: str,
    workers: int,
) -> Split:
    """Decode the images `files` lists (per class folder of split_dir) into one uint8 tensor,
    or load them from the cache; name unreadable files."""
    if sorted(files) != class_names:
        extra = sorted(set(files) - set(class_names))
        lacking = sorted(set(class_names) - set(files))
        raise TrainerError(
            f"class folders in {split_dir} don't match train/: "
            f"extra {extra or 'none'}, missing {lacking or 'none'}"
        )
    empty = [c for c in class_names if not files[c]]
    if empty:
        raise TrainerError(f"no images in {split_dir}/{empty[0]}/ (empty class folders: {empty})")
    entries = [e for c in class_names for e in files[c]]
    counts = torch.tensor([len(files[c]) for c in class_names])
    labels = torch.arange(len(class_names)).repeat_interleave(counts)
    # Relative to the data folder, e.g. "train/cat/0001.jpg": the cache key and Split.paths.
    paths = [f"{split_dir.name}/{c}/{e.name}" for c in class_names for e in files[c]]
    stats = [e.stat() for e in entries]
    key_items = [(p, st.st_size, st.st_mtime_ns) for p, st in zip(paths, stats, strict=True)]
    image_files = [e.path for e in entries]
    images, _ = load_or_decode(
        cache_dir,
        split_dir,
        key_items,
        image_size,
        lambda out: decode_into(out, image_files, image_size, workers),
    )
    return Split(torch.from_numpy(images), labels, paths)


def stratified_split(
    labels: torch.Tensor, ratio: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded per-class hold-out: (train_index, valid_index), each sorted."""
    generator = torch.Generator().manual_seed(seed)
    # The bookkeeping in numpy, one thread: torch's two-thread unique/compare/sort of 50,000
    # labels took 0.2-0.7 s of CPU on a busy 2-core machine, numpy's a few ms. The random
    # draws are torch's, as always, so every seed gives the split it gave before.
    y = labels.cpu().numpy()
    train_parts, valid_parts = [], []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        members = members[torch.randperm(len(members), generator=generator).numpy()]
        # At least one image per class on each side, whenever the class has two.
        n_valid = min(max(round(len(members) * ratio), 1), len(members) - 1)
        valid_parts.append(members[:n_valid])
        train_parts.append(members[n_valid:])
    return (
        torch.from_numpy(np.sort(np.concatenate(train_parts))),
        torch.from_numpy(np.sort(np.concatenate(valid_parts))),
    )


def load_folders(
    data_dir: Path,
    image_size: int,
    valid_ratio: float,
    seed: int,
    cache_dir: str = "",
    workers: int = 0,
) -> Dataset:
    """Read DIR/train/<class>/*, optional DIR/valid/ and DIR/test/, holding out valid if absent.

    Decoded pixels are cached per folder in `cache_dir` (empty or "none": no cache); a cache
    miss decodes with `workers` processes (trainer.decode.pool_size).
    """
    data_dir = Path(data_dir)
    train_dir = data_dir / "train"
    if not train_dir.is_dir():
        raise TrainerError(f"no train/ folder in {data_dir} (expected {train_dir}/<class>/*.jpg)")
    train_files = _class_folders(train_dir)
    class_names = sorted(train_files)
    if len(class_names) < 2:
        raise TrainerError(f"{train_dir} needs at least two class folders, found {class_names}")
    train = _decode_folder(train_dir, train_files, class_names, image_size, cache_dir, workers)
    splits = {
        name: _decode_folder(
            data_dir / name,
            _class_folders(data_dir / name),
            class_names,
            image_size,
            cache_dir,
            workers,
        )
        for name in ("valid", "test")
        if (data_dir / name).is_dir()
    }
    valid = splits.get("valid")
    if valid is None and valid_ratio == 0:  # train on every image; no validation
        valid = train.subset(torch.zeros(0, dtype=torch.int64))
    elif valid is None:
        train_index, valid_index = stratified_split(train.labels, valid_ratio, seed)
        train, valid = train.subset(train_index), train.subset(valid_index)
    return Dataset(class_names, train, valid, splits.get("test"), "valid" not in splits)


def load_torchvision(root: Path, image_size: int, valid_ratio: float, seed: int) -> Dataset:
    """Download CIFAR-10 once into `root` (reused after), hold out valid, keep the test set."""
    from torchvision.datasets import CIFAR10

    try:
        train_set = CIFAR10(str(root), train=True, download=True)
        test_set = CIFAR10(str(root), train=False, download=True)
    except (OSError, RuntimeError) as exc:
        raise TrainerError(
            f"cannot download CIFAR-10 into {root} ({exc}); pass --data-dir with class folders"
        ) from None
    to_tensor = resize_crop(image_size)

    def as_split(ds: CIFAR10, name: str) -> Split:
        images = torch.stack([to_tensor(Image.fromarray(a)) for a in np.asarray(ds.data)])
        labels = torch.tensor(ds.targets, dtype=torch.int64)
        return Split(images, labels, [f"cifar10-{name}/{i}" for i in range(len(labels))])

    train = as_split(train_set, "train")
    train_index, valid_index = stratified_split(train.labels, valid_ratio, seed)
    return Dataset(
        list(CIFAR10_CLASSES),
        train.subset(train_index),
        train.subset(valid_index),
        as_split(test_set, "test"),
        True,
    )
