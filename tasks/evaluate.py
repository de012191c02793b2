"""Evaluate stage: the trained model on the 10,000-image test set.

Writes the metrics DVC compares (``accuracy`` and ``loss`` at the top level),
per-class precision/recall/F1, the confusion matrix as a DVC plot (one row per
test image: actual, predicted) and the most-confused pairs.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.data import load_arrays
from tasks.digits import N_CLASSES
from tasks.io import atomic_write_text
from tasks.metrics import confusion_matrix
from tasks.model import evaluate_arrays, load_model, pick_device


@dataclass
class EvaluateResult:
    """What the command prints; classes.json and confusion.csv sit beside metrics.json."""

    metrics: dict[str, Any]  # accuracy, loss, macro averages
    metrics_path: Path


def most_confused(actual: np.ndarray, predicted: np.ndarray, top: int) -> list[dict[str, Any]]:
    """The ``top`` off-diagonal (actual, predicted) pairs by count."""
    cm = confusion_matrix(actual, predicted)
    np.fill_diagonal(cm, 0)
    order = np.argsort(-cm, axis=None, kind="stable")[:top]
    pairs = [divmod(int(i), N_CLASSES) for i in order]
    return [{"actual": a, "predicted": p, "count": int(cm[a, p])} for a, p in pairs if cm[a, p]]


def real_metrics(
    model_path: Path, real_test: Path, batch_size: int = 1000, device: str = "auto"
) -> dict[str, Any] | None:
    """``{"accuracy", "count"}`` on your labelled test images; None when there are none."""
    images, labels = load_arrays(real_test)
    if len(labels) == 0:
        return None  # absent, not zero: no images is no measurement
    dev = pick_device(device)
    _, accuracy, _ = _score(load_model(model_path, device=dev), images, labels, batch_size, dev)
    return {"accuracy": accuracy, "count": len(labels)}


def _score(
    loaded: Any, images: np.ndarray, labels: np.ndarray, batch_size: int, dev: torch.device
) -> tuple[float, float, torch.Tensor]:
    """(loss, accuracy, predictions (N,)) of a loaded model on uint8 images (N, 28, 28)."""
    return evaluate_arrays(
        loaded.model,
        torch.from_numpy(images).to(dev),
        torch.from_numpy(labels).to(dev),
        loaded.mean,
        loaded.std,
        batch_size,
    )


def evaluate(
    model_path: Path,
    test_path: Path,
    out_dir: Path,
    batch_size: int = 1000,
    top_confused: int = 10,
    device: str = "auto",
    real_test: Path | None = None,
) -> EvaluateResult:
    """Score ``model_path`` on ``test_path``; write metrics.json, classes.json, confusion.csv.

    With ``real_test`` (the labelled stage's test.npz), metrics.json also holds ``real``:
    accuracy and count on your own labelled test images, when there are any.
    """
    from sklearn.metrics import precision_recall_fscore_support

    dev = pick_device(device)
    loaded = load_model(model_path, device=dev)
    images, labels = load_arrays(test_path)
    loss, accuracy, pred = _score(loaded, images, labels, batch_size, dev)
    predicted = pred.cpu().numpy()
    actual = labels.astype(np.int64)
    prec, rec, f1, support = precision_recall_fscore_support(
        actual, predicted, labels=list(range(N_CLASSES)), zero_division=0
    )
    per_class = [
        {
            "class": loaded.classes[c],
            "precision": float(prec[c]),
            "recall": float(rec[c]),
            "f1": float(f1[c]),
            "support": int(support[c]),
        }
        for c in range(N_CLASSES)
    ]
    metrics = {
        "accuracy": accuracy,
        "loss": loss,
        "macro_precision": float(prec.mean()),
        "macro_recall": float(rec.mean()),
        "macro_f1": float(f1.mean()),
        "n_test": len(labels),
        "errors": int((predicted != actual).sum()),
    }
    if real_test is not None and (real := real_metrics(model_path, real_test, batch_size, device)):
        metrics["real"] = real
    confused = most_confused(actual, predicted, top_confused)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    atomic_write_text(
        out_dir / "classes.json",
        json.dumps({"per_class": per_class, "most_confused": confused}, indent=2) + "\n",
    )
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    writer.writerows(zip(actual.tolist(), predicted.tolist(), strict=True))
    atomic_write_text(out_dir / "confusion.csv", buf.getvalue())
    return EvaluateResult(metrics, metrics_path)
