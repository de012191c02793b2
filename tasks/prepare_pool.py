"""Decode + preprocess in worker processes: started once per process, reused by every run.

Decoding and preprocessing hold the GIL for much of their time (Pillow's header
parse, numpy's small calls) and tasks.decode serializes two steps process-wide
(Pillow's header reads, the C-stderr capture around a JPEG decode), so threads do
not scale: worker processes do. The pool is started at the first large input and
kept for the life of the process (the batch_predict flow's chunks, a test session
reuse it): start-up is paid once. The workers are forked from a forkserver that has
imported this module (numpy, OpenCV, Pillow; not torch). As with any
multiprocessing use, each worker also imports the main script (``digitflow``: the
CLI, no torch; ``python -m``: nothing), so a script calling predict_paths needs the
usual ``if __name__ == "__main__":`` guard.

Small inputs (fewer than ``MIN_FILES_FOR_PROCESSES`` files) and daemonic processes
(a Dask worker cannot have children) use threads in the calling process instead:
the same function on the same files, so the same rows.

A per-file deadline (``FILE_DEADLINE_S``) holds everywhere. A C decoder cannot be
interrupted, so in worker processes a watchdog thread ends the worker that overran and
the parent gives that file an error row and carries on in a fresh pool; in threads
(files one task each) the caller stops waiting for the late file, gives it its row and
leaves its daemon thread to finish alone (a new thread takes its place).

This module imports no torch: the workers stay small.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import multiprocessing
import os
import queue
import re
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from tasks.preprocess import Prepared, encode_png, prepare_file, set_opencv_threads

# Suffixes of the formats OpenCV decodes: a folder named like this is reported, not walked.
IMAGE_SUFFIXES = frozenset(
    {
        ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".tif", ".tiff", ".webp",
        ".gif", ".pbm", ".pgm", ".ppm", ".pnm", ".pxm", ".sr", ".ras", ".exr", ".hdr", ".pic",
        ".jp2", ".j2k", ".jpf", ".jpx", ".pfm", ".avif",
    }
)  # fmt: skip
# Files per task: amortizes a task's round trip to a worker process (~0.2 ms) over
# 64 PNGs (~0.2 ms each) while keeping chunks small enough to balance two workers.
DECODE_CHUNK = 64
# Chunks queued per worker: keeps them busy and lets them decode ahead while the caller
# starts (imports torch, loads the model): 2 x 16 x 64 files, ~1.6 MB of 28x28 results.
IN_FLIGHT_PER_WORKER = 16
# Below this many files the calling process decodes them itself, in threads: no pool
# to start for one photo (a forkserver and its workers take ~0.5 s of CPU to start).
MIN_FILES_FOR_PROCESSES = 2 * DECODE_CHUNK
MNIST_SHAPE = (28, 28)  # a Prepared image
# bytes of the input's name kept in a debug image's name: with the index and ".png",
# well under NAME_MAX (255 bytes on Linux and macOS file systems)
DEBUG_NAME_BYTES = 200
# A file still decoding after this long is stopped and gets an error row: ~100x the
# slowest real photo (a 12 MP phone JPEG decodes and preprocesses in ~0.2 s on one core).
FILE_DEADLINE_S = 20.0
DEADLINE_EXIT = 86  # a worker's exit status when its watchdog stopped it
INTERNAL_ERROR = "internal error"  # how a bug's row message starts (the API answers it 500)

log = logging.getLogger(__name__)
_logged_bugs: set[tuple[str, str, int]] = set()  # (exception type, file, line) logged here
_logged_lock = threading.Lock()
_pools: dict[tuple[int, float], _Pool] = {}  # (workers, deadline) -> this process's pool
_pools_lock = threading.Lock()


def is_image_named_dir(path: str) -> bool:
    """A path whose suffix is an image format's (a folder named so is reported, not walked)."""
    return os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES


def debug_name(index: int, path: str) -> str:
    """A safe, unique file name for the debug image of input number ``index``."""
    name = os.path.basename(path).encode("utf-8", "backslashreplace").decode("utf-8")
    safe = re.sub(r"[^\w.-]", "_", name)
    # cut by bytes, not characters: 100 CJK characters are 300 bytes, past NAME_MAX (255)
    safe = safe.encode("utf-8")[:DEBUG_NAME_BYTES].decode("utf-8", "ignore")
    return f"{index:07d}_{safe}.png"


