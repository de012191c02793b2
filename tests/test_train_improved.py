"""The improved recipe: per-sample augmentation, BatchNorm/Dropout model, schedule, resume."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tasks.config import AugmentParams, ParamsError, TrainParams, parse_params
from tasks.model import ImprovedCNN, build_model, load_model, normalize_uint8, save_model
from tasks.train import random_affine, train, train_batch_inputs

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


@pytest.mark.parametrize("kwargs", [{"batchnorm": True, "dropout": 0.3}, {"batchnorm": False}])
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
        ({"train": {"batchnorm": True}}, "train.batchnorm"),  # the seed CNN has none
        ({"train": {"model": "improved", "dropout": 1.0}}, "train.dropout"),
        ({"train": {"augment": {"scale": 1.5}}}, "train.augment.scale"),
        ({"train": {"augment": {"rotate": 10}}}, "train.augment.rotate"),
        ({"train": {"schedule": "cosine"}}, "train.schedule"),
    ],
)
def test_bad_improved_params_name_the_key(data: dict, key: str):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        parse_params(data)


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


@pytest.mark.training
def test_improved_recipe_loss_goes_down(tiny_prepared: Path, tmp_path: Path):
    # float32 here (the determinism test above covers bf16)
    params = replace(IMPROVED, epochs=4, amp=False, channels_last=False)
    history = _run(params, tiny_prepared, tmp_path / "run")
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["val_accuracy"] > 0.8
