"""The batch_predict Prefect flow: same output on local threads and on a real Dask cluster."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from flows.cli import predict as predict_cmd
from tasks.model import build_model, save_model
from tasks.predict import predict_paths
from tests.images import REFERENCES, big_glyph, photo, png_bytes

CHUNK = 3  # small chunks so a handful of files spreads over several tasks


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    return save_model(path, build_model("seed"), "seed", mean=0.0, std=1.0, params={})


@pytest.fixture(scope="module")
def inbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight files over three chunks: digits, a photo, a blank and a broken file."""
    folder = tmp_path_factory.mktemp("inbox")
    for d in range(5):
        (folder / f"digit{d}.png").write_bytes(png_bytes(REFERENCES[d]))
    sub = folder / "photos"
    sub.mkdir()
    img = photo(big_glyph(6), np.random.default_rng(0), (120, 160))
    (sub / "six.png").write_bytes(png_bytes(img))
    (sub / "blank.png").write_bytes(png_bytes(np.full((40, 40), 255, np.uint8)))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    return folder


@pytest.fixture(scope="module")
def reference_output(inbox: Path, model_file: Path, tmp_path_factory: pytest.TempPathFactory):
    """What `digitflow predict` writes for the same inputs."""
    out = tmp_path_factory.mktemp("ref") / "pred.csv"
    predict_paths([inbox], model_file, out, progress=False)
    return out.read_bytes()


def test_local_flow_matches_predict(
    prefect_api: None, inbox: Path, model_file: Path, reference_output: bytes, tmp_path: Path
) -> None:
    from flows.batch_predict import run_batch_predict

    out = tmp_path / "flow.csv"
    summary = run_batch_predict([inbox], model_file, out, chunk_size=CHUNK)
    assert (summary.total, summary.ok, summary.empty, summary.error) == (8, 6, 1, 1)
    assert out.read_bytes() == reference_output


@pytest.mark.slow
def test_dask_flow_runs_the_chunks_on_the_cluster(
    prefect_api: None, inbox: Path, model_file: Path, reference_output: bytes, tmp_path: Path
) -> None:
    """A real scheduler and worker process on loopback run every chunk; same output."""
    from distributed import Client, LocalCluster, get_task_stream

    from flows.batch_predict import run_batch_predict

    out = tmp_path / "dask.csv"
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True,
            protocol="tcp://", host="127.0.0.1", dashboard_address=None,
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):  # fmt: skip
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        (worker,) = client.scheduler_info()["workers"]
        (worker_pid,) = client.run(os.getpid).values()
        with get_task_stream(client) as stream:  # every task the scheduler ran meanwhile
            summary = run_batch_predict(
                [inbox], model_file, out, chunk_size=CHUNK, dask_address=cluster.scheduler_address
            )
    assert worker_pid != os.getpid()  # the worker is another process
    chunk_tasks = [t for t in stream.data if t["key"].startswith("predict_chunk_task-")]
    assert len(chunk_tasks) == 3  # 8 files in chunks of 3
    assert {t["worker"] for t in chunk_tasks} == {worker}
    assert all(t["status"] == "OK" for t in chunk_tasks)
    assert summary.total == 8
    assert out.read_bytes() == reference_output


def test_unreachable_dask_address_is_a_usage_error(
    inbox: Path, model_file: Path, tmp_path: Path
) -> None:
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    app = typer.Typer()
    app.command()(predict_cmd.batch_predict)
    out = tmp_path / "o.csv"
    args = [str(inbox), "--model", str(model_file), "--out", str(out), "--dask-address", address]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"error: cannot reach the Dask scheduler at {address}" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.slow
def test_batch_predict_command_exit_codes(
    prefect_api: None, inbox: Path, model_file: Path, tmp_path: Path
) -> None:
    app = typer.Typer()
    app.command()(predict_cmd.batch_predict)
    runner = CliRunner()
    out = tmp_path / "o.jsonl"
    args = [str(inbox), "--model", str(model_file), "--out", str(out), "--chunk-size", "4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output  # the blank and the broken file
    assert "8 files: 6 ok, 1 empty, 1 error" in result.output
    assert len(out.read_text().splitlines()) == 8
    assert runner.invoke(app, [*args, "--allow-failures"]).exit_code == 0
    bad_model = runner.invoke(app, [str(inbox), "--model", str(tmp_path / "no.pt")])
    assert bad_model.exit_code == 2 and "model file not found" in bad_model.output


def test_batch_predict_progress_bar(
    prefect_api: None, inbox: Path, model_file: Path, tmp_path: Path
) -> None:
    """A bar over the 8 files with --progress; none by default when stderr is not a terminal."""
    app = typer.Typer()
    app.command()(predict_cmd.batch_predict)
    runner = CliRunner()
    args = [str(inbox), "--model", str(model_file), "--out", str(tmp_path / "o.csv")]
    args += ["--chunk-size", str(CHUNK), "--allow-failures"]
    shown = runner.invoke(app, [*args, "--progress"])
    assert shown.exit_code == 0, shown.output
    assert "batch-predict:" in shown.output and "/8 [" in shown.output
    quiet = runner.invoke(app, args)
    assert quiet.exit_code == 0, quiet.output
    assert "batch-predict:" not in quiet.output and "/8 [" not in quiet.output
