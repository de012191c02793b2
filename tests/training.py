"""Training runs shared by the test modules: a tiny real run, and one "killed" mid-way."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.config import TrainParams
from tasks.train import TrainResult, train


def run_train(prepared: Path, out: Path, **kw) -> TrainResult:
    """The real train step on ``prepared`` into ``out``: 2 epochs of batch 32 unless ``kw``."""
    params = TrainParams(**{"epochs": 2, "batch_size": 32, "device": "cpu", **kw})
    return train(
        prepared / "train.npz", prepared / "val.npz", out / "model.pt", out / "live",
        out / "ckpt.pt", params, progress=False,
    )  # fmt: skip


class Stop(Exception):
    """The simulated crash."""


def run_interrupted(prepared: Path, out: Path, after_epochs: int, **kw) -> None:
    """Train like run_train, but "die" in epoch ``after_epochs + 1``: its checkpoint is on disk."""
    import tasks.train as tr

    real, calls = tr.train_epoch, []

    def crash_later(*args, **kwargs):
        calls.append(1)
        if len(calls) > after_epochs:
            raise Stop
        return real(*args, **kwargs)

    # fault injection: the real run, with the process "killed" in the middle of an epoch
    with pytest.MonkeyPatch.context() as m:
        m.setattr(tr, "train_epoch", crash_later)
        with pytest.raises(Stop):
            run_train(prepared, out, **kw)
    assert not (out / "model.pt").exists() and (out / "ckpt.pt").is_file()
