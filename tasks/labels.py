"""The labelled-images inbox: ``data/labeled/<label>/<sha256>.<ext>``, one file per image.

An image is stored under the label a person gave it, named by the SHA-256 of its bytes:
the same image labelled twice is one file, and two labels of one image are two files
(a disagreement that whoever reviews the inbox sees). Writes are atomic (a hidden temp
file in the label's folder, then a rename): a reader never sees a half-written image,
and the hidden temp file is skipped by `digitflow predict`'s folder walk.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import stat
from pathlib import Path

from tasks.digits import N_CLASSES
from tasks.io import atomic_open, atomic_write_text

log = logging.getLogger(__name__)

SUFFIX = re.compile(r"\.[a-z0-9]{1,5}")  # ".png", ".jpg", ".webp": no separators, no dots


def store_labelled(data: bytes, label: int, root: Path, suffix: str) -> Path:
    """Store ``data`` as ``root/<label>/<sha256><suffix>`` atomically; return its path.

    Deduplicated: an image already stored under this label is not written again. Raises
    ValueError for a label outside 0..9, a suffix that is not ``.`` and 1-5 lowercase
    letters or digits, and empty ``data``.
    """
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < N_CLASSES:
        raise ValueError(f"label must be a digit 0-{N_CLASSES - 1}, got {label!r}")
    if not SUFFIX.fullmatch(suffix):
        raise ValueError(f"file suffix must look like '.png', got {suffix!r}")
    if not data:
        raise ValueError("no image bytes to store")
    path = Path(root) / str(label) / f"{hashlib.sha256(data).hexdigest()}{suffix}"
    if path.is_file():
        return path  # the same bytes under the same label: stored already
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return path


# suffixes for the formats predict reads, by the format read_header names
FORMAT_SUFFIX = {"jpeg": ".jpg", "tiff": ".tif", "jp2": ".jp2", "sunraster": ".ras"}


class NotAnImage(ValueError):
    """A file that predict could not read as an image: it is not stored."""


def read_image_bytes(path: Path) -> tuple[bytes, str]:
    """A file's bytes and the suffix of its format, read with the decoder's bounds."""
    from tasks.decode import MAX_FILE_BYTES, read_header

    try:
        # non-blocking: a FIFO would hang a plain open(); checked on the open descriptor
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise NotAnImage(f"{path}: not a regular file")
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise NotAnImage(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if len(data) > MAX_FILE_BYTES:
        raise NotAnImage(f"{path}: larger than {MAX_FILE_BYTES // 2**20} MiB")
    header = read_header(data)
    if header is None:
        raise NotAnImage(f"{path}: not an image predict reads")
    return data, image_suffix(header.format)


def image_suffix(fmt: str) -> str:
    """The file suffix a stored image gets, from the format read_header names."""
    return FORMAT_SUFFIX.get(fmt, f".{fmt}")


def label_file(path: Path, label: int, root: Path) -> tuple[Path, bool]:
    """Store the image at ``path`` under ``label``; (where, whether it was new)."""
    data, suffix = read_image_bytes(path)
    target = Path(root) / str(label) / f"{hashlib.sha256(data).hexdigest()}{suffix}"
    existed = target.is_file()
    return store_labelled(data, label, root, suffix), not existed


REVIEW_INDEX = "review.csv"  # in the review folder: each copied row, its probabilities
NOT_COPIED = ("error",)  # statuses with no image to look at: listed in the output only


def read_rows(predictions: Path, fmt: str) -> list[dict[str, str]]:
    """The rows of a predictions file `digitflow predict` wrote (CSV or JSONL), as text."""
    with open(predictions, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        if fmt == "csv":
            return list(csv.DictReader(fh))
        rows = [json.loads(line) for line in fh if line.strip()]
    return [{k: "" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
             for k, v in row.items()} for row in rows]  # fmt: skip


def copy_for_review(predictions: Path, fmt: str, review_dir: Path) -> int:
    """Copy the rows flagged for review into ``review_dir/<predicted label>/``; how many.

    An `empty` row goes to ``empty/``. Each copy is named by its content hash and its
    original name (two files of one name never collide); ``review.csv`` lists the copies
    with their original path and probabilities, so a person confirms a label by moving the
    file into ``data/labeled/<label>/`` or with ``digitflow label FILE --as N``.
    """
    rows = [r for r in read_rows(predictions, fmt) if r.get("review") == "true"]
    index = []
    for row in rows:
        if row["status"] in NOT_COPIED:
            continue
        source = Path(row["path"])
        try:
            data, _ = read_image_bytes(source)  # bounded, and still the image predict read
        except NotAnImage as exc:
            log.warning("not copied for review: %s", exc)
            continue
        folder = review_dir / (row["label"] if row["status"] == "ok" else row["status"])
        target = folder / f"{hashlib.sha256(data).hexdigest()[:16]}_{source.name}"
        with atomic_open(target, "wb") as fh:
            fh.write(data)
        index.append({"copy": str(target), **row})
    if index:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(index[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(index)
        atomic_write_text(review_dir / REVIEW_INDEX, buffer.getvalue())
    return len(index)
