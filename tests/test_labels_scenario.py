"""The labelled-images loop end to end: label, reproduce, retrain, promote, nothing new.

A real git + DVC repo of this project on tiny data, a real Prefect API. The "user" writes
digits in styles the training data lacks (a 7 with a bar through it, a 1 with a flag
and a base), labels them with `digitflow label`, and the retrain flow judges the
challenger on them against the champion re-scored on the same images.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from flows.retrain import ARTIFACT_DECISION, retrain
from tests.test_flows import (
    BIN,
    SERVED,
    TINY_RECIPES,
    _artifact,
    _dvc,
    _edit_params,
    _run,
    _tags,
    make_repo,
)

USER_DIGITS = 48  # of each style: ~20 % of them become the labelled test images
SIDE = 96  # pixels of a drawn digit's square photo


def _user_digit(label: int, rng: np.random.Generator) -> np.ndarray:
    """Dark ink on light paper: a barred 7 or a 1 with a flag and a base, each drawn anew."""
    img = np.full((SIDE, SIDE), 235, np.uint8)
    j = lambda v: int(v + rng.integers(-5, 6))  # noqa: E731  (a pen is never exact)
    width = int(rng.integers(4, 8))
    strokes = (
        [((25, 20), (72, 20)), ((72, 20), (40, 80)), ((35, 50), (68, 48))]  # barred 7
        if label == 7
        else [((50, 15), (50, 80)), ((50, 15), (32, 32)), ((32, 80), (68, 80))]  # flagged 1
    )
    for (x0, y0), (x1, y1) in strokes:
        cv2.line(img, (j(x0), j(y0)), (j(x1), j(y1)), 30, width, cv2.LINE_AA)
    return img


def _label(repo: Path, folder: Path, label: int) -> None:
    proc = subprocess.run(
        [str(Path(BIN) / "digitflow"), "label", *map(str, sorted(folder.iterdir())),
         "--as", str(label), "--to", str(repo / "data/labeled")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"{USER_DIGITS} stored" in proc.stdout


def _labelled_accuracies(decision: str) -> tuple[float, float]:
    match = re.search(r"\| labelled accuracy \| ([\d.]+) \| ([\d.]+) \|", decision)
    assert match, decision
    return float(match[1]), float(match[2])


@pytest.mark.slow
def test_labelled_images_train_a_challenger_that_is_promoted_on_them(
    prefect_api: None, tiny_env: Path, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo")
    robust = {**TINY_RECIPES[SERVED], "epochs": 2, "labeled_weight": 20}
    _edit_params(
        repo,
        train={SERVED: robust},
        # tiny data: MNIST accuracy moves by whole points between runs; the labelled images
        # must gain a point for a promotion
        retrain={"min_improvement": 0.01, "max_mnist_drop": 0.5},
    )
    _run(repo, "git", "commit", "-qam", "tiny recipes with labelled images")
    first = retrain(root=str(repo))
    assert first["promoted"] and first["tag"] == "model@v1", first["reasons"]

    rng = np.random.default_rng(0)
    for label in (7, 1):
        folder = tmp_path / f"user-{label}"
        folder.mkdir()
        for i in range(USER_DIGITS):
            cv2.imwrite(str(folder / f"{label}_{i}.png"), _user_digit(label, rng))
        _label(repo, folder, label)
    _dvc(repo, "repro", "labeled")  # the inbox's hash into dvc.lock, its files into the cache
    _run(repo, "git", "add", "dvc.lock", "data")
    _run(repo, "git", "commit", "-qm", "my own sevens and ones")

    state = retrain(root=str(repo), only_if_new_labels=True, return_state=True)
    second = state.result()
    assert second["trained"] and second["promoted"], second["reasons"]
    assert second["tag"] == "model@v2" and second["compared_with"] == "model@v1"
    assert any("labelled test images" in r for r in second["reasons"]), second["reasons"]
    decision = _artifact(ARTIFACT_DECISION, state.state_details.flow_run_id).data
    champion_on_them, challenger_on_them = _labelled_accuracies(decision)
    assert challenger_on_them > champion_on_them
    metrics = _run(repo, "git", "show", f"model@v2:data/evaluate/{SERVED}/metrics.json")
    assert '"real"' in metrics  # the promoted commit records both figures

    again = retrain(root=str(repo), only_if_new_labels=True)
    assert not again["trained"] and not again["promoted"]
    assert again["reasons"] == ["no new labelled images since model@v2: nothing to train"]
    assert _tags(repo) == ["model@v1", "model@v2"]


def test_user_digits_differ_each_time() -> None:
    rng = np.random.default_rng(0)
    a, b = _user_digit(7, rng), _user_digit(7, rng)
    assert a.shape == (SIDE, SIDE) and not np.array_equal(a, b)
