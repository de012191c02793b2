"""Download against a real HTTP server on 127.0.0.1 (no network)."""

from __future__ import annotations

import gzip
import http.server
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tasks.download import MNIST_FILES, DownloadError, download_mnist, load_checksums
from tasks.idx import read_images, write_idx
from tests.local_http import serve


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, bytes]] = {}
    hits: list[str] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        status, body = self.routes.get(self.path, (404, b"not found"))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"routes": {}, "hits": []})
    with serve(handler) as url:
        yield url, handler


def _serve_all(handler: type[_Handler], prefix: str, mirror: Path) -> None:
    for name in MNIST_FILES.values():
        handler.routes[f"{prefix}/{name}.gz"] = (200, (mirror / f"{name}.gz").read_bytes())


def _no_sleep(_: float) -> None:
    pass


def test_downloads_gz_over_http_and_writes_raw_idx(server, tiny_mnist: Path, tmp_path: Path):
    url, handler = server
    _serve_all(handler, "/a", tiny_mnist / "mirror")
    sums = load_checksums(tiny_mnist / "checksums.json")
    out = download_mnist(tmp_path / "raw", [url + "/a/"], checksums=sums, sleep=_no_sleep)
    assert set(out) == set(MNIST_FILES)
    assert read_images(out["train_images"]).shape == (600, 28, 28)
    # written raw (decompressed), whatever the compression served
    assert out["train_images"].read_bytes()[:2] != b"\x1f\x8b"
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(MNIST_FILES.values())


def test_corrupted_file_is_rejected_and_nothing_left_behind(
    server, tiny_mnist: Path, tmp_path: Path
):
    url, handler = server
    _serve_all(handler, "/a", tiny_mnist / "mirror")
    name = MNIST_FILES["train_labels"]
    good = gzip.decompress((tiny_mnist / "mirror" / f"{name}.gz").read_bytes())
    bad = bytearray(good)
    bad[-1] ^= 0xFF  # one flipped byte: still valid gzip and IDX, wrong content
    handler.routes[f"/a/{name}.gz"] = (200, gzip.compress(bytes(bad)))
    sums = load_checksums(tiny_mnist / "checksums.json")
    with pytest.raises(DownloadError, match="SHA-256 mismatch"):
        download_mnist(tmp_path / "raw", [url + "/a"], checksums=sums, sleep=_no_sleep)
    leftovers = [p.name for p in (tmp_path / "raw").iterdir()]
    assert name not in leftovers
    assert not [n for n in leftovers if n.startswith(".")], "temp files left behind"


