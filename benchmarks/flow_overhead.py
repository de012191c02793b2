"""Prefect's overhead: ``digitflow run`` vs ``dvc repro`` of the same pipeline, from the same state.

Both runs start from an identical fresh copy of the project (git + DVC repo with an
empty DVC cache, so nothing is restored from a cache) and reproduce every stage
on real MNIST. ``digitflow run`` talks to a Prefect server this script starts
(``prefect server start``); the start-up cost of Prefect's ephemeral server (no
``PREFECT_API_URL``) is measured separately with a trivial flow.

    flock /tmp/digitflow-cpu.lock .venv/bin/python benchmarks/flow_overhead.py

Writes benchmarks/results/flow_overhead.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SERVER_START_TIMEOUT_S = 120  # a cold `prefect server start` migrates a fresh database first
TRIVIAL_FLOW = (
    "from prefect import flow\n@flow\ndef noop() -> int:\n    return 1\nassert noop() == 1\n"
)
REPEATS = 3  # trivial-flow timings: take the fastest, the least disturbed by other load


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _check(args: list[str], cwd: Path, env: dict[str, str]) -> None:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )


def _timed(args: list[str], cwd: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    _check(args, cwd, env)
    return time.perf_counter() - start


def _server_cpu_s(server: subprocess.Popen[bytes]) -> float:
    """CPU seconds the Prefect server (and its children) have used so far."""
    import psutil

    proc = psutil.Process(server.pid)
    times = [proc.cpu_times(), *(c.cpu_times() for c in proc.children(recursive=True))]
    return sum(t.user + t.system for t in times)


def _timed_with_cpu(
    args: list[str], cwd: Path, env: dict[str, str], server: subprocess.Popen[bytes]
) -> tuple[float, float]:
    """(wall s, CPU s of the command's process tree + the server meanwhile).

    On a shared machine wall time moves with other users' load; CPU time much less.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = _server_cpu_s(server)
    wall = _timed(args, cwd, env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu + _server_cpu_s(server) - server_before


# What a fresh copy of the project needs to reproduce dvc.yaml: the pipeline, its code and
# the git-tracked inputs (the predict stage's example folder).
SOURCES = ("dvc.yaml", "params.yaml", "tasks", "flows", "data/inbox")


def copy_sources(where: Path) -> None:
    """Copy SOURCES (those that exist) from the project into ``where``."""
    for name in SOURCES:
        src, dst = PROJECT / name, where / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)


def make_clean_repo(where: Path, overrides: dict[str, Any]) -> Path:
    """A fresh git + DVC repo of this project (own, empty DVC cache), params overridden."""
    where.mkdir(parents=True)
    copy_sources(where)
    if overrides:
        params = yaml.safe_load((where / "params.yaml").read_text())
        for section, values in overrides.items():
            params[section].update(values)
        (where / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (where / ".dvcignore").write_text("__pycache__/\n")
    (where / ".gitignore").write_text("__pycache__/\n/data/checkpoints/\n")
    env = _env()
    for args in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "bench@digitflow"],
        ["git", "config", "user.name", "digitflow benchmark"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-q", "-m", "pipeline"],
    ):
        _check(args, where, env)
    return where


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path) -> tuple[subprocess.Popen[bytes], str, float]:
    """`prefect server start` on a free local port; returns (process, API URL, start-up s)."""
    port = _free_port()
    log = (home / "server.log").open("wb")
    start = time.perf_counter()
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=_env(PREFECT_HOME=str(home)),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = start + SERVER_START_TIMEOUT_S
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited early; see {home / 'server.log'}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc, url, time.perf_counter() - start
        except OSError:
            time.sleep(0.25)  # not listening yet
    proc.terminate()
    raise RuntimeError(f"prefect server not healthy after {SERVER_START_TIMEOUT_S} s")


def trivial_flow_s(cwd: Path, env: dict[str, str]) -> float:
    """Fastest of REPEATS runs of a one-line flow in a fresh interpreter."""
    return min(_timed([sys.executable, "-c", TRIVIAL_FLOW], cwd, env) for _ in range(REPEATS))


