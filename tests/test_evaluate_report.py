"""Evaluate and report steps on a model trained on tiny data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tasks.data import load_arrays
from tasks.evaluate import evaluate, most_confused
from tasks.model import load_model, save_model
from tasks.report import write_report


def test_most_confused_orders_off_diagonal_pairs():
    actual = np.array([1, 1, 1, 7, 7, 3, 3, 3])
    pred = np.array([7, 7, 1, 1, 1, 3, 5, 8])
    pairs = most_confused(actual, pred, top=3)
    assert pairs[0]["count"] == 2 and pairs[1]["count"] == 2
    assert {(p["actual"], p["predicted"]) for p in pairs[:2]} == {(1, 7), (7, 1)}
    assert all(p["actual"] != p["predicted"] for p in pairs)
    assert most_confused(actual, actual, top=5) == []


@pytest.fixture(scope="module")
def evaluated(trained_model_path: Path, tiny_prepared: Path, tmp_path_factory) -> tuple:
    out = tmp_path_factory.mktemp("eval")
    return evaluate(trained_model_path, tiny_prepared / "test.npz", out, 64, 5, "cpu"), out


def test_evaluate_writes_metrics_classes_and_confusion(evaluated, tiny_prepared: Path):
    _result, out = evaluated
    _, labels = load_arrays(tiny_prepared / "test.npz")
    metrics = json.loads((out / "metrics.json").read_text())
    # accuracy recomputed independently from the confusion plot rows
    with (out / "confusion.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(labels)
    assert [int(r["actual"]) for r in rows] == labels.tolist()
    acc = np.mean([r["actual"] == r["predicted"] for r in rows])
    assert metrics["accuracy"] == pytest.approx(acc)
    assert metrics["errors"] == sum(r["actual"] != r["predicted"] for r in rows)
    assert metrics["loss"] > 0
    classes = json.loads((out / "classes.json").read_text())
    assert [c["class"] for c in classes["per_class"]] == [str(d) for d in range(10)]
    assert sum(c["support"] for c in classes["per_class"]) == len(labels)
    recall_1 = np.mean([r["predicted"] == "1" for r in rows if r["actual"] == "1"])
    assert classes["per_class"][1]["recall"] == pytest.approx(recall_1)
    assert len(classes["most_confused"]) <= 5


def test_report_has_the_seed_reports_sections(
    evaluated, trained_model_path, tiny_prepared, tmp_path
):
    _, eval_dir = evaluated
    params = {"train": {"epochs": 2, "lr": 0.001}}
    path = write_report(
        trained_model_path, eval_dir, tiny_prepared / "test.npz", tmp_path, params, 9
    )
    md = path.read_text()
    for heading in [
        "## Test accuracy",
        "## Training",
        "## Confusion matrix",
        "## Most-confused pairs",
        "## Misclassified test digits",
        "## Parameters",
    ]:
        assert heading in md
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert f"**{metrics['accuracy']:.2%}** on {metrics['n_test']:,} test images" in md
    # the per-epoch table: one row per epoch of the model's own history, in order
    loaded = load_model(trained_model_path)
    section = md.split("## Training\n", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("| ")][1:]  # no header
    epochs = [line.split("|")[1].strip().split()[0] for line in table]
    assert epochs == [str(r["epoch"]) for r in loaded.history]
    for r in loaded.history:
        assert f"{r['loss']:.4f} | {r['train_accuracy']:.2%} | {r['val_loss']:.4f}" in md
    # the parameters section is the YAML of what was passed, not just some text
    block = md.split("## Parameters", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(block) == params
    for png in ["training_curves.png", "confusion_matrix.png", "misclassified.png"]:
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and f"({png})" in md


def test_report_names_the_epoch_the_model_holds(
    evaluated, trained_model_path: Path, tiny_prepared: Path, tmp_path: Path
):
    """keep=best kept epoch 2 of 3: the report says so, not the last epoch's numbers."""
    _, eval_dir = evaluated
    loaded = load_model(trained_model_path)
    history = [
        {"epoch": e, "loss": 1.0 / e, "train_accuracy": 0.5 + e / 10, "val_loss": 0.9 + e / 10,
         "val_accuracy": acc}
        for e, acc in [(1, 0.61), (2, 0.83), (3, 0.72)]
    ]  # fmt: skip
    model = save_model(
        tmp_path / "model.pt", loaded.model, loaded.arch, loaded.mean, loaded.std,
        {**loaded.params, "keep": "best"}, metrics=history[1], history=history,
    )  # fmt: skip
    md = write_report(model, eval_dir, tiny_prepared / "test.npz", tmp_path / "r", {}, 9)
    md = md.read_text()
    assert "holds epoch 2's weights (validation accuracy 83.00%" in md
    marked = [line for line in md.splitlines() if "(model)" in line]
    assert len(marked) == 1 and marked[0].startswith("| 2 (model) |")
