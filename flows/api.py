"""Predictions over HTTP: ``digitflow api``, a FastAPI app served by uvicorn.

- ``POST /predict``: images as multipart (``files``) or one image as the raw body
  (``Content-Type: image/*``) -> a JSON array, one object per image with exactly the
  fields of a ``digitflow predict --format jsonl`` row. The rows come from the CLI's own
  code: each upload is decoded and preprocessed by ``tasks.prepare_pool.prepare_chunk`` (the
  decoder's limits, its messages), classified by the frozen ``tasks.predict.Classifier``,
  made into a ``Row`` as ``iter_predictions`` does and written by ``RowWriter``; ``path``
  is the upload's file name (``-`` for a raw body). ``?input=true`` adds ``input_png``, the
  28x28 image the network saw (base64 PNG), for the page.
- ``GET /health``: the model that answers (file, SHA-256, champion tag, classes), the
  last refused file, uptime, the limits.
- ``GET /``: a page to draw a digit or drop a photo (flows/static/, no CDN); ``/docs``.
- ``POST /label?label=N`` (``--accept-labels`` only): the image into data/labeled/N/.

Bounds (``ApiSettings``): body size, files per request, one time limit per request
(reading the body, queueing and computing), at most ``compute_slots`` requests decoding
and ``queue`` more queued or waiting for the network (more: 503), request bodies held in
memory within a budget (more: 503). Bad input is a 4xx JSON answer with a one-line
``detail``. The network runs in one thread that batches the images of all requests
waiting for it (``Batcher``): one call for 8 images costs ~2.5 single ones.

Model swaps: a watcher thread polls the model file's (device, inode, size, mtime); once a
change has held still for one poll, the new file is loaded and checked, then published by
one reference assignment. A request takes the model once, when its body is in, so
requests in flight finish on the model they started with. A file that fails to load or
check is refused with one log line; the old model keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import logging
import os
import queue
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import yaml
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from flows.paths import PROJECT_MARKER
from tasks.decode import read_header
from tasks.labels import image_suffix, store_labelled
from tasks.model import ModelFileError
from tasks.predict import (
    DEFAULTS,
    INFER_SLICE,
    Classifier,
    Row,
    RowWriter,
    needs_review,
    prediction_row,
)
from tasks.prepare_pool import INTERNAL_ERROR, prepare_chunk
from tasks.preprocess import MNIST_SIZE, Prepared, encode_png, set_opencv_threads

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
SETTINGS_ENV = "DIGITFLOW_API_SETTINGS"  # ApiSettings as JSON, for uvicorn's worker processes
RAW_BODY_NAME = "-"  # the ``path`` of a raw-body image's row (stdin's usual name)
FORM_FIELD = b"files"  # the multipart field the images come in
# The champions' tags (flows/pipeline.py TAG_PREFIX, not imported: it pulls in Prefect;
# tests/test_api.py checks both agree) and how many of the newest are searched for the
# served file's checksum.
CHAMPION_TAG_PREFIX = "model@v"
CHAMPION_TAGS_SEARCHED = 50
GIT_TIMEOUT_S = 10  # one `git` call of the champion look-up
# Header lines of one multipart part and their size: a part needs two (disposition, type).
PART_MAX_HEADERS = 8
PART_MAX_HEADER_BYTES = 4096
JSON = "application/json"
INFER_BATCH = INFER_SLICE  # images per network call at most: the CLI's slice


@dataclass(frozen=True)
class ApiSettings:
    """What `digitflow api` serves and its bounds (read once, at start-up)."""

    model: str  # the model file, watched for swaps
    preprocess: bool = True  # as `digitflow predict --preprocess` (the default)
    review_below: float = DEFAULTS.review_below
    max_body_bytes: int = 8 * 2**20  # a 12 MP phone JPEG is 3-6 MB
    max_files: int = 16  # images per request
    time_limit_s: float = 10.0  # per request: reading the body, queueing, computing
    compute_slots: int = 2  # requests computing at once: one per core of the target machine
    queue: int = 64  # requests waiting for a slot; one more is answered 503
    # Request bodies held in memory by all requests together (partial ones included); a
    # request that would go over is answered 503. 32 full-size bodies.
    body_budget_bytes: int = 256 * 2**20
    poll_s: float = 1.0  # model file polls: a swap is seen within 2 polls
    accept_labels: bool = False  # POST /label stores images in labels_root
    labels_root: str = "data/labeled"

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> ApiSettings:
        return cls(**json.loads(os.environ[SETTINGS_ENV]))


# --------------------------------------------------------------------------- the model


class ModelCheckError(ModelFileError):
    """A model file that loads but does not give probabilities (refused for serving)."""


@dataclass(frozen=True)
class ServedModel:
    """A loaded, checked model and what /health tells about it."""

    classifier: Classifier
    path: str
    sha256: str
    size: int
    mtime: float
    loaded_at: float  # time.time()
    champion: str | None  # the model@vN tag whose dvc.lock records this file, if any

    def describe(self) -> dict[str, Any]:
        return {
            "path": self.path, "sha256": self.sha256, "size": self.size,
            "mtime": self.mtime, "loaded_at": self.loaded_at, "champion": self.champion,
            "classes": self.classifier.classes,
        }  # fmt: skip


FileKey = tuple[int, int, int, int]


def file_key(path: str) -> FileKey | None:
    """(device, inode, size, mtime_ns) of ``path`` (symlinks followed); None if missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _git(root: Path, *args: str) -> str | None:
    proc = subprocess.run(
        ["git", *args], cwd=root, capture_output=True, timeout=GIT_TIMEOUT_S, check=False
    )
    return proc.stdout.decode("utf-8", "replace") if proc.returncode == 0 else None


