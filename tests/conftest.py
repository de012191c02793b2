"""Shared fixtures: tiny synthetic MNIST, a briefly trained model, one Prefect API."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.synth import write_checksums, write_tiny_mnist


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the four MNIST files (gzipped), 600 train / 200 test rendered digits.

    ``checksums.json`` beside them holds their SHA-256s (for DIGITFLOW_MNIST_CHECKSUMS).
    """
    folder = tmp_path_factory.mktemp("tiny_mnist")
    sums = write_tiny_mnist(folder / "mirror")
    write_checksums(folder / "checksums.json", sums)
    return folder


@pytest.fixture(scope="session")
def tiny_prepared(tiny_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny data downloaded and split: a folder with train/val/test .npz."""
    from tasks.download import download_mnist, load_checksums
    from tasks.split import split_dataset

    work = tmp_path_factory.mktemp("tiny_prepared")
    download_mnist(
        work / "raw",
        [str(tiny_mnist / "mirror")],
        checksums=load_checksums(tiny_mnist / "checksums.json"),
    )
    split_dataset(work / "raw", work / "prepared", val_fraction=0.3, seed=0)
    return work / "prepared"


@pytest.fixture(scope="session")
def trained_model_path(tiny_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seed CNN trained 2 epochs on the tiny data, saved as a real model file."""
    from tasks.config import TrainParams
    from tasks.train import train

    out = tmp_path_factory.mktemp("model")
    result = train(
        tiny_prepared / "train.npz",
        tiny_prepared / "val.npz",
        out / "model.pt",
        out / "live",
        out / "ckpt.pt",
        TrainParams(epochs=2, batch_size=32, device="cpu"),
        progress=False,
    )
    return result.model_path


@pytest.fixture(scope="session")
def prefect_api():
    """One real, temporary Prefect API for the whole test session (~20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def tiny_env(tiny_mnist: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the download stage at the tiny synthetic mirror (inherited by `dvc repro`)."""
    monkeypatch.setenv("MNIST_MIRROR", str(tiny_mnist / "mirror"))
    monkeypatch.setenv("DIGITFLOW_MNIST_CHECKSUMS", str(tiny_mnist / "checksums.json"))
    return tiny_mnist
