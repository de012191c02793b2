"""Hostile inputs to `digitflow predict`: file names, folder depth, corrupt JPEGs, bad
output paths, SIGTERM; and property-based tests of the decoder and the row writer."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from flows.cli import predict as predict_cmd
from tasks.model import build_model, save_model
from tasks.predict import FORMATS, Row, columns, open_output, predict_paths
from tasks.preprocess import Prepared, prepare_file

ROOT = Path(__file__).resolve().parents[1]
CORRUPT = "Corrupt JPEG data"  # libjpeg's words for data it had to make up
SIGTERM_EXIT = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    return save_model(path, build_model("seed"), "seed", mean=0.13, std=0.31, params={})


def digit_photo(digit: int, size: tuple[int, int] = (120, 160)) -> np.ndarray:
    """A dark printed digit on light paper, (h, w) uint8."""
    img = np.full(size, 230, np.uint8)
    h, w = size
    scale = min(h, w) / 40
    cv2.putText(img, str(digit), (w // 3, 3 * h // 4), cv2.FONT_HERSHEY_SIMPLEX, scale, 20,
                max(2, int(scale * 3)), cv2.LINE_AA)  # fmt: skip
    return img


def encoded(img: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


PNG = encoded(digit_photo(3), ".png")
JPEG = encoded(digit_photo(4), ".jpg")


def read_rows(out: Path, fmt: str) -> list[dict]:
    """The rows as a reader following the format's rules gets them back."""
    with out.open(encoding="utf-8", errors="surrogateescape", newline="") as fh:
        if fmt == "csv":
            return list(csv.DictReader(fh))
        return [json.loads(line) for line in fh.read().splitlines()]


def cli(*args: str | Path) -> typer.testing.Result:
    app = typer.Typer()
    app.command()(predict_cmd.predict)
    return CliRunner().invoke(app, [str(a) for a in args])


# --------------------------------------------------------------------------- file names

HOSTILE_NAMES = [
    b"carriage\rreturn.png", b"new\nline.png", b"comma,name.png", b'quote"name.png',
    b"tab\tname.png", b"\r\n\r.png", b'",\r\n".png', b"not_utf8_\xff\xfe.png",
    b"line\xe2\x80\xa8separator.png", b"nel\xc2\x85.png", b"plain.png",
]  # fmt: skip


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_file_name_gets_one_row_that_reads_back(
    tmp_path: Path, model_file: Path, fmt: str
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in HOSTILE_NAMES:
        (folder / os.fsdecode(name)).write_bytes(PNG)
    out = tmp_path / f"pred.{fmt}"

    summary = predict_paths([folder], model_file, out, fmt=fmt, progress=False)

    rows = read_rows(out, fmt)
    assert len(rows) == summary.total == len(HOSTILE_NAMES)
    assert sorted(os.path.basename(os.fsencode(r["path"])) for r in rows) == sorted(HOSTILE_NAMES)
    assert all(r["status"] == "ok" for r in rows)
    assert all(os.path.isfile(os.fsencode(r["path"])) for r in rows)  # the file, byte for byte


names = st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b"\0" not in b)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(paths=st.lists(names, min_size=1, max_size=5), message=st.text(max_size=30))
def test_any_name_round_trips_through_the_writer(paths: list[bytes], message: str) -> None:
    """Any names the OS allows (any bytes but '/' and NUL) and any message: one row each."""
    rows = [Row(os.fsdecode(b"dir/" + p), "error", message) for p in paths]
    rows.append(Row(os.fsdecode(b"ok/" + paths[0]), "ok", "", "7", 0.5, [0.05] * 10))
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in FORMATS:
            out = Path(tmp) / f"o.{fmt}"
            with open_output(out, fmt) as writer:
                for row in rows:
                    writer.write(row)
            back = read_rows(out, fmt)
            assert [r["path"] for r in back] == [r.path for r in rows]
            assert [r["message"] for r in back] == [r.message for r in rows]
            assert [list(r) for r in back] == [columns()] * len(rows)


# --------------------------------------------------------------------------- folders


def test_a_folder_1100_levels_deep_is_walked(tmp_path: Path, model_file: Path) -> None:
    top = tmp_path / "deep"
    top.mkdir()
    (top / "top.png").write_bytes(PNG)
    chain = [top]
    for _ in range(1100):  # one level at a time: os.makedirs recurses too
        chain.append(chain[-1] / "d")
        chain[-1].mkdir()
    (chain[-1] / "bottom.png").write_bytes(PNG)
    out = tmp_path / "o.csv"
    try:
        summary = predict_paths([top], model_file, out, progress=False)
    finally:
        # removed here, bottom up: pytest's own clean-up (shutil.rmtree) recurses too
        (chain[-1] / "bottom.png").unlink()
        for folder in reversed(chain[1:]):
            folder.rmdir()

    rows = read_rows(out, "csv")
    assert summary.total == len(rows) == 2
    assert {Path(r["path"]).name: r["status"] for r in rows} == {
        "top.png": "ok",
        "bottom.png": "ok",
    }


# --------------------------------------------------------------------------- corrupt JPEGs