def champion_tag(path: Path, md5: str) -> str | None:
    """The newest ``model@vN`` tag whose dvc.lock has this file (by path and MD5), if any.

    The project is the nearest folder above the file holding dvc.yaml; DVC records
    outputs' MD5s relative to it. None outside a git + DVC project, or for a file no
    champion tag records (a local training run).
    """
    path = path.absolute()
    root = next((p for p in path.parents if (p / PROJECT_MARKER).is_file()), None)
    if root is None:
        return None
    rel = path.relative_to(root).as_posix()
    tags = _git(root, "tag", "--list", f"{CHAMPION_TAG_PREFIX}*")
    if not tags:
        return None
    numbered = [t for t in tags.split() if t[len(CHAMPION_TAG_PREFIX) :].isdigit()]
    numbered.sort(key=lambda t: int(t[len(CHAMPION_TAG_PREFIX) :]), reverse=True)
    for tag in numbered[:CHAMPION_TAGS_SEARCHED]:
        text = _git(root, "show", f"{tag}:dvc.lock")
        lock = yaml.safe_load(text) if text else None
        stages = lock.get("stages", {}) if isinstance(lock, dict) else {}
        for stage in stages.values():
            for out in stage.get("outs", []) if isinstance(stage, dict) else []:
                if isinstance(out, dict) and out.get("path") == rel and out.get("md5") == md5:
                    return tag
    return None


def load_served(path: str) -> ServedModel:
    """Load and check a model file for serving.

    Raises ModelFileError (not a digitflow model: tasks.model's checks) or
    ModelCheckError (it loads but a blank image does not give finite probabilities over
    its classes, or the file changed while it was read).
    """
    key = file_key(path)
    if key is None:
        raise ModelFileError(f"model file not found: {path}")
    data = Path(path).read_bytes()
    classifier = Classifier.from_file(path)
    probs = classifier.probabilities([np.zeros((MNIST_SIZE, MNIST_SIZE), np.uint8)])
    if probs.shape != (1, len(classifier.classes)) or not np.isfinite(probs).all():
        raise ModelCheckError(f"a blank image gives probabilities of shape {probs.shape}")
    if abs(float(probs.sum()) - 1.0) > 1e-6:  # float64 softmax: off by ~1e-16
        raise ModelCheckError(f"probabilities sum to {float(probs.sum())}")
    if file_key(path) != key:
        raise ModelCheckError("the file changed while it was loaded (being written?)")
    try:
        champion = champion_tag(Path(path), hashlib.md5(data).hexdigest())
    except (OSError, subprocess.SubprocessError, yaml.YAMLError) as exc:
        log.warning("champion tag of %s not found: %s", path, exc)
        champion = None
    return ServedModel(
        classifier, path, hashlib.sha256(data).hexdigest(), key[2], key[3] / 1e9, time.time(),
        champion,
    )  # fmt: skip


