"""Batch prediction: output schema, bad inputs, exit codes, atomic output, model safety."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from flows import paths
from flows.cli import predict as predict_cmd
from tasks.model import ModelFileError, build_model, load_model, normalize_uint8, save_model
from tasks.predict import Classifier, PredictUsageError, columns, expand_inputs, predict_paths
from tasks.preprocess import naive_28, to_mnist
from tests.images import (
    REFERENCES,
    big_glyph,
    hdr_bytes,
    photo,
    png_bytes,
    png_header_only,
)

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def cli(*args: str | Path) -> typer.testing.Result:
    """Invoke the predict command as flows/cli/predict.py defines it."""
    app = typer.Typer()
    app.command()(predict_cmd.predict)
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid (untrained, seeded) model file with a non-trivial normalization."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    return save_model(path, build_model("seed"), "seed", mean=0.13, std=0.31, params={})


def write_png(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(img))
    return path


@pytest.fixture
def good_folder(tmp_path: Path) -> Path:
    """Three readable digit images, one of them in a subfolder."""
    folder = tmp_path / "good"
    write_png(folder / "a.png", REFERENCES[1])
    write_png(folder / "b.png", 255 - REFERENCES[2])  # dark on light
    write_png(folder / "sub" / "c.png", photo(big_glyph(3), np.random.default_rng(0), (120, 160)))
    return folder


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- schema


def test_csv_schema_and_probabilities(good_folder: Path, model_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred.csv"
    summary = predict_paths([good_folder], model_file, out, progress=False)
    assert (summary.total, summary.ok, summary.failed) == (3, 3, 0)
    with out.open(encoding="utf-8") as fh:
        header = fh.readline().strip().split(",")
    assert header == columns() == [
        "path", "label", "confidence", *(f"p{i}" for i in range(10)), "status", "message",
        "review",
    ]  # fmt: skip
    rows = read_csv(out)
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    assert [Path(r["path"]).name for r in rows] == ["a.png", "b.png", "c.png"]
    for r in rows:
        probs = [float(r[f"p{i}"]) for i in range(10)]
        assert abs(sum(probs) - 1) < 1e-4
        assert r["label"] == str(int(np.argmax(probs)))
        assert float(r["confidence"]) == pytest.approx(max(probs), abs=1e-6)
        assert (r["status"], r["message"]) == ("ok", "")
        # an untrained model is never 90 % sure: every row is flagged by the default
        assert r["review"] == "true"


def test_probabilities_match_the_plain_model(model_file: Path, tmp_path: Path) -> None:
    """The frozen fast path computes what the model file's network computes."""
    images = [REFERENCES[d] for d in range(10)] * 10  # 100: more than one 64-image slice
    loaded = load_model(model_file)
    with torch.inference_mode():
        x = normalize_uint8(torch.from_numpy(np.stack(images)), loaded.mean, loaded.std)
        expected = torch.softmax(loaded.model(x).double(), dim=1).numpy()
    got = Classifier.from_file(model_file).probabilities(images)
    assert np.allclose(got, expected, atol=1e-6)


def test_jsonl_output(good_folder: Path, model_file: Path, tmp_path: Path) -> None:
    (good_folder / "broken.png").write_bytes(b"junk")
    out = tmp_path / "pred.jsonl"
    result = cli(good_folder, "--model", model_file, "--out", out, "--no-progress")
    assert result.exit_code == 1
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [list(r) for r in records] == [columns()] * 4
    ok = [r for r in records if r["status"] == "ok"]
    assert len(ok) == 3 and all(isinstance(r["label"], int) for r in ok)
    assert all(abs(sum(r[f"p{i}"] for i in range(10)) - 1) < 1e-4 for r in ok)
    (bad,) = [r for r in records if r["status"] != "ok"]
    assert bad["label"] is None and bad["p0"] is None and "not an image" in bad["message"]
    assert all(r["review"] is True for r in records)  # JSON booleans; no prediction: review


