"""Download stage: the four MNIST files, from a local mirror or the public ones.

A file is accepted only when its decompressed content has the published
SHA-256, whatever the compression it came in; it is written to a temp file and
renamed, so a partial or corrupt download never lands in the output folder.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tasks.io import atomic_write_bytes

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

# HTTP statuses worth retrying: the server or a proxy may recover.
TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}


class DownloadError(RuntimeError):
    """Every source failed for some file; the message names each source and why."""


class _Rejected(Exception):
    """A source answered, but not with the right file (no point retrying it)."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _decompress(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":  # gzip magic
        try:
            return gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise _Rejected(f"corrupt gzip data ({exc})") from exc
    return data


def _is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in {"http", "https", "file"}


def _candidates(source: str, name: str) -> list[str]:
    """Where ``name`` may be found in one source: gzipped first, then raw."""
    if _is_url(source):
        base = source if source.endswith("/") else source + "/"
        return [base + name + ".gz", base + name]
    folder = Path(source)
    return [str(folder / (name + ".gz")), str(folder / name)]


def _fetch(location: str, timeout_s: float) -> bytes:
    if not _is_url(location):
        path = Path(location)
        if not path.is_file():
            raise FileNotFoundError(f"{location}: no such file")
        return path.read_bytes()
    req = urllib.request.Request(location, headers={"User-Agent": "digitflow"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return resp.read()


def _fetch_with_retries(
    location: str, retries: int, backoff_s: float, timeout_s: float,
    sleep: Callable[[float], None],
) -> bytes:  # fmt: skip
    """Fetch, retrying transient errors (5xx, 429, timeouts, resets) with backoff."""
    for attempt in range(1, retries + 1):
        try:
            return _fetch(location, timeout_s)
        except urllib.error.HTTPError as exc:
            if exc.code not in TRANSIENT_HTTP or attempt == retries:
                raise
            reason = f"HTTP {exc.code}"
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            if attempt == retries:
                raise
            reason = str(getattr(exc, "reason", exc))
        delay = backoff_s * 2 ** (attempt - 1)
        log.warning("%s: %s; retry %d/%d in %.1fs", location, reason, attempt, retries - 1, delay)
        sleep(delay)
    raise AssertionError("unreachable")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"unreachable ({exc.reason})"
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
) -> dict[str, Path]:
    """Fetch the four MNIST files into ``out_dir`` as raw IDX; returns {name: path}.

    ``sources`` are local folders or http(s)/file URLs, tried in order per file.
    A file already present with the right checksum is kept as is. ``checksums``
    (file name -> SHA-256 of the decompressed file) defaults to MNIST's own.
    """
    checksums = checksums or MNIST_SHA256
    if not sources:
        raise DownloadError("no MNIST source configured: set MNIST_MIRROR to a folder or URL")
    out_dir.mkdir(parents=True, exist_ok=True)
    done: dict[str, Path] = {}
    for key, name in MNIST_FILES.items():
        target = out_dir / name
        expected = checksums[name]
        if target.is_file() and _sha256(target.read_bytes()) == expected:
            done[key] = target
            continue
        failures: list[str] = []
        for source in sources:
            data = None
            for location in _candidates(source, name):
                try:
                    raw = _decompress(
                        _fetch_with_retries(location, retries, backoff_s, timeout_s, sleep)
                    )
                    got = _sha256(raw)
                    if got != expected:
                        raise _Rejected(
                            f"SHA-256 mismatch (got {got[:12]}…, want {expected[:12]}…)"
                        )
                    data = raw
                    break
                except (OSError, _Rejected, urllib.error.URLError) as exc:
                    failures.append(f"  {location}: {_describe(exc)}")
            if data is not None:
                atomic_write_bytes(target, data)
                log.info("%s <- %s", target, source)
                done[key] = target
                break
        else:
            raise DownloadError(
                f"could not get {name} from any source:\n" + "\n".join(failures) + "\n"
                "Set MNIST_MIRROR to a folder (or http(s)/file URL) holding the MNIST files, "
                "e.g. MNIST_MIRROR=../shared/mnist"
            )
    return done


def load_checksums(path: Path) -> dict[str, str]:
    """Checksums for a private MNIST-format dataset: JSON {file name: sha256}, all four names."""
    data = json.loads(Path(path).read_text())
    missing = sorted(set(MNIST_SHA256) - set(data if isinstance(data, dict) else {}))
    if missing:
        raise DownloadError(f"{path}: checksum file lacks {', '.join(missing)}")
    return {name: str(data[name]) for name in MNIST_SHA256}