class ModelWatcher:
    """The model that answers, and a thread that swaps in a changed model file."""

    def __init__(self, path: str, poll_s: float) -> None:
        self.path, self.poll_s = path, poll_s
        self.current = load_served(path)  # ModelFileError: nothing to serve
        self.refused: dict[str, Any] | None = None  # the last file refused, and why
        self.swaps = 0
        self._seen = file_key(path)  # the file as last loaded (or refused)
        self._pending: FileKey | None = None  # a change waiting to hold still for one poll
        self._missing_logged = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="model-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def poll(self) -> None:
        """Look at the file once; load, check and swap it in after it held still one poll."""
        key = file_key(self.path)
        if key is None:
            if not self._missing_logged:  # `dvc checkout` removes, then links: usually brief
                log.warning("model file %s is missing; still serving %s", self.path, self._sha())
                self._missing_logged = True
            return
        self._missing_logged = False
        if key == self._seen:
            self._pending = None
            return
        if key != self._pending:  # changed since the last poll: may still be being written
            self._pending = key
            return
        self._seen, self._pending = key, None
        try:
            new = load_served(self.path)
        except (ModelFileError, OSError) as exc:  # ModelCheckError is a ModelFileError
            self.refused = {"path": self.path, "reason": str(exc), "at": time.time()}
            log.warning(
                "model file %s changed but was refused (%s); still serving sha256 %s",
                self.path, exc, self._sha(),
            )  # fmt: skip
            return
        old, self.current = self.current, new  # one assignment: requests see old or new
        self.swaps += 1
        log.info(
            "model swapped: %s sha256 %s -> %s%s", self.path, old.sha256[:12],
            new.sha256[:12], f" ({new.champion})" if new.champion else "",
        )  # fmt: skip

    def _sha(self) -> str:
        return self.current.sha256[:12]


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Upload:
    name: str  # the row's ``path``
    data: bytes