def _sof_declaring(data: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOF0) saying ``width`` x ``height``."""
    i = data.index(b"\xff\xc0")
    return data[: i + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[i + 9 :]


def test_corrupt_jpegs_are_errors_not_predictions(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    big = encoded(digit_photo(4, (600, 800)), ".jpg")
    files = {
        "good.jpg": JPEG,
        # cut at 40% with an end marker appended: decodes, the rest made up grey
        "cut40.jpg": big[: len(big) * 2 // 5] + b"\xff\xd9",
        # a 160x120 scan in a frame that says 20000x20000: all but a corner made up
        "declares_20000.jpg": _sof_declaring(JPEG, 20000, 20000),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)

    results = {name: prepare_file(tmp_path / name) for name in files}

    assert results["good.jpg"].status == "ok"
    for name in ("cut40.jpg", "declares_20000.jpg"):
        assert results[name].status == "error", name
        assert results[name].message.startswith(CORRUPT), name
    # libjpeg's line went into the rows, not onto the terminal
    assert CORRUPT not in capfd.readouterr().err


# --------------------------------------------------------------------------- decoder fuzzing


def assert_well_formed(result: Prepared) -> None:
    """A status; an image exactly when ok; a message exactly when not."""
    assert isinstance(result, Prepared)
    assert result.status in ("ok", "empty", "error")
    assert (result.image is not None) == (result.status == "ok")
    assert (result.message == "") == (result.status == "ok")
    if result.image is not None:
        assert result.image.shape == (28, 28) and result.image.dtype == np.uint8


def _mutated(data: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    buf = bytearray(data[: max(1, cut)])
    for pos, value in edits:
        buf[pos % len(buf)] = value
    return bytes(buf)


edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8)


@pytest.mark.timeout(300)  # a hang fails the test instead of holding the suite
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    source=st.sampled_from([PNG, JPEG, encoded(digit_photo(5), ".jpg")]),
    edits=edits,
    cut=st.integers(1, 20000),
    noise=st.binary(max_size=64),
)
def test_mutated_images_always_get_a_status(
    source: bytes, edits: list[tuple[int, int]], cut: int, noise: bytes
) -> None:
    """Flipped bytes, cuts and appended junk: a Prepared with a status, never an exception."""
    data = _mutated(source, edits, cut) + noise
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.img"
        path.write_bytes(data)
        result = prepare_file(path)
    assert_well_formed(result)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    magic=st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"", b"BM", b"II*\x00"]),
    body=st.binary(max_size=2048),
)
def test_random_bytes_always_get_a_status(magic: bytes, body: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.img"
        path.write_bytes(magic + body)
        result = prepare_file(path)
    assert_well_formed(result)


# --------------------------------------------------------------------------- output paths


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder no file can be created in, for this user (root ignores permission bits)."""
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    if os.access(folder, os.W_OK):  # root: use a filesystem that refuses new files
        folder = Path("/sys/kernel")
        if not folder.is_dir():
            pytest.skip("running as root without sysfs: no folder that refuses root")
    return folder


def test_unusable_out_and_debug_dir_exit_2_before_any_work(
    tmp_path: Path, model_file: Path
) -> None:
    images = tmp_path / "in"
    images.mkdir()
    (images / "a.png").write_bytes(PNG)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    locked = _unwritable_folder(tmp_path)
    good_out = tmp_path / "o.csv"
    cases = {
        "out under a file": (["--out", a_file / "o.csv"], f"{a_file} is a file, not a folder"),
        "out in a locked folder": (["--out", locked / "o.csv"], f"cannot write in {locked}"),
        "debug dir is a file": (
            ["--out", good_out, "--debug-dir", a_file],
            f"{a_file} is a file, not a folder",
        ),
        "debug dir under a file": (
            ["--out", good_out, "--debug-dir", a_file / "dbg"],
            f"{a_file} is a file, not a folder",
        ),
        "debug dir in a locked folder": (
            ["--out", good_out, "--debug-dir", locked / "dbg"],
            f"cannot write in {locked}",
        ),
    }
    for case, (args, message) in cases.items():
        result = cli(images, "--model", model_file, "--no-progress", *args)
        assert result.exit_code == 2, (case, result.output)
        assert result.output.count("\n") == 1 and "Traceback" not in result.output, case
        assert result.output.startswith("error: ") and message in result.output, case
        assert not good_out.exists(), case  # refused before any work
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_sigterm_removes_the_temp_output(model_file: Path, tmp_path: Path) -> None:
    """`kill` in the middle of a run: no output, no temp file, the previous output kept."""
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(4000):  # minutes at one image per batch: the run is signalled midway
        (folder / f"{i:05d}.png").write_bytes(PNG)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "pred.csv"
    out.write_text("previous results\n")
    code = "import typer; from flows.cli.predict import predict; typer.run(predict)"
    args = [folder, "--model", model_file, "--out", out, "--batch-size", "1", "--workers", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args), "--no-progress"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        # the known point: the temp output exists, so the command is in its work loop
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if list(out_dir.glob(".pred.csv.*.tmp")):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be signalled"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == SIGTERM_EXIT, output
    assert b"Traceback" not in output
    assert out.read_text() == "previous results\n"
    assert sorted(p.name for p in out_dir.iterdir()) == ["pred.csv"]


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", ["predict", "batch-predict"])
def test_help_is_whole_at_80_columns(command: str) -> None:
    """Every option's help, every word of it, is on screen in an 80-column terminal."""
    from flows.cli import app

    env = {**os.environ, "COLUMNS": "80", "TERM": "dumb"}
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", command, "--help"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "…" not in proc.stdout
    assert max(len(line) for line in proc.stdout.splitlines()) <= 80
    shown = " ".join(proc.stdout.replace("│", " ").split())
    click_command = typer.main.get_command(app).commands[command]
    for param in click_command.params:
        for word in (getattr(param, "help", None) or "").split():
            assert word in shown, (param.name, word)
