"""Scores computed from (actual, predicted) labels, shared by evaluate, report and the flows.

Light on purpose (numpy only), so the Prefect flows can import it without torch.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from tasks.digits import N_CLASSES


def confusion_matrix(actual: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """(10, 10) int64 counts: rows are the actual class, columns the predicted one.

    One bincount rather than sklearn.metrics.confusion_matrix: that refuses an empty input
    and costs its import (~1 s) in the flows, for the same counts.
    """
    actual, predicted = np.asarray(actual, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    for name, labels in (("actual", actual), ("predicted", predicted)):
        if labels.size and not (labels.min() >= 0 and labels.max() < N_CLASSES):
            raise ValueError(f"{name} labels must be in 0..{N_CLASSES - 1}")
    flat = np.bincount(actual * N_CLASSES + predicted, minlength=N_CLASSES * N_CLASSES)
    return flat.reshape(N_CLASSES, N_CLASSES)


def read_confusion_rows(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(actual, predicted) from the evaluate stage's confusion.csv (one row per test image)."""
    with Path(path).open(newline="") as fh:
        rows = [(int(r["actual"]), int(r["predicted"])) for r in csv.DictReader(fh)]
    pairs = np.array(rows, dtype=np.int64).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]