class Refused(HTTPException):
    """A 4xx/5xx answer whose detail is one line."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, " ".join(detail.split()), headers)


def _busy(detail: str) -> Refused:
    return Refused(503, detail, {"Retry-After": "1"})


T = TypeVar("T")


class Admission:
    """Bounded work: bodies within a memory budget, ``slots`` computing, ``queue`` waiting.

    Counters are touched only on the event loop; a compute slot is given back when its
    thread finishes, so a request that timed out still holds its slot until then.
    """

    def __init__(self, settings: ApiSettings) -> None:
        self.settings = settings
        self.body_bytes = 0  # request bytes held in memory now
        self.admitted = 0  # requests queued or computing
        self.slots = asyncio.Semaphore(settings.compute_slots)
        self.executor = ThreadPoolExecutor(settings.compute_slots, thread_name_prefix="predict")

    @contextlib.asynccontextmanager
    async def holding(self) -> AsyncIterator[Callable[[int], None]]:
        """A ``take(n)`` that accounts ``n`` more body bytes; all given back on exit."""
        held = 0

        def take(n: int) -> None:
            nonlocal held
            if self.body_bytes + n > self.settings.body_budget_bytes:
                raise _busy("server busy: too many request bytes in flight; retry")
            self.body_bytes += n
            held += n

        try:
            yield take
        finally:
            self.body_bytes -= held

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """One request queued, decoding or waiting for the network; 503 when all are taken."""
        s = self.settings
        if self.admitted >= s.compute_slots + s.queue:
            raise _busy(f"server busy: {self.admitted} requests queued or computing; retry")
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    async def run(self, work: Callable[[], T], deadline: float) -> T:
        """``work()`` in a compute thread, once a slot is free; 503 if not done by ``deadline``."""
        loop = asyncio.get_running_loop()
        limit = self.settings.time_limit_s
        try:
            await asyncio.wait_for(self.slots.acquire(), deadline - loop.time())
        except TimeoutError:
            raise _busy(f"server busy: no compute slot within {limit:g} s") from None
        future = self.executor.submit(work)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self.slots.release))
        return await until(asyncio.wrap_future(future), deadline, limit)


async def until(awaitable: Awaitable[T], deadline: float, limit: float) -> T:
    """``awaitable``'s result, or 503 when the request's time limit comes first."""
    try:
        return await asyncio.wait_for(awaitable, deadline - asyncio.get_running_loop().time())
    except TimeoutError:
        raise _busy(f"not done within the {limit:g} s time limit") from None


async def read_body(request: Request, settings: ApiSettings, take: Callable[[int], None]) -> bytes:
    """The request body, at most ``max_body_bytes`` (413), each chunk accounted by ``take``."""
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Refused(400, f"bad Content-Length {declared[:40]!r}")
        if int(declared) > limit:
            raise Refused(413, f"request body too large: {int(declared)} bytes > {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"request body too large: over {limit} bytes")
        take(len(chunk))
        chunks.append(chunk)
    return b"".join(chunks)


async def read_body_by(
    request: Request, settings: ApiSettings, take: Callable[[int], None], deadline: float
) -> bytes:
    """read_body, whole by ``deadline`` (the loop's clock), else 408: a slow sender."""
    try:
        return await asyncio.wait_for(
            read_body(request, settings, take), deadline - asyncio.get_running_loop().time()
        )
    except TimeoutError:
        raise Refused(
            408, f"request body not received within {settings.time_limit_s:g} s"
        ) from None


def parse_form(body: bytes, boundary: bytes, max_files: int) -> list[Upload]:
    """The ``files`` parts of a multipart/form-data body; 413 over ``max_files``, 422 bad form."""
    uploads: list[Upload] = []
    headers: dict[bytes, bytes] = {}
    field_name, value = [b""], [b""]  # the header line being read
    data: list[bytes] = []
    ended = [False]

    def on_header_field(b: bytes, start: int, end: int) -> None:
        field_name[0] += b[start:end]

    def on_header_value(b: bytes, start: int, end: int) -> None:
        value[0] += b[start:end]

    def on_header_end() -> None:
        headers[field_name[0].lower()] = value[0]
        field_name[0], value[0] = b"", b""

    def on_part_begin() -> None:
        headers.clear()
        data.clear()

    def on_part_data(b: bytes, start: int, end: int) -> None:
        data.append(b[start:end])

    def on_part_end() -> None:
        _, opts = parse_options_header(headers.get(b"content-disposition", b""))
        if opts.get(b"name") != FORM_FIELD:
            return  # other fields are not ours: ignored, like unknown query parameters
        if len(uploads) >= max_files:
            raise Refused(413, f"too many files: more than {max_files} in one request")
        filename = opts.get(b"filename", b"").decode("utf-8", "replace")
        uploads.append(Upload(filename or f"files[{len(uploads)}]", b"".join(data)))

    def on_end() -> None:
        ended[0] = True

    parser = MultipartParser(
        boundary,
        {
            "on_header_field": on_header_field, "on_header_value": on_header_value,
            "on_header_end": on_header_end, "on_part_begin": on_part_begin,
            "on_part_data": on_part_data, "on_part_end": on_part_end, "on_end": on_end,
        },
        max_header_count=PART_MAX_HEADERS,
        max_header_size=PART_MAX_HEADER_BYTES,
    )  # fmt: skip
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise Refused(422, f"malformed multipart body: {exc}") from None
    if not ended[0]:
        raise Refused(422, "malformed multipart body: it ends before its closing boundary")
    if not uploads:
        raise Refused(422, "no image in the form: send them as `files` parts")
    return uploads


def prepare_uploads(uploads: list[Upload], tmp_root: str, preprocess: bool) -> list[Prepared]:
    """Decode + preprocess each upload by the CLI's ``prepare_chunk`` (runs in a compute thread).

    ``prepare_chunk`` reads files, so each upload is written to the server's private temp
    folder (RAM-backed where /dev/shm exists) and removed once read: the same bytes go
    through the same code, limits and messages as a file given to `digitflow predict`,
    and a bug on one odd image is that image's error row (logged once), never a 500.
    """
    prepared = []
    for upload in uploads:
        fd, path = tempfile.mkstemp(dir=tmp_root, prefix="upload-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(upload.data)
            prepared.extend(prepare_chunk([path], 0, preprocess, None))
        finally:
            os.unlink(path)
    return prepared


class Batcher:
    """One thread runs the network for all requests: the images waiting are one batch.

    Each request's images go with the model the request took, and a batch is split by
    model: a request that started before a swap finishes on the old one.
    """

    def __init__(self, max_images: int = INFER_BATCH) -> None:
        self.max_images = max_images
        self._queue: queue.SimpleQueue[tuple[ServedModel, list[np.ndarray], Future] | None]
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="infer", daemon=True)
        self._thread.start()

    def submit(self, served: ServedModel, images: list[np.ndarray]) -> Future[np.ndarray]:
        """(len(images), C) probabilities, when computed."""
        future: Future[np.ndarray] = Future()
        self._queue.put((served, images, future))
        return future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            batch, n = [item], len(item[1])
            while n < self.max_images:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:  # closing: finish this batch first
                    self._queue.put(None)
                    break
                batch.append(more)
                n += len(more[1])
            by_model: dict[int, list[tuple[ServedModel, list[np.ndarray], Future]]] = {}
            for entry in batch:
                by_model.setdefault(id(entry[0]), []).append(entry)
            for entries in by_model.values():
                self._infer(entries)

    @staticmethod
    def _infer(entries: list[tuple[ServedModel, list[np.ndarray], Future]]) -> None:
        images = [img for _, imgs, _ in entries for img in imgs]
        try:
            probs = entries[0][0].classifier.probabilities(images)
        except Exception as exc:  # handed to each waiting request (a bug: its 500)
            for _, _, future in entries:
                future.set_exception(exc)
            return
        start = 0
        for _, imgs, future in entries:
            future.set_result(probs[start : start + len(imgs)])
            start += len(imgs)


def make_rows(
    names: list[str], prepared: list[Prepared], probs: np.ndarray, classes: list[str]
) -> list[Row]:
    """The rows tasks.predict.iter_predictions makes from prepared images and probabilities."""
    rows, ok = [], iter(probs)
    for name, prep in zip(names, prepared, strict=True):
        if prep.image is None:
            rows.append(Row(name, prep.status, prep.message))
            continue
        rows.append(prediction_row(name, next(ok), classes))
    return rows


def rows_json(rows: list[Row], pngs: list[bytes | None], n_classes: int) -> bytes:
    """The rows as a JSON array of `digitflow predict --format jsonl` rows (+ input_png)."""
    buffer = io.StringIO()
    writer = RowWriter(buffer, "jsonl", n_classes)
    for row in rows:
        writer.write(row)
    lines = buffer.getvalue().splitlines()
    if any(png is not None for png in pngs):
        for i, png in enumerate(pngs):
            record = json.loads(lines[i])
            record["input_png"] = base64.b64encode(png).decode("ascii") if png else None
            lines[i] = json.dumps(record, ensure_ascii=False)
    return ("[" + ",".join(lines) + "]").encode("utf-8")


def _refusal_for(rows: list[Row]) -> Refused | None:
    """When no upload is a readable image: 413 for one over the decoder's limits, else 415.

    A bug in decoding (its traceback logged once) is a 500 with the row's one-line message.
    """
    if not rows or any(row.status != "error" for row in rows):
        return None
    first = rows[0]
    if first.message.startswith(INTERNAL_ERROR):
        return Refused(500, f"{first.path}: {first.message}")
    too_large = first.message.startswith(("image too large", "file too large"))
    return Refused(413 if too_large else 415, f"{first.path}: {first.message}")


# --------------------------------------------------------------------------- the app

PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                    "required": ["files"],
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@dataclass
class _Service:
    """What the routes of one app share: settings, the model, admission, the batcher."""

    settings: ApiSettings
    watcher: ModelWatcher
    admission: Admission
    batcher: Batcher
    started: float  # time.time() at creation, for uptime
    tmp_root: str = ""  # the uploads' private temp folder, made by the lifespan


def _uploads(ctype: bytes, opts: dict[bytes, bytes], body: bytes, max_files: int) -> list[Upload]:
    """The images of a request body: the parts of a form, or the raw body as one image."""
    if ctype == b"multipart/form-data":
        boundary = opts.get(b"boundary")
        if not boundary:
            raise Refused(422, "multipart Content-Type without a boundary")
        return parse_form(body, boundary, max_files)
    if not body:
        raise Refused(422, "empty request body: send an image")
    return [Upload(RAW_BODY_NAME, body)]


def _add_predict(app: FastAPI, svc: _Service) -> None:
    settings = svc.settings

    @app.post("/predict", openapi_extra=PREDICT_BODY, summary="Classify images")
    async def predict(
        request: Request,
        input: bool = Query(False, description="add input_png: the 28x28 network input"),
    ) -> Response:
        """One row per image, the fields of `digitflow predict --format jsonl`."""
        deadline = asyncio.get_running_loop().time() + settings.time_limit_s
        ctype, opts = parse_options_header(request.headers.get("content-type"))
        if ctype != b"multipart/form-data" and not ctype.startswith(b"image/"):
            shown = ctype.decode("latin-1")[:60] or "none"
            raise Refused(415, f"Content-Type {shown}: send image/* or multipart/form-data")
        async with svc.admission.holding() as take:
            body = await read_body_by(request, settings, take, deadline)
            uploads = _uploads(ctype, opts, body, settings.max_files)
            del body
            served = svc.watcher.current  # this request's model, whatever swaps meanwhile
            with svc.admission.admit():
                prepared = await svc.admission.run(
                    lambda: prepare_uploads(uploads, svc.tmp_root, settings.preprocess), deadline
                )
                images = [prep.image for prep in prepared if prep.image is not None]
                classes = served.classifier.classes
                probs = np.zeros((0, len(classes)))
                if images:
                    probs = await until(
                        asyncio.wrap_future(svc.batcher.submit(served, images)),
                        deadline, settings.time_limit_s,
                    )  # fmt: skip
        rows = make_rows([u.name for u in uploads], prepared, probs, classes)
        for row in rows:  # the CLI's review flag, set as write_predictions sets it
            row.review = needs_review(row, settings.review_below)
        refusal = _refusal_for(rows)
        if refusal is not None:
            raise refusal
        pngs = [encode_png(p.image) if input and p.image is not None else None for p in prepared]
        content = rows_json(rows, pngs, len(classes))
        return Response(content, media_type=JSON, headers={"X-Model-SHA256": served.sha256})


def _add_health(app: FastAPI, svc: _Service) -> None:
    settings, watcher = svc.settings, svc.watcher

    @app.get("/health", summary="The model that answers, uptime, limits")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": watcher.current.describe(),
            "refused": watcher.refused,
            "swaps": watcher.swaps,
            "uptime_s": round(time.time() - svc.started, 3),
            "accept_labels": settings.accept_labels,
            "limits": {
                "max_body_bytes": settings.max_body_bytes, "max_files": settings.max_files,
                "time_limit_s": settings.time_limit_s, "compute_slots": settings.compute_slots,
                "queue": settings.queue,
            },
        }  # fmt: skip