def test_review_flag_follows_the_threshold(
    good_folder: Path, model_file: Path, tmp_path: Path
) -> None:
    """review is true below --review-below (and for rows without a prediction), and counted."""
    (good_folder / "broken.png").write_bytes(b"junk")
    out = tmp_path / "pred.csv"
    confs = None
    for threshold, expected_ok_flags in (("0", 0), ("1", 3)):
        result = cli(good_folder, "--model", model_file, "--out", out, "--no-progress",
                     "--review-below", threshold, "--allow-failures")  # fmt: skip
        assert result.exit_code == 0, result.output
        rows = read_csv(out)
        assert list(rows[0])[-1] == "review"
        ok = [r for r in rows if r["status"] == "ok"]
        assert sum(r["review"] == "true" for r in ok) == expected_ok_flags
        assert [r["review"] for r in rows if r["status"] != "ok"] == ["true"]
        assert f"{expected_ok_flags + 1} to review" in result.output
        confs = sorted(float(r["confidence"]) for r in ok)
    # a threshold between two confidences splits the rows there
    assert confs is not None and confs[0] < confs[-1]
    middle = (confs[0] + confs[-1]) / 2
    summary = predict_paths([good_folder], model_file, out, progress=False, review_below=middle)
    flagged = sorted(
        float(r["confidence"]) for r in read_csv(out) if r["review"] == "true" and r["confidence"]
    )
    assert flagged == [c for c in confs if c < middle]
    assert summary.review == len(flagged) + 1


# --------------------------------------------------------------------------- bad inputs


