"""The render stage: seeded synthetic photos of training digits, read back as predict reads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest

from tasks.config import RenderParams, TrainParams, parse_params
from tasks.data import load_arrays, save_arrays
from tasks.render import render_dataset, render_photo
from tasks.train import _fingerprint, mix_renders
from tests.synth import make_digits

TINY = RenderParams(count=12, seed=3)


@pytest.fixture
def train_npz(tmp_path: Path) -> Path:
    images, labels = make_digits(30, seed=5)
    return save_arrays(tmp_path / "train.npz", images, labels)


def test_renders_are_seeded_network_inputs_of_training_digits(
    train_npz: Path, tmp_path: Path
) -> None:
    a = render_dataset(train_npz, tmp_path / "a" / "renders.npz", TINY)
    b = render_dataset(train_npz, tmp_path / "b" / "renders.npz", TINY)
    assert a.path.read_bytes() == b.path.read_bytes()  # same params: same renders
    x, y = load_arrays(a.path)
    assert a.n == len(x) == TINY.count - a.empty - a.lost
    assert a.n >= TINY.count // 2  # most renders keep their digit
    assert x.dtype == np.uint8 and x.shape[1:] == (28, 28)
    assert set(y.tolist()) <= set(range(10))
    assert all(img.max() > 0 for img in x)  # the digit was found: ink in every input
    c = render_dataset(train_npz, tmp_path / "c.npz", dataclasses.replace(TINY, seed=4))
    assert c.path.read_bytes() != a.path.read_bytes()


def test_lined_paper_renders_have_lines_across_the_page(train_npz: Path) -> None:
    """Ruled paper: rows of darker pixels spanning the whole width, away from the digit."""
    images, _ = load_arrays(train_npz)
    p = dataclasses.replace(
        TINY, lined=1.0, squared=0.0, shadow=0.0, dark=0.0, noise_max=0.0, blur_max=0.0,
        crossing_line=0.0, edge_marks=0.0, rotate_deg=0.0, perspective=0.0,
    )  # fmt: skip
    photo = render_photo(images[0], p, np.random.default_rng(0))
    gray = photo.mean(axis=2).astype(np.float32)
    # a ruled line darkens a row (give or take its 2 degree tilt) against the paper around it
    darker = cv2.GaussianBlur(gray, (0, 0), 6) - gray > 2
    lined_rows = darker.mean(axis=1) > 0.3
    assert lined_rows.sum() >= 2
    plain = render_photo(images[0], dataclasses.replace(p, lined=0.0), np.random.default_rng(0))
    g = plain.mean(axis=2).astype(np.float32)
    assert ((cv2.GaussianBlur(g, (0, 0), 6) - g > 2).mean(axis=1) > 0.3).sum() == 0


def test_mixing_renders_keeps_the_share_and_the_seed_recipe_unaffected(
    train_npz: Path, tmp_path: Path
) -> None:
    images, labels = load_arrays(train_npz)
    renders = render_dataset(train_npz, tmp_path / "r.npz", TINY)
    x, y = mix_renders(images, labels, renders.path, 0.2)
    n = round(len(images) * 0.2 / 0.8)  # 20 % of the result
    assert len(x) == len(images) + min(n, renders.n) and len(x) == len(y)
    assert np.array_equal(x[: len(images)], images)  # MNIST first, as it was
    # the seed recipe reads no renders: its run identity is what it was without the stage
    seed = TrainParams()
    assert seed.renders_share == 0.0
    val = save_arrays(tmp_path / "val.npz", images[:5], labels[:5])
    assert _fingerprint(seed, train_npz, val) == _fingerprint(seed, train_npz, val)


def test_render_params_are_checked() -> None:
    with pytest.raises(ValueError, match="lined"):
        parse_params({"render": {"lined": 0.8, "squared": 0.5}})
    with pytest.raises(ValueError, match="line_spacing_min"):
        parse_params({"render": {"line_spacing_min": 0.9, "line_spacing_max": 0.5}})
    with pytest.raises(ValueError, match="renders_share"):
        parse_params({"train": {"seed": {"renders_share": 1.0}}})
