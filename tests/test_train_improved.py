"""The improved recipe: per-sample augmentation, BatchNorm/Dropout model, schedule, resume."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tasks.config import AugmentParams, ParamsError, TrainParams, parse_params
from tasks.model import ImprovedCNN, build_model, load_model, normalize_uint8, save_model
from tasks.train import random_affine, random_appearance, train, train_batch_inputs

AUG = AugmentParams(rotate_deg=15.0, scale=0.15, translate=0.1)
# the improved recipe, shrunk for 420 tiny images: a few epochs, small batches
IMPROVED = TrainParams(
    model="improved", epochs=2, batch_size=32, lr=3e-3, device="cpu",
    batchnorm=True, dropout=0.2, augment=AUG, schedule="onecycle",
    channels_last=True, amp=True,  # the preset's speed switches: bf16 must be seeded too
)  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny batches gain nothing from 2 threads, and on a busy 2-core box the OpenMP
    threads of two processes stall each other: one thread keeps these tests fast."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _digits(n: int = 16) -> torch.Tensor:
    """(n, 28, 28) uint8: the same vertical bar n times, so any per-sample change shows."""
    x = torch.zeros(n, 28, 28, dtype=torch.uint8)
    x[:, 6:22, 12:16] = 255
    return x


def _run(params: TrainParams, data: Path, out: Path) -> list[dict[str, float]]:
    result = train(
        data / "train.npz", data / "val.npz", out / "model.pt", out / "live", out / "ckpt.pt",
        params, progress=False,
    )  # fmt: skip
    return result.history


def test_augment_off_is_the_seed_path_exactly():
    x = _digits()
    for aug in (None, AugmentParams()):
        out = train_batch_inputs(x, 0.1307, 0.3081, aug, None)
        assert torch.equal(out, normalize_uint8(x, 0.1307, 0.3081))


def test_augment_is_per_sample_random_and_seeded():
    x = _digits()
    a = train_batch_inputs(x, 0.0, 1.0, AUG, torch.Generator().manual_seed(0))
    b = train_batch_inputs(x, 0.0, 1.0, AUG, torch.Generator().manual_seed(0))
    c = train_batch_inputs(x, 0.0, 1.0, AUG, torch.Generator().manual_seed(1))
    assert a.shape == (16, 1, 28, 28) and a.dtype == torch.float32
    assert torch.equal(a, b)  # same seed, same warp
    assert not torch.equal(a, c)
    # identical inputs, yet every sample got its own transform (v2 on a batch would not)
    assert all(not torch.allclose(a[0], a[i]) for i in range(1, 16))
    assert a.min() >= 0.0 and a.max() <= 1.0 + 1e-6  # bilinear: no new extremes


def test_near_zero_affine_is_the_identity():
    x = normalize_uint8(_digits(4), 0.0, 1.0)
    tiny = AugmentParams(rotate_deg=1e-6, scale=1e-6, translate=1e-6)
    out = random_affine(x, tiny, torch.Generator().manual_seed(0))
    assert torch.allclose(out, x, atol=1e-4)  # the grid convention maps pixels onto themselves


def test_near_zero_shear_and_elastic_are_the_identity():
    x = normalize_uint8(_digits(4), 0.0, 1.0)
    tiny = AugmentParams(shear_deg=1e-6, elastic_px=1e-6)
    out = random_affine(x, tiny, torch.Generator().manual_seed(0))
    assert torch.allclose(out, x, atol=1e-4)


def _column_centre(img: torch.Tensor, rows: slice) -> float:
    """Ink-weighted mean column of ``rows`` of a (28, 28) image."""
    band = img[rows]
    return float((band.sum(0) * torch.arange(28.0)).sum() / band.sum())


def test_shear_slants_per_sample_and_elastic_bends():
    x = normalize_uint8(_digits(8), 0.0, 1.0)  # a vertical bar, rows 6..21
    sheared = random_affine(x, AugmentParams(shear_deg=20.0), torch.Generator().manual_seed(0))
    # a sheared bar's top and bottom move to opposite sides: its slant is not zero
    slants = [
        _column_centre(img[0], slice(6, 10)) - _column_centre(img[0], slice(18, 22))
        for img in sheared
    ]
    assert max(abs(s) for s in slants) > 1.0
    assert len({round(s, 3) for s in slants}) == len(slants)  # each sample its own shear
    bent = random_affine(x, AugmentParams(elastic_px=3.0), torch.Generator().manual_seed(0))
    assert not torch.allclose(bent, x, atol=0.05)
    # a smooth warp stretches or squeezes the bar locally, each sample its own way, but it
    # stays a stroke (3 px of displacement cannot move a 16 px bar out of the image)
    mass = bent.sum((1, 2, 3))
    assert bool((mass > 0.25 * x[0].sum()).all()) and mass.std() > 1.0


def test_stroke_width_thickens_and_thins_per_sample():
    x = normalize_uint8(_digits(32), 0.0, 1.0)  # a 4 px wide bar: 64 pixels of ink per row band
    out = random_appearance(x, AugmentParams(stroke=1.0), torch.Generator().manual_seed(0))
    ink = out.sum((1, 2, 3)) / x.sum((1, 2, 3))  # (B,) ink relative to the input
    assert ink.max() > 1.2 and ink.min() < 0.8  # some samples thicker, some thinner
    assert out.min() >= 0.0 and out.max() <= 1.0  # blends of max/min: no new extremes
    # the thinnest never loses the stroke: erosion by at most one pixel per side
    assert bool((out.amax((1, 2, 3)) > 0.99).all())


def test_blur_and_contrast_soften_and_dim():
    x = normalize_uint8(_digits(16), 0.0, 1.0)
    gen = torch.Generator().manual_seed(0)
    blurred = random_appearance(x, AugmentParams(blur=1.0), gen)
    # blur spreads ink beyond the bar's columns 12..15, keeping its total (zero padding aside)
    assert float(blurred[:, 0, :, 11].sum()) > 0 and float(x[:, 0, :, 11].sum()) == 0
    dimmed = random_appearance(x, AugmentParams(contrast=0.5), torch.Generator().manual_seed(0))
    peaks = dimmed.amax((1, 2, 3))
    assert peaks.min() >= 0.5 - 1e-6 and peaks.max() <= 1.0 and peaks.std() > 0


def test_appearance_only_augmentation_keeps_the_geometry():
    x = _digits(8)
    aug = AugmentParams(blur=0.5, contrast=0.3)
    out = train_batch_inputs(x, 0.0, 1.0, aug, torch.Generator().manual_seed(0))
    # no warp: the bar's ink-weighted centre stays on columns 12..15
    assert all(abs(_column_centre(img[0], slice(6, 22)) - 13.5) < 0.01 for img in out)


@pytest.mark.parametrize(
    "kwargs", [{"batchnorm": True, "dropout": 0.3}, {"batchnorm": False}, {"width": 8}]
)
def test_improved_model_saves_and_loads_its_switches(tmp_path: Path, kwargs: dict):
    torch.manual_seed(0)
    model = build_model("improved", **kwargs).eval()
    x = torch.rand(3, 1, 28, 28)
    assert model(x).shape == (3, 10)
    save_model(tmp_path / "m.pt", model, "improved", 0.0, 1.0, {}, arch_kwargs=kwargs)
    loaded = load_model(tmp_path / "m.pt")  # torch.load(weights_only=True) inside
    assert isinstance(loaded.model, ImprovedCNN) and loaded.arch_kwargs == kwargs
    assert torch.equal(loaded.model(x), model(x))


def test_files_without_arch_kwargs_still_load(tmp_path: Path, trained_model_path: Path):
    blob = torch.load(trained_model_path, weights_only=True)
    blob.pop("arch_kwargs", None)  # as written before the key existed (format version 1)
    torch.save(blob, tmp_path / "old.pt")
    assert load_model(tmp_path / "old.pt").arch == "seed"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"train": {"seed": {"batchnorm": True}}}, "train.seed.batchnorm"),  # the seed CNN has none
        ({"train": {"seed": {"model": "improved", "dropout": 1.0}}}, "train.seed.dropout"),
        ({"train": {"seed": {"augment": {"scale": 1.5}}}}, "train.seed.augment.scale"),
        ({"train": {"seed": {"augment": {"rotate": 10}}}}, "train.seed.augment.rotate"),
        ({"train": {"seed": {"schedule": "cosine"}}}, "train.seed.schedule"),
    ],
)
def test_bad_improved_params_name_the_key(data: dict, key: str):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        parse_params(data)


@pytest.mark.slow
def test_same_seed_same_history_and_exact_resume(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    full = _run(IMPROVED, tiny_prepared, tmp_path / "a")
    assert full == _run(IMPROVED, tiny_prepared, tmp_path / "b")

    # interrupt a third run after epoch 1 (its checkpoint is on disk), then rerun it
    import tasks.train as train_mod

    real_epoch, calls = train_mod.train_epoch, []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_epoch", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(IMPROVED, tiny_prepared, tmp_path / "c")
    monkeypatch.setattr(train_mod, "train_epoch", real_epoch)
    # data, order, augmentation, dropout RNG, Adam and OneCycle state all continue exactly
    assert _run(IMPROVED, tiny_prepared, tmp_path / "c") == full
    # ... down to the bytes of the model file and metrics.json (what DVC compares)
    for name in ["model.pt", "live/metrics.json"]:
        digests = {hashlib.sha256((tmp_path / r / name).read_bytes()).digest() for r in "abc"}
        assert len(digests) == 1, name


@pytest.mark.training
def test_improved_recipe_loss_goes_down(tiny_prepared: Path, tmp_path: Path):
    # float32 here (the determinism test above covers bf16)
    params = replace(IMPROVED, epochs=4, amp=False, channels_last=False)
    history = _run(params, tiny_prepared, tmp_path / "run")
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["val_accuracy"] > 0.8
