"""`digitflow api` speed: requests/s and latency over real HTTP on 127.0.0.1.

The real CLI serves the model in a subprocess; 8 client threads, each with its own
keep-alive connection (http.client), send one image per request as a raw
``image/*`` body for a fixed time, after a warm-up:

* ``png28``: a 28x28 MNIST-like PNG (an MNIST test digit when the data is there,
  else a rendered one);
* ``jpeg640``: a photo-like 640x480 JPEG (dark digit on shaded, noisy paper).

Every answer must be 200 with one row; any other answer counts as a failure.
The clients run on the same 2 cores as the server (in one process: their Python
takes up to a core), so the figures are a lower bound of what the server does alone.

Targets (issue 19), printed as PASS/FAIL lines, exit code 1 if any fails:

* png28: >= 500 requests/s and p99 latency <= 50 ms, no failed request;
* jpeg640: >= 150 requests/s, no failed request.

    flock /tmp/digitflow-cpu.lock .venv/bin/python -m benchmarks.api_speed \\
        [--model data/models/robust/model.pt] [--seconds 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from flows.paths import model_file
from tests.images import REFERENCES, big_glyph, photo, png_bytes

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 8
PNG_RPS, PNG_P99_MS, JPEG_RPS = 500.0, 50.0, 150.0  # the targets (module docstring)
WARMUP_S = 2.0  # before measuring: the first requests build caches
START_TIMEOUT_S = 60.0  # the server loads torch and the model
JPEG_QUALITY = 90  # a phone's usual setting
PHOTO_SIZE = (480, 640)  # (height, width)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, workers: int) -> subprocess.Popen[bytes]:
    """`digitflow api` in a subprocess; returns once /health answers."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "flows.cli", "api", "--model", str(model), "--port", str(port),
           "--workers", str(workers)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.PIPE)
    end = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < end:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise SystemExit(f"server exited {proc.returncode}: {err.strip()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not answer /health in time")


def sample_png() -> bytes:
    """An MNIST test digit as a PNG when the prepared data is there, else a rendered one."""
    test = ROOT / "data/prepared/test.npz"
    if test.is_file():
        return png_bytes(np.load(test)["x"][0])
    return png_bytes(REFERENCES[7])


def sample_jpeg() -> bytes:
    img = photo(big_glyph(4), np.random.default_rng(0), PHOTO_SIZE)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    assert ok
    return buf.tobytes()


def load(port: int, body: bytes, ctype: str, seconds: float) -> dict[str, Any]:
    """CLIENTS keep-alive clients for ``seconds`` (after a warm-up): rate and latency."""
    latencies: list[list[float]] = [[] for _ in range(CLIENTS)]
    failures = [0] * CLIENTS
    phase = {"measure_from": 0.0, "stop": 0.0}
    start = threading.Barrier(CLIENTS + 1)

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"Content-Type": ctype}
        start.wait()
        while (now := time.perf_counter()) < phase["stop"]:
            try:
                conn.request("POST", "/predict", body, headers)
                resp = conn.getresponse()
                data = resp.read()
                ok = resp.status == 200 and len(json.loads(data)) == 1
            except (OSError, http.client.HTTPException, ValueError):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            end = time.perf_counter()
            if now >= phase["measure_from"]:
                latencies[i].append(end - now)
                failures[i] += not ok
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    phase["measure_from"], phase["stop"] = t0 + WARMUP_S, t0 + WARMUP_S + seconds
    start.wait()
    for t in threads:
        t.join()
    lat = np.array([x for per in latencies for x in per]) * 1000
    return {
        "requests": int(lat.size),
        "failed": int(sum(failures)),
        "rps": round(lat.size / seconds, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / model_file("robust"))
    ap.add_argument("--seconds", type=float, default=10.0, help="measured time per case")
    ap.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    port = free_port()
    load_before = os.getloadavg()[0]  # other processes on the 2 cores skew the figures
    proc = start_server(args.model, port, args.workers)
    try:
        png = load(port, sample_png(), "image/png", args.seconds)
        jpeg = load(port, sample_jpeg(), "image/jpeg", args.seconds)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    results = {
        "clients": CLIENTS, "workers": args.workers, "cpus": os.cpu_count(),
        "load_before": load_before, "png28": png, "jpeg640": jpeg,
    }  # fmt: skip
    print(json.dumps(results, indent=2))
    checks = [
        (f"png28 >= {PNG_RPS:g} req/s", png["rps"] >= PNG_RPS, f"{png['rps']} req/s"),
        (f"png28 p99 <= {PNG_P99_MS:g} ms", (png["p99_ms"] or 1e9) <= PNG_P99_MS,
         f"{png['p99_ms']} ms"),
        (f"jpeg640 >= {JPEG_RPS:g} req/s", jpeg["rps"] >= JPEG_RPS, f"{jpeg['rps']} req/s"),
        ("no failed request", png["failed"] + jpeg["failed"] == 0,
         f"{png['failed'] + jpeg['failed']} failed"),
    ]  # fmt: skip
    for name, passed, got in checks:
        print(f"{'PASS' if passed else 'FAIL'}: {name} ({got})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(passed for _, passed, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
