"""The IDX file format of MNIST: parse with checks, write (for tests and tools).

Header: 2 zero bytes, a type code (0x08 = uint8), the number of dimensions, then
one big-endian uint32 per dimension; the data follows, row-major.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from tasks.digits import N_CLASSES
from tasks.errors import WorkError

UINT8 = 0x08


class IdxError(WorkError, ValueError):
    """An IDX file is malformed, truncated or not what was expected."""


MAX_HEADER = 4 + 4 * 3  # the longest header: 3 dims


def parse_header(head: bytes, name: str = "<bytes>") -> tuple[int, tuple[int, ...]] | None:
    """(header length, shape) from the first bytes of an IDX file; None while incomplete.

    The one rule for an IDX header, shared by :func:`parse_idx` and the download's
    streaming size cap (the header fixes the file's exact size).
    """
    if len(head) < 4:
        return None
    zero, dtype, ndim = struct.unpack(">HBB", head[:4])
    if zero != 0 or dtype != UINT8 or not 1 <= ndim <= 3:
        raise IdxError(
            f"{name}: bad IDX magic number 0x{int.from_bytes(head[:4], 'big'):08x} "
            "(expected 0x00000801 labels or 0x00000803 images)"
        )
    header = 4 + 4 * ndim
    if len(head) < header:
        return None
    return header, struct.unpack(f">{ndim}I", head[4:header])


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes into a uint8 array, checking header and length."""
    parsed = parse_header(data, name)
    if parsed is None:
        what = "too short for an IDX header" if len(data) < 4 else "truncated IDX header"
        raise IdxError(f"{name}: {what} ({len(data)} bytes)")
    header, shape = parsed
    expected = int(np.prod(shape, dtype=np.int64))
    got = len(data) - header
    if got != expected:
        raise IdxError(
            f"{name}: {'truncated' if got < expected else 'trailing data'}: header says "
            f"shape {shape} ({expected} bytes of data), file has {got}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(path: Path) -> np.ndarray:
    """Read a raw or gzipped IDX file."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise IdxError(f"{path}: corrupt gzip data: {exc}") from exc
    return parse_idx(raw, str(path))


def read_images(path: Path) -> np.ndarray:
    """(N, 28, 28) uint8 images; anything else is an IdxError naming the file."""
    arr = read_idx(path)
    if arr.ndim != 3 or arr.shape[1:] != (28, 28):
        raise IdxError(f"{path}: expected images of shape (N, 28, 28), got {arr.shape}")
    return arr


def read_labels(path: Path) -> np.ndarray:
    """(N,) uint8 labels, each a class (0..9)."""
    arr = read_idx(path)
    if arr.ndim != 1:
        raise IdxError(f"{path}: expected a 1-d label file, got shape {arr.shape}")
    if arr.size and arr.max() >= N_CLASSES:
        raise IdxError(f"{path}: label {int(arr.max())} out of range 0..{N_CLASSES - 1}")
    return arr


def encode_idx(arr: np.ndarray) -> bytes:
    """IDX bytes of a uint8 array (1 to 3 dims)."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = struct.pack(">HBB", 0, UINT8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> Path:
    """Write ``arr`` as an IDX file (gzipped when ``gz``)."""
    data = encode_idx(arr)
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path
