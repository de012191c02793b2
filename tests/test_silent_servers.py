"""Servers that accept connections and never answer (issue 21.5): one line, exit 2, in seconds.

Each command runs as a user runs it (the console script in a subprocess) against a real
loopback server that accepts and stays silent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.prefect_api import API_CHECK_TIMEOUT_S
from tests.images import REFERENCES, png_bytes
from tests.local_http import silent_server

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
BOUND_S = 30  # the checks' own limits (5 s) plus start-up on 2 busy cores


def _digitflow(
    cwd: Path, env: dict[str, str], *args: str
) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run(
        [str(BIN / "digitflow"), *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    return proc, time.monotonic() - start


def _one_line_exit_2(proc: subprocess.CompletedProcess, seconds: float, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert seconds < BOUND_S


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "digit.png"
    path.write_bytes(png_bytes(REFERENCES[7]))
    return path


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return env | {"PREFECT_HOME": str(tmp_path / "prefect"), **extra}


def test_batch_predict_refuses_a_mute_dask_scheduler(tmp_path: Path, image: Path) -> None:
    from tasks.model import build_model, save_model

    model = save_model(tmp_path / "model.pt", build_model("seed"), "seed", 0.0, 1.0, params={})
    with silent_server() as port:
        proc, seconds = _digitflow(
            ROOT, _env(tmp_path), "batch-predict", str(image), "--out", str(tmp_path / "o.csv"),
            "--model", str(model),
            "--dask-address", f"tcp://127.0.0.1:{port}",
        )  # fmt: skip
    _one_line_exit_2(proc, seconds, "no answer within 5 s")
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.parametrize(
    "args",
    [["serve"], ["retrain"], ["run"], ["batch-predict", "IMAGE"]],
    ids=["serve", "retrain", "run", "batch-predict"],
)
def test_commands_refuse_a_mute_prefect_api(tmp_path: Path, image: Path, args: list[str]) -> None:
    repo = tmp_path / "repo"  # a git + DVC repo whose one stage has never run
    repo.mkdir()
    (repo / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (repo / "dvc.yaml").write_text(
        "stages:\n  hello:\n    cmd: echo hi > hi.txt\n    outs: [hi.txt]\n"
    )
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    args = [str(image) if a == "IMAGE" else a for a in args]
    if args[0] == "batch-predict":
        args += ["--out", str(tmp_path / "o.csv")]
    with silent_server() as port:
        env = _env(tmp_path, PREFECT_API_URL=f"http://127.0.0.1:{port}/api")
        proc, seconds = _digitflow(repo, env, *args)
    _one_line_exit_2(proc, seconds, f"did not answer within {API_CHECK_TIMEOUT_S:g} s")
