"""Batch predictions: files, folders and globs in, one CSV/JSONL row per file out.

Streaming and memory-bounded: the sorted list of paths is the only thing that
grows with the input (~100 bytes a file). Files are decoded and preprocessed in
worker processes (tasks.prepare_pool: started once per process; small inputs in
threads) with a bounded number of chunks in flight; each prepared input is a
784-byte 28x28 image, batched for the network here and written out, in input
order, as soon as its batch is done. The output goes to a temp file renamed at
the end, so an interrupted run leaves no half-written file. The CLI, the DVC
predict stage and the batch_predict flow all run ``iter_predictions``.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import functools
import glob
import heapq
import json
import os
import stat
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from tasks.config import PredictParams
from tasks.decode import read_header
from tasks.digits import N_CLASSES
from tasks.errors import DigitflowError, WorkError
from tasks.io import atomic_open
from tasks.prepare_pool import (
    IMAGE_SUFFIXES,
    MIN_FILES_FOR_PROCESSES,
    PreparedStream,
    is_image_named_dir,
)
from tasks.preprocess import Prepared, set_opencv_threads

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch is imported where it is used, not here: `digitflow predict` starts its decode
# workers first, and they decode while this process imports torch and loads the model.

FORMATS = ("csv", "jsonl")
PROB_DECIMALS = 6  # probabilities in the output: enough to rank, short enough to diff
# predict's defaults where no params.yaml is read (library calls, the flows' defaults): the
# one place they are set is tasks/config.py PredictParams
DEFAULTS = PredictParams()

# bytes read to tell an image from another file in a folder walk: every header read_header
# knows fits (a TIFF whose directory lies further on, named without .tif, counts as other)
SNIFF_BYTES = 4096
NON_FINITE_MESSAGE = "the network's output is not finite (NaN or infinity): no prediction"
JIT_DEPRECATION = r"`torch\.jit\.\w+` is deprecated"  # torch.jit FutureWarnings
INFER_SLICE = 64  # images per network call (see Classifier.probabilities)
HELD_ROWS_PER_IMAGE = 4  # rows held back for a batch: at most 4 x batch_size (bounded memory)
PROBLEMS_KEPT = 10  # non-ok rows a summary keeps for the log (the output file has them all)
OUTPUT_ERRORS = "surrogateescape"  # undecodable file-name bytes are written back as they were
# json.dumps escapes every control character below 0x20, but with ensure_ascii=False it
# leaves NEL, LINE SEPARATOR and PARAGRAPH SEPARATOR raw, and str.splitlines() breaks a
# record there: escaped too, so one record is one line for any reader.
JSON_LINE_BREAKS = str.maketrans({c: f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"})


class PredictUsageError(DigitflowError, ValueError):
    """The command cannot run at all (no inputs, bad options); exit code 2."""


class PredictOutputError(WorkError):
    """The output file could not be written (a full disk); exit code 1, the old file kept."""


# errors of writing a file that are no bug: the output's file system refused the bytes
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})


@dataclass
class Row:
    """One output row: a file and its prediction, or why there is none."""

    path: str
    status: str  # "ok" | "empty" | "error"
    message: str = ""
    label: str | None = None  # class name of the most probable class, when ok
    confidence: float | None = None  # its softmax probability
    probs: list[float] | None = None  # (10,) softmax probabilities, when ok
    review: bool = False  # a person should check it (needs_review); set when written


@dataclass
class PredictSummary:
    """What a run produced; ``ok + empty + error == total``."""

    out_path: Path
    total: int = 0
    ok: int = 0
    empty: int = 0
    error: int = 0
    skipped: int = 0  # files of the folder walks that are not images: no row
    review: int = 0  # rows flagged for review (needs_review), of any status
    seconds: float = 0.0
    first_problems: list[Row] = field(default_factory=list)  # the first non-ok rows, for the log

    @property
    def failed(self) -> int:
        return self.total - self.ok

    def count(self, row: Row) -> None:
        self.total += 1
        setattr(self, row.status, getattr(self, row.status) + 1)
        self.review += row.review
        if row.status != "ok" and len(self.first_problems) < PROBLEMS_KEPT:
            self.first_problems.append(row)


# --------------------------------------------------------------------------- inputs


def _walk(top: str) -> Iterator[str]:
    """Every non-hidden file under ``top``; folders named like images are yielded, not walked.

    Hidden entries (.DS_Store, .git, a run's own temp files) are skipped. Symlinked
    folders are followed, after the real folders (so files are listed under their
    real path first), each folder once: a symlink to a folder already searched (a
    cycle, or a second way to the same folder) is yielded itself and gets an error
    row saying so. A folder that cannot be listed is yielded too (its row says why).
    Nothing found is dropped silently.

    Iterative, with a stack of folders, rather than os.walk: os.walk recurses once per
    level in Python 3.11, so a tree 1,000 folders deep ended in a RecursionError.
    """
    visited: set[tuple[int, int]] = set()  # (st_dev, st_ino) of the folders searched
    links: list[str] = []  # symlinked folders still to follow (a heap: sorted order)
    unreadable: list[str] = []  # folders that cannot be listed: their row says so

    def walk_real(start: str) -> Iterator[str]:
        stack = [start]  # folders still to list; symlinked ones go to ``links`` instead
        while stack:
            root = stack.pop()
            try:
                st = os.stat(root)
            except OSError:
                st = None
            if st is not None:
                if (st.st_dev, st.st_ino) in visited:  # reached again through a symlink
                    yield root
                    continue
                visited.add((st.st_dev, st.st_ino))
            try:
                with os.scandir(root) as it:
                    entries = list(it)
            except OSError:
                unreadable.append(root)
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    is_dir = entry.is_dir()  # follows symlinks, like os.walk
                except OSError:  # its row says what is wrong with it
                    is_dir = False
                if not is_dir:
                    yield entry.path
                elif is_image_named_dir(entry.name):
                    yield entry.path  # becomes an error row: "is a folder"
                elif entry.is_symlink():
                    heapq.heappush(links, entry.path)
                else:
                    stack.append(entry.path)

    yield from walk_real(top)
    while links:
        yield from walk_real(heapq.heappop(links))  # the walk follows its own top
    yield from unreadable


def is_other_file(path: str) -> bool:
    """A readable regular file that is not an image by its suffix nor by its first bytes.

    What a folder walk skips (a README, a sources.csv). Anything that cannot be read as a
    regular file is not "other": its row says what is wrong with it. Opened non-blocking,
    so a FIFO cannot hang the walk.
    """
    if os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        head = os.read(fd, SNIFF_BYTES)
    except OSError:
        return False
    finally:
        os.close(fd)
    return read_header(head) is None


@dataclass
class Inputs:
    """The files to classify, sorted, and how many other files the folder walks skipped."""

    paths: list[str]
    skipped: int = 0
    # the output file, where an input named it or a folder walk found it as an image: the
    # run would replace an input (plan_inputs refuses it)
    out_among: list[str] = field(default_factory=list)


def expand_inputs(inputs: Iterable[Path | str], exclude: Iterable[Path] = ()) -> Inputs:
    """Files, folders (recursive) and glob patterns -> sorted, de-duplicated path strings.

    A path that does not exist and a pattern that matches nothing are kept as they
    are, so they get an error row instead of vanishing. ``exclude`` (the output
    file) is left out. Files found in a folder that are not images (is_other_file)
    are skipped and counted; a file named on the command line always gets its row.
    """
    excluded = {os.path.realpath(p) for p in exclude}
    excluded_names = {os.path.basename(p) for p in excluded}
    found: set[str] = set()
    walked: set[str] = set()
    for item in inputs:
        arg = os.fspath(item)
        if os.path.isdir(arg) and not is_image_named_dir(arg):
            matches: Iterable[str] = [arg]
        elif not os.path.lexists(arg) and glob.has_magic(arg):
            try:
                matches = glob.glob(arg, recursive=True) or [arg]
            except RecursionError as exc:  # glob's ** recurses once a level (Python 3.11)
                raise PredictUsageError(
                    f"pattern {arg}: the folders are too deep for **; pass the folder "
                    "itself (folders are searched at any depth)"
                ) from exc
        else:
            matches = [arg]
        for m in matches:
            if os.path.isdir(m) and not is_image_named_dir(m):
                walked.update(os.path.normpath(p) for p in _walk(m))
            else:
                found.add(os.path.normpath(m))
    others = {p for p in walked - found if is_other_file(p)}
    # realpath (a few syscalls) only for files named like an excluded one
    dropped = {
        p
        for p in (found | walked) - others
        if os.path.basename(p) in excluded_names and os.path.realpath(p) in excluded
    }
    paths = sorted((found | walked) - others - dropped)
    return Inputs(paths, skipped=len(others), out_among=sorted(dropped))


# --------------------------------------------------------------------------- inference


_threads_lock = threading.Lock()
_threads_users = 0
_threads_before = (0, 0)  # torch, OpenCV thread counts to restore when the last user leaves


@contextlib.contextmanager
def _compute_threads() -> Iterator[None]:
    """One intra-op thread for torch and OpenCV while predicting.

    Parallelism comes from the decode pool overlapping with inference; for this
    small CNN, torch's own threads are slower than one (measured on 2 cores at
    batch 64: 2 threads 1.4k img/s, 1 thread 5k img/s). The settings are
    process-wide, so concurrent chunks (flow tasks in threads) share one
    reference-counted setting.
    """
    import torch

    global _threads_users, _threads_before
    with _threads_lock:
        if _threads_users == 0:
            _threads_before = (torch.get_num_threads(), set_opencv_threads(1))
            torch.set_num_threads(1)
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_before[0])
                set_opencv_threads(_threads_before[1])


@dataclass
class Classifier:
    """A model file's network, ready for fast CPU inference, with its normalization."""

    forward: Callable[[torch.Tensor], torch.Tensor]  # (B, 1, 28, 28) float32 -> (B, C) logits
    mean: float
    std: float
    classes: list[str]

    @classmethod
    def from_file(cls, path: Path | str) -> Classifier:
        """Load (safely: ModelFileError for anything not ours) and freeze for inference."""
        import torch

        from tasks.model import load_model

        loaded = load_model(Path(path))
        example = torch.zeros(INFER_SLICE, 1, 28, 28)
        return cls(_frozen(loaded.model, example), loaded.mean, loaded.std, loaded.classes)

    def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        """(B, 28, 28) uint8 images -> (B, C) float64 softmax probabilities."""
        import torch

        from tasks.model import normalize_uint8

        x = normalize_uint8(torch.from_numpy(np.stack(images)), self.mean, self.std)
        with torch.inference_mode():
            # slices of 64 keep the first conv's activations (64x64x26x26 floats, 11 MB)
            # in cache: 2.9x faster than 256 at once, and the outputs are identical
            logits = torch.cat(
                [self.forward(x[i : i + INFER_SLICE]) for i in range(0, len(x), INFER_SLICE)]
            )
        return torch.softmax(logits.double(), dim=1).numpy()


