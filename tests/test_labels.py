"""Your own labelled images: the inbox (digitflow label), the labeled stage, real.* metrics."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.evaluate import evaluate
from tasks.label_split import in_test, split_labelled
from tasks.labels import NotAnImage, label_file
from tests.images import REFERENCES, png_bytes

runner = CliRunner()


def _digit_png(tmp_path: Path, digit: int, name: str, shade: int = 0) -> Path:
    """A distinct PNG of ``digit``: ``shade`` changes a corner pixel, so the bytes differ."""
    img = REFERENCES[digit].copy()
    img[0, 0] = shade
    path = tmp_path / name
    path.write_bytes(png_bytes(img))
    return path


def test_label_stores_by_content_once_and_refuses_what_is_not_an_image(tmp_path: Path) -> None:
    inbox = tmp_path / "labeled"
    seven = _digit_png(tmp_path, 7, "seven.png")
    stored, new = label_file(seven, 7, inbox)
    assert new and stored.parent == inbox / "7" and stored.suffix == ".png"
    assert stored.read_bytes() == seven.read_bytes()
    again, new_again = label_file(_digit_png(tmp_path, 7, "copy.png"), 7, inbox)
    assert again == stored and not new_again  # same bytes, another name: stored once
    (tmp_path / "notes.txt").write_text("not an image")
    os.mkfifo(tmp_path / "pipe")  # must not hang: opened non-blocking, refused
    for bad in ("notes.txt", "pipe", "missing.png"):
        with pytest.raises(NotAnImage):
            label_file(tmp_path / bad, 1, inbox)
    assert sorted(p.name for p in inbox.rglob("*") if p.is_file()) == [stored.name]


def test_label_command_with_as_and_from_a_corrected_csv(tmp_path: Path) -> None:
    inbox = tmp_path / "labeled"
    one, two = _digit_png(tmp_path, 1, "a.png"), _digit_png(tmp_path, 2, "b.png")
    result = runner.invoke(app, ["label", str(one), "--as", "1", "--to", str(inbox)])
    assert result.exit_code == 0, result.output
    assert "1 stored" in result.stdout and len(list((inbox / "1").iterdir())) == 1

    predictions = tmp_path / "predictions.csv"
    with predictions.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "confidence"])
        writer.writerows([[one, "1", "0.9"], [two, "2", "0.4"], [tmp_path / "gone.png", "3", ""],
                          [two, "x", ""]])  # fmt: skip
    result = runner.invoke(app, ["label", "--from-csv", str(predictions), "--to", str(inbox)])
    assert result.exit_code == 1  # two rows skipped: each says why
    assert "1 stored" in result.stdout and "1 already there" in result.stdout
    assert "gone.png" in result.stderr and "'x' is not a digit" in result.stderr
    assert len(list((inbox / "2").iterdir())) == 1


@pytest.mark.parametrize("args", [["label"], ["label", "x.png"], ["label", "--as", "3"]])
def test_label_usage_errors_exit_2(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "give FILES with --as DIGIT" in result.stderr


def test_labeled_stage_splits_by_content_and_reports_bad_content(tmp_path: Path) -> None:
    inbox, out = tmp_path / "labeled", tmp_path / "split"
    files = [_digit_png(tmp_path, d % 10, f"{d}.png", shade=d) for d in range(40)]
    for d, path in enumerate(files[:30]):
        label_file(path, d % 10, inbox)
    (inbox / "cats").mkdir()  # not a class folder
    (inbox / "4" / "broken.png").write_bytes(b"\x89PNG broken")
    (inbox / "4" / "dup.png").write_bytes(files[4].read_bytes())  # same image, same label
    (inbox / "5" / "clash.png").write_bytes(files[3].read_bytes())  # digit 3 also under 5

    first = split_labelled(inbox, out, test_fraction=0.3)

    assert first.train + first.test == 29  # 30 images, the 3/5 clash left out
    assert any("cats: not a class folder" in p for p in first.problems)
    assert any("broken.png: error" in p for p in first.problems)
    assert any("dup.png: same image as" in p and "counted once" in p for p in first.problems)
    assert any("clash.png" in p and "both left out" in p for p in first.problems)
    test_before = _rows(out / "test.npz")

    for d, path in enumerate(files[30:], start=30):  # more images: no earlier one moves
        label_file(path, d % 10, inbox)
    split_labelled(inbox, out, test_fraction=0.3)
    assert test_before <= _rows(out / "test.npz")
    assert not test_before & _rows(out / "train.npz")


def _rows(path: Path) -> set[bytes]:
    with np.load(path) as z:
        return {
            img.tobytes() + bytes([label])
            for img, label in zip(z["images"], z["labels"], strict=True)
        }


def test_split_side_depends_on_the_hash_alone() -> None:
    assert in_test("00000000" + "f" * 56, 0.2) and not in_test("ffffffff" + "0" * 56, 0.2)


def test_an_empty_inbox_gives_empty_splits_and_no_real_metrics(
    tmp_path: Path, tiny_prepared: Path, trained_model_path: Path
) -> None:
    split = tmp_path / "split"
    result = split_labelled(tmp_path / "labeled", split, 0.2)
    assert (result.train, result.test) == (0, 0)
    out = evaluate(trained_model_path, tiny_prepared / "test.npz", tmp_path / "e",
                   real_test=split / "test.npz")  # fmt: skip
    assert "real" not in json.loads(out.metrics_path.read_text())


def test_evaluate_scores_the_labelled_test_images_beside_mnist(
    tmp_path: Path, tiny_prepared: Path, trained_model_path: Path
) -> None:
    inbox, split = tmp_path / "labeled", tmp_path / "split"
    for d in range(60):
        label_file(_digit_png(tmp_path, d % 10, f"{d}.png", shade=d), d % 10, inbox)
    result = split_labelled(inbox, split, 0.5)
    out = evaluate(trained_model_path, tiny_prepared / "test.npz", tmp_path / "e",
                   real_test=split / "test.npz")  # fmt: skip
    metrics = json.loads(out.metrics_path.read_text())
    assert metrics["real"]["count"] == result.test > 0
    assert 0.0 <= metrics["real"]["accuracy"] <= 1.0 and "accuracy" in metrics