def _prepare_one(path: str, index: int, preprocess: bool, debug_dir: Path | None) -> Prepared:
    """Decode + preprocess one file, its debug image written; bad input is a row, not a raise."""
    prep = prepare_file(path, preprocess=preprocess)
    if prep.status == "error" and prep.message == "no such file" and glob.has_magic(path):
        prep = Prepared(None, "error", "no file matches this pattern")
    elif prep.message.startswith("is a folder") and not is_image_named_dir(path):
        real = os.path.realpath(path)
        if real != os.path.abspath(path):  # the walk reached it again through a symlink
            message = f"symlink to a folder already searched ({real}): not searched twice"
            prep = Prepared(None, "error", message)
    if debug_dir is not None and prep.image is not None:
        try:
            (debug_dir / debug_name(index, path)).write_bytes(encode_png(prep.image))
        except OSError as exc:  # a full disk, a folder removed meanwhile
            return Prepared(None, "error", f"cannot write its debug image: {exc.strerror or exc}")
    return prep


def _bug_row(path: str, exc: Exception) -> Prepared:
    """The row of a file whose decoding or preprocessing raised (a bug, not bad input).

    The batch goes on; the bug is logged with its traceback once per process and place
    it was raised from (a folder of such files logs it once, not once a file).
    """
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = (type(exc).__name__, frame.filename, frame.lineno or 0) if frame else None
    with _logged_lock:
        first = where not in _logged_bugs
        _logged_bugs.add(where or (type(exc).__name__, "", 0))
    if first:
        log.error("internal error on %s (logged once; its row says so)", path, exc_info=exc)
    return Prepared(None, "error", f"{INTERNAL_ERROR}: {type(exc).__name__}: {exc}")


def prepare_chunk(
    paths: Sequence[str], start: int, preprocess: bool, debug_dir: Path | None
) -> list[Prepared]:
    """Decode + preprocess a few files (in a worker process or a pool thread).

    Never raises for one file: whatever goes wrong with it becomes its error row.
    """
    out = []
    for i, path in enumerate(paths):
        try:
            prep = _prepare_one(path, start + i, preprocess, debug_dir)
        except Exception as exc:  # a bug on one odd file must not end the batch: its row
            prep = _bug_row(path, exc)
        out.append(prep)
    return out


# A chunk's results as they cross the process boundary: one (k, 28, 28) array for the
# k images and the (status, message) of every file; cheaper to pickle than k objects.
Packed = tuple[np.ndarray, list[tuple[str, str]]]


def late_row(deadline_s: float) -> Prepared:
    """The row of a file whose decoding overran the per-file deadline."""
    return Prepared(None, "error", f"decoding took longer than {deadline_s:g} s: stopped")


def _prepare_packed(
    paths: Sequence[str],
    start: int,
    preprocess: bool,
    debug_dir: Path | None,
    late: frozenset[int] = frozenset(),
) -> Packed:
    """``prepare_chunk`` in a worker process, each file watched, its results packed.

    ``late``: indexes of files that overran the deadline before (not decoded again).
    """
    assert _watchdog is not None, "runs in a worker started by process_pool"
    preps = []
    for i, path in enumerate(paths):
        if start + i in late:
            preps.append(late_row(_watchdog.deadline_s))
            continue
        _watchdog.current = (start + i, time.monotonic())
        preps.extend(prepare_chunk([path], start + i, preprocess, debug_dir))
        _watchdog.current = None
    images = [p.image for p in preps if p.image is not None]
    stacked = np.stack(images) if images else np.empty((0, *MNIST_SHAPE), np.uint8)
    return stacked, [(p.status, p.message) for p in preps]


def _unpack(packed: Packed) -> list[Prepared]:
    images, statuses = packed
    it = iter(images)
    return [
        Prepared(next(it) if status == "ok" else None, status, message)
        for status, message in statuses
    ]


