"""benchmarks/real_digits.py: figures from the real CLI on a tiny labelled folder."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from benchmarks import real_digits
from tests.synth import render_digit

ROOT = Path(__file__).resolve().parents[1]
LAST_LINE = re.compile(r"^real-digits accuracy: (0\.\d{3}|1\.000) \((\d+) images\)$")
PER_LABEL = {0: 2, 1: 1, 3: 2, 7: 1}  # rendered images per label (others: none)
BROKEN = "7/broken.png"  # not an image: an error row, a miss with prediction "-"
KINDS = {  # sources.csv's free-text kind -> the broad group expected
    "28x28 hand-drawn pixels, 1px black on white": real_digits.SMALL,
    "canvas drawing 130x130, thin black on white": real_digits.CANVAS,
    "phone photo crop, blue pen on white paper, small/low-res": real_digits.PHOTO,
    "28x28 downscaled photo, pen on grey paper": real_digits.DOWNSCALED,
}


def make_folder(root: Path) -> Path:
    """``<label>/<name>.png`` rendered digits (dark on light, 56x56), a broken file, sources."""
    folder = root / "realdigits"
    rng = np.random.default_rng(0)
    kinds = list(KINDS)
    sources = []
    for label, n in PER_LABEL.items():
        for i in range(n):
            img = cv2.resize(255 - render_digit(label, rng), (56, 56))
            path = folder / str(label) / f"d{label}_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(cv2.imencode(".png", img)[1].tobytes())
            sources.append((f"{label}/{path.name}", label, kinds[len(sources) % len(kinds)]))
    (folder / BROKEN).write_bytes(b"not a png")
    sources.append((BROKEN, 7, kinds[0]))
    (folder / "README.md").write_text("not an image, not labelled: left out\n")
    with (folder / real_digits.SOURCES).open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label", "repo", "path_in_repo", "commit", "kind", "round"])
        for i, (file, label, kind) in enumerate(sources):
            w.writerow([file, label, "someone/repo", file, "0" * 40, kind, 1 + i % 2])
    return folder


def test_kind_groups() -> None:
    for kind, group in KINDS.items():
        assert real_digits.kind_group(kind) == group, kind
    assert real_digits.kind_group("28x28 drawing, thick black on white") == real_digits.SMALL
    assert real_digits.kind_group("small scanned crop (~50px), black pen") == real_digits.PHOTO
    assert real_digits.kind_group("tablet/canvas drawing (~850px)") == real_digits.CANVAS


def test_dev_set_groups_match_its_readme() -> None:
    """The README's four broad groups of round 1: 123 photos/scans, 64 drawings, 49 small,
    12 downscaled."""
    kinds = real_digits.read_sources(real_digits.DEFAULT_FOLDER)
    rounds = real_digits.read_rounds(real_digits.DEFAULT_FOLDER)
    if kinds is None or rounds is None:
        pytest.skip(f"no {real_digits.DEFAULT_FOLDER} with rounds")
    counts = Counter(real_digits.kind_group(k) for f, k in kinds.items() if rounds[f] == "1")
    expected = {
        real_digits.PHOTO: 123,
        real_digits.CANVAS: 64,
        real_digits.SMALL: 49,
        real_digits.DOWNSCALED: 12,
    }
    assert counts == expected


@pytest.mark.slow
def test_benchmark_on_tiny_folder(
    trained_model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = make_folder(tmp_path)
    out, misses = tmp_path / "results.json", tmp_path / "misses"
    args = [str(folder), "--model", str(trained_model_path), "--json", str(out)]
    assert real_digits.main([*args, "--save-misses", str(misses)]) == 0

    lines = capsys.readouterr().out.strip().splitlines()
    m = LAST_LINE.match(lines[-1])
    assert m, lines[-1]
    n_files = sum(PER_LABEL.values()) + 1  # + the broken file
    assert int(m.group(2)) == n_files

    res = json.loads(out.read_text())
    rows = res["rows"]
    assert res["n_images"] == len(rows) == n_files
    assert res["model"] == str(trained_model_path)
    expected = Counter({str(d): n for d, n in PER_LABEL.items()}) + Counter({"7": 1})
    for label in real_digits.LABELS:
        assert res["per_label"][label]["n"] == expected[label], label
    correct = sum(r["prediction"] == r["truth"] for r in rows)
    assert res["overall"]["correct"] == correct
    assert res["overall"]["accuracy"] == pytest.approx(correct / n_files)
    assert m.group(1) == f"{correct / n_files:.3f}"

    broken = next(r for r in rows if r["file"] == BROKEN)
    assert broken["status"] == "error" and broken["prediction"] == "-"
    assert BROKEN in [x["file"] for x in res["misses"]]
    assert sum(g["n"] for g in res["per_group"].values()) == n_files
    assert res["naive_resize"]["overall"]["n"] == n_files
    # per round: ours, the baseline and the gain; the review flag's recall and false-flag rate
    by_round = res["per_round"]
    assert list(by_round) == ["1", "2", "all"]
    assert by_round["1"]["ours"]["n"] + by_round["2"]["ours"]["n"] == n_files
    for r in by_round.values():
        assert r["gain"] == pytest.approx(r["ours"]["accuracy"] - r["baseline"]["accuracy"])
    everything = by_round["all"]
    assert everything["ours"] == res["overall"]
    assert everything["baseline"]["correct"] == sum(r["baseline_correct"] for r in rows)
    review = everything["review"]
    assert review["misses"] == len(res["misses"])
    assert review["flagged_misses"] == sum(x["review"] for x in res["misses"])
    assert next(x for x in res["misses"] if x["file"] == BROKEN)["review"]  # no prediction
    assert "| all | " in "\n".join(lines)
    # every miss that had a network input (status ok) was saved, named truth_as_prediction
    saved = sorted(p.name for p in misses.iterdir())
    wanted = sorted(
        f"{x['truth']}_as_{x['prediction']}__{Path(x['file']).name}.png"
        for x in res["misses"]
        if x["status"] == "ok"
    )
    assert saved == wanted


@pytest.mark.slow
def test_ablation_in_process(
    trained_model_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--ablation: every variant scored on every file, a markdown table, in the JSON too."""
    folder = make_folder(tmp_path)
    out = tmp_path / "results.json"
    args = [str(folder), "--model", str(trained_model_path), "--json", str(out), "--ablation"]
    assert real_digits.main(args) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    rows = res["ablation"]
    assert [r["variant"] for r in rows] == [v.name for v in real_digits.ABLATION]
    n_files = sum(PER_LABEL.values()) + 1
    for r in rows:
        assert r["overall"]["n"] == n_files, r["variant"]
        assert sum(g["n"] for g in r["per_group"].values()) == n_files
        assert f"| {r['variant']} | " in printed
    # the broken file is a miss for every variant, never an exception
    assert all(r["overall"]["correct"] <= n_files - 1 for r in rows)
    # in-process, the full preprocessing is what the CLI does: the same predictions
    full = rows[0]
    assert full["variant"] == "full preprocessing"
    assert full["overall"]["correct"] == res["overall"]["correct"]


def test_mnist_style_baseline_recipe() -> None:
    """The reference baseline: dark-on-light in, the digit's box 20 px, mass at the centre.

    (It has no blank test: Otsu always splits something, as in the tutorials.)
    """
    img = np.full((120, 90), 230, np.uint8)
    cv2.rectangle(img, (40, 20), (50, 100), 20, -1)  # a "1": a bar 11 x 81 px
    out = real_digits.mnist_style_baseline(img)
    assert out is not None and out.shape == (28, 28)
    rows = np.flatnonzero(out.max(1) > 0)
    assert rows[-1] - rows[0] + 1 == 20
    m = cv2.moments(out)
    assert abs(m["m01"] / m["m00"] - 14) <= 1 and abs(m["m10"] / m["m00"] - 14) <= 1


def test_missing_folder_exits_2(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "benchmarks.real_digits", str(tmp_path / "nope")]
    proc = subprocess.run(
        [*cmd, "--json", str(tmp_path / "r.json")], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "no such folder" in proc.stderr
    assert proc.stdout == "" and not (tmp_path / "r.json").exists()


def test_folder_without_labels_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.png").write_bytes(b"")
    assert real_digits.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
