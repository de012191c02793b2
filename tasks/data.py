"""Compact dataset files shared by the stages: uint8 images + labels in one .npz.

70,000 MNIST images are 55 MB as uint8; one array file per split loads in
milliseconds and, unlike 70,000 PNGs, is one object in DVC's cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.errors import WorkError
from tasks.io import atomic_open


class DatasetError(WorkError, ValueError):
    """A dataset file holds arrays that are not (N, 28, 28) images with N labels."""


def save_arrays(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write (N, 28, 28) uint8 images and (N,) uint8 labels atomically."""
    if images.dtype != np.uint8 or labels.dtype != np.uint8 or len(images) != len(labels):
        raise ValueError(f"{path}: expected equal-length uint8 images and labels")
    with atomic_open(path, "wb") as fh:
        np.savez(fh, images=images, labels=labels)
    return path


def load_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8); never unpickles."""
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path} (run the split stage)")
    with np.load(path, allow_pickle=False) as z:
        images, labels = z["images"], z["labels"]
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DatasetError(f"{path}: bad dataset arrays {images.shape} / {labels.shape}")
    return images, labels