class _Watchdog:
    """In a worker process: ends the process when one file overruns the deadline.

    ``current`` is the (index, start time) of the file being decoded, set by
    ``_prepare_packed``. The overrun file's index goes to ``report`` (a SimpleQueue:
    written before the exit, no feeder thread) for the parent to give it its row.
    """

    def __init__(self, deadline_s: float, report: multiprocessing.SimpleQueue) -> None:
        self.deadline_s, self.report = deadline_s, report
        self.current: tuple[int, float] | None = None
        # a tenth of the deadline: an overrun is caught within 10 %, at little cost
        self.period_s = deadline_s / 10
        threading.Thread(target=self._run, name="deadline", daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(self.period_s)
            current = self.current
            if current is not None and time.monotonic() - current[1] > self.deadline_s:
                self.report.put(current[0])
                os._exit(DEADLINE_EXIT)  # the decoder holds this thread's sibling: no cleanup


_watchdog: _Watchdog | None = None  # a worker process's own


def _init_worker(deadline_s: float, report: multiprocessing.SimpleQueue) -> None:
    """Ctrl-C goes to the whole process group: the parent stops and cancels, workers carry on.

    One OpenCV thread: the workers are the parallelism. The watchdog enforces the deadline.
    """
    global _watchdog
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_opencv_threads(1)
    _watchdog = _Watchdog(deadline_s, report)


@dataclasses.dataclass
class _Pool:
    """A pool of decode processes and the queue their watchdogs name overrun files on."""

    executor: ProcessPoolExecutor
    overruns: multiprocessing.SimpleQueue
    seen: set[int] = dataclasses.field(default_factory=set)  # overruns read so far

    def overrun(self) -> set[int]:
        """Indexes of the files whose watchdogs stopped a worker (read after it broke).

        Every stream on this pool sees them all: each picks those in its own range.
        """
        while not self.overruns.empty():
            self.seen.add(self.overruns.get())
        return set(self.seen)


def process_pool(workers: int, deadline_s: float = FILE_DEADLINE_S) -> _Pool | None:
    """This process's pool of ``workers`` decode processes; None where there can be none.

    A daemonic process (a Dask worker, a multiprocessing worker) may not start
    children: its callers decode in threads.
    """
    if multiprocessing.current_process().daemon:
        return None
    with _pools_lock:
        pool = _pools.get((workers, deadline_s))
        if pool is None:
            ctx = multiprocessing.get_context("forkserver")
            # the forkserver imports this module once; each worker is a fork of it
            ctx.set_forkserver_preload([__name__])
            overruns = ctx.SimpleQueue()
            executor = ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=_init_worker, initargs=(deadline_s, overruns)
            )
            pool = _pools[(workers, deadline_s)] = _Pool(executor, overruns)
        return pool


def _forget(pool: _Pool) -> None:
    """Drop a broken pool (a worker died: a decoder crash, OOM): the next run starts anew."""
    with _pools_lock:
        for k, p in list(_pools.items()):
            if p is pool:
                del _pools[k]
    pool.executor.shutdown(wait=False, cancel_futures=True)


class DaemonThreads:
    """Decode threads that never hold the process: ThreadPoolExecutor joins its threads at
    exit, so a decoder stuck on a late file would keep the CLI from exiting."""

    def __init__(self, n: int) -> None:
        self._queue: queue.SimpleQueue[tuple[Future, Callable, tuple] | None]
        self._queue = queue.SimpleQueue()
        self._started = 0
        for _ in range(n):
            self.add_thread()

    def add_thread(self) -> None:
        """One more thread (to take the place of one left on a late file)."""
        self._started += 1
        threading.Thread(target=self._run, name="decode", daemon=True).start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller, who raises it
                future.set_exception(exc)

    def submit(self, fn: Callable, *args: object) -> Future:
        future: Future = Future()
        self._queue.put((future, fn, args))
        return future

    def shutdown(self) -> None:
        """Each thread ends once its task is done (a cancelled future is skipped)."""
        for _ in range(self._started):
            self._queue.put(None)


def _prepare_started(
    paths: Sequence[str],
    start: int,
    preprocess: bool,
    debug_dir: Path | None,
    started: dict[int, float],
) -> list[Prepared]:
    """``prepare_chunk`` in a thread, its start time noted (by ``start``) for the deadline."""
    started[start] = time.monotonic()
    return prepare_chunk(paths, start, preprocess, debug_dir)


