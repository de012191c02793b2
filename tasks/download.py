"""Download stage: the four MNIST files, from a local mirror or the public ones.

A file is accepted only when its decompressed content has the published
SHA-256, whatever the compression it came in. Every source is treated as
hostile: bytes are streamed (never held whole), decompressed into a temp file
with a cap on both the raw and the decompressed size, and each file gets a
whole-file deadline; the temp file is renamed only once the checksum matches,
so a partial, oversized or corrupt download never lands in the output folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable
from itertools import takewhile
from pathlib import Path
from typing import IO, Any

import urllib3
from urllib3.exceptions import HTTPError, MaxRetryError, NameResolutionError
from urllib3.util import Retry, Timeout

from tasks.errors import DigitflowError
from tasks.idx import MAX_HEADER, IdxError, parse_header
from tasks.io import atomic_path

log = logging.getLogger(__name__)

# logical name -> file name in data/raw (raw, uncompressed IDX)
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# SHA-256 of the decompressed files (see ../shared/mnist/README.md): content, not compression.
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# Decompressed sizes of MNIST's files: header + 60,000 or 10,000 images of 28x28 or labels.
MNIST_SIZES = {
    "train-images-idx3-ubyte": 16 + 60_000 * 28 * 28,  # 47,040,016
    "train-labels-idx1-ubyte": 8 + 60_000,  # 60,008
    "t10k-images-idx3-ubyte": 16 + 10_000 * 28 * 28,  # 7,840,016
    "t10k-labels-idx1-ubyte": 8 + 10_000,  # 10,008
}

# A private MNIST-format dataset (custom checksums) declares its own size in its IDX header;
# this is the most it may declare: 20x MNIST's largest file, far beyond any digit set this
# pipeline is sized for (the later stages load each file whole into memory).
MAX_IDX_BYTES = 1 << 30

# The whole-file deadline, in multiples of `download.timeout_s` (the per-read socket timeout):
# the default 30 s gives 300 s per file and location, i.e. MNIST's largest file (9.9 MB
# gzipped) must arrive at >= 33 KB/s. A keyword of download_mnist overrides it.
FILE_DEADLINE_TIMEOUTS = 10

# HTTP statuses worth retrying: the server or a proxy may recover.
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})

MAX_REDIRECTS = 5  # mirrors may move (http -> https, a CDN); a longer chain is a loop

CHUNK = 256 * 1024  # bytes per read and per decompression step: memory stays O(CHUNK)

# zlib's wbits for a gzip member (16 + the 32 KiB window), header and CRC checked by zlib
_GZIP_WBITS = 16 + zlib.MAX_WBITS
_GZIP_MAGIC = b"\x1f\x8b"

# Raw bytes allowed beyond the decompressed cap: deflate expands incompressible data by
# under 0.03 % (zlib's deflateBound), and a gzip header's optional name/comment/extra fields
# stay far under 64 KiB; more raw input than this is padding or garbage, not the file.
_RAW_SLACK_FRACTION = 512
_RAW_SLACK_BYTES = 64 * 1024

_CHECKSUMS_MAX_BYTES = 64 * 1024  # a JSON of four names and hashes is ~400 bytes


class DownloadError(DigitflowError, RuntimeError):
    """Every source failed for some file; the message names each source and why."""


class _Rejected(Exception):
    """A source answered, but not with the right file in time (no point retrying it)."""


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


class _IdxSink:
    """Decompressed IDX bytes -> an open temp file and a SHA-256, capped at the declared size.

    The cap is exact: an IDX header (2 zero bytes, type, ndim, one uint32 per dim) fixes the
    file's size, so no byte past ``header + prod(dims)`` can belong to the file. Before the
    header is complete the cap is ``exact`` (MNIST's own size, when the checksums are
    MNIST's) or MAX_IDX_BYTES; for MNIST the header must also declare exactly MNIST's size.
    A size table alone would not do: the tests' tiny set (and any private MNIST-format set)
    has the same file names with other sizes.
    """

    def __init__(self, out: IO[bytes], exact: int | None) -> None:
        self._out = out
        self._exact = exact
        self.limit = exact if exact is not None else MAX_IDX_BYTES
        self.size = 0
        self._head = b""
        self._header_done = False
        self._sha = hashlib.sha256()

    def room(self) -> int:
        """Bytes to ask for next: one past the cap at most, so an excess shows up."""
        return min(CHUNK, self.limit + 1 - self.size)

    def _parse_header(self) -> None:
        try:
            parsed = parse_header(self._head)
        except IdxError:
            raise _Rejected(f"not an MNIST IDX file (magic 0x{self._head[:4].hex()})") from None
        if parsed is None:
            return
        header, dims = parsed
        declared = header + math.prod(dims)
        if self._exact is not None and declared != self._exact:
            raise _Rejected(
                f"IDX header declares shape {dims} ({declared:,} bytes), "
                f"not MNIST's {self._exact:,} bytes"
            )
        if declared > MAX_IDX_BYTES:
            raise _Rejected(
                f"IDX header declares shape {dims} ({declared:,} bytes), "
                f"over the {MAX_IDX_BYTES:,}-byte limit"
            )
        self.limit = declared
        self._header_done = True

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._header_done:
            self._head += data[: MAX_HEADER - len(self._head)]
            self._parse_header()
        self.size += len(data)
        if self.size > self.limit:
            raise _Rejected(f"more data than the {self.limit:,} bytes its IDX header declares")
        self._sha.update(data)
        self._out.write(data)

    def finish(self) -> str:
        """SHA-256 of the whole file, once it is exactly as long as declared."""
        if not self._header_done:
            raise _Rejected(f"too short for an IDX header ({self.size} bytes)")
        if self.size != self.limit:
            raise _Rejected(f"truncated: {self.size:,} of the {self.limit:,} bytes declared")
        return self._sha.hexdigest()


class _Unpacker:
    """Raw bytes of one file as they arrive (gzip, sniffed by magic, or plain) into a sink.

    Written by hand rather than with ``gzip.GzipFile`` because that one pulls input by
    itself and cannot be fed chunk by chunk from a network read we time and cap;
    ``zlib.decompressobj`` with ``max_length`` inflates at most what the sink has room for.
    """

    def __init__(self, sink: _IdxSink) -> None:
        self._sink = sink
        self._raw = 0
        self._prefix = b""
        self._z: Any = None  # zlib decompress object once gzip is sniffed
        self._plain = False

    def want(self) -> int:
        """Raw bytes to read next."""
        return self._sink.room() if self._plain else CHUNK

    def feed(self, data: bytes) -> None:
        self._raw += len(data)
        limit = self._sink.limit
        if self._raw > limit + limit // _RAW_SLACK_FRACTION + _RAW_SLACK_BYTES:
            raise _Rejected(f"sent over {self._raw:,} bytes for a file of at most {limit:,}")
        if self._z is None and not self._plain:
            self._prefix += data
            if len(self._prefix) < len(_GZIP_MAGIC):
                return  # a slow server may send the magic one byte at a time
            data, self._prefix = self._prefix, b""
            if data.startswith(_GZIP_MAGIC):
                self._z = zlib.decompressobj(_GZIP_WBITS)
            else:
                self._plain = True
        if self._plain:
            self._sink.write(data)
        else:
            self._inflate(data)

    def _inflate(self, data: bytes) -> None:
        pending = True  # zlib may hold output of earlier input even when given none
        try:
            while data or pending:
                if self._z.eof:  # another gzip member follows (what gzip.decompress accepts)
                    data = self._z.unused_data + data
                    if not data:
                        return
                    self._z = zlib.decompressobj(_GZIP_WBITS)
                room = self._sink.room()
                out = self._z.decompress(data, room)
                self._sink.write(out)
                data = self._z.unconsumed_tail
                pending = len(out) == room
        except zlib.error as exc:
            raise _Rejected(f"corrupt gzip data ({exc})") from exc

    def finish(self) -> str:
        """SHA-256 of the decompressed file; rejects a stream that ends early."""
        if self._z is None and not self._plain:  # under 2 bytes in all: not gzip
            self._plain = True
            self._sink.write(self._prefix)
        if self._z is not None:
            self._inflate(b"")
            if not self._z.eof:
                raise _Rejected("corrupt gzip data (the stream ends before its end marker)")
        return self._sink.finish()


class _Retry(Retry):
    """urllib3's ``Retry`` with three changes a download needs (each says why below)."""

    def __init__(
        self, *args: Any, deadline: float = math.inf,
        pause: Callable[[float], None] = time.sleep, **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.deadline = deadline  # time.monotonic() by which the file must be complete
        self.pause = pause

    def new(self, **kw: Any) -> _Retry:
        new = super().new(**kw)
        new.deadline, new.pause = self.deadline, self.pause
        return new

    def increment(
        self, method: str | None = None, url: str | None = None,
        response: Any = None, error: Exception | None = None, _pool: Any = None,
        _stacktrace: Any = None,
    ) -> _Retry:  # fmt: skip
        # 1. A name that does not resolve will not resolve a few seconds later: go to the
        #    next source now (the pipeline's own retries cover a longer outage).
        if isinstance(error, NameResolutionError):
            raise MaxRetryError(_pool, url, error) from error
        # 2. urllib3 drains a retried response's body to reuse the connection; that body's
        #    length is the server's choice (an endless 503 would hold us forever), so drop
        #    the connection instead.
        if response is not None:
            response.close()
        return super().increment(method, url, response, error, _pool, _stacktrace)

    def get_backoff_time(self) -> float:
        # 3a. urllib3 retries the first failure at once (0, 2f, 4f, ...); params.yaml's
        #     backoff_s is the first wait, doubling after (f, 2f, 4f, ...).
        errors = len(list(takewhile(lambda h: h.redirect_location is None, reversed(self.history))))
        if not errors:
            return 0.0
        return min(self.backoff_max, self.backoff_factor * 2 ** (errors - 1))

    def sleep_for_retry(self, response: Any) -> bool:
        wait = self.get_retry_after(response)
        if not wait:
            return False
        self._wait(wait, "Retry-After")
        return True

    def sleep(self, response: Any = None) -> None:
        # 3b. Waits go through _wait: never past the file's deadline, and through an
        #     injectable pause (urllib3 calls time.sleep itself).
        retry_after = self.respect_retry_after_header and response is not None
        if retry_after and self.sleep_for_retry(response):
            return
        self._wait(self.get_backoff_time(), "backoff")

    def _wait(self, seconds: float, why: str) -> None:
        if time.monotonic() + seconds > self.deadline:
            raise _Rejected(f"asked to wait {seconds:.0f} s ({why}), past the file's deadline")
        last = self.history[-1] if self.history else None
        reason = f"HTTP {last.status}" if last and last.status else str(last and last.error)
        log.warning("%s: %s; retrying in %.1fs", last and last.url, reason, seconds)
        if seconds > 0:
            self.pause(seconds)


def _is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in {"http", "https", "file"}


def _candidates(source: str, name: str) -> list[str]:
    """Where ``name`` may be found in one source: gzipped first, then raw."""
    if _is_url(source):
        base = source if source.endswith("/") else source + "/"
        return [base + name + ".gz", base + name]
    folder = Path(source)
    return [str(folder / (name + ".gz")), str(folder / name)]


def _pump(read: Callable[[int], bytes], unpacker: _Unpacker, deadline: float) -> str:
    """Read until EOF into ``unpacker``; returns the content's SHA-256.

    The deadline is checked between reads because socket timeouts (urllib3's ``Timeout``
    included) bound each read, not the sum: a server sending a byte every few seconds
    never trips them. One read blocks at most ``timeout_s``, so a file takes at most its
    deadline plus one timeout.
    """
    while chunk := read(unpacker.want()):
        unpacker.feed(chunk)
        if time.monotonic() > deadline:
            raise _Rejected("file not complete within its deadline (server too slow)")
    return unpacker.finish()


def _fetch(
    location: str, out: IO[bytes], exact: int | None, http: urllib3.PoolManager,
    retry: _Retry, timeout_s: float,
) -> str:  # fmt: skip
    """Stream one location into ``out`` (decompressed); returns the content's SHA-256."""
    unpacker = _Unpacker(_IdxSink(out, exact))
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme not in {"http", "https"}:  # a local folder or a file:// URL
        path = Path(urllib.request.url2pathname(parsed.path) if parsed.scheme else location)
        if not path.is_file():  # also refuses FIFOs and devices (/dev/zero never ends)
            raise FileNotFoundError("no such file")
        with open(path, "rb") as fh:
            return _pump(fh.read, unpacker, retry.deadline)
    # Each read (connect, headers, body chunk) waits at most timeout_s; the deadline is
    # checked between body chunks (_pump) and before each retry's wait (_Retry). The status
    # line and headers are bounded only by http.client's limits (64 KiB a line, 100 headers)
    # and the per-read timeout: a server dripping its headers is not cut at the deadline.
    per_read = max(min(timeout_s, retry.deadline - time.monotonic()), 0.001)
    resp = http.request(
        "GET", location, retries=retry, timeout=Timeout(connect=per_read, read=per_read),
        preload_content=False, decode_content=False,  # we decompress, capped, ourselves
    )  # fmt: skip
    try:
        if resp.status != 200:
            raise _Rejected(f"HTTP {resp.status} {resp.reason}")
        return _pump(resp.read1, unpacker, retry.deadline)
    finally:
        resp.close()  # not drained: a rejected body may be endless
        resp.release_conn()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, MaxRetryError):
        reason = exc.reason
        if isinstance(reason, NameResolutionError):
            return f"unreachable (name does not resolve: {reason})"
        return f"unreachable ({reason})"
    if isinstance(exc, HTTPError):  # the connection broke or timed out mid-body
        return f"connection failed ({exc})"
    return str(exc) or type(exc).__name__


def sources_in_order(mirror_env: str | None, mirrors: list[str]) -> list[str]:
    """$MNIST_MIRROR (when set) first, then the configured mirrors."""
    return ([mirror_env] if mirror_env else []) + list(mirrors)


def download_mnist(
    out_dir: Path,
    sources: list[str],
    retries: int = 3,
    backoff_s: float = 1.0,
    timeout_s: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
    checksums: dict[str, str] | None = None,
    file_deadline_s: float | None = None,
) -> dict[str, Path]:
    """Fetch the four MNIST files into ``out_dir`` as raw IDX; returns {name: path}.

    ``sources`` are local folders or http(s)/file URLs, tried in order per file.
    A file already present with the right checksum is kept as is. ``checksums``
    (file name -> SHA-256 of the decompressed file) defaults to MNIST's own.
    ``retries`` is the number of attempts per location on transient errors;
    ``timeout_s`` bounds each network read, ``file_deadline_s`` (default
    FILE_DEADLINE_TIMEOUTS x ``timeout_s``) each location's whole file, retries included.
    """
    checksums = checksums or MNIST_SHA256
    # MNIST's own files have known sizes; any other MNIST-format set is capped by its header
    sizes = MNIST_SIZES if checksums == MNIST_SHA256 else {}
    if file_deadline_s is None:
        file_deadline_s = FILE_DEADLINE_TIMEOUTS * timeout_s
    if not sources:
        raise DownloadError("no MNIST source configured: set MNIST_MIRROR to a folder or URL")
    out_dir.mkdir(parents=True, exist_ok=True)
    attempts_left = max(retries - 1, 0)
    # Identity encoding: a server's own Content-Encoding would be decompressed by urllib3,
    # outside our caps; the .gz files are compressed already.
    http = urllib3.PoolManager(headers={"User-Agent": "digitflow", "Accept-Encoding": "identity"})
    done: dict[str, Path] = {}
    for key, name in MNIST_FILES.items():
        target = out_dir / name
        expected = checksums[name]
        if target.is_file() and _sha256_file(target) == expected:
            done[key] = target
            continue
        failures: list[str] = []
        for location in (loc for source in sources for loc in _candidates(source, name)):
            # Each kind of failure (connect, read before the headers, transient status) gets
            # `retries` attempts; redirects are counted apart, as urllib.request did.
            retry = _Retry(
                total=None, connect=attempts_left, read=attempts_left, status=attempts_left,
                other=0, redirect=MAX_REDIRECTS, status_forcelist=TRANSIENT_HTTP,
                backoff_factor=backoff_s, raise_on_status=False,
                deadline=time.monotonic() + file_deadline_s, pause=sleep,
            )  # fmt: skip
            try:
                with atomic_path(target) as tmp, open(tmp, "wb") as fh:
                    got = _fetch(location, fh, sizes.get(name), http,
                                 retry, timeout_s)  # fmt: skip
                    if got != expected:
                        raise _Rejected(
                            f"SHA-256 mismatch (got {got[:12]}…, want {expected[:12]}…)"
                        )
            except (OSError, _Rejected, HTTPError) as exc:
                failures.append(f"{location}: {_describe(exc)}")
                log.warning("%s", failures[-1])
                continue
            log.info("%s <- %s", target, location)
            done[key] = target
            break
        else:
            # one line (the CLI prints it as is): each location and why, then the remedy
            raise DownloadError(
                f"could not get {name} from any source: " + "; ".join(failures) + ". "
                "Set MNIST_MIRROR to a folder (or http(s)/file URL) holding the MNIST files, "
                "e.g. MNIST_MIRROR=../shared/mnist"
            )
    return done


def load_checksums(path: Path) -> dict[str, str]:
    """Checksums for a private MNIST-format dataset: JSON {file name: sha256}, all four names."""
    with open(path, "rb") as fh:
        text = fh.read(_CHECKSUMS_MAX_BYTES + 1)
    if len(text) > _CHECKSUMS_MAX_BYTES:
        raise DownloadError(f"{path}: checksum file over {_CHECKSUMS_MAX_BYTES:,} bytes")
    try:
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DownloadError(f"{path}: not a JSON checksum file ({exc})") from exc
    missing = sorted(set(MNIST_SHA256) - set(data if isinstance(data, dict) else {}))
    if missing:
        raise DownloadError(f"{path}: checksum file lacks {', '.join(missing)}")
    return {name: str(data[name]) for name in MNIST_SHA256}
