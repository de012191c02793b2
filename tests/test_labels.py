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


def test_retrain_with_labels_needs_a_gain_on_them_and_little_mnist_loss() -> None:
    from flows.retrain import judge
    from tasks.config import RetrainParams

    rules = RetrainParams(min_improvement=0.01, max_class_drop=0.01, max_mnist_drop=0.002)
    classes = {"per_class": [{"class": "0", "recall": 1.0}]}
    champion = {"accuracy": 0.995, "real": {"accuracy": 0.80, "count": 50}}

    def decide(mnist: float, real: float):
        challenger = {"accuracy": mnist, "real": {"accuracy": real, "count": 50}}
        return judge(champion, classes, challenger, classes, rules, against="model@v1")

    assert decide(0.994, 0.90).promote  # labels up 10 points, MNIST down 0.001
    worse_mnist = decide(0.990, 0.90)
    assert not worse_mnist.promote and "retrain.max_mnist_drop" in worse_mnist.reasons[0]
    no_gain = decide(0.996, 0.805)
    assert not no_gain.promote and "labelled test images (50)" in no_gain.reasons[0]
    # without labelled images on both sides: MNIST decides, as before
    plain = judge({"accuracy": 0.98}, classes, {"accuracy": 0.995}, classes, rules)
    assert plain.promote and "test accuracy gain" in plain.reasons[0]


def test_decision_shows_both_models_on_the_labelled_images() -> None:
    from flows.retrain import Decision, decision_markdown

    champion = {"accuracy": 0.995, "loss": 0.02, "macro_f1": 0.99, "errors": 50,
                "real": {"accuracy": 0.8, "count": 50}}  # fmt: skip
    challenger = {**champion, "real": {"accuracy": 0.9, "count": 50}}
    text = decision_markdown(Decision(True, ["ok"]), "model@v1", "model@v2", champion,
                             challenger, [])  # fmt: skip
    assert "| labelled accuracy | 0.8000 | 0.9000 |" in text
    assert "| labelled count | 50 | 50 |" in text


def test_labels_unchanged_since_reads_the_inbox_hash_of_each_commit(tmp_path: Path) -> None:
    import subprocess

    import yaml

    from flows.retrain import INBOX_STAGE, labels_unchanged_since

    def commit(md5: str, message: str) -> None:
        lock = {"schema": "2.0", "stages": {INBOX_STAGE: {"outs": [{"path": "data/labeled",
                                                                     "md5": md5}]}}}  # fmt: skip
        (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
        for args in (["add", "dvc.lock"], ["commit", "--allow-empty", "-qm", message]):
            subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                           cwd=tmp_path, check=True)  # fmt: skip

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    commit("aaa.dir", "champion")
    subprocess.run(["git", "tag", "model@v1"], cwd=tmp_path, check=True)
    commit("aaa.dir", "a commit with other changes")
    assert labels_unchanged_since(tmp_path, "model@v1")
    commit("bbb.dir", "new labelled images")
    assert not labels_unchanged_since(tmp_path, "model@v1")


def test_training_adds_each_labelled_image_weight_times(tmp_path: Path) -> None:
    from tasks.data import save_arrays
    from tasks.train import add_labelled

    mnist_x, mnist_y = np.zeros((5, 28, 28), np.uint8), np.zeros(5, np.uint8)
    own_x = np.stack([REFERENCES[7], REFERENCES[1]])
    path = save_arrays(tmp_path / "train.npz", own_x, np.array([7, 1], np.uint8))
    x, y = add_labelled(mnist_x, mnist_y, path, weight=3)
    assert len(x) == 11 and list(y[5:]) == [7, 7, 7, 1, 1, 1]
    assert (x[5] == REFERENCES[7]).all() and (x[-1] == REFERENCES[1]).all()
    empty = save_arrays(
        tmp_path / "none.npz", np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8)
    )
    assert len(add_labelled(mnist_x, mnist_y, empty, weight=3)[0]) == 5


def test_every_format_predict_reads_gets_a_suffix_the_store_accepts() -> None:
    from tasks.decode import _PILLOW_FORMATS
    from tasks.labels import SUFFIX, image_suffix

    for fmt in {*_PILLOW_FORMATS.values(), "tiff", "pam", "pfm", "hdr"}:
        assert SUFFIX.fullmatch(image_suffix(fmt)), fmt
    assert image_suffix("sunraster") == ".ras" and image_suffix("jpeg") == ".jpg"