def cached_classifier(path: Path | str) -> Classifier:
    """``Classifier.from_file``, kept while the file is unchanged: chunks load it once."""
    st = os.stat(path)
    return _cached_classifier(os.path.realpath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=2)  # the model of this run, and one more (a retrain's candidate)
def _cached_classifier(real: str, mtime_ns: int, size: int) -> Classifier:
    return Classifier.from_file(real)


def _frozen(model: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The eval-mode network traced and frozen: conv+ReLU fused, weights pre-packed for oneDNN.

    Measured on this 2-core CPU, batch 64, seed CNN: 11k img/s vs 4.8k eager, same
    outputs bit for bit; 60 ms to build. torch.jit is deprecated in favour of
    torch.compile, whose compile time here would be longer than a whole run.
    """
    # only the deprecation notices, see above; a filter rather than catch_warnings(),
    # which is not thread-safe (chunk tasks build classifiers in parallel threads)
    import torch

    warnings.filterwarnings("ignore", message=JIT_DEPRECATION, category=FutureWarning)
    with torch.inference_mode():
        traced = torch.jit.trace(model, example, check_trace=False)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced))


def prediction_row(path: str, probs: np.ndarray, classes: list[str]) -> Row:
    """The row of an image the network saw: ``ok``, or ``error`` when ``probs`` is not finite.

    Finite weights can still overflow on some input (NaN or infinite logits): such an
    output is no prediction, whatever argmax would say.
    """
    if not np.isfinite(probs).all():
        return Row(path, "error", NON_FINITE_MESSAGE)
    k = int(np.argmax(probs))
    rounded = [round(float(v), PROB_DECIMALS) for v in probs]
    return Row(path, "ok", "", classes[k], float(probs[k]), rounded)


def iter_predictions(
    paths: Sequence[str],
    classifier: Classifier,
    batch_size: int,
    workers: int,
    preprocess: bool = True,
    debug_dir: Path | None = None,
    index_offset: int = 0,
    stream: PreparedStream | None = None,
) -> Iterator[Row]:
    """One Row per path, in order. Holds at most ``batch_size`` prepared images at a time.

    ``index_offset`` is the position of ``paths[0]`` in the whole input (debug file names).
    ``stream``: the decoding of ``paths``, already started (default: started here).
    """
    held: list[tuple[str, Prepared]] = []  # rows waiting for their batch, in order
    n_images = 0

    def flush() -> Iterator[Row]:
        images = [p.image for _, p in held if p.image is not None]
        probs = iter(classifier.probabilities(images)) if images else iter(())
        for path, prep in held:
            if prep.image is None:
                yield Row(path, prep.status, prep.message)
                continue
            yield prediction_row(path, next(probs), classifier.classes)

    if stream is None:
        stream = PreparedStream(paths, workers, preprocess, debug_dir, index_offset)
    for item in stream:
        held.append(item)
        n_images += item[1].image is not None
        # a full batch, or many rows without images (a folder of broken files) waiting
        if n_images >= batch_size or len(held) >= HELD_ROWS_PER_IMAGE * batch_size:
            yield from flush()
            held, n_images = [], 0
    if held:
        yield from flush()


# --------------------------------------------------------------------------- output


def needs_review(row: Row, review_below: float) -> bool:
    """True where the row is not to be trusted: no prediction, or confidence < review_below.

    A plain threshold on the softmax confidence (params.yaml predict.review_below); an
    empty or unreadable file has no prediction to trust, so it is flagged too.
    """
    return row.status != "ok" or row.confidence is None or row.confidence < review_below


def _label_json(label: str | None) -> int | str | None:
    return int(label) if label is not None and label.isdigit() else label


def columns(n_classes: int = N_CLASSES) -> list[str]:
    """The output schema: path, label, confidence, p0..p{n-1}, status, message, review."""
    probs = [f"p{i}" for i in range(n_classes)]
    return ["path", "label", "confidence", *probs, "status", "message", "review"]


class RowWriter:
    """Writes rows as CSV (header + one line each) or JSON Lines to an open text file."""

    def __init__(self, fh: IO[str], fmt: str, n_classes: int = N_CLASSES) -> None:
        if fmt not in FORMATS:
            raise PredictUsageError(f"unknown output format {fmt!r} (use one of {FORMATS})")
        self.fh, self.fmt, self.n_classes = fh, fmt, n_classes
        self.columns = columns(n_classes)
        self._csv = self._csv_quoted = None
        if fmt == "csv":
            self._csv = csv.writer(fh, lineterminator="\n")
            # QUOTE_MINIMAL quotes a field holding the delimiter, a quote or a character of
            # the line terminator ("\n"), but not a lone "\r" (Python 3.11), which a reader
            # takes for the end of the row: rows holding one are written fully quoted.
            self._csv_quoted = csv.writer(fh, lineterminator="\n", quoting=csv.QUOTE_ALL)
            self._csv.writerow(self.columns)

    def write(self, row: Row) -> None:
        ok = row.probs is not None
        conf = round(row.confidence, PROB_DECIMALS) if row.confidence is not None else None
        if self._csv is not None:
            probs = [f"{p:.{PROB_DECIMALS}f}" for p in row.probs] if ok else [""] * self.n_classes
            conf_s = f"{conf:.{PROB_DECIMALS}f}" if conf is not None else ""
            review = "true" if row.review else "false"
            fields = [row.path, row.label or "", conf_s, *probs, row.status, row.message, review]
            quoted = any("\r" in f for f in (row.path, row.label or "", row.message))
            (self._csv_quoted if quoted else self._csv).writerow(fields)
        else:
            record: dict[str, Any] = {
                "path": row.path, "label": _label_json(row.label), "confidence": conf,
            }  # fmt: skip
            record.update({f"p{i}": (row.probs[i] if ok else None) for i in range(self.n_classes)})
            record.update(status=row.status, message=row.message, review=row.review)
            line = json.dumps(record, ensure_ascii=False).translate(JSON_LINE_BREAKS)
            self.fh.write(line + "\n")


@contextlib.contextmanager
def open_output(out_path: Path, fmt: str, n_classes: int = N_CLASSES) -> Iterator[RowWriter]:
    """A RowWriter on a temp file next to ``out_path``, renamed over it when the block succeeds.

    UTF-8, with ``surrogateescape``: a file name that is not valid UTF-8 (os.fsdecode
    turned its bad bytes into lone surrogates) is written as its original bytes, so
    ``open(out, encoding="utf-8", errors="surrogateescape")`` and ``os.fsencode(path)``
    give the file back; every other name is plain UTF-8.
    """
    with atomic_open(out_path, "w", encoding="utf-8", errors=OUTPUT_ERRORS, newline="") as fh:
        yield RowWriter(fh, fmt, n_classes)


def progress_bar(total: int, enabled: bool | None, desc: str) -> tqdm:
    """A bar over ``total`` images on stderr; ``enabled=None``: only on a terminal.

    tqdm's ``disable=None`` switches itself off when stderr is not a TTY, so logs stay
    clean in DVC and CI.
    """
    disable = None if enabled is None else not enabled
    return tqdm(
        total=total, unit="img", desc=desc, dynamic_ncols=True, leave=False, disable=disable
    )


def _check_folder_writable(folder: Path, what: str) -> None:
    """PredictUsageError naming ``what`` unless files can be created in ``folder``.

    A missing ``folder`` is made later: its nearest existing ancestor must be a folder
    that can be written.

    That folder is tried with a real temp file, created and removed: permission bits
    tell nothing for root, nor for read-only mounts.
    """
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PredictUsageError(f"{what}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".digitflow-probe.", suffix=".tmp")
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise PredictUsageError(f"{what}: cannot write in {existing} ({reason})") from exc
    os.close(fd)
    os.unlink(probe)


def _check_out_file(out_path: Path, model_path: Path | None) -> None:
    """PredictUsageError unless ``out_path`` is absent or a regular file other than the model.

    A symlink is refused, not followed: the atomic rename would replace the link itself
    and leave its target with stale results, and writing through it would change a file
    elsewhere; the message names the target to pass instead.
    """
    if not os.path.lexists(out_path):
        return
    st = os.lstat(out_path)
    if stat.S_ISLNK(st.st_mode):
        raise PredictUsageError(
            f"output path {out_path} is a symlink (to {os.path.realpath(out_path)}): "
            "pass the file itself"
        )
    if stat.S_ISDIR(st.st_mode):
        raise PredictUsageError(f"output path {out_path} is a folder")
    if not stat.S_ISREG(st.st_mode):
        raise PredictUsageError(f"output path {out_path} is not a regular file")
    if (
        model_path is not None
        and os.path.exists(model_path)
        and os.path.samefile(out_path, model_path)
    ):
        raise PredictUsageError(f"output path {out_path} is the model file")


def _hard_link_among(out_path: Path, paths: Sequence[str]) -> str | None:
    """The input that is another name (a hard link) of the existing ``out_path``, if any.

    The inputs are looked at only when the output file has more than one name: the
    common case costs one stat.
    """
    try:
        st = os.stat(out_path)
    except FileNotFoundError:
        return None
    if st.st_nlink < 2:
        return None
    for path in paths:
        try:
            other = os.stat(path)
        except OSError:  # a missing or unreadable input: its own error row says so later
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            return path
    return None


def check_options(
    out_path: Path,
    fmt: str,
    batch_size: int,
    workers: int,
    debug_dir: Path | None = None,
    model_path: Path | None = None,
) -> None:
    """Raise PredictUsageError for options that cannot work, before any work is done.

    ``--out`` must be absent or a regular file, not a symlink, not the model file
    (``model_path``); plan_inputs also refuses one that is an input.
    """
    if fmt not in FORMATS:
        raise PredictUsageError(f"unknown output format {fmt!r} (use one of {FORMATS})")
    if batch_size < 1:
        raise PredictUsageError(f"batch size must be >= 1, got {batch_size}")
    if workers < 1:
        raise PredictUsageError(f"workers must be >= 1, got {workers}")
    out_path = Path(out_path)
    _check_out_file(out_path, model_path)
    _check_folder_writable(out_path.absolute().parent, f"output path {out_path}")
    if debug_dir is not None:
        _check_folder_writable(Path(debug_dir).absolute(), f"debug folder {debug_dir}")


# --------------------------------------------------------------------------- entry points


def plan_inputs(
    inputs: Iterable[Path | str],
    out_path: Path,
    fmt: str,
    batch_size: int,
    workers: int,
    debug_dir: Path | None = None,
    model_path: Path | None = None,
) -> Inputs:
    """Check the options, then expand ``inputs``: the sorted files to classify.

    The first step of `digitflow predict` and of the batch_predict flow. Raises
    PredictUsageError for options that cannot work (``--out`` one of the inputs or the
    model, see check_options) and when there is nothing to do. An earlier output found
    in an input folder (a CSV, not an image) is left out of the inputs, not refused.
    """
    check_options(out_path, fmt, batch_size, workers, debug_dir, model_path)
    planned = expand_inputs(inputs, exclude=[out_path])
    if planned.out_among:
        raise PredictUsageError(
            f"output path {out_path} is one of the inputs ({planned.out_among[0]})"
        )
    linked = _hard_link_among(Path(out_path), planned.paths)
    if linked is not None:
        raise PredictUsageError(f"output path {out_path} is a hard link to the input {linked}")
    if not planned.paths:
        raise PredictUsageError(
            f"no input files (the folders are empty or hold only hidden files"
            f"{f' and {planned.skipped} non-image files' if planned.skipped else ''})"
        )
    return planned


def write_predictions(
    rows: Iterable[Row],
    out_path: Path,
    fmt: str,
    n_classes: int,
    total: int,
    progress: bool | None = None,
    desc: str = "predict",
    review_below: float = DEFAULTS.review_below,
) -> PredictSummary:
    """Write ``rows`` (``total`` of them, in order) to ``out_path`` atomically; count them.

    The last step of `digitflow predict` and of the batch_predict flow: the same
    bytes whoever computed the rows. ``progress``: a bar over the rows (None: on a
    terminal). Each row's ``review`` flag is set here (needs_review, ``review_below``).
    """
    summary = PredictSummary(out_path=Path(out_path))
    try:
        with (
            progress_bar(total, progress, desc) as bar,
            open_output(Path(out_path), fmt, n_classes) as writer,
        ):
            for row in rows:
                row.review = needs_review(row, review_below)
                writer.write(row)
                summary.count(row)
                bar.update(1)
    except OSError as exc:
        if exc.errno not in OUTPUT_ERRNOS:
            raise
        raise PredictOutputError(
            f"cannot write {out_path}: {exc.strerror}; nothing written "
            "(an earlier file there is kept)"
        ) from exc
    return summary


def predict_paths(
    inputs: Sequence[Path | str],
    model_path: Path,
    out_path: Path,
    fmt: str = "csv",
    batch_size: int = DEFAULTS.batch_size,
    workers: int = DEFAULTS.workers,
    preprocess: bool = True,
    debug_dir: Path | None = None,
    progress: bool | None = None,
    review_below: float = DEFAULTS.review_below,
) -> PredictSummary:
    """Classify every image under ``inputs`` into ``out_path`` (CSV or JSONL), atomically.

    Raises PredictUsageError when there is nothing to do and ModelFileError when
    ``model_path`` is not a digitflow model. Bad input files never raise: each gets
    a row with status "error" or "empty" and a message.
    """
    t0 = time.perf_counter()
    planned = plan_inputs(
        inputs, Path(out_path), fmt, batch_size, workers, debug_dir, Path(model_path)
    )
    paths = planned.paths
    debug = None if debug_dir is None else Path(debug_dir)
    stream = None
    if debug is None and workers > 1 and len(paths) >= MIN_FILES_FOR_PROCESSES:
        # decoding starts in the worker processes while torch loads the model (a bad model
        # file still refuses the run: nothing is written before it is checked)
        stream = PreparedStream(paths, workers, preprocess, None)
    try:
        classifier = Classifier.from_file(model_path)  # ModelFileError: refused, nothing run
        if debug is not None:
            debug.mkdir(parents=True, exist_ok=True)
        with _compute_threads():
            rows = iter_predictions(
                paths, classifier, batch_size, workers, preprocess, debug, stream=stream
            )
            summary = write_predictions(
                rows, out_path, fmt, len(classifier.classes), len(paths), progress, "predict",
                review_below,
            )  # fmt: skip
    finally:
        if stream is not None:
            stream.close()
    summary.skipped = planned.skipped
    summary.seconds = time.perf_counter() - t0
    return summary


def predict_chunk(
    paths: Sequence[str],
    model_path: Path | str,
    batch_size: int,
    workers: int,
    preprocess: bool = True,
    debug_dir: Path | str | None = None,
    index_offset: int = 0,
) -> list[Row]:
    """Rows for one chunk of already expanded paths (the unit of work of the batch flow).

    ``index_offset`` is the chunk's position in the whole input (debug file names).
    """
    classifier = cached_classifier(model_path)
    if debug_dir is not None:
        Path(debug_dir).mkdir(parents=True, exist_ok=True)
    debug = None if debug_dir is None else Path(debug_dir)
    with _compute_threads():
        return list(
            iter_predictions(
                paths, classifier, batch_size, workers, preprocess, debug, index_offset
            )
        )


def chunked(items: Sequence[str], size: int) -> list[Sequence[str]]:
    """``items`` in consecutive slices of ``size`` (the last may be shorter)."""
    return [items[i : i + size] for i in range(0, len(items), max(1, size))]
