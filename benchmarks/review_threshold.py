"""The review flag's threshold on validation data, never on the dev set of real photos.

Renders synthetic photos of MNIST *validation* digits (tasks/render.py, the render
stage's params with another seed: digits and draws the model never trained on), reads
them back as predict does, and classifies them and the clean validation split with a
model. For each candidate threshold it prints the share of correct rows flagged
(confidence below the threshold) and the share of misses flagged, on both sets; the
threshold for params.yaml predict.review_below is the highest one that flags at most
TARGET_FALSE_FLAGS of the correct renders.

    flock /tmp/digitflow-cpu.lock .venv/bin/python -m benchmarks.review_threshold \\
        [--model PATH] [--n 1000]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.real_digits import default_model
from flows.paths import PREPARED_DIR
from tasks.config import load_params
from tasks.data import load_arrays
from tasks.predict import Classifier
from tasks.render import render_arrays

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99)
TARGET_FALSE_FLAGS = 0.05  # the bound on correct rows flagged
VAL_SEED = 1_000_003  # another seed than the render stage's: other digits, other draws


def flag_figures(
    probs: np.ndarray, labels: np.ndarray, classes: list[str], threshold: float
) -> tuple[float, float, int]:
    """(share of correct rows flagged, share of misses flagged, misses) at ``threshold``."""
    pred = np.array([int(classes[k]) for k in probs.argmax(1)])
    conf = probs.max(1)
    correct = pred == labels
    flagged = conf < threshold
    rate = float(flagged[correct].mean()) if correct.any() else 0.0
    recall = float(flagged[~correct].mean()) if (~correct).any() else 1.0
    return rate, recall, int((~correct).sum())


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="default: the CLI's default model")
    ap.add_argument("--n", type=int, default=1000, help="renders of validation digits")
    args = ap.parse_args(argv)
    params = load_params(ROOT / "params.yaml")
    model = args.model or default_model()
    classifier = Classifier.from_file(model)
    val_x, val_y = load_arrays(ROOT / PREPARED_DIR / "val.npz")
    p = dataclasses.replace(params.render, count=args.n, seed=VAL_SEED)
    with tempfile.TemporaryDirectory(prefix="review_threshold_") as tmp:
        rx, ry, empty, lost = render_arrays(val_x, val_y, p, Path(tmp))
    sets = {
        "MNIST validation": (classifier.probabilities(list(val_x)), val_y),
        f"renders of validation digits ({len(rx)}; {empty} empty, {lost} lost)": (
            classifier.probabilities(list(rx)), ry,
        ),
    }  # fmt: skip
    print(f"model {model}")
    chosen = None
    for name, (probs, labels) in sets.items():
        acc = float(
            (np.array([int(classifier.classes[k]) for k in probs.argmax(1)]) == labels).mean()
        )
        print(f"\n{name}: accuracy {acc:.4f}")
        print("| review_below | correct flagged | misses flagged |\n|---:|---:|---:|")
        for t in THRESHOLDS:
            rate, recall, misses = flag_figures(probs, labels, classifier.classes, t)
            print(f"| {t} | {rate:.1%} | {recall:.0%} of {misses} |")
            if name.startswith("renders") and rate <= TARGET_FALSE_FLAGS:
                chosen = t
    print(f"\nhighest threshold flagging <= {TARGET_FALSE_FLAGS:.0%} of correct renders: {chosen}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
