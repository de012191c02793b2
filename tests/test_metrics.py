"""The one confusion matrix: counts from (actual, predicted), and the evaluate CSV read back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.metrics import confusion_matrix, read_confusion_rows

labels = st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), max_size=200)


@settings(max_examples=50, deadline=None)
@given(labels)
def test_confusion_matrix_counts_every_pair(pairs: list[tuple[int, int]]):
    actual = np.array([a for a, _ in pairs], dtype=np.int64)
    predicted = np.array([p for _, p in pairs], dtype=np.int64)
    cm = confusion_matrix(actual, predicted)
    assert cm.shape == (10, 10) and cm.sum() == len(pairs)
    for a in range(10):
        for p in range(10):
            assert cm[a, p] == pairs.count((a, p))


def test_confusion_rows_read_back(tmp_path: Path):
    path = tmp_path / "confusion.csv"
    path.write_text("actual,predicted\n3,5\n7,7\n1,7\n")
    actual, predicted = read_confusion_rows(path)
    assert actual.tolist() == [3, 7, 1] and predicted.tolist() == [5, 7, 7]
    header_only = tmp_path / "empty.csv"
    header_only.write_text("actual,predicted\n")
    assert confusion_matrix(*read_confusion_rows(header_only)).sum() == 0


def test_out_of_range_labels_are_refused():
    with pytest.raises(ValueError, match="predicted labels"):
        confusion_matrix(np.array([1]), np.array([10]))
