"""Split stage: parse the raw IDX files, hold out a seeded validation split."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.data import save_arrays
from tasks.download import MNIST_FILES
from tasks.idx import IdxError, read_images, read_labels


def _pair(raw_dir: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_images(raw_dir / MNIST_FILES[f"{prefix}_images"])
    labels = read_labels(raw_dir / MNIST_FILES[f"{prefix}_labels"])
    if len(images) != len(labels):
        raise IdxError(f"{raw_dir}: {prefix} set has {len(images)} images but {len(labels)} labels")
    return images, labels


def split_dataset(raw_dir: Path, out_dir: Path, val_fraction: float, seed: int) -> dict[str, Path]:
    """Write train/val/test .npz files; returns {split name: path}.

    The validation set is a seeded random ``val_fraction`` of the training
    images (a permutation, so the same seed always gives the same split).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train_x, train_y = _pair(raw_dir, "train")
    test_x, test_y = _pair(raw_dir, "test")
    n_val = round(len(train_x) * val_fraction)
    if n_val == 0 or n_val == len(train_x):
        raise ValueError(
            f"val_fraction {val_fraction} of {len(train_x)} images leaves an empty split"
        )
    order = np.random.default_rng(seed).permutation(len(train_x))
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    return {
        "train": save_arrays(out_dir / "train.npz", train_x[train_idx], train_y[train_idx]),
        "val": save_arrays(out_dir / "val.npz", train_x[val_idx], train_y[val_idx]),
        "test": save_arrays(out_dir / "test.npz", test_x, test_y),
    }
