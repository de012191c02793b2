"""Small synthetic MNIST-format data made in the tests: rendered digits, real IDX files.

Each class is a printed digit drawn with OpenCV at a random size, offset,
stroke width and slant, so a CNN can learn it in one epoch and the real
parsing, splitting and training code paths run without the network.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np

from tasks.download import MNIST_FILES
from tasks.idx import encode_idx, write_idx


def render_digit(digit: int, rng: np.random.Generator) -> np.ndarray:
    """One 28x28 uint8 white-on-black digit, MNIST-like (ink inside ~20x20, centred-ish)."""
    canvas = np.zeros((56, 56), np.uint8)  # draw at 2x, then downsample: smoother strokes
    scale = rng.uniform(1.3, 1.7)
    thickness = int(rng.integers(3, 6))
    (w, h), _ = cv2.getTextSize(str(digit), cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    x = (56 - w) // 2 + int(rng.integers(-3, 4))
    y = (56 + h) // 2 + int(rng.integers(-3, 4))
    cv2.putText(canvas, str(digit), (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thickness,
                cv2.LINE_AA)  # fmt: skip
    shear = np.float32([[1, rng.uniform(-0.2, 0.2), 0], [0, 1, 0]])
    canvas = cv2.warpAffine(canvas, shear, (56, 56))
    return cv2.resize(canvas, (28, 28), interpolation=cv2.INTER_AREA)


def make_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 28, 28) uint8 images and (n,) uint8 labels, classes balanced."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    rng.shuffle(labels)
    images = np.stack([render_digit(int(d), rng) for d in labels])
    return images, labels


def write_tiny_mnist(
    folder: Path, n_train: int = 600, n_test: int = 200, gz: bool = True, seed: int = 0
) -> dict[str, str]:
    """Write the four MNIST files (gzipped when ``gz``); returns their content SHA-256s."""
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y = make_digits(n_train, seed)
    test_x, test_y = make_digits(n_test, seed + 1)
    arrays = {
        "train_images": train_x, "train_labels": train_y,
        "test_images": test_x, "test_labels": test_y,
    }  # fmt: skip
    sums = {}
    for key, name in MNIST_FILES.items():
        write_idx(folder / (name + ".gz" if gz else name), arrays[key], gz=gz)
        sums[name] = hashlib.sha256(encode_idx(arrays[key])).hexdigest()
    return sums


def write_checksums(path: Path, sums: dict[str, str]) -> Path:
    path.write_text(json.dumps(sums, indent=2))
    return path
