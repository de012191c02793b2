"""The command line: stage commands and their clear errors (run in-process with Typer)."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from tasks.download import MNIST_FILES, MNIST_SIZES
from tests.local_http import serve

runner = CliRunner()
DIGITFLOW = str(Path(sys.executable).parent / "digitflow")  # the console script: main()
# Bounds on waiting for a subprocess that should have long finished: a hang fails the test
# instead of blocking the suite (not a speed assertion: normal runs take a few seconds).
HANG_S = 120
POLL_S = 0.05  # how often to look for the download's temp file


def _download_cmd(tmp_path: Path, mirror: str) -> tuple[list[str], dict[str, str]]:
    """`digitflow download` from ``mirror`` only (one attempt per location), and its env."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"download": {"mirrors": [], "retries": 1}}))
    env = {k: v for k, v in os.environ.items() if k != "DIGITFLOW_MNIST_CHECKSUMS"}
    env["MNIST_MIRROR"] = mirror
    cmd = [DIGITFLOW, "download", "--out", str(tmp_path / "raw"), "--params", str(params)]
    return cmd, env


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
    assert result.exit_code == 2  # what the command was pointed at is wrong, not the work
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
    assert r.exit_code == 2  # a model file that is not ours: an expected error
    assert "not a digitflow model file" in r.output
    assert "Traceback" not in r.output


def test_unknown_recipe_exits_2_before_any_work(tmp_path: Path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"seed": {"epochs": 1}}}))
    model = tmp_path / "model.pt"
    result = runner.invoke(app, ["train", "--recipe", "fast", "--data", str(tmp_path),
                                 "--model", str(model), "--params", str(params)])  # fmt: skip
    assert result.exit_code == 2
    assert "train.fast: no such recipe" in result.output and "seed" in result.output
    assert not model.exists()


def test_download_from_an_unreachable_server_is_one_line_and_exit_2(tmp_path: Path):
    # a port bound but not listening: connections to it are refused, and nobody else can
    # take it while the test runs
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        mirror = f"http://127.0.0.1:{closed.getsockname()[1]}/"
        cmd, env = _download_cmd(tmp_path, mirror)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors == proc.stderr.splitlines()[-1:], proc.stderr
    assert mirror in errors[0] and "unreachable" in errors[0]
    assert not any((tmp_path / "raw").iterdir())  # nothing half-written left behind


class _Drip(BaseHTTPRequestHandler):
    """Serves MNIST's training images: a valid header and a first block, then a byte at a
    time, forever (until the client goes away or the server stops)."""

    stop = threading.Event()

    def do_GET(self) -> None:
        name = MNIST_FILES["train_images"]
        self.send_response(200)
        self.send_header("Content-Length", str(MNIST_SIZES[name]))
        self.end_headers()
        # IDX header of 60,000 28x28 images, then more than a write buffer of pixels, so the
        # temp file has bytes on disk
        self.wfile.write(struct.pack(">4sIII", b"\0\0\x08\x03", 60_000, 28, 28))
        self.wfile.write(bytes(64 * 1024))
        self.wfile.flush()
        while not self.stop.wait(POLL_S):
            try:
                self.wfile.write(b"\0")
                self.wfile.flush()
            except OSError:  # the client hung up: the end of this request
                return

    def log_message(self, format: str, *args: object) -> None:
        pass  # the test asserts on the client, not on the server's access log


@pytest.fixture
def dripping_server() -> Iterator[str]:
    _Drip.stop.clear()
    with serve(_Drip) as url:
        try:
            yield f"{url}/"
        finally:
            _Drip.stop.set()  # before shutdown: the handler's drip loop ends with it


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # removed since it was listed: the poll then says why
        return 0


def test_sigterm_mid_download_removes_the_temp_file_and_exits_143(
    tmp_path: Path, dripping_server: str
):
    cmd, env = _download_cmd(tmp_path, dripping_server)
    out = tmp_path / "raw"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the known point: a temp file with downloaded bytes in it, the download under way
        deadline = time.monotonic() + HANG_S
        while not any(_size(p) for p in out.glob(".*.tmp")):
            assert proc.poll() is None, f"exited {proc.returncode}: {proc.communicate()}"
            assert time.monotonic() < deadline, "no temp file appeared"
            time.sleep(POLL_S)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=HANG_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    assert list(out.iterdir()) == []  # no temp file, no partial file


def test_dvc_yaml_commands_spell_the_stage_paths_of_flows_paths() -> None:
    """dvc.yaml (YAML cannot import) names each stage output where flows/paths.py says."""
    import shlex

    import yaml

    from flows import paths

    stages = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())[
        "stages"
    ]
    key = {"name": "${key}"}  # a foreach stage's model
    expected = {
        "download": {"--out": paths.RAW_DIR},
        "split": {"--raw": paths.RAW_DIR, "--out": paths.PREPARED_DIR},
        "render": {"--data": paths.PREPARED_DIR, "--out": paths.RENDERS},
        "train": {
            "--data": paths.PREPARED_DIR,
            "--renders": paths.RENDERS,
            "--model": paths.MODEL_FILE.format(**key),
            "--live-dir": paths.TRAIN_DIR.format(**key),
            "--checkpoint": paths.CHECKPOINT_FILE.format(**key),
        },
        "evaluate": {
            "--model": paths.MODEL_FILE.format(**key),
            "--test": paths.TEST_SET,
            "--out": paths.EVAL_DIR.format(**key),
        },
        "report": {
            "--model": paths.MODEL_FILE.format(**key),
            "--eval-dir": paths.EVAL_DIR.format(**key),
            "--test": paths.TEST_SET,
            "--out": paths.REPORT_DIR.format(**key),
        },
        "predict": {"--model": paths.MODEL_FILE.format(name="${predict.model}")},
    }
    for stage, options in expected.items():
        body = stages[stage].get("do", stages[stage])  # foreach stages keep theirs under do
        words = shlex.split(body["cmd"])
        given = {w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")}
        assert {o: given.get(o) for o in options} == options, stage
