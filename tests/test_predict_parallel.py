"""Batch prediction at speed: reduced JPEG decoding, worker processes, rows in input order.

Small synthetic inputs only: the same rows whichever way the files are decoded
(worker processes, threads, one chunk at a time), never timings.
"""

from __future__ import annotations

import csv
import multiprocessing
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tasks import prepare_pool
from tasks.decode import jpeg_scale, load_gray, read_header
from tasks.model import build_model, save_model
from tasks.predict import chunked, expand_inputs, predict_chunk, predict_paths
from tasks.prepare_pool import (
    DECODE_CHUNK,
    MIN_FILES_FOR_PROCESSES,
    prepare_chunk,
    prepared_stream,
    process_pool,
)
from tests.images import big_glyph, photo, png_bytes
from tests.synth import make_digits

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid (untrained, seeded) model file."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    return save_model(path, build_model("seed"), "seed", mean=0.13, std=0.31, params={})


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """More files than MIN_FILES_FOR_PROCESSES: MNIST-like PNGs, photo JPEGs, bad files."""
    folder = tmp_path_factory.mktemp("mixed")
    images, labels = make_digits(MIN_FILES_FOR_PROCESSES + 20, seed=3)
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        (folder / f"d{i:04d}_{label}.png").write_bytes(png_bytes(img))
    rng = np.random.default_rng(0)
    for d in range(6):  # photos, decoded at a reduced scale
        ok, buf = cv2.imencode(".jpg", photo(big_glyph(d), rng, size=(480, 640)))
        assert ok
        (folder / f"p{d}_{d}.jpg").write_bytes(buf.tobytes())
    (folder / "e0_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "e1_empty.jpg").write_bytes(b"")
    (folder / "e2_blank.png").write_bytes(png_bytes(np.full((40, 40), 255, np.uint8)))
    (folder / "e3_folder.png").mkdir()
    return folder


# --------------------------------------------------------------------------- reduced decoding


@pytest.mark.parametrize(
    ("width", "height", "scale"),
    [
        (28, 28, 1),  # MNIST-size: as it is
        (320, 240, 1),  # already the working size
        (639, 479, 2),  # 1/2 rounds up to 320: still the working size
        (640, 480, 2),  # a webcam frame: 320x240
        (1280, 960, 4),
        (1279, 959, 4),  # ceil(1279 / 4) = 320
        (1276, 957, 2),  # ceil(1276 / 4) = 319: 1/4 would be too small
        (4032, 3024, 8),  # a 12 MP phone photo: 504x378
        (3024, 4032, 8),  # portrait: the longer side decides
        (20_000, 20_000, 8),  # the largest DCT scaling there is
    ],
)
def test_jpeg_scale_from_header_size(width: int, height: int, scale: int) -> None:
    # the largest scale whose longer side (libjpeg rounds up) is still >= 320
    longer = max(width, height)
    assert jpeg_scale(width, height, max_side=320) == scale
    assert -(-longer // scale) >= 320 or scale == 1
    assert scale == 8 or -(-longer // (2 * scale)) < 320


def test_jpeg_scale_pixel_cap_wins() -> None:
    # under a small pixel cap the scale goes on down, whatever max_side asks for
    assert jpeg_scale(2000, 2000, max_side=4096, max_pixels=1_000_000) == 2
    assert jpeg_scale(2000, 2000, max_side=4096, max_pixels=200_000) == 8
    assert jpeg_scale(2000, 2000, max_side=4096) == 1


def test_phone_size_jpeg_is_decoded_reduced(tmp_path: Path) -> None:
    """A 4032x3024 JPEG: the header says 1/8, the result is the 320 px working image."""
    img = cv2.resize(photo(big_glyph(7), np.random.default_rng(1), (378, 504)), (4032, 3024))
    path = tmp_path / "phone.jpg"
    path.write_bytes(cv2.imencode(".jpg", img)[1].tobytes())
    header = read_header(path.read_bytes())
    assert header is not None and (header.width, header.height) == (4032, 3024)
    assert jpeg_scale(header.width, header.height) == 8
    gray = load_gray(path)
    assert gray.shape == (240, 320)
    # the same picture as a full decode, area-resized (DCT scaling is an area average)
    full = cv2.resize(
        cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), (320, 240), interpolation=cv2.INTER_AREA
    )
    assert np.abs(gray.astype(int) - full).mean() < 3


# --------------------------------------------------------------------------- worker processes


def test_stream_keeps_input_order(mixed_folder: Path) -> None:
    """Worker processes hand back every file's result, in input order, as one thread would."""
    paths = expand_inputs([mixed_folder]).paths
    assert len(paths) >= MIN_FILES_FOR_PROCESSES
    streamed = list(prepared_stream(paths, workers=2, preprocess=True, debug_dir=None))
    assert [p for p, _ in streamed] == paths
    direct = prepare_chunk(paths, 0, True, None)
    for (_, got), want in zip(streamed, direct, strict=True):
        assert (got.status, got.message) == (want.status, want.message)
        if want.image is None:
            assert got.image is None
        else:
            assert np.array_equal(got.image, want.image)
    assert {p.status for _, p in streamed} == {"ok", "empty", "error"}


def test_processes_threads_and_chunks_write_the_same_rows(
    mixed_folder: Path, model_file: Path, tmp_path: Path
) -> None:
    """Worker processes (2), threads (1 worker) and the flow's chunks: byte-identical rows."""
    procs, threads = tmp_path / "procs.csv", tmp_path / "threads.csv"
    predict_paths([mixed_folder], model_file, procs, workers=2, progress=False)
    predict_paths([mixed_folder], model_file, threads, workers=1, progress=False)
    assert procs.read_bytes() == threads.read_bytes()
    assert process_pool(2) is not None  # the 2-worker run used the process pool

    paths = expand_inputs([mixed_folder]).paths
    rows = []
    for i, chunk in enumerate(chunked(paths, DECODE_CHUNK + 7)):  # chunks not on a boundary
        rows += predict_chunk(chunk, model_file, 256, 2, index_offset=i * (DECODE_CHUNK + 7))
    assert [r.path for r in rows] == paths
    with procs.open(newline="") as fh:
        written = list(csv.DictReader(fh))
    assert [w["path"] for w in written] == paths
    assert [(r.status, r.label or "") for r in rows] == [(w["status"], w["label"]) for w in written]


def test_pool_is_started_once_and_reused(mixed_folder: Path, model_file: Path) -> None:
    """Later runs (the flow's chunks) find the same worker processes: start-up paid once."""
    paths = expand_inputs([mixed_folder]).paths
    predict_chunk(paths, model_file, 64, 2)
    pool = process_pool(2)
    assert pool is not None
    pids = set(pool.executor._processes)  # the worker processes, by pid
    assert len(pids) == 2
    predict_chunk(paths, model_file, 64, 2)
    assert process_pool(2) is pool
    assert set(pool.executor._processes) == pids


def test_one_file_starts_no_worker_process(mixed_folder: Path) -> None:
    """A single file is decoded in the calling process: no pool to start."""
    one = str(next(mixed_folder.glob("p3_*.jpg")))
    code = (
        "from tasks import prepare_pool as pp\n"
        f"rows = list(pp.prepared_stream([{one!r}], 2, True, None))\n"
        "assert rows[0][1].status == 'ok', rows\n"
        "assert not pp._pools, pp._pools\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _pool_in_daemon(queue: multiprocessing.Queue) -> None:
    queue.put(prepare_pool.process_pool(2) is None)


def test_daemonic_process_decodes_in_threads() -> None:
    """A daemonic process (a Dask worker) may not have children: no process pool there."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_pool_in_daemon, args=(queue,), daemon=True)
    proc.start()
    assert queue.get(timeout=60) is True
    proc.join(timeout=60)
