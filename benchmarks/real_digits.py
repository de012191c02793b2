"""Accuracy of `digitflow predict` on real handwritten digits: a labelled folder of images.

The folder holds one subfolder per label, ``<label>/<file>`` (default: the development
set ../shared/realdigits-dev beside the checkout, read in place, never copied). The
real CLI classifies it in a subprocess, with the default options and the default
model (``--model`` only when given here), then once more with ``--no-preprocess`` (the
seed's whole-image resize to 28x28) on the same images. Printed:

* the accuracy overall and per label (n, correct, accuracy);
* per broad kind of image, when the folder has a ``sources.csv`` (columns file, label,
  repo, path_in_repo, commit, kind): the free-text ``kind`` grouped by keywords into
  photos/scans of paper, canvas/tablet drawings, small hand-made images and photos
  downscaled to 28x28 (see kind_group), for both runs;
* the confusion pairs (truth -> prediction) and every miss. A row whose status is not
  ``ok`` (an empty or unreadable file) is a miss with prediction ``-``.

The last line is ``real-digits accuracy: 0.XXX (N images)``. Everything, per image too
(with its detailed kind), goes to ``--json`` (default benchmarks/results/real_digits.json).
``--save-misses DIR`` copies the 28x28 network inputs of the misses there (from the CLI's
``--debug-dir``), named ``<truth>_as_<prediction>__<file name>.png``.

``--ablation`` adds, in this process (the same decoding, ``load_image``, and the same
``to_mnist``, with one step switched off at a time through ``Steps``), the accuracy of
each variant overall and per broad kind (ABLATION): the full preprocessing; without
the noise-based ink floor (the former fixed floor), with the former line rule or no
line removal, without stroke-width normalization, without the colour channel choice
(plain gray); the 20-line MNIST-style baseline (mnist_style_baseline) and the seed's
whole-image resize. A markdown table, and ``ablation`` in the JSON.

    flock /tmp/digitflow-cpu.lock .venv/bin/python -m benchmarks.real_digits \\
        [FOLDER] [--model PATH] [--save-misses DIR] [--json PATH] [--ablation]

Exit codes: 0 done; 1 the CLI failed (an exit code other than 0 or 1); 2 the folder
does not exist or holds no labelled images.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from flows.paths import model_file
from tasks.config import load_params
from tasks.decode import ImageError, load_gray, load_image
from tasks.preprocess import (
    LINES_ANY,
    LINES_OFF,
    MNIST_BOX,
    MNIST_SIZE,
    Steps,
    naive_28,
    to_mnist,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FOLDER = ROOT.parent / "shared/realdigits-dev"
DEFAULT_JSON = ROOT / "benchmarks/results/real_digits.json"
LABELS = tuple(str(d) for d in range(10))  # the model's classes: one subfolder each
SOURCES = "sources.csv"  # per-image origin and kind, in the folder (optional)
NO_PREDICTION = "-"  # the prediction of a row whose status is not ok
CLI_OK_CODES = (0, 1)  # predict's exit codes with an output file (1: some rows not ok)
EXIT_CLI_FAILED, EXIT_NO_INPUT = 1, 2
# `python -m flows.cli` runs the CLI (flows/cli/__main__.py calls main()) without
# depending on the console script being installed.
CLI = [sys.executable, "-m", "flows.cli"]
CLI_SUMMARY = re.compile(r"^\d+ files: ")  # predict's summary line on stderr

# Broad groups of the free-text kinds (the groups of the dev set's README)
PHOTO = "photo/scan of paper"
CANVAS = "canvas/tablet drawing"
SMALL = "small hand-made"
DOWNSCALED = "photo downscaled to 28x28"
OTHER = "other"
NO_KIND = "no kind (not in sources.csv)"
GROUPS = (PHOTO, CANVAS, SMALL, DOWNSCALED, OTHER, NO_KIND)  # the order of the tables
NO_ROUND = "-"  # the round of an image sources.csv does not list (or without a round column)
ALL_ROUNDS = "all"  # the overall row of the per-round table
MISS_FIELDS = (  # what the JSON and the printout keep of each miss
    "file", "round", "truth", "prediction", "confidence", "review", "baseline_prediction",
    "status", "message",
)  # fmt: skip
SMALL_MAX_SIDE = 64  # px: a kind whose stated size (WxH) is at most this is a small image
SIZE = re.compile(r"\b(\d+)\s*x\s*(\d+)\b")  # an image size in a kind: "28x28", "130x130"


# The ablation's in-process inference: images per forward pass (the CLI's default batch)
ABLATION_BATCH = 256
BASELINE_BLUR = 5  # px, the baseline's Gaussian kernel (the usual tutorial choice)


def kind_group(kind: str) -> str:
    """The broad group of a free-text kind ("phone photo, blue pen on paper"), by keywords.

    In order: a downscaled photo; hand-drawn pixels or a stated size of at most
    SMALL_MAX_SIDE px (small hand-made, drawn or preprocessed); a canvas, tablet or
    other drawing; a photo or scan of paper; else other.
    """
    k = kind.lower()
    sides = [max(int(w), int(h)) for w, h in SIZE.findall(k)]
    if "downscaled" in k and "photo" in k:
        return DOWNSCALED
    if "pixels" in k or (sides and max(sides) <= SMALL_MAX_SIDE):
        return SMALL
    if any(word in k for word in ("canvas", "tablet", "drawing")):
        return CANVAS
    if "photo" in k or "scan" in k:
        return PHOTO
    return OTHER


def labelled_files(folder: Path) -> list[Path]:
    """The non-hidden files under the label subfolders (``<label>/...``), sorted."""
    files = []
    for label in LABELS:
        sub = folder / label
        if not sub.is_dir():
            continue
        for root, dirs, names in os.walk(sub):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            files += [Path(root, n) for n in names if not n.startswith(".")]
    return sorted(files)


def read_sources(folder: Path) -> dict[str, str] | None:
    """``sources.csv``'s kind per file (``<label>/<name>``), or None without the file."""
    path = folder / SOURCES
    if not path.is_file():
        return None
    with path.open(encoding="utf-8", newline="") as fh:
        return {row["file"]: row.get("kind") or "" for row in csv.DictReader(fh)}


