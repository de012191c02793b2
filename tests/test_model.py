"""The model file: self-describing, loaded with weights_only=True, foreign files refused."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from tasks.model import ModelFileError, SeedCNN, load_model, normalize_uint8, save_model


class _Boom:
    """A pickle payload that would run code when unpickled by a careless loader."""

    def __reduce__(self):
        return (Path.touch, (Path(_Boom.target),))

    target = ""


def test_save_then_load_roundtrip(tmp_path: Path):
    model = SeedCNN()
    path = save_model(tmp_path / "m.pt", model, "seed", 0.1, 0.3, {"epochs": 1},
                      {"val_accuracy": 0.5}, history=[{"epoch": 1, "loss": 1.0}])  # fmt: skip
    loaded = load_model(path)
    x = torch.rand(3, 1, 28, 28)
    model.eval()
    assert torch.equal(loaded.model(x), model(x))
    assert (loaded.arch, loaded.mean, loaded.std) == (
        "seed",
        pytest.approx(0.1),
        pytest.approx(0.3),
    )
    assert loaded.params == {"epochs": 1} and loaded.history[0]["loss"] == 1.0
    assert not loaded.model.training
    # no temp files left beside it
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_pickle_carrying_code_is_refused_and_not_executed(tmp_path: Path):
    marker = tmp_path / "pwned"
    _Boom.target = str(marker)
    evil = tmp_path / "evil.pt"
    torch.save({"format": "digitflow-model", "payload": _Boom()}, evil)
    with pytest.raises(ModelFileError, match="not a digitflow model file") as refused:
        load_model(evil)
    assert not marker.exists()
    assert "pickled objects" in str(refused.value)
    assert "weights_only=False" not in str(refused.value)  # never advise unsafe loading
    # a plain pickle (not torch's zip format) is refused too
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(ModelFileError):
        load_model(raw)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        bytes(range(256)) * 4,
        b"PK\x03\x04" + bytes(100),  # a zip's first bytes, then nothing
    ],
)
def test_junk_bytes_are_refused(tmp_path: Path, payload: bytes):
    path = tmp_path / "junk.pt"
    path.write_bytes(payload)
    with pytest.raises(ModelFileError, match="not a digitflow model file") as refused:
        load_model(path)
    # junk is named as such (before: "holds pickled objects", torch's fallback reading it
    # as a legacy pickle)
    assert "not a PyTorch file" in str(refused.value)
    assert "pickled objects" not in str(refused.value)


def test_foreign_torch_files_are_refused(tmp_path: Path):
    bare = tmp_path / "state_dict.pt"
    torch.save(SeedCNN().state_dict(), bare)  # someone's plain weights: no header
    with pytest.raises(ModelFileError, match="no 'digitflow-model' header"):
        load_model(bare)
    wrong = tmp_path / "wrong.pt"
    save_model(wrong, SeedCNN(), "seed", 0, 1, {})
    blob = torch.load(wrong, weights_only=True)
    blob["state_dict"].pop("features.0.weight")
    torch.save(blob, wrong)
    with pytest.raises(ModelFileError, match="do not fit"):
        load_model(wrong)
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "absent.pt")


def test_normalize_uint8_shapes_and_values():
    x = torch.tensor([[[0, 255]]], dtype=torch.uint8).expand(2, 28, 2)
    out = normalize_uint8(x, 0.5, 0.5)
    assert out.shape == (2, 1, 28, 2) and out.dtype == torch.float32
    assert out.min().item() == -1.0 and out.max().item() == 1.0
