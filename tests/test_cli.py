"""The command line: stage commands and their clear errors (run in-process with Typer)."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def test_bad_params_exit_2_naming_the_key(tmp_path: Path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"split": {"val_fraction": 1.5}}))
    result = runner.invoke(app, ["split", "--raw", str(tmp_path), "--params", str(params)])
    assert result.exit_code == 2
    assert "split.val_fraction" in result.output


def test_download_all_sources_failing_is_one_clear_error(tmp_path: Path, monkeypatch):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"download": {"mirrors": [], "retries": 1}}))
    monkeypatch.setenv("MNIST_MIRROR", str(tmp_path / "missing"))
    monkeypatch.delenv("DIGITFLOW_MNIST_CHECKSUMS", raising=False)
    result = runner.invoke(
        app, ["download", "--out", str(tmp_path / "raw"), "--params", str(params)]
    )
    assert result.exit_code == 1
    assert "MNIST_MIRROR" in result.output and str(tmp_path / "missing") in result.output


def test_download_and_split_commands(tiny_mnist: Path, tmp_path: Path, monkeypatch):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"download": {"mirrors": []}, "split": {"val_fraction": 0.5}}))
    monkeypatch.setenv("MNIST_MIRROR", str(tiny_mnist / "mirror"))
    monkeypatch.setenv("DIGITFLOW_MNIST_CHECKSUMS", str(tiny_mnist / "checksums.json"))
    r = runner.invoke(app, ["download", "--out", str(tmp_path / "raw"), "--params", str(params)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["split", "--raw", str(tmp_path / "raw"), "--out",
                            str(tmp_path / "prep"), "--params", str(params)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert {p.name for p in (tmp_path / "prep").iterdir()} == {"train.npz", "val.npz", "test.npz"}


def test_evaluate_refuses_a_file_that_is_not_a_model(tmp_path: Path):
    junk = tmp_path / "model.pt"
    junk.write_bytes(b"\x00garbage" * 10)
    r = runner.invoke(app, ["evaluate", "--model", str(junk), "--test", str(tmp_path / "t.npz"),
                            "--out", str(tmp_path / "e")])  # fmt: skip
    assert r.exit_code == 1
    assert "not a digitflow model file" in r.output


def test_unknown_recipe_exits_2_before_any_work(tmp_path: Path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"seed": {"epochs": 1}}}))
    model = tmp_path / "model.pt"
    result = runner.invoke(app, ["train", "--recipe", "fast", "--data", str(tmp_path),
                                 "--model", str(model), "--params", str(params)])  # fmt: skip
    assert result.exit_code == 2
    assert "train.fast: no such recipe" in result.output and "seed" in result.output
    assert not model.exists()