def _add_label(app: FastAPI, svc: _Service) -> None:
    settings = svc.settings

    @app.post("/label", summary="Store an image under its label (with --accept-labels)")
    async def label(
        request: Request, label: int = Query(..., ge=0, le=9, description="the digit it shows")
    ) -> dict[str, Any]:
        """The raw image body into data/labeled/<label>/<sha256>.<ext> (deduplicated)."""
        if not settings.accept_labels:
            raise Refused(403, "labels are not accepted: start the server with --accept-labels")
        deadline = asyncio.get_running_loop().time() + settings.time_limit_s
        async with svc.admission.holding() as take:
            body = await read_body_by(request, settings, take, deadline)
            header = read_header(body) if body else None
            if header is None:
                raise Refused(415, "not an image this server can read")
            suffix = image_suffix(header.format)
            root = Path(settings.labels_root)
            path = await asyncio.to_thread(store_labelled, body, label, root, suffix)
        return {"stored": str(path), "label": label}


def create_app(settings: ApiSettings, watcher: ModelWatcher | None = None) -> FastAPI:
    """The app; loads the model now (ModelFileError if it cannot) unless ``watcher`` is given."""
    watcher = watcher or ModelWatcher(settings.model, settings.poll_s)
    svc = _Service(settings, watcher, Admission(settings), Batcher(), time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # parallelism is across requests (compute_slots); one thread within each, as the CLI
        torch.set_num_threads(1)
        set_opencv_threads(1)
        shm = "/dev/shm"  # RAM-backed where there is one: uploads never touch the disk
        base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
        with tempfile.TemporaryDirectory(prefix="digitflow-api-", dir=base) as tmp:
            svc.tmp_root = tmp
            watcher.start()
            try:
                yield
            finally:
                watcher.stop()
                svc.admission.executor.shutdown(wait=True, cancel_futures=True)
                svc.batcher.close()

    app = FastAPI(
        title="digitflow",
        summary="Handwritten-digit predictions from the pipeline's model",
        lifespan=lifespan,
    )
    app.state.watcher, app.state.settings = watcher, settings

    @app.exception_handler(RequestValidationError)
    async def one_line_422(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return JSONResponse({"detail": f"{where}: {first.get('msg')}"}, status_code=422)

    _add_predict(app, svc)
    _add_health(app, svc)
    _add_label(app, svc)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def app_from_env() -> FastAPI:
    """The app of one uvicorn worker process (``--workers N``): settings from the environment."""
    from flows.cli import configure_logging

    configure_logging(verbose=False)  # a spawned worker: swap and refusal lines at INFO
    return create_app(ApiSettings.from_env())


# Connections uvicorn keeps at once (idle keep-alive ones included); one more is answered 503
# by uvicorn itself. Bounds what slow senders can hold: their partial bodies count in the
# body budget, their sockets here.
MAX_CONNECTIONS = 256
KEEP_ALIVE_S = 5  # idle keep-alive connections are closed after this


def serve(settings: ApiSettings, host: str, port: int, workers: int = 1) -> None:
    """Run the app on uvicorn until Ctrl-C/SIGTERM. The model is loaded before binding."""
    import uvicorn

    common: dict[str, Any] = {
        "host": host, "port": port, "limit_concurrency": MAX_CONNECTIONS,
        "timeout_keep_alive": KEEP_ALIVE_S, "access_log": False, "log_level": "warning",
    }  # fmt: skip
    banner = f"serving {settings.model} on http://{host}:{port}/ (docs at /docs)"
    if workers == 1:
        app = create_app(settings)  # ModelFileError before anything is bound or said
        log.info(banner)
        uvicorn.run(app, **common)
        return
    load_served(settings.model)  # refused here, once, rather than in every worker
    log.info("%s, %d workers", banner, workers)
    os.environ[SETTINGS_ENV] = settings.to_env()
    uvicorn.run("flows.api:app_from_env", factory=True, workers=workers, **common)
