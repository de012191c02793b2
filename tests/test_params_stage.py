"""A bad params.yaml fails `dvc repro` before any stage's outputs are removed (issue 15.1).

A real git + DVC repo: this project's `params` stage as dvc.yaml defines it, and a cheap
stand-in for train@robust that depends on its stamp and on `train.robust`, as the real one.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_first_run import ROOT, _env, _git_dvc_repo, _ok

MODEL = "data/models/robust/model.pt"
# writes a model file whose bytes follow the recipe, as the real train stage does
FAKE_TRAIN = (
    "python -c \"import pathlib, yaml; p = yaml.safe_load(open('params.yaml'))['train']['robust'];"
    f" f = pathlib.Path('{MODEL}'); f.parent.mkdir(parents=True, exist_ok=True);"
    " f.write_text(str(p['epochs']))\""
)


def _pipeline() -> dict:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    train = {
        "cmd": FAKE_TRAIN,
        "deps": [d for d in stages["train"]["do"]["deps"] if d == "data/params.ok"],
        "params": ["train.robust"],
        "outs": [MODEL],
    }
    return {"stages": {"params": stages["params"], "train": train}}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_typo_in_params_fails_repro_in_one_line_and_keeps_every_output(
    tmp_path: Path,
) -> None:
    env = _env(tmp_path)
    repo = _git_dvc_repo(tmp_path / "repo", env, _pipeline())
    for code in ("tasks", "flows"):  # the params stage's dep on tasks/config.py
        subprocess.run(["cp", "-r", str(ROOT / code), str(repo / code)], check=True)
    dvc = [sys.executable, "-m", "dvc"]
    _ok([*dvc, "repro"], repo, env)
    outputs = [repo / MODEL, repo / "data/params.ok", repo / "dvc.lock"]
    before = {p: _digest(p) for p in outputs}

    params = (repo / "params.yaml").read_text()
    robust = params.index("\n  robust:")
    typo = params[:robust] + params[robust:].replace("    epochs:", "    epoch:", 1)
    (repo / "params.yaml").write_text(typo)
    proc = subprocess.run([*dvc, "repro"], cwd=repo, env=env, capture_output=True, text=True)

    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train.robust.epoch: unknown key" in errors[0], proc.stderr
    assert {p: _digest(p) for p in outputs} == before  # nothing removed or rewritten

    # fixed, the pipeline is up to date again: the stamp's bytes did not change
    (repo / "params.yaml").write_text(params)
    status = subprocess.run([*dvc, "status", "--json"], cwd=repo, env=env, capture_output=True,
                            text=True, check=True).stdout  # fmt: skip
    assert "train" not in yaml.safe_load(status)