def read_rounds(folder: Path) -> dict[str, str] | None:
    """``sources.csv``'s ``round`` per file (``<label>/<name>``); None without the column."""
    path = folder / SOURCES
    if not path.is_file():
        return None
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if "round" not in (reader.fieldnames or ()):
            return None
        return {row["file"]: row["round"] or NO_ROUND for row in reader}


class CliError(RuntimeError):
    """`digitflow predict` exited with a code other than 0 or 1, or wrote no output."""


def run_predict(
    folder: Path, out: Path, model: Path | None, extra: Sequence[str] = ()
) -> tuple[list[dict[str, str]], str]:
    """Run `digitflow predict` on the label subfolders; the CSV rows and its summary line."""
    inputs = [str(folder / label) for label in LABELS if (folder / label).is_dir()]
    cmd = [*CLI, "predict", *inputs, "--out", str(out), "--allow-failures", "--no-progress"]
    if model is not None:
        cmd += ["--model", str(model)]
    cmd += extra
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, errors="replace")
    lines = proc.stderr.strip().splitlines()
    if proc.returncode not in CLI_OK_CODES or not out.is_file():
        last = lines[-1] if lines else "(no output on stderr)"
        what = " ".join(["digitflow predict", *extra])
        raise CliError(f"{what} exited {proc.returncode}: {last}")
    with out.open(encoding="utf-8", errors="surrogateescape", newline="") as fh:
        rows = list(csv.DictReader(fh))
    summary = next((line for line in lines if CLI_SUMMARY.match(line)), "")
    return rows, summary


