"""IDX parsing and the seeded split, on tiny files made here."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from tasks.data import load_arrays
from tasks.download import MNIST_FILES
from tasks.idx import IdxError, encode_idx, parse_idx, read_images, read_labels, write_idx
from tasks.split import split_dataset


def _raw_dir(tiny_mnist: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in MNIST_FILES.values():
        (dest / name).write_bytes(
            gzip.decompress((tiny_mnist / "mirror" / f"{name}.gz").read_bytes())
        )
    return dest


def test_idx_roundtrip_and_gz(tmp_path: Path):
    arr = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    np.testing.assert_array_equal(read_images(write_idx(tmp_path / "a", arr)), arr)
    np.testing.assert_array_equal(read_images(write_idx(tmp_path / "b.gz", arr, gz=True)), arr)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x00\x00", "too short"),
        (b"\x12\x34\x08\x03" + b"\x00" * 12, "bad IDX magic"),
        (b"\x00\x00\x0d\x01" + b"\x00" * 4, "bad IDX magic"),  # float data, not uint8
        (encode_idx(np.zeros((3, 28, 28), np.uint8))[:-5], "truncated"),
        (encode_idx(np.zeros((3,), np.uint8)) + b"xx", "trailing data"),
    ],
)
def test_parse_idx_rejects_bad_data(data: bytes, match: str):
    with pytest.raises(IdxError, match=match):
        parse_idx(data, "somefile")


def test_wrong_kind_of_file_names_it(tmp_path: Path):
    labels = write_idx(tmp_path / "labels", np.zeros(5, np.uint8))
    with pytest.raises(IdxError, match=r"labels.*\(N, 28, 28\)"):
        read_images(labels)
    bad = write_idx(tmp_path / "bad-labels", np.array([1, 12], np.uint8))
    with pytest.raises(IdxError, match="out of range"):
        read_labels(bad)


def test_split_is_seeded_disjoint_and_complete(tiny_mnist: Path, tmp_path: Path):
    raw = _raw_dir(tiny_mnist, tmp_path / "raw")
    a = split_dataset(raw, tmp_path / "a", val_fraction=0.3, seed=7)
    b = split_dataset(raw, tmp_path / "b", val_fraction=0.3, seed=7)
    c = split_dataset(raw, tmp_path / "c", val_fraction=0.3, seed=8)
    tx, _ty = load_arrays(a["train"])
    vx, _vy = load_arrays(a["val"])
    sx, _ = load_arrays(a["test"])
    assert (len(tx), len(vx), len(sx)) == (420, 180, 200)
    assert tx.dtype == np.uint8 and tx.shape[1:] == (28, 28)
    # same seed -> same bytes; another seed -> another split
    assert a["val"].read_bytes() == b["val"].read_bytes()
    assert not np.array_equal(load_arrays(c["val"])[0], vx)
    # train + val is exactly the original training set
    full = read_images(raw / MNIST_FILES["train_images"])
    together = np.concatenate([tx, vx]).reshape(len(full), -1)
    assert sorted(map(bytes, together)) == sorted(map(bytes, full.reshape(len(full), -1)))


def test_split_rejects_truncated_file(tiny_mnist: Path, tmp_path: Path):
    raw = _raw_dir(tiny_mnist, tmp_path / "raw")
    target = raw / MNIST_FILES["test_labels"]
    target.write_bytes(target.read_bytes()[:-3])
    with pytest.raises(IdxError, match="t10k-labels-idx1-ubyte.*truncated"):
        split_dataset(raw, tmp_path / "out", 0.3, 0)
    assert not (tmp_path / "out" / "test.npz").exists()


def test_split_rejects_count_mismatch(tiny_mnist: Path, tmp_path: Path):
    raw = _raw_dir(tiny_mnist, tmp_path / "raw")
    write_idx(raw / MNIST_FILES["train_labels"], np.zeros(10, np.uint8))
    with pytest.raises(IdxError, match="600 images but 10 labels"):
        split_dataset(raw, tmp_path / "out", 0.3, 0)


def test_split_missing_file(tiny_mnist: Path, tmp_path: Path):
    raw = _raw_dir(tiny_mnist, tmp_path / "raw")
    shutil.rmtree(raw)
    raw.mkdir()
    with pytest.raises(FileNotFoundError):
        split_dataset(raw, tmp_path / "out", 0.3, 0)