class PreparedStream:
    """(path, Prepared) in input order, at most ``workers * IN_FLIGHT_PER_WORKER`` chunks ahead.

    Worker processes for ``MIN_FILES_FOR_PROCESSES`` files or more (``workers`` > 1),
    else threads of this process. The first chunks are submitted when the stream is
    made, so the workers decode while the caller loads its model. ``close()`` (also
    at the end of the iteration) cancels what is still queued; running chunks finish.
    ``index_offset``: the position of ``paths[0]`` in the whole input (debug file names).
    ``deadline_s``: the per-file deadline in worker processes.
    """

    def __init__(
        self,
        paths: Sequence[str],
        workers: int,
        preprocess: bool,
        debug_dir: Path | None,
        index_offset: int = 0,
        deadline_s: float = FILE_DEADLINE_S,
    ) -> None:
        self.paths, self.preprocess, self.debug_dir = paths, preprocess, debug_dir
        self.index_offset = index_offset
        self.workers, self.deadline_s = max(1, workers), deadline_s
        big = self.workers > 1 and len(paths) >= MIN_FILES_FOR_PROCESSES
        self.procs = process_pool(self.workers, deadline_s) if big else None
        self.threads = None if self.procs is not None else DaemonThreads(self.workers)
        # a task: DECODE_CHUNK files in a process, one file in a thread (its own deadline)
        self.step = DECODE_CHUNK if self.procs is not None else 1
        self.max_pending = self.workers * IN_FLIGHT_PER_WORKER * DECODE_CHUNK // self.step
        self.pending: deque[tuple[int, Future]] = deque()
        self.next_start = 0
        self.late: set[int] = set()  # indexes (in paths) of files that overran the deadline
        self.started: dict[int, float] = {}  # threads: file index -> when its decoding began
        self._fill()

    def _fill(self) -> None:
        """Submit tasks until ``max_pending`` are queued or the paths run out."""
        while len(self.pending) < self.max_pending and self.next_start < len(self.paths):
            start = self.next_start
            chunk = self.paths[start : start + self.step]
            args = (chunk, self.index_offset + start, self.preprocess, self.debug_dir)
            if self.procs is not None:
                late = frozenset(self.index_offset + i for i in self.late)
                fut = self.procs.executor.submit(_prepare_packed, *args, late)
            else:
                assert self.threads is not None
                fut = self.threads.submit(_prepare_started, *args, self.started)
            self.pending.append((start, fut))
            self.next_start += self.step

    def _thread_result(self, start: int, fut: Future) -> list[Prepared]:
        """The file's rows, or its late row once it has decoded past the deadline."""
        while True:
            try:
                return fut.result(timeout=self.deadline_s / 10)  # an overrun seen within 10 %
            except TimeoutError:
                began = self.started.get(self.index_offset + start)
                if began is not None and time.monotonic() - began > self.deadline_s:
                    assert self.threads is not None
                    self.threads.add_thread()  # its thread stays with the decoder
                    return [late_row(self.deadline_s)]

    def _restart(self, first: int) -> None:
        """A worker died: note the file that overran, resubmit from ``first`` in a new pool.

        A worker that died of anything else (a decoder crash, the OOM killer) ends the run.
        """
        assert self.procs is not None
        overrun = self.procs.overrun()
        _forget(self.procs)
        if not overrun:
            raise BrokenProcessPool("a decode worker process died (a decoder crash?)")
        self.late |= {i - self.index_offset for i in overrun}  # others' are never matched
        for _, fut in self.pending:
            fut.cancel()
        self.pending.clear()
        self.next_start = first
        self.procs = process_pool(self.workers, self.deadline_s)
        self._fill()

    def __iter__(self) -> Iterator[tuple[str, Prepared]]:
        try:
            while self.pending:
                first, fut = self.pending[0]
                if self.procs is None:
                    preps = self._thread_result(first, fut)
                else:
                    try:
                        preps = _unpack(fut.result())
                    except BrokenProcessPool:
                        self._restart(first)
                        continue
                self.pending.popleft()
                self._fill()  # the next task is queued before this one is handed on
                yield from zip(self.paths[first : first + self.step], preps, strict=True)
        finally:
            self.close()

    def close(self) -> None:
        """Drop the queued chunks (on Ctrl-C, an error downstream, the end); running ones finish."""
        for _, fut in self.pending:
            fut.cancel()
        self.pending.clear()
        self.next_start = len(self.paths)
        if self.threads is not None:
            self.threads.shutdown()


def prepared_stream(
    paths: Sequence[str],
    workers: int,
    preprocess: bool,
    debug_dir: Path | None,
    index_offset: int = 0,
) -> Iterator[tuple[str, Prepared]]:
    """(path, Prepared) in input order (``PreparedStream``, started now)."""
    return iter(PreparedStream(paths, workers, preprocess, debug_dir, index_offset))
