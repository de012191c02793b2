"""Labelled stage: your own images (``data/labeled/<label>/<file>``) as train and test arrays.

Each image goes through predict's own decoding and ``to_mnist``, so the network trains
on what it will see. The split is by content: an image's SHA-256 decides its side, so
adding images never moves an earlier one between train and test. Bad content (a folder
not named after a class, a file that is not a readable image, one image under two
labels) gets one message each and is left out; the good images go on.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tasks.data import save_arrays
from tasks.digits import CLASSES
from tasks.preprocess import prepare_file

log = logging.getLogger(__name__)

HASH_SPAN = 2**32  # the first 8 hex digits of an image's SHA-256, as a share of this


@dataclass
class LabelledSplit:
    """What the stage wrote: counts per side and one message per image left out."""

    train: int = 0
    test: int = 0
    problems: list[str] = field(default_factory=list)


def in_test(digest: str, test_fraction: float) -> bool:
    """The image's side, from its SHA-256 alone: stable whatever else is in the folder."""
    return int(digest[:8], 16) < test_fraction * HASH_SPAN


def _files(inbox: Path, problems: list[str]) -> list[tuple[Path, int]]:
    """(file, label) for every non-hidden file of a class folder; problems for the rest."""
    found = []
    for entry in sorted(inbox.iterdir()) if inbox.is_dir() else []:
        if entry.name.startswith("."):
            continue
        if not entry.is_dir() or entry.name not in CLASSES:
            problems.append(f"{entry}: not a class folder (0-9), left out")
            continue
        found += [(f, int(entry.name)) for f in sorted(entry.rglob("*")) if _listed(f, entry)]
    return found


def _listed(path: Path, folder: Path) -> bool:
    """Not a folder, nothing hidden on the way (a FIFO or a link is listed: its message says)."""
    hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
    return not hidden and not path.is_dir()


def _read(files: list[tuple[Path, int]], problems: list[str]) -> dict[str, tuple[np.ndarray, int]]:
    """{sha256: (28x28 image, label)}: unreadable files, duplicates and conflicts reported."""
    kept: dict[str, tuple[np.ndarray, int]] = {}
    where: dict[str, Path] = {}
    conflicts: set[str] = set()
    for path, label in files:
        prepared = prepare_file(path)  # bounded decoding, predict's preprocessing
        if prepared.status != "ok":
            problems.append(f"{path}: {prepared.status}: {prepared.message}, left out")
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()  # a regular file, size-capped
        if digest in kept or digest in conflicts:
            first = where[digest]
            if digest in kept and kept[digest][1] == label:
                problems.append(f"{path}: same image as {first}, counted once")
                continue
            problems.append(f"{path}: same image as {first} under another label, both left out")
            kept.pop(digest, None)
            conflicts.add(digest)
            continue
        kept[digest], where[digest] = (prepared.image, label), path
    return kept


def _save(path: Path, items: list[tuple[np.ndarray, int]]) -> Path:
    images = np.stack([img for img, _ in items]) if items else np.zeros((0, 28, 28), np.uint8)
    labels = np.array([label for _, label in items], dtype=np.uint8)
    return save_arrays(path, images, labels)


def split_labelled(inbox: Path, out_dir: Path, test_fraction: float) -> LabelledSplit:
    """Write ``out_dir/train.npz`` and ``out_dir/test.npz`` (possibly empty) from ``inbox``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    result = LabelledSplit()
    images = _read(_files(Path(inbox), result.problems), result.problems)
    order = sorted(images)  # by content hash: the arrays do not depend on file names
    test = [images[d] for d in order if in_test(d, test_fraction)]
    train = [images[d] for d in order if not in_test(d, test_fraction)]
    _save(Path(out_dir) / "train.npz", train)
    _save(Path(out_dir) / "test.npz", test)
    result.train, result.test = len(train), len(test)
    for problem in result.problems:
        log.warning("%s", problem)
    return result