def main() -> None:
    """Run the benchmark and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mirror", type=Path, default=PROJECT.parent / "shared" / "mnist")
    ap.add_argument("--epochs", type=int, default=None, help="override train.epochs (seed: 5)")
    ap.add_argument("--out", type=Path, default=PROJECT / "benchmarks/results/flow_overhead.json")
    args = ap.parse_args()

    overrides: dict[str, Any] = {"train": {"epochs": args.epochs}} if args.epochs else {}
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "config": "seed params.yaml" + (f" with train.epochs={args.epochs}" if args.epochs else ""),
    }
    with tempfile.TemporaryDirectory(prefix="digitflow-bench-") as tmp_str:
        tmp = Path(tmp_str)
        home = tmp / "prefect-home"
        home.mkdir()
        run_env = _env(MNIST_MIRROR=str(args.mirror.resolve()), PREFECT_HOME=str(home))

        server, url, results["server_start_s"] = start_server(home)
        try:
            # the same clean state twice: one fresh copy per tool
            plain = make_clean_repo(tmp / "dvc-repro", overrides)
            flowed = make_clean_repo(tmp / "digitflow-run", overrides)
            results["dvc_repro_s"], results["dvc_repro_cpu_s"] = _timed_with_cpu(
                [sys.executable, "-m", "dvc", "repro"], plain, run_env, server
            )
            results["digitflow_run_s"], results["digitflow_run_cpu_s"] = _timed_with_cpu(
                [str(BIN / "digitflow"), "run"],
                flowed,
                {**run_env, "PREFECT_API_URL": url},
                server,
            )
            results["trivial_flow_server_s"] = trivial_flow_s(
                tmp, {**run_env, "PREFECT_API_URL": url}
            )
        finally:
            server.terminate()
            server.wait(timeout=30)
        results["trivial_flow_ephemeral_s"] = trivial_flow_s(tmp, run_env)

    results["overhead_s"] = results["digitflow_run_s"] - results["dvc_repro_s"]
    results["overhead_pct"] = 100 * results["overhead_s"] / results["dvc_repro_s"]
    results["overhead_cpu_s"] = results["digitflow_run_cpu_s"] - results["dvc_repro_cpu_s"]
    results["overhead_cpu_pct"] = 100 * results["overhead_cpu_s"] / results["dvc_repro_cpu_s"]
    results["ephemeral_startup_s"] = (
        results["trivial_flow_ephemeral_s"] - results["trivial_flow_server_s"]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    rows = [
        ("`dvc repro` (all stages, clean state)", f"{results['dvc_repro_s']:.1f} s"),
        ("`digitflow run` (same, Prefect server)", f"{results['digitflow_run_s']:.1f} s"),
        (
            "overhead of the flow",
            f"{results['overhead_s']:+.1f} s ({results['overhead_pct']:+.1f} %)",
        ),
        (
            "CPU time: `dvc repro` / `digitflow run`",
            f"{results['dvc_repro_cpu_s']:.1f} s / {results['digitflow_run_cpu_s']:.1f} s",
        ),
        (
            "CPU overhead of the flow",
            f"{results['overhead_cpu_s']:+.1f} s ({results['overhead_cpu_pct']:+.1f} %)",
        ),
        ("trivial flow, Prefect server", f"{results['trivial_flow_server_s']:.1f} s"),
        (
            "trivial flow, ephemeral (no PREFECT_API_URL)",
            f"{results['trivial_flow_ephemeral_s']:.1f} s",
        ),
        ("ephemeral server start-up cost", f"{results['ephemeral_startup_s']:.1f} s"),
        ("`prefect server start` until healthy", f"{results['server_start_s']:.1f} s"),
    ]
    print(f"{results['config']}; {results['machine']}\n")
    print("| measurement | time |\n|---|---|")
    print("\n".join(f"| {name} | {value} |" for name, value in rows))


if __name__ == "__main__":
    main()