def test_every_bad_input_gets_its_row(tmp_path: Path, model_file: Path) -> None:
    d = tmp_path / "in"
    write_png(d / "good.png", REFERENCES[7])
    (d / "zero.png").write_bytes(b"")
    (d / "text.jpg").write_text("not an image")
    jpeg = cv2.imencode(".jpg", photo(big_glyph(4), np.random.default_rng(1), (120, 160)))[1]
    (d / "cut.jpg").write_bytes(jpeg.tobytes()[: len(jpeg) // 3])
    (d / "cut.png").write_bytes(png_bytes(REFERENCES[5])[:-30])
    (d / "folder.png").mkdir()
    write_png(d / "ünïcødé_数字.png", REFERENCES[8])
    write_png(d / "deep16.png", (255 - REFERENCES[9]).astype(np.uint16) * 257)
    rgba = np.zeros((56, 56, 4), np.uint8)
    rgba[..., 3] = cv2.resize(REFERENCES[6], (56, 56))
    write_png(d / "alpha.png", rgba)
    write_png(d / "blank.png", np.full((50, 50), 255, np.uint8))
    (d / "huge.png").write_bytes(png_header_only(20000, 20000))
    write_png(d / ".hidden.png", REFERENCES[0])  # hidden files are skipped
    out = tmp_path / "pred.csv"

    summary = predict_paths([d, d / "missing.png"], model_file, out, progress=False)

    rows = {Path(r["path"]).name: r for r in read_csv(out)}
    expected = {
        "good.png": ("ok", ""),
        "zero.png": ("error", "empty file"),
        "text.jpg": ("error", "not an image"),
        "cut.jpg": ("error", "truncated JPEG"),
        "cut.png": ("error", "truncated PNG"),
        "folder.png": ("error", "is a folder"),
        "ünïcødé_数字.png": ("ok", ""),
        "deep16.png": ("ok", ""),
        "alpha.png": ("ok", ""),
        "blank.png": ("empty", "no ink"),
        "huge.png": ("error", "too large: 20000x20000"),
        "missing.png": ("error", "no such file"),
    }
    assert set(rows) == set(expected)
    for name, (status, message) in expected.items():
        assert rows[name]["status"] == status, name
        assert message in rows[name]["message"], name
    assert (summary.ok, summary.empty, summary.error) == (4, 1, 7)


def test_symlinked_folders_are_followed_once(tmp_path: Path, model_file: Path) -> None:
    """Symlinked folders are searched; cycles and second ways in get a row, never vanish."""
    d = tmp_path / "in"
    write_png(d / "a.png", REFERENCES[1])
    write_png(d / "sub" / "b.png", REFERENCES[2])
    write_png(tmp_path / "outside" / "c.png", REFERENCES[3])
    (d / "ext").symlink_to(tmp_path / "outside")  # followed: its images count
    (d / "again").symlink_to(d / "sub")  # a second way to a folder already searched
    (d / "loop").symlink_to(d)  # a cycle
    (tmp_path / "outside" / "back").symlink_to(d)  # a cycle through ext
    (d / "broken").symlink_to(tmp_path / "nowhere")
    out = tmp_path / "o.csv"

    summary = predict_paths([d], model_file, out, progress=False)

    rows = {os.path.relpath(r["path"], d): (r["status"], r["message"]) for r in read_csv(out)}
    searched = "symlink to a folder already searched"
    assert rows == {
        "a.png": ("ok", ""),
        "sub/b.png": ("ok", ""),
        "ext/c.png": ("ok", ""),
        "again": ("error", f"{searched} ({d / 'sub'}): not searched twice"),
        "loop": ("error", f"{searched} ({d}): not searched twice"),
        "ext/back": ("error", f"{searched} ({d}): not searched twice"),
        "broken": ("error", "no such file"),
    }
    assert (summary.total, summary.ok) == (7, 3)


def test_non_utf8_file_names_round_trip(tmp_path: Path, model_file: Path) -> None:
    """A name that is not UTF-8 is written as its bytes (surrogateescape), not as escapes."""
    raw = b"digit_\xff\xfe.png"
    folder = tmp_path / "in"
    folder.mkdir()
    try:
        (folder / os.fsdecode(raw)).write_bytes(png_bytes(REFERENCES[4]))
    except OSError:
        pytest.skip("this filesystem refuses non-UTF-8 names")
    for fmt in ("csv", "jsonl"):
        out = tmp_path / f"o.{fmt}"
        predict_paths([folder], model_file, out, fmt=fmt, progress=False)
        data = out.read_bytes()
        assert raw in data and b"\\udc" not in data
        text = data.decode("utf-8", "surrogateescape")
        if fmt == "csv":
            (row,) = csv.DictReader(io.StringIO(text, newline=""))
        else:
            (row,) = map(json.loads, text.splitlines())
        assert row["status"] == "ok"
        assert os.path.basename(os.fsencode(row["path"])) == raw  # the file, byte for byte
        assert os.path.isfile(os.fsencode(row["path"]))


def test_inputs_expand_sorted_deduplicated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("b.png", "a.jpg", "sub/c.png", "sub/deeper/d.bmp", ".git/x.png"):
        write_png(tmp_path / name, REFERENCES[0])
    monkeypatch.chdir(tmp_path)
    got = expand_inputs(["sub", "./sub/c.png", "*.png", "a.jpg", "nothing-*.png"])
    assert got.paths == ["a.jpg", "b.png", "nothing-*.png", "sub/c.png", "sub/deeper/d.bmp"]
    assert got.skipped == 0


def test_a_folder_walk_skips_other_files_and_counts_them(
    tmp_path: Path, model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A README and a sources.csv beside the images: skipped, counted, not error rows."""
    folder = tmp_path / "digits"
    write_png(folder / "a.png", REFERENCES[3])
    (folder / "photo_no_suffix").write_bytes(png_bytes(REFERENCES[5]))  # an image by its bytes
    (folder / "README.md").write_text("# my digits\n")
    (folder / "sources.csv").write_text("file,label\na.png,3\n")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")  # named as an image: its row says why
    os.mkfifo(folder / "pipe")  # cannot be sniffed without blocking: kept, gets its row
    named = tmp_path / "notes.txt"  # named on the command line: always a row
    named.write_text("not an image")
    out = tmp_path / "o.csv"

    summary = predict_paths([folder, named], model_file, out, progress=False)

    rows = {os.path.basename(r["path"]): r["status"] for r in read_csv(out)}
    assert rows == {
        "a.png": "ok", "photo_no_suffix": "ok", "broken.jpg": "error", "pipe": "error",
        "notes.txt": "error",
    }  # fmt: skip
    assert (summary.total, summary.skipped) == (5, 2)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PredictUsageError, match="2 non-image files"):
        only_others = tmp_path / "others"
        for name in ("README.md", "sources.csv"):
            (only_others / name).parent.mkdir(exist_ok=True)
            (only_others / name).write_text("text")
        predict_paths([only_others], model_file, tmp_path / "p.csv", progress=False)


def test_predict_on_a_folder_with_other_files_exits_0_and_says_what_it_skipped(
    tmp_path: Path, model_file: Path
) -> None:
    folder = tmp_path / "digits"
    write_png(folder / "a.png", REFERENCES[3])
    (folder / "README.md").write_text("# my digits\n")
    result = cli(folder, "--model", model_file, "--out", tmp_path / "o.csv")
    assert result.exit_code == 0, result.output
    assert "1 ok, 0 empty, 0 error" in result.stderr
    assert "; 1 non-image files skipped ->" in result.stderr


def test_glob_matching_nothing_is_an_error_row(model_file: Path, tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", REFERENCES[0])
    out = tmp_path / "o.csv"
    predict_paths([tmp_path / "a.png", tmp_path / "z*.png"], model_file, out, progress=False)
    rows = read_csv(out)
    assert [r["status"] for r in rows] == ["ok", "error"]
    assert rows[1]["message"] == "no file matches this pattern"


def test_output_file_is_not_an_input(good_folder: Path, model_file: Path) -> None:
    out = good_folder / "predictions.csv"
    predict_paths([good_folder], model_file, out, progress=False)
    summary = predict_paths([good_folder], model_file, out, progress=False)  # second run
    assert summary.total == 3 and summary.failed == 0


def test_debug_dir_holds_the_network_inputs(model_file: Path, tmp_path: Path) -> None:
    img = photo(big_glyph(2), np.random.default_rng(5), (200, 260))
    write_png(tmp_path / "in" / "photo.png", img)
    debug = tmp_path / "debug"
    predict_paths([tmp_path / "in"], model_file, tmp_path / "o.csv", debug_dir=debug)
    (saved,) = debug.iterdir()
    assert saved.name == "0000000_photo.png.png"
    net_input = cv2.imread(str(saved), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(net_input, to_mnist(img))


# --------------------------------------------------------------------------- CLI


def test_exit_codes(good_folder: Path, model_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.csv"
    assert cli(good_folder, "--model", model_file, "--out", out).exit_code == 0
    (good_folder / "bad.png").write_bytes(b"")
    result = cli(good_folder, "--model", model_file, "--out", out)
    assert result.exit_code == 1
    assert "4 files: 3 ok, 0 empty, 1 error" in result.output
    assert "bad.png: empty file" in result.output
    allowed = cli(good_folder, "--model", model_file, "--out", out, "--allow-failures")
    assert allowed.exit_code == 0 and len(read_csv(out)) == 4


def test_usage_errors_exit_2(good_folder: Path, model_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.csv"
    (tmp_path / "empty").mkdir()
    cases = {
        "no inputs": [tmp_path / "empty", "--model", model_file, "--out", out],
        "no model": [good_folder, "--model", tmp_path / "nope.pt", "--out", out],
        "out is a folder": [good_folder, "--model", model_file, "--out", tmp_path],
        "bad format": [good_folder, "--model", model_file, "--format", "xml"],
        "no arguments": [],
    }
    for case, args in cases.items():
        result = cli(*args)
        assert result.exit_code == 2, case
    assert "no input files" in cli(*cases["no inputs"]).output
    assert "model file not found" in cli(*cases["no model"]).output
    assert not out.exists()


def test_default_model_and_params_come_from_the_project(
    model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From any subfolder, the defaults are the project's (the nearest dvc.yaml above)."""
    project = tmp_path / "project"
    (project / "data" / "models" / "mine").mkdir(parents=True)
    (project / "dvc.yaml").write_text("stages: {}\n")
    shutil.copy(model_file, project / "data" / "models" / "mine" / "model.pt")
    # predict.model names the pipeline model used by default: data/models/mine/model.pt
    (project / "params.yaml").write_text(
        "models:\n  mine: seed\npredict:\n  model: mine\n  preprocess: false\n"
    )
    img = photo(big_glyph(9), np.random.default_rng(6), (150, 200))
    write_png(project / "inbox" / "sub" / "p.png", img)
    debug = tmp_path / "dbg"
    monkeypatch.chdir(project / "inbox" / "sub")
    assert paths.project_root() == project

    result = cli("p.png", "--out", "o.csv", "--debug-dir", debug)

    assert result.exit_code == 0, result.output
    assert read_csv(Path("o.csv"))[0]["status"] == "ok"
    # the project's params.yaml was read: preprocess false
    assert np.array_equal(cv2.imread(str(next(debug.iterdir())), 0), naive_28(img))
    # no model there: the error names the path tried
    (project / "data" / "models" / "mine" / "model.pt").unlink()
    result = cli("p.png", "--out", "o.csv")
    assert result.exit_code == 2
    assert f"model file not found: {project / 'data/models/mine/model.pt'}" in result.output
    # outside any project: relative to the current folder
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    if paths.project_root() is not None:
        pytest.skip(f"{tmp_path} is inside a folder with dvc.yaml")
    result = cli(project / "inbox" / "sub" / "p.png", "--out", "o.csv")
    assert result.exit_code == 2
    # the built-in default: the seed report's model
    assert "model file not found: data/models/seed/model.pt" in result.output
    assert "no dvc.yaml in it or above it" in result.output
    assert not Path("o.csv").exists()


def test_huge_hdr_is_an_error_row_in_bounded_memory(model_file: Path, tmp_path: Path) -> None:
    """The CLI in its own process: an 8000x8000 HDR (4 MB file, 768 MB as float32 and
    1.5 GB at the decoder's peak) is refused from its header, with a clear row."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "huge.hdr").write_bytes(hdr_bytes(8000, 8000))
    write_png(folder / "ok.png", REFERENCES[5])
    out, peak = tmp_path / "o.csv", tmp_path / "peak_kb"
    # VmHWM at exit, not ru_maxrss: that one survives exec, so it would count pytest itself
    code = (
        "import atexit, re, sys\n"
        "from pathlib import Path\n"
        "peak, status = Path(sys.argv.pop()), Path('/proc/self/status')\n"
        "atexit.register(lambda: peak.write_text(\n"
        "    re.search(r'VmHWM:\\s+(\\d+)', status.read_text())[1]))\n"
        "import typer\n"
        "from flows.cli.predict import predict\n"
        "typer.run(predict)\n"
    )
    args = [folder, "--model", model_file, "--out", out, "--no-progress", peak]
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 1, proc.stderr  # a row in error, not a crash
    rows = {Path(r["path"]).name: r for r in read_csv(out)}
    assert rows["ok.png"]["status"] == "ok"
    assert rows["huge.hdr"]["status"] == "error"
    assert rows["huge.hdr"]["message"].startswith("image too large: 8000x8000 HDR (64 MP")
    assert int(peak.read_text()) < 1_000_000  # KiB: torch and the model, no 1.5 GB decode


class _Payload:
    """Pickles as a call to Path.touch(marker): loading it unsafely would run that call."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_foreign_model_files_are_refused(good_folder: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "digitflow-model", "payload": _Payload(marker)}, evil)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    not_ours = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(3)}, not_ours)
    for model in (evil, junk, not_ours):
        with pytest.raises(ModelFileError, match="not a digitflow model"):
            Classifier.from_file(model)
        result = cli(good_folder, "--model", model, "--out", tmp_path / "o.csv")
        assert result.exit_code == 2 and "not a digitflow model" in result.output
    assert not marker.exists()  # the pickled call never ran


def test_params_fill_unset_options(model_file: Path, tmp_path: Path) -> None:
    img = photo(big_glyph(9), np.random.default_rng(6), (150, 200))
    write_png(tmp_path / "in" / "p.png", img)
    params = tmp_path / "params.yaml"
    params.write_text("predict:\n  preprocess: false\n  batch_size: 3\n  workers: 1\n")
    debug = tmp_path / "dbg"
    args = [tmp_path / "in", "--model", model_file, "--out", tmp_path / "o.csv"]
    assert cli(*args, "--params", params, "--debug-dir", debug).exit_code == 0
    assert np.array_equal(cv2.imread(str(next(debug.iterdir())), 0), naive_28(img))
    # an option on the command line wins over params
    assert cli(*args, "--params", params, "--debug-dir", debug, "--preprocess").exit_code == 0
    assert np.array_equal(cv2.imread(str(next(debug.iterdir())), 0), to_mnist(img))
    params.write_text("predict:\n  batchsize: 3\n")
    result = cli(*args, "--params", params)
    assert result.exit_code == 2 and "predict.batchsize" in result.output


def test_failed_run_keeps_the_previous_output(good_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.csv"
    out.write_text("previous results\n")
    with pytest.raises(ModelFileError):
        predict_paths([good_folder], tmp_path / "missing.pt", out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictUsageError, match="no input files"):
        predict_paths([tmp_path / "empty"], tmp_path / "missing.pt", out)
    assert out.read_text() == "previous results\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# Child-process code that runs the real predict command and pauses it at a known point:
# right after the first row reaches the temp output, it says PAUSED on stdout and waits on
# stdin. The test signals it there, so the signal always lands mid-write (no timing race).
PAUSE_AFTER_FIRST_ROW = """
import sys, typer
from flows.cli.predict import predict
from tasks import predict as tp
write = tp.RowWriter.write
def paused(self, row):
    write(self, row)
    self.fh.flush()
    print("PAUSED", flush=True)
    sys.stdin.readline()
tp.RowWriter.write = paused
typer.run(predict)
"""


def run_paused(args: list[str | Path]) -> subprocess.Popen[bytes]:
    """The predict command in a child process, paused after its first output row."""
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSE_AFTER_FIRST_ROW, *map(str, args), "--no-progress"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line == b"PAUSED\n", line + proc.stdout.read()
    return proc


def test_interrupted_run_leaves_no_output(model_file: Path, tmp_path: Path) -> None:
    """Ctrl-C in the middle of writing: no predictions file, no temp file left behind."""
    folder = tmp_path / "many"
    folder.mkdir()
    data = png_bytes(REFERENCES[3])
    for i in range(3):
        (folder / f"{i:05d}.png").write_bytes(data)
    out = tmp_path / "out" / "pred.csv"
    proc = run_paused([folder, "--model", model_file, "--out", out, "--batch-size", "1"])
    temps = list(out.parent.glob(".pred.csv.*.tmp"))
    assert len(temps) == 1 and temps[0].stat().st_size > 0  # the known point: mid-write
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0, output
    assert b"Traceback" not in output
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


def test_review_dir_gets_the_flagged_rows_by_predicted_label(
    tmp_path: Path, model_file: Path
) -> None:
    """An untrained model is unsure of everything: every readable row is copied for review."""
    folder = tmp_path / "in"
    write_png(folder / "three.png", REFERENCES[3])
    write_png(folder / "blank.png", np.full((28, 28), 0, np.uint8))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    review = tmp_path / "review"
    result = cli(folder, "--model", model_file, "--out", tmp_path / "o.csv", "--review-dir", review)
    assert result.exit_code == 1, result.output  # the empty and the broken row
    rows = {os.path.basename(r["path"]): r for r in read_csv(tmp_path / "o.csv")}
    label = rows["three.png"]["label"]
    copied = sorted(p.relative_to(review).parent.as_posix() for p in review.rglob("*.png"))
    assert copied == sorted([label, "empty"])
    index = read_csv(review / "review.csv")
    assert {os.path.basename(r["path"]) for r in index} == {"three.png", "blank.png"}
    assert all(Path(r["copy"]).is_file() and "p9" in r for r in index)
    assert "2 files to review copied" in result.stderr
