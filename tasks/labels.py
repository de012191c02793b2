"""The labelled-images inbox: ``data/labeled/<label>/<sha256>.<ext>``, one file per image.

An image is stored under the label a person gave it, named by the SHA-256 of its bytes:
the same image labelled twice is one file, and two labels of one image are two files
(a disagreement that whoever reviews the inbox sees). Writes are atomic (a hidden temp
file in the label's folder, then a rename): a reader never sees a half-written image,
and the hidden temp file is skipped by `digitflow predict`'s folder walk.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from tasks.io import atomic_open

N_LABELS = 10  # the digits 0..9
SUFFIX = re.compile(r"\.[a-z0-9]{1,5}")  # ".png", ".jpg", ".webp": no separators, no dots


def store_labelled(data: bytes, label: int, root: Path, suffix: str) -> Path:
    """Store ``data`` as ``root/<label>/<sha256><suffix>`` atomically; return its path.

    Deduplicated: an image already stored under this label is not written again. Raises
    ValueError for a label outside 0..9, a suffix that is not ``.`` and 1-5 lowercase
    letters or digits, and empty ``data``.
    """
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < N_LABELS:
        raise ValueError(f"label must be a digit 0-{N_LABELS - 1}, got {label!r}")
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