def image_key(folder: Path, path: str) -> str:
    """A row's path as ``<label>/<name>`` relative to the folder (sources.csv's ``file``)."""
    return Path(os.path.relpath(path, folder)).as_posix()


def prediction(row: dict[str, str]) -> str:
    """The predicted label of a CSV row, or NO_PREDICTION if its status is not ok."""
    return row["label"] if row["status"] == "ok" and row["label"] else NO_PREDICTION


def score(records: Iterable[dict[str, Any]], key: str = "correct") -> dict[str, Any]:
    """n, correct and accuracy (None when n is 0) of some per-image records."""
    flags = [bool(r[key]) for r in records]
    n, correct = len(flags), sum(flags)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else None}


def image_records(
    folder: Path,
    rows: list[dict[str, str]],
    naive_rows: list[dict[str, str]],
    kinds: dict[str, str] | None,
    rounds: dict[str, str] | None = None,
    baseline: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One record per image (in output order): truth, the runs' predictions, kind, round.

    ``baseline``: the 20-line baseline's prediction per ``<label>/<name>`` (baseline_predictions).
    """
    naive = {image_key(folder, r["path"]): prediction(r) for r in naive_rows}
    baseline = baseline or {}
    records = []
    for index, row in enumerate(rows):
        key = image_key(folder, row["path"])
        truth, pred = key.split("/", 1)[0], prediction(row)
        kind = None if kinds is None else kinds.get(key)
        naive_pred = naive.get(key, NO_PREDICTION)
        records.append(
            {
                "index": index,  # position in the output (the --debug-dir file number)
                "file": key,
                "truth": truth,
                "prediction": pred,
                "confidence": float(row["confidence"]) if row["confidence"] else None,
                "status": row["status"],
                "message": row["message"],
                "correct": pred == truth,
                "naive_prediction": naive_pred,
                "naive_correct": naive_pred == truth,
                "baseline_prediction": baseline.get(key, NO_PREDICTION),
                "baseline_correct": baseline.get(key, NO_PREDICTION) == truth,
                # the CLI's review column; a CLI without one flags nothing
                "review": row.get("review") == "true",
                "round": NO_ROUND if rounds is None else rounds.get(key, NO_ROUND),
                "kind": kind,
                "group": NO_KIND if kind is None else kind_group(kind),
            }
        )
    return records


def breakdown(records: list[dict[str, Any]], field: str, order: Iterable[str]) -> dict[str, Any]:
    """Both runs' scores per value of ``field``, in ``order`` (values absent are left out)."""
    out = {}
    for value in order:
        subset = [r for r in records if r[field] == value]
        if subset:
            out[value] = {**score(subset), "naive": score(subset, "naive_correct")}
    return out


def review_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The review flag: its recall on the misses and its rate on the correct rows."""
    misses = [r for r in records if not r["correct"]]
    correct = [r for r in records if r["correct"]]
    flagged_misses = sum(r["review"] for r in misses)
    flagged_correct = sum(r["review"] for r in correct)
    return {
        "flagged": flagged_misses + flagged_correct,
        "misses": len(misses),
        "flagged_misses": flagged_misses,
        "recall_on_misses": flagged_misses / len(misses) if misses else None,
        "correct": len(correct),
        "flagged_correct": flagged_correct,
        "rate_on_correct": flagged_correct / len(correct) if correct else None,
    }


def per_round(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per round (sources.csv) and overall: ours, the baseline, the gain, the review flag."""
    rounds = sorted({r["round"] for r in records}, key=lambda x: (x == NO_ROUND, x))
    out = {}
    for name in [*rounds, ALL_ROUNDS]:
        subset = records if name == ALL_ROUNDS else [r for r in records if r["round"] == name]
        ours, base = score(subset), score(subset, "baseline_correct")
        out[name] = {
            "ours": ours,
            "baseline": base,
            "gain": ours["accuracy"] - base["accuracy"],
            "empty": sum(r["status"] == "empty" for r in subset),
            "review": review_figures(subset),
        }
    return out


def summarize(records: list[dict[str, Any]], has_kinds: bool) -> dict[str, Any]:
    """All the figures: overall, per label, per kind, confusion pairs and misses."""
    misses = [r for r in records if not r["correct"]]
    pairs = Counter((r["truth"], r["prediction"]) for r in misses)
    kinds = sorted({r["kind"] for r in records if r["kind"] is not None})
    return {
        "n_images": len(records),
        "overall": score(records),
        "per_round": per_round(records),
        "per_label": {label: score(r for r in records if r["truth"] == label) for label in LABELS},
        "per_group": breakdown(records, "group", GROUPS) if has_kinds else None,
        "per_kind": breakdown(records, "kind", kinds) if has_kinds else None,
        "confusion_pairs": [
            {"truth": t, "prediction": p, "count": c}
            for (t, p), c in sorted(pairs.items(), key=lambda item: (-item[1], item[0]))
        ],
        "misses": [{k: r[k] for k in MISS_FIELDS} for r in misses],
        "naive_resize": {
            "options": ["--no-preprocess"],
            "overall": score(records, "naive_correct"),
            "per_label": {
                label: score((r for r in records if r["truth"] == label), "naive_correct")
                for label in LABELS
            },
        },
    }


def save_misses(records: list[dict[str, Any]], debug_dir: Path, dest: Path) -> int:
    """Copy the misses' network inputs to ``dest`` as ``<truth>_as_<pred>__<name>.png``.

    The CLI names each input ``NNNNNNN_<name>.png`` by its position in the output;
    rows that were not decoded (status error) have none. Returns the number copied.
    """
    dest.mkdir(parents=True, exist_ok=True)
    copied = 0
    for r in records:
        if r["correct"]:
            continue
        found = sorted(debug_dir.glob(f"{r['index']:07d}_*.png"))
        if found:
            name = Path(r["file"]).name
            shutil.copyfile(found[0], dest / f"{r['truth']}_as_{r['prediction']}__{name}.png")
            copied += 1
    return copied


def sha256(path: Path) -> str | None:
    """The file's SHA-256, or None if it is missing (records which model was measured)."""
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def default_model() -> Path:
    """The CLI's default model file: params.yaml's predict.model, in this project."""
    return ROOT / model_file(load_params(ROOT / "params.yaml").predict.model)


# --------------------------------------------------------------------------- ablation


def mnist_style_baseline(gray: np.ndarray) -> np.ndarray | None:
    """THE BASELINE, not the pipeline: the 20-line MNIST-style recipe of the tutorials.

    (H, W) uint8 dark-on-light -> (28, 28) uint8: invert, Gaussian blur, Otsu,
    crop the ink's box, longer side to 20 px, pad to 28x28 with the centre of mass
    at the centre. No polarity test, no shading, line or speck handling. None when
    Otsu finds no ink.
    """
    ink = cv2.GaussianBlur(255 - gray, (BASELINE_BLUR, BASELINE_BLUR), 0)
    _, binary = cv2.threshold(ink, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    ys, xs = np.nonzero(binary)
    if ys.size == 0:
        return None
    crop = binary[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    s = MNIST_BOX / max(crop.shape)
    size = (max(1, round(crop.shape[1] * s)), max(1, round(crop.shape[0] * s)))
    small = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
    m = cv2.moments(small)
    if m["m00"] == 0:
        return None
    oy = int(np.clip(round(MNIST_SIZE / 2 - m["m01"] / m["m00"]), 0, MNIST_SIZE - size[1]))
    ox = int(np.clip(round(MNIST_SIZE / 2 - m["m10"] / m["m00"]), 0, MNIST_SIZE - size[0]))
    out = np.zeros((MNIST_SIZE, MNIST_SIZE), np.uint8)
    out[oy : oy + size[1], ox : ox + size[0]] = small
    return out


@dataclass(frozen=True)
class Variant:
    """One row of the ablation: a name and how it turns a decoded image into 28x28."""

    name: str
    colour: bool  # decoded with load_image (colour kept) rather than load_gray
    prepare: Callable[[np.ndarray], np.ndarray | None]


def _steps(steps: Steps) -> Callable[[np.ndarray], np.ndarray | None]:
    return lambda img: to_mnist(img, steps=steps)


ABLATION = (
    Variant("full preprocessing", True, _steps(Steps())),
    Variant("fixed ink floor (no noise floor)", True, _steps(Steps(noise_floor=False))),
    Variant("former line rule (any long thin run)", True, _steps(Steps(lines=LINES_ANY))),
    Variant("no line removal", True, _steps(Steps(lines=LINES_OFF))),
    Variant(
        "thick runs are strokes (no stacked-line check)",
        True,
        _steps(Steps(stacked_lines=False)),
    ),
    Variant("no stroke-width normalization", True, _steps(Steps(stroke_width=False))),
    Variant("no colour channel choice (gray)", True, _steps(Steps(colour=False))),
    Variant(
        "all four off (the former pipeline)",
        False,
        _steps(Steps(noise_floor=False, lines=LINES_ANY, stroke_width=False, colour=False)),
    ),
    Variant("20-line MNIST-style baseline", False, mnist_style_baseline),
    Variant("seed's whole-image resize", False, naive_28),
)


def infer(model: Any, images: Sequence[np.ndarray | None]) -> list[str]:
    """The loaded model's class for each 28x28 image (a blank image where None)."""
    import torch

    from tasks.model import normalize_uint8

    blank = np.zeros((MNIST_SIZE, MNIST_SIZE), np.uint8)
    batch = torch.from_numpy(np.stack([blank if x is None else x for x in images]))
    with torch.inference_mode():
        preds = torch.cat(
            [
                model.model(normalize_uint8(batch[i : i + ABLATION_BATCH], model.mean, model.std))
                for i in range(0, len(batch), ABLATION_BATCH)
            ]
        ).argmax(1)
    return [model.classes[int(p)] for p in preds]


def baseline_predictions(folder: Path, model_path: Path) -> dict[str, str]:
    """The 20-line baseline's prediction per ``<label>/<name>``, with the same model.

    A file that cannot be decoded, or where the baseline finds no ink, is NO_PREDICTION.
    """
    from tasks.model import load_model

    model = load_model(model_path)
    files = labelled_files(folder)
    images: list[np.ndarray | None] = []
    for f in files:
        try:
            images.append(mnist_style_baseline(load_gray(f)))
        except ImageError:  # an error row in the CLI too
            images.append(None)
    preds = infer(model, images)
    return {
        image_key(folder, str(f)): NO_PREDICTION if x is None else p
        for f, x, p in zip(files, images, preds, strict=True)
    }


def ablation(folder: Path, model_path: Path, kinds: dict[str, str] | None) -> list[dict[str, Any]]:
    """Every ABLATION variant's accuracy, overall and per broad kind, computed in-process.

    Each file is decoded once per decoding (colour, gray) as prepare_file does;
    a file that cannot be decoded, or a variant that finds no ink, is a miss.
    """
    from tasks.model import load_model

    model = load_model(model_path)
    files = labelled_files(folder)
    keys = [image_key(folder, str(f)) for f in files]
    groups = [NO_KIND if kinds is None or k not in kinds else kind_group(kinds[k]) for k in keys]
    inputs: dict[str, list[np.ndarray | None]] = {v.name: [] for v in ABLATION}
    for f in files:
        decoded: dict[bool, np.ndarray | None] = {}
        for colour, load in ((True, load_image), (False, load_gray)):
            try:
                decoded[colour] = load(f)
            except ImageError:  # an error row in the CLI: a miss for every variant
                decoded[colour] = None
        for v in ABLATION:
            src = decoded[v.colour]
            inputs[v.name].append(None if src is None else v.prepare(src))
    rows = []
    for v in ABLATION:
        images = inputs[v.name]
        preds = infer(model, images)
        records = [
            {
                "correct": x is not None and p == k.split("/", 1)[0],
                "group": g,
            }
            for x, p, k, g in zip(images, preds, keys, groups, strict=True)
        ]
        rows.append(
            {
                "variant": v.name,
                "overall": score(records),
                "empty": sum(x is None for x in images),
                "per_group": {
                    group: score(r for r in records if r["group"] == group)
                    for group in GROUPS
                    if any(r["group"] == group for r in records)
                },
            }
        )
    return rows


def print_ablation(rows: list[dict[str, Any]]) -> None:
    """The ablation as a markdown table: one row per variant, accuracy per broad kind."""
    groups = list(rows[0]["per_group"]) if rows else []
    print("\n| variant | overall | no ink | " + " | ".join(groups) + " |")
    print("|---|---:|---:|" + "---:|" * len(groups))
    for r in rows:
        cells = [f"{fmt_acc(r['per_group'][g])} ({r['per_group'][g]['n']})" for g in groups]
        overall = f"{fmt_acc(r['overall'])} ({r['overall']['correct']}/{r['overall']['n']})"
        print(f"| {r['variant']} | {overall} | {r['empty']} | " + " | ".join(cells) + " |")


def print_rounds(rounds: dict[str, Any]) -> None:
    """Per round and overall: ours, the baseline, the gain, the review flag's figures."""
    print(
        "\n| round | n | ours | 20-line baseline | gain | empty | review: misses flagged "
        "| review: correct flagged |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    for name, r in rounds.items():
        rv = r["review"]
        recall = f"{rv['flagged_misses']}/{rv['misses']}" + (
            f" = {rv['recall_on_misses']:.0%}" if rv["misses"] else ""
        )
        rate = f"{rv['flagged_correct']}/{rv['correct']}" + (
            f" = {rv['rate_on_correct']:.1%}" if rv["correct"] else ""
        )
        print(
            f"| {name} | {r['ours']['n']} | {fmt_acc(r['ours'])} | {fmt_acc(r['baseline'])} "
            f"| {r['gain'] * 100:+.1f} pt | {r['empty']} | {recall} | {rate} |"
        )


def fmt_acc(s: dict[str, Any]) -> str:
    """An accuracy as a percentage, ``-`` when there were no images."""
    return "-" if s["accuracy"] is None else f"{s['accuracy']:.1%}"


def printable(name: str) -> str:
    """A file name safe to print: undecodable bytes (lone surrogates) as backslash escapes."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def print_report(results: dict[str, Any]) -> None:
    """Markdown tables of the figures, then the one-line result last."""
    overall, naive = results["overall"], results["naive_resize"]["overall"]
    print(f"folder {results['folder']}, model {results['model']}")
    print(f"default preprocessing: {overall['correct']}/{overall['n']} = {fmt_acc(overall)}")
    naive_line = f"{naive['correct']}/{naive['n']} = {fmt_acc(naive)}"
    print(f"seed's whole-image resize (--no-preprocess): {naive_line}")
    print("\n| label | n | correct | accuracy | resize only |\n|---|---:|---:|---:|---:|")
    for label, s in results["per_label"].items():
        s_naive = results["naive_resize"]["per_label"][label]
        print(f"| {label} | {s['n']} | {s['correct']} | {fmt_acc(s)} | {fmt_acc(s_naive)} |")
    if results["per_group"] is None:
        print(f"\nno {SOURCES} in the folder: no per-kind figures")
    else:
        print("\n| kind (broad group) | n | correct | accuracy | resize only |")
        print("|---|---:|---:|---:|---:|")
        for group, s in results["per_group"].items():
            print(f"| {group} | {s['n']} | {s['correct']} | {fmt_acc(s)} | {fmt_acc(s['naive'])} |")
    print_rounds(results["per_round"])
    print("\nconfusion pairs (truth -> prediction: count):")
    for p in results["confusion_pairs"]:
        print(f"  {p['truth']} -> {p['prediction']}: {p['count']}")
    print(f"\nmisses ({len(results['misses'])}):")
    for m in results["misses"]:
        conf = "-" if m["confidence"] is None else f"{m['confidence']:.3f}"
        flag = ", review" if m["review"] else ""
        print(
            f"  {printable(m['file'])} (round {m['round']}): {m['truth']} -> {m['prediction']} "
            f"({conf}, {m['status']}{flag}; baseline {m['baseline_prediction']})"
        )
    if results.get("saved_misses") is not None:
        print(f"saved {results['saved_misses']} network inputs to {results['saved_misses_dir']}")
    if results.get("ablation") is not None:
        print("\nablation (in-process, the same decoding and to_mnist, one step off at a time):")
        print_ablation(results["ablation"])
    print(f"wrote {results['json']}")
    print(f"real-digits accuracy: {overall['accuracy']:.3f} ({overall['n']} images)")


def fail(code: int, message: str) -> int:
    """One line on stderr; returns ``code`` for main's exit."""
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "folder", nargs="?", type=Path, default=DEFAULT_FOLDER,
        help=f"labelled images, <label>/<file> (default: {DEFAULT_FOLDER})",
    )  # fmt: skip
    ap.add_argument("--model", type=Path, default=None, help="default: the CLI's default model")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help="write all figures here")
    ap.add_argument("--save-misses", type=Path, default=None, help="misses' 28x28 inputs here")
    ap.add_argument(
        "--ablation", action="store_true",
        help="also the accuracy with each preprocessing step off, and of two baselines",
    )  # fmt: skip
    args = ap.parse_args(argv)

    folder = args.folder.absolute()
    if not folder.is_dir():
        return fail(EXIT_NO_INPUT, f"no such folder: {folder}")
    if not labelled_files(folder):
        return fail(EXIT_NO_INPUT, f"no labelled images (<label>/<file>, labels 0-9) in {folder}")
    kinds = read_sources(folder)
    model = args.model.absolute() if args.model is not None else None

    with tempfile.TemporaryDirectory(prefix="real_digits_") as tmp:
        work = Path(tmp)
        debug = ["--debug-dir", str(work / "debug")] if args.save_misses else []
        try:
            rows, cli_summary = run_predict(folder, work / "preds.csv", model, debug)
            naive_rows, naive_summary = run_predict(
                folder, work / "naive.csv", model, ["--no-preprocess"]
            )
        except CliError as exc:
            return fail(EXIT_CLI_FAILED, str(exc))
        baseline = baseline_predictions(folder, model or default_model())
        records = image_records(folder, rows, naive_rows, kinds, read_rounds(folder), baseline)
        if not records:
            return fail(EXIT_NO_INPUT, f"no labelled images in {folder}")
        saved = save_misses(records, work / "debug", args.save_misses) if debug else None

    # the CLI's default, run from the project: the model params.yaml predict.model names
    model_used = model or default_model()  # the CLI's default, run from the project
    results: dict[str, Any] = {
        "folder": str(folder),
        "model": str(model_used),
        "model_sha256": sha256(model_used),
        "cli": {"default": cli_summary, "naive_resize": naive_summary},
        **summarize(records, kinds is not None),
        "saved_misses": saved,
        "saved_misses_dir": str(args.save_misses) if args.save_misses else None,
        "ablation": ablation(folder, model_used, kinds) if args.ablation else None,
        "json": str(args.json),
        "rows": records,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print_report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