def test_truncated_gzip_is_rejected(server, tiny_mnist: Path, tmp_path: Path):
    url, handler = server
    _serve_all(handler, "/a", tiny_mnist / "mirror")
    name = MNIST_FILES["test_images"]
    data = (tiny_mnist / "mirror" / f"{name}.gz").read_bytes()
    handler.routes[f"/a/{name}.gz"] = (200, data[: len(data) // 2])
    sums = load_checksums(tiny_mnist / "checksums.json")
    with pytest.raises(DownloadError, match="corrupt gzip"):
        download_mnist(tmp_path / "raw", [url + "/a"], checksums=sums, sleep=_no_sleep)
    assert not (tmp_path / "raw" / name).exists()


@pytest.mark.parametrize("status", [404, 500])
def test_failing_first_mirror_falls_through_to_next(
    server, tiny_mnist: Path, tmp_path: Path, status: int
):
    url, handler = server
    for name in MNIST_FILES.values():
        handler.routes[f"/broken/{name}.gz"] = (status, b"oops")
        handler.routes[f"/broken/{name}"] = (status, b"oops")
    _serve_all(handler, "/good", tiny_mnist / "mirror")
    sums = load_checksums(tiny_mnist / "checksums.json")
    delays: list[float] = []
    out = download_mnist(
        tmp_path / "raw", [url + "/broken", url + "/good"], retries=3, backoff_s=0.5,
        checksums=sums, sleep=delays.append,
    )  # fmt: skip
    assert len(out) == 4
    assert any(h.startswith("/good/") for h in handler.hits)
    if status == 500:  # transient: retried with exponential backoff before moving on
        assert delays[:2] == [0.5, 1.0]
        assert handler.hits.count(f"/broken/{MNIST_FILES['train_images']}.gz") == 3
    else:  # a 404 is final: no retries
        assert delays == []
        assert handler.hits.count(f"/broken/{MNIST_FILES['train_images']}.gz") == 1


def test_transient_error_then_success_is_retried(server, tiny_mnist: Path, tmp_path: Path):
    _url, handler = server
    _serve_all(handler, "/a", tiny_mnist / "mirror")
    name = MNIST_FILES["train_images"]
    body = handler.routes[f"/a/{name}.gz"][1]
    calls = {"n": 0}

    class Flaky(handler):  # type: ignore[misc, valid-type]
        def do_GET(self) -> None:
            if self.path == f"/a/{name}.gz" and calls["n"] < 2:
                calls["n"] += 1
                self.routes[self.path] = (503, b"busy")
            else:
                self.routes[f"/a/{name}.gz"] = (200, body)
            super().do_GET()

    with serve(Flaky) as url:
        sums = load_checksums(tiny_mnist / "checksums.json")
        delays: list[float] = []
        out = download_mnist(
            tmp_path / "raw", [f"{url}/a"], backoff_s=0.25, checksums=sums, sleep=delays.append
        )
    assert len(out) == 4 and delays == [0.25, 0.5]


def test_all_sources_failing_names_each_and_suggests_mirror(server, tmp_path: Path):
    url, _ = server
    missing_dir = tmp_path / "nowhere"
    with pytest.raises(DownloadError) as err:
        download_mnist(tmp_path / "raw", [str(missing_dir), url + "/x"], sleep=_no_sleep)
    msg = str(err.value)
    assert str(missing_dir) in msg and f"{url}/x/" in msg
    assert "HTTP 404" in msg and "no such file" in msg
    assert "MNIST_MIRROR" in msg


def test_local_folder_with_raw_files_and_existing_files_kept(tiny_mnist: Path, tmp_path: Path):
    raw_mirror = tmp_path / "rawmirror"
    raw_mirror.mkdir()
    for name in MNIST_FILES.values():
        gz = (tiny_mnist / "mirror" / f"{name}.gz").read_bytes()
        (raw_mirror / name).write_bytes(gzip.decompress(gz))
    sums = load_checksums(tiny_mnist / "checksums.json")
    out = download_mnist(tmp_path / "raw", [str(raw_mirror)], checksums=sums)
    mtimes = {k: p.stat().st_mtime_ns for k, p in out.items()}
    # second call: files are already there and verified, so the (now empty) source isn't needed
    for f in raw_mirror.iterdir():
        f.unlink()
    again = download_mnist(tmp_path / "raw", [str(raw_mirror)], checksums=sums)
    assert {k: p.stat().st_mtime_ns for k, p in again.items()} == mtimes


def test_file_url_source(tiny_mnist: Path, tmp_path: Path):
    sums = load_checksums(tiny_mnist / "checksums.json")
    out = download_mnist(tmp_path / "raw", [(tiny_mnist / "mirror").as_uri()], checksums=sums)
    assert len(out) == 4


def test_real_mnist_checksums_reject_synthetic_data(tiny_mnist: Path, tmp_path: Path):
    # the tiny set's header declares 600 images, not MNIST's 60,000: refused by its size
    with pytest.raises(DownloadError, match="not MNIST's 47,040,016 bytes"):
        download_mnist(tmp_path / "raw", [str(tiny_mnist / "mirror")])
    # a file of exactly MNIST's shape but other content: refused by its SHA-256
    fake = tmp_path / "fake"
    fake.mkdir()
    write_idx(fake / MNIST_FILES["train_images"], np.zeros((60_000, 28, 28), np.uint8))
    with pytest.raises(DownloadError, match="SHA-256 mismatch"):
        download_mnist(tmp_path / "raw", [str(fake)])
