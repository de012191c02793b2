"""End to end: `dvc repro` of the real dvc.yaml in a temporary git + DVC repo, on tiny data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "tasks", "flows", "data"]


def make_repo(dest: Path, tiny_mnist: Path, train_overrides: dict | None = None) -> dict[str, str]:
    """Copy the project's pipeline into ``dest`` as a fresh git + DVC repo; return its env."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            # only git-tracked content: the project's data/ outputs stay behind
            tracked = subprocess.run(["git", "ls-files", name], cwd=ROOT, capture_output=True,
                                     text=True, check=True).stdout.split()  # fmt: skip
            for rel in tracked:
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, dest / rel)
        elif src.exists():
            shutil.copy2(src, dest / name)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for recipe in params["train"].values():  # every recipe, shrunk to one quick epoch
        recipe.update({"epochs": 1, "batch_size": 32, "amp": False, **(train_overrides or {})})
    params["evaluate"]["batch_size"] = 100
    params["render"]["count"] = 20  # synthetic photos: a second, not a minute
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MNIST_MIRROR": str(tiny_mnist / "mirror"),
        "DIGITFLOW_MNIST_CHECKSUMS": str(tiny_mnist / "checksums.json"),
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid",
    }  # fmt: skip
    env.pop("DVC_EXP_BASELINE_REV", None)
    run(["git", "init", "-q", "-b", "main"], dest, env)
    run(["dvc", "init", "-q"], dest, env)
    run(["dvc", "config", "core.autostage", "true"], dest, env)
    run(["git", "add", "-A"], dest, env)
    run(["git", "commit", "-qm", "pipeline"], dest, env)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def stage_names(repo: Path, env: dict[str, str]) -> list[str]:
    """Every stage as DVC names it: foreach stages expand to ``train@seed``, ``train@robust``."""
    names = run(["dvc", "stage", "list", "--name-only"], repo, env).split()
    assert "train@seed" in names and "train@robust" in names
    return names


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_dvc_repro_end_to_end_then_skip_then_metrics_diff(tiny_mnist: Path, tmp_path: Path):
    repo = tmp_path / "repo"
    env = make_repo(repo, tiny_mnist)

    out = run(["dvc", "repro"], repo, env)
    for stage in stage_names(repo, env):
        assert f"Running stage '{stage}'" in out
    models = yaml.safe_load((repo / "params.yaml").read_text())["models"]
    assert {"seed", "robust"} <= set(models)
    for name in models:  # every pipeline model is trained, evaluated and reported
        metrics = json.loads((repo / f"data/evaluate/{name}/metrics.json").read_text())
        assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["n_test"] == 200
        assert (repo / f"data/report/{name}/report.md").is_file()
        assert f"Running stage 'train@{name}'" in out
    assert (repo / "dvc.lock").is_file()

    # nothing changed: every stage is skipped
    again = run(["dvc", "repro"], repo, env)
    assert "Running stage" not in again
    for stage in stage_names(repo, env):
        assert f"Stage '{stage}' didn't change, skipping" in again
    # the predict stage classified the inbox with the prediction model (params predict.model)
    assert "data/models/robust/model.pt" in (repo / "dvc.lock").read_text()
    assert "up to date" in run(["dvc", "status"], repo, env)

    # metrics and plots are readable by DVC
    shown = json.dumps(json.loads(run(["dvc", "metrics", "show", "--json"], repo, env)))
    assert "data/evaluate/seed/metrics.json" in shown
    assert "data/evaluate/robust/metrics.json" in shown
    plots = run(["dvc", "plots", "show", "--json"], repo, env)
    for name in ("seed", "robust"):
        assert f"data/evaluate/{name}/confusion.csv" in plots
        assert f"data/train/{name}/plots/metrics/val/accuracy.tsv" in plots

    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "run 1"], repo, env)

    # a fresh clone pulls the models from a DVC remote instead of retraining (README
    # "Sharing models": a local-folder remote here)
    remote = tmp_path / "dvc-remote"
    run(["dvc", "remote", "add", "-d", "storage", str(remote)], repo, env)
    run(["git", "commit", "-qam", "DVC remote"], repo, env)
    run(["dvc", "push"], repo, env)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    run(["dvc", "pull"], clone, env)
    for name in models:
        model = f"data/models/{name}/model.pt"
        assert (clone / model).read_bytes() == (repo / model).read_bytes()
    assert "up to date" in run(["dvc", "status"], clone, env)  # nothing to retrain
    # one model at a revision, without a clone (how a champion tag is fetched)
    got = tmp_path / "got.pt"
    run(["dvc", "get", str(repo), "data/models/robust/model.pt", "--rev", "HEAD", "-o", str(got)],
        tmp_path, env)  # fmt: skip
    assert got.read_bytes() == (repo / "data/models/robust/model.pt").read_bytes()
    # the models are DVC model artifacts (dvc.yaml `artifacts:`), resolved to those files
    from dvc.repo import Repo

    with Repo(str(clone)) as dvc_repo:
        artifacts = dvc_repo.artifacts.read()["dvc.yaml"]
        assert {n for n, a in artifacts.items() if a.type == "model"} == set(models)
        for name in models:
            assert dvc_repo.artifacts.get_path(name) == f"data/models/{name}/model.pt"

    # a params change: only the downstream stages rerun, and the change shows in metrics diff
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["seed"]["epochs"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(["dvc", "repro"], repo, env)
    assert "Running stage 'train@seed'" in out and "Running stage 'split'" not in out
    assert "Running stage 'train@robust'" not in out  # its recipe did not change
    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], repo, env))
    train_diff = diff["data/train/seed/metrics.json"]
    assert train_diff["step"]["old"] == 1 and train_diff["step"]["new"] == 2
    assert set(train_diff["val.accuracy"]) >= {"old", "new", "diff"}
    params_diff = json.loads(run(["dvc", "params", "diff", "--json"], repo, env))
    epochs_diff = params_diff["params.yaml"]["train.seed.epochs"]
    assert (epochs_diff["old"], epochs_diff["new"]) == (1, 2)

    # experiments: `dvc exp run -S` reruns from the committed baseline and is listed
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "run 2"], repo, env)
    # (3 epochs: a value not run before, or DVC's run cache restores that run's outputs)
    out = run(["dvc", "exp", "run", "-S", "train.seed.epochs=3", "-n", "three-epochs"], repo, env)
    assert "Running stage 'train@seed'" in out
    shown = run(["dvc", "exp", "show", "--json"], repo, env)
    assert "three-epochs" in shown

    # a model's recipe is one flag away: the robust model retrained with the seed recipe
    out = run(["dvc", "exp", "run", "-S", "models.robust=seed", "-n", "robust-as-seed"], repo, env)
    assert "Running stage 'train@robust'" in out and "Running stage 'train@seed'" not in out
    exp_params = json.loads(run(["dvc", "exp", "show", "--json"], repo, env))
    assert "robust-as-seed" in json.dumps(exp_params)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert "--recipe seed" in lock["stages"]["train@robust"]["cmd"]
    assert "train.seed" in json.dumps(lock["stages"]["train@robust"]["params"])
