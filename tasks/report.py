"""Report stage: the seed report's sections, filled from this run, as Markdown + PNGs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tasks.data import load_arrays
from tasks.io import atomic_path, atomic_write_text
from tasks.metrics import confusion_matrix, read_confusion_rows
from tasks.model import load_model


def _save_fig(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _curves_figure(history: list[dict[str, float]], kept: int, path: Path) -> Path:
    """Loss and accuracy per epoch, with the epoch the model file holds marked."""
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax_loss.plot(epochs, [r["loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    ax_acc.plot(epochs, [r["train_accuracy"] for r in history], "o-", label="train")
    ax_acc.plot(epochs, [r["val_accuracy"] for r in history], "o-", label="validation")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.axvline(kept, color="gray", linestyle="--", label=f"model (epoch {kept})")
        ax.legend()
        ax.grid(alpha=0.3)
    return _save_fig(fig, path)


def _confusion_figure(cm: np.ndarray, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(cm, cmap="Blues")
    for (a, p), n in np.ndenumerate(cm):
        # dark text on light cells, white on dark ones
        ax.text(p, a, str(n), ha="center", va="center", fontsize=7,
                color="white" if n > cm.max() / 2 else "black")  # fmt: skip
    ax.set(xticks=range(len(cm)), yticks=range(len(cm)), xlabel="predicted", ylabel="actual",
           title="Confusion matrix (test set)")  # fmt: skip
    return _save_fig(fig, path)


def _misclassified_figure(
    images: np.ndarray, actual: np.ndarray, predicted: np.ndarray, n: int, path: Path
) -> Path:
    import matplotlib.pyplot as plt

    wrong = np.flatnonzero(actual != predicted)[:n]
    cols = 9  # fits a page width at a readable digit size
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong, strict=False):
        ax.imshow(images[i], cmap="gray")
        ax.set_title(f"true {actual[i]} / pred {predicted[i]}", fontsize=7)
    return _save_fig(fig, path)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _epoch_rows(history: list[dict[str, float]], kept: int) -> list[list[Any]]:
    """The training table's rows, the kept epoch marked "(model)"."""
    return [
        [f"{int(r['epoch'])} (model)" if int(r["epoch"]) == kept else int(r["epoch"]),
         f"{r['loss']:.4f}", f"{r['train_accuracy']:.2%}",
         f"{r['val_loss']:.4f}", f"{r['val_accuracy']:.2%}"]
        for r in history
    ]  # fmt: skip


def _kept_sentence(history: list[dict[str, float]], kept: int, keep: str) -> str:
    """Which epoch's weights the model file holds ("" when its history lacks that epoch)."""
    kept_row = next((r for r in history if int(r["epoch"]) == kept), None)
    if kept_row is None:
        return ""
    return (
        f"The model file holds epoch {kept}'s weights "
        f"(validation accuracy {kept_row['val_accuracy']:.2%}; `train.keep: {keep}`), "
        "marked on the curves."
    )


def write_report(
    model_path: Path,
    eval_dir: Path,
    test_path: Path,
    out_dir: Path,
    params: dict[str, Any],
    n_misclassified: int = 36,
) -> Path:
    """Write ``out_dir/report.md`` and its figures; returns the report path."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display

    loaded = load_model(model_path)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    classes = json.loads((eval_dir / "classes.json").read_text())
    actual, predicted = read_confusion_rows(eval_dir / "confusion.csv")
    images, _ = load_arrays(test_path)
    cm = confusion_matrix(actual, predicted)

    history = loaded.history
    # the epoch whose weights the file holds (train.keep: best or last); files without it
    # hold the last
    kept = int(loaded.metrics.get("epoch", history[-1]["epoch"] if history else 0))
    out_dir.mkdir(parents=True, exist_ok=True)
    _curves_figure(history, kept, out_dir / "training_curves.png")
    _confusion_figure(cm, out_dir / "confusion_matrix.png")
    _misclassified_figure(images, actual, predicted, n_misclassified, out_dir / "misclassified.png")

    epoch_rows = _epoch_rows(history, kept)
    holds = _kept_sentence(history, kept, loaded.params.get("keep", "last"))
    class_rows = [
        [c["class"], f"{c['precision']:.4f}", f"{c['recall']:.4f}", f"{c['f1']:.4f}", c["support"]]
        for c in classes["per_class"]
    ]
    pair_rows = [[p["actual"], p["predicted"], p["count"]] for p in classes["most_confused"]]
    md = f"""# digitflow report

Model: `{loaded.arch}` CNN, trained {len(history)} epochs. {holds}

## Test accuracy

**{metrics["accuracy"]:.2%}** on {metrics["n_test"]:,} test images \
({metrics["errors"]} errors), test loss {metrics["loss"]:.4f}, macro F1 {metrics["macro_f1"]:.4f}.

## Training

{_table(["epoch", "loss", "train accuracy", "val loss", "val accuracy"], epoch_rows)}

![training curves](training_curves.png)

## Confusion matrix

![confusion matrix](confusion_matrix.png)

## Per-class precision, recall, F1

{_table(["class", "precision", "recall", "F1", "support"], class_rows)}

## Most-confused pairs

{_table(["actual", "predicted", "count"], pair_rows) if pair_rows else "No errors."}

## Misclassified test digits

![misclassified digits](misclassified.png)

## Parameters

```yaml
{yaml.safe_dump(params, sort_keys=False).strip()}
```
"""
    return atomic_write_text(out_dir / "report.md", md)
