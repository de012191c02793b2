"""Damaged resume checkpoints: one warning naming the file, moved aside, trained from the start.

Each checkpoint is a real one (a real run interrupted after epoch 1), then damaged the way
disks, copies and people damage files; the rerun is the real train step.
"""

from __future__ import annotations

import logging
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tasks.config import TrainParams
from tasks.train import CHECKPOINT_FORMAT, TrainResult, _fingerprint
from tests.training import run_interrupted, run_train

EPOCHS = 2


class _Boom:
    """A pickle payload that would run code when unpickled by a careless loader."""

    target = ""

    def __reduce__(self):
        return (Path.touch, (Path(_Boom.target),))


@pytest.fixture(scope="module")
def clean(tiny_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """The uninterrupted run every recovered run must equal."""
    return run_train(tiny_prepared, tmp_path_factory.mktemp("clean"), epochs=EPOCHS)


@pytest.fixture(scope="module")
def checkpoint(tiny_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bytes of a real checkpoint: the run was killed during epoch 2."""
    out = tmp_path_factory.mktemp("interrupted")
    run_interrupted(tiny_prepared, out, after_epochs=1, epochs=EPOCHS)
    return (out / "ckpt.pt").read_bytes()


def _flip_bit(data: bytes) -> bytes:
    # the middle of the file is the payload's bulk: the weights and Adam's moments
    b = bytearray(data)
    b[len(b) // 2] ^= 0x10
    return bytes(b)


def _code_pickle(path: Path) -> bytes:
    torch.save({"format": CHECKPOINT_FORMAT, "model": _Boom()}, path)
    return path.read_bytes()


DAMAGE = {
    "truncated": lambda data, _: data[: len(data) // 2],
    "empty": lambda data, _: b"",
    "random bytes": lambda data, _: random.Random(0).randbytes(len(data)),
    "bit flip": lambda data, _: _flip_bit(data),
    "code-carrying pickle": lambda _, path: _code_pickle(path),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_checkpoint_is_set_aside_and_training_starts_over(
    damage: str,
    checkpoint: bytes,
    clean: TrainResult,
    tiny_prepared: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
):
    marker = tmp_path / "pwned"
    _Boom.target = str(marker)
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(DAMAGE[damage](checkpoint, tmp_path / "evil.pt"))
    bad = ckpt.read_bytes()
    assert damage == "code-carrying pickle" or bad != checkpoint  # really damaged

    with caplog.at_level(logging.INFO, logger="tasks.train"):
        result = run_train(tiny_prepared, tmp_path, epochs=EPOCHS)

    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert str(ckpt) in message and "\n" not in message
    assert "weights_only=False" not in message  # never torch's advice to load unsafely
    assert not any("resuming" in r.getMessage() for r in caplog.records)
    # kept beside, byte for byte, for whoever wants to look; the rerun trained from scratch
    assert (tmp_path / "ckpt.pt.corrupt").read_bytes() == bad
    assert result.resumed_from_epoch == 0
    assert result.history == clean.history
    assert not ckpt.exists() and not marker.exists()


def test_intact_checkpoint_still_resumes(
    checkpoint: bytes, clean: TrainResult, tiny_prepared: Path, tmp_path: Path
):
    """The control for the damaged cases: the same bytes, undamaged, resume after epoch 1."""
    (tmp_path / "ckpt.pt").write_bytes(checkpoint)
    result = run_train(tiny_prepared, tmp_path, epochs=EPOCHS)
    assert result.resumed_from_epoch == 1 and result.history == clean.history


def test_checkpoint_from_an_older_digitflow_is_set_aside(
    tiny_prepared: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    # this run's own checkpoint, but without the checksummed payload, as older versions wrote
    params = TrainParams(epochs=1, batch_size=32, device="cpu")  # what run_train trains
    data = (tiny_prepared / "train.npz", tiny_prepared / "val.npz")
    old = {"format": CHECKPOINT_FORMAT, "fingerprint": _fingerprint(params, *data), "epoch": 1}
    torch.save(old, tmp_path / "ckpt.pt")
    with caplog.at_level(logging.WARNING, logger="tasks.train"):
        result = run_train(tiny_prepared, tmp_path, epochs=1)
    assert result.resumed_from_epoch == 0 and (tmp_path / "ckpt.pt.corrupt").is_file()
    assert "older digitflow" in caplog.records[0].getMessage()


@pytest.mark.slow
def test_cli_warns_in_one_line_and_a_rerun_is_not_blocked(
    checkpoint: bytes, tiny_prepared: Path, tmp_path: Path
):
    """`digitflow train` with a truncated checkpoint: exit 0, one stderr line, no traceback."""
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(checkpoint[:1000])
    params = Path(__file__).resolve().parents[1] / "params.yaml"
    cmd = [
        sys.executable, "-m", "flows.cli", "train", "--data", str(tiny_prepared),
        "--model", str(tmp_path / "model.pt"), "--live-dir", str(tmp_path / "live"),
        "--checkpoint", str(ckpt), "--params", str(params),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "Aborted" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if str(ckpt) in line]
    assert len(lines) == 1 and "damaged" in lines[0], proc.stderr
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "ckpt.pt.corrupt").is_file()
