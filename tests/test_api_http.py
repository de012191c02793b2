"""`digitflow api` over real HTTP: the CLI serving on 127.0.0.1 in a subprocess.

A model swap during a stream of requests (none may fail), a refused model file, slow
senders and oversized bodies, with http.client keep-alive connections.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.images import REFERENCES, png_bytes
from tests.test_api import make_model

pytestmark = pytest.mark.slow  # each server start imports torch: a few seconds

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90  # torch + the model, on a busy 2-core machine
POLL_S = 0.1  # the model file poll of the servers here
TIME_LIMIT_S = 2.0  # per request: short, for the slow-sender test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def health(self) -> dict:
        c = self.conn()
        c.request("GET", "/health")
        return json.loads(c.getresponse().read())


def start_server(model: Path, log: Path, *extra: str) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "flows.cli", "api", "--model", str(model), "--port", str(port),
           "--poll", str(POLL_S), "--time-limit", str(TIME_LIMIT_S), *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    server = Server(port, proc, log)
    end = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < end:
        assert proc.poll() is None, log.read_text()
        try:
            server.health()
            return server
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no answer in {START_TIMEOUT_S} s: {log.read_text()}")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    model = make_model(tmp_path / "model.pt", 0)
    s = start_server(model, tmp_path / "server.log")
    yield s
    s.proc.terminate()
    s.proc.wait(timeout=30)


def post_png(conn: http.client.HTTPConnection, data: bytes) -> tuple[int, dict[str, str], bytes]:
    conn.request("POST", "/predict", data, {"Content-Type": "image/png"})
    resp = conn.getresponse()
    return resp.status, dict(resp.getheaders()), resp.read()


def raw_answer(sock: socket.socket) -> tuple[int, dict]:
    """The status and JSON body of the answer on a socket the test wrote a request to."""
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    return resp.status, json.loads(resp.read())


def test_predict_and_errors_over_http(server: Server) -> None:
    conn = server.conn()  # one keep-alive connection for all of these
    status, headers, body = post_png(conn, png_bytes(REFERENCES[4]))
    assert status == 200 and headers["content-type"] == "application/json"
    (row,) = json.loads(body)
    assert row["path"] == "-" and row["status"] == "ok" and isinstance(row["label"], int)

    conn.request("POST", "/predict", b"hello", {"Content-Type": "text/plain"})
    resp = conn.getresponse()
    assert resp.status == 415 and "text/plain" in json.loads(resp.read())["detail"]

    status, _, body = post_png(conn, b"\x89PNG\r\n\x1a\nbroken")
    assert status == 415 and json.loads(body)["detail"]

    # a declared 1 GB body is refused from its headers, before it is sent
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    raw.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: 1000000000\r\n\r\n" + b"x" * 1000)  # fmt: skip
    status, body = raw_answer(raw)
    raw.close()
    assert status == 413 and "too large" in body["detail"]

    status, _, _ = post_png(server.conn(), png_bytes(REFERENCES[4]))
    assert status == 200  # still serving


def test_slow_sender_gets_408_and_others_are_served(server: Server) -> None:
    slow = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                 b"Content-Length: 5000\r\n\r\n" + b"\x89PNG")  # fmt: skip
    t0 = time.monotonic()
    conn = server.conn()
    for _ in range(20):  # normal requests meanwhile
        status, _, _ = post_png(conn, png_bytes(REFERENCES[1]))
        assert status == 200
    status, body = raw_answer(slow)  # waits for the time limit
    assert status == 408 and "not received" in body["detail"]
    assert time.monotonic() - t0 < TIME_LIMIT_S + 5
    slow.close()


def test_swap_during_a_stream_of_requests_fails_none(server: Server, tmp_path: Path) -> None:
    """Clients send without pause while the model file is replaced, then damaged."""
    model = Path(server.health()["model"]["path"])
    old_sha = server.health()["model"]["sha256"]
    data = png_bytes(REFERENCES[3])
    stop = threading.Event()
    seen: list[tuple[float, int, str]] = []  # (time, status, model sha) of every answer
    errors: list[str] = []

    def client() -> None:
        conn = server.conn()
        while not stop.is_set():
            try:
                status, headers, body = post_png(conn, data)
            except (OSError, http.client.HTTPException) as exc:
                errors.append(repr(exc))
                conn = server.conn()
                continue
            seen.append((time.monotonic(), status, headers.get("x-model-sha256", "")))
            if status != 200:
                errors.append(body.decode(errors="replace"))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    new = make_model(tmp_path / "staged.pt", 1)
    os.replace(new, model)  # a promotion / dvc checkout: a new file in its place
    new_sha = None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        health = server.health()
        if health["swaps"] == 1:
            new_sha = health["model"]["sha256"]
            break
        time.sleep(0.05)
    assert new_sha is not None and new_sha != old_sha
    time.sleep(0.5)
    model.write_bytes(b"a half-copied or foreign file")  # damaged in place: refused
    deadline = time.monotonic() + 20
    while server.health()["refused"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()

    assert errors == []
    assert len(seen) > 50 and all(status == 200 for _, status, _ in seen)
    shas = [sha for _, _, sha in sorted(seen)]
    assert shas[0] == old_sha and shas[-1] == new_sha and set(shas) == {old_sha, new_sha}
    health = server.health()
    assert health["model"]["sha256"] == new_sha and health["swaps"] == 1
    assert health["refused"]["path"] == str(model)
    log = server.log.read_text()
    assert log.count("model swapped") == 1 and log.count("refused") == 1
