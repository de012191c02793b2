"""Prefect's overhead: ``digitflow run`` vs ``dvc repro`` of the same pipeline, from the same state.

Every pipeline run starts from its own fresh copy of the project (git + DVC repo
with an empty DVC cache, so nothing is restored from a cache) and reproduces
every stage on real MNIST. The runs alternate ABBA-style (dvc, flow, flow, dvc,
...) so that a warm page cache or a burst of other load does not favour one tool;
wall time and CPU time (the command's whole process tree, plus the Prefect
server meanwhile) are recorded for each, and the overhead is computed from the
medians and checked against OVERHEAD_LIMIT_PCT. ``digitflow run`` talks to a
Prefect server this script starts (``prefect server start``); the start-up cost
of Prefect's ephemeral server (no ``PREFECT_API_URL``) is measured separately
with a trivial flow, on a fresh PREFECT_HOME (cold: new database) and on a
used one (warm).

    flock /tmp/digitflow-cpu.lock .venv/bin/python benchmarks/flow_overhead.py
    .venv/bin/python benchmarks/flow_overhead.py --repeats 1 --epochs 1   # quick check

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
import statistics
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
OVERHEAD_LIMIT_PCT = 10.0  # digitflow run may cost at most this much more than dvc repro
DVC, FLOW = "dvc_repro", "digitflow_run"


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


def _children_cpu_s() -> float:
    """User + system CPU s of all waited-for descendants of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _server_cpu_s(server: subprocess.Popen[bytes] | None) -> float:
    """CPU seconds the Prefect server (and its children) have used so far."""
    if server is None:
        return 0.0
    import psutil

    proc = psutil.Process(server.pid)
    times = [proc.cpu_times(), *(c.cpu_times() for c in proc.children(recursive=True))]
    return sum(t.user + t.system for t in times)


def timed(
    args: list[str], cwd: Path, env: dict[str, str], server: subprocess.Popen[bytes] | None = None
) -> tuple[float, float]:
    """(wall s, CPU s) of one command: its process tree, plus the server meanwhile.

    The command's tree is waited for (dvc waits for its stage commands, the flow for
    its dvc processes), so RUSAGE_CHILDREN covers all of it. On a shared machine wall
    time moves with other users' load; CPU time much less.
    """
    cpu_before, server_before = _children_cpu_s(), _server_cpu_s(server)
    start = time.perf_counter()
    _check(args, cwd, env)
    wall = time.perf_counter() - start
    cpu = _children_cpu_s() - cpu_before + _server_cpu_s(server) - server_before
    return wall, cpu


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


def abba_order(repeats: int) -> list[str]:
    """dvc, flow, flow, dvc, dvc, flow, ...: each tool ``repeats`` times, order balanced."""
    order: list[str] = []
    for i in range(repeats):
        order += [DVC, FLOW] if i % 2 == 0 else [FLOW, DVC]
    return order


def pipeline_runs(
    tmp: Path,
    repeats: int,
    overrides: dict[str, Any],
    run_env: dict[str, str],
    url: str,
    server: subprocess.Popen[bytes],
) -> dict[str, list[dict[str, float]]]:
    """Each tool ``repeats`` times in ABBA order, every run on its own fresh clean repo."""
    commands = {
        DVC: ([sys.executable, "-m", "dvc", "repro"], run_env),
        FLOW: ([str(BIN / "digitflow"), "run"], {**run_env, "PREFECT_API_URL": url}),
    }
    runs: dict[str, list[dict[str, float]]] = {DVC: [], FLOW: []}
    for i, tool in enumerate(abba_order(repeats)):
        repo = make_clean_repo(tmp / f"run{i}-{tool}", overrides)  # not timed
        args, env = commands[tool]
        # both import the copy's tasks/flows (as `digitflow run` does, flows.pipeline.dvc_env),
        # so both compile the same fresh .pyc files
        env = {**env, "PYTHONPATH": str(repo)}
        wall, cpu = timed(args, repo, env, server)
        runs[tool].append({"order": i, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3)})
        print(f"  run {i + 1}: {tool:<14} {wall:7.1f} s wall {cpu:7.1f} s CPU", flush=True)
        shutil.rmtree(repo, ignore_errors=True)  # its data and DVC cache
    return runs


def trivial_flow(tmp: Path, env: dict[str, str], repeats: int, fresh_home: bool) -> list[float]:
    """Wall s of ``repeats`` runs of a one-line flow, each in a fresh interpreter.

    ``fresh_home``: every run gets a new, empty PREFECT_HOME (cold: the ephemeral
    server creates and migrates its database); else they share one, used once
    beforehand (warm).
    """
    if not fresh_home:
        home = Path(tempfile.mkdtemp(prefix="home-warm-", dir=tmp))
        env = {**env, "PREFECT_HOME": str(home)}
        timed([sys.executable, "-c", TRIVIAL_FLOW], tmp, env)  # creates the database
    walls = []
    for _ in range(repeats):
        run_env = env
        if fresh_home:
            run_env = {**env, "PREFECT_HOME": tempfile.mkdtemp(prefix="home-cold-", dir=tmp)}
        walls.append(round(timed([sys.executable, "-c", TRIVIAL_FLOW], tmp, run_env)[0], 3))
    return walls


def warm_up(tmp: Path, env: dict[str, str]) -> None:
    """Untimed: load the interpreter, torch, DVC and Prefect into the page cache."""
    code = "import torch, dvc.repo, prefect, flows.pipeline, tasks.train"
    _check([sys.executable, "-c", code], tmp, env)


def overhead_pct(base: float, other: float) -> float:
    return 100 * (other - base) / base


def summarize(runs: dict[str, list[dict[str, float]]], limit_pct: float) -> dict[str, Any]:
    """Medians per tool and metric, the overhead from them, and the verdict."""
    summary: dict[str, Any] = {}
    for metric in ("wall_s", "cpu_s"):
        dvc = statistics.median(r[metric] for r in runs[DVC])
        flow = statistics.median(r[metric] for r in runs[FLOW])
        pct = overhead_pct(dvc, flow)
        summary[metric] = {
            f"{DVC}_median": round(dvc, 3),
            f"{FLOW}_median": round(flow, 3),
            "overhead_s": round(flow - dvc, 3),
            "overhead_pct": round(pct, 2),
            "pass": pct <= limit_pct,
        }
    summary["limit_pct"] = limit_pct
    summary["pass"] = summary["wall_s"]["pass"] and summary["cpu_s"]["pass"]
    return summary


def main() -> None:
    """Run the benchmark and write the results."""
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument(
        "--mirror",
        type=Path,
        default=PROJECT.parent / "shared" / "mnist",
        help="local MNIST folder ($MNIST_MIRROR of the download stage)",
    )
    ap.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="override every recipe's epochs (None: params.yaml's)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="pipeline runs per tool, in ABBA order (2: dvc, flow, flow, dvc); "
        "even numbers balance the order",
    )
    ap.add_argument(
        "--trivial-repeats", type=int, default=3, help="runs of the trivial flow per setting"
    )
    ap.add_argument(
        "--limit-pct", type=float, default=OVERHEAD_LIMIT_PCT, help="allowed overhead, %%"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=PROJECT / "benchmarks/results/flow_overhead.json",
        help="JSON file for the results",
    )
    args = ap.parse_args()
    if args.repeats < 1 or args.trivial_repeats < 1:
        ap.error("--repeats and --trivial-repeats must be >= 1")
    if not args.mirror.is_dir():
        ap.error(f"--mirror {args.mirror}: no such folder (a local copy of the MNIST files)")

    recipes = yaml.safe_load((PROJECT / "params.yaml").read_text())["train"]
    overrides: dict[str, Any] = (
        {"train": {name: {**r, "epochs": args.epochs} for name, r in recipes.items()}}
        if args.epochs
        else {}
    )
    epochs = args.epochs or {name: r["epochs"] for name, r in recipes.items()}
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "config": f"params.yaml with epochs {epochs}",
        "repeats": args.repeats,
        "order": abba_order(args.repeats),
    }
    print(f"{results['config']}; {results['machine']}; order {' '.join(results['order'])}")
    with tempfile.TemporaryDirectory(prefix="digitflow-bench-") as tmp_str:
        tmp = Path(tmp_str)
        home = tmp / "prefect-home"
        home.mkdir()
        run_env = _env(MNIST_MIRROR=str(args.mirror.resolve()), PREFECT_HOME=str(home))
        warm_up(tmp, run_env)

        server, url, results["server_start_s"] = start_server(home)  # fresh database
        try:
            runs = pipeline_runs(tmp, args.repeats, overrides, run_env, url, server)
            server_env = {**run_env, "PREFECT_API_URL": url}
            results["trivial_flow_server_s"] = trivial_flow(
                tmp, server_env, args.trivial_repeats, fresh_home=False
            )
        finally:
            server.terminate()
            server.wait(timeout=30)
        results["trivial_flow_ephemeral_warm_s"] = trivial_flow(
            tmp, run_env, args.trivial_repeats, fresh_home=False
        )
        results["trivial_flow_ephemeral_cold_s"] = trivial_flow(
            tmp, run_env, args.trivial_repeats, fresh_home=True
        )

    results["runs"] = runs
    results["overhead"] = summary = summarize(runs, args.limit_pct)
    trivial = {
        key: statistics.median(results[f"trivial_flow_{key}_s"])
        for key in ("server", "ephemeral_warm", "ephemeral_cold")
    }
    results["trivial_flow_median_s"] = {k: round(v, 3) for k, v in trivial.items()}
    results["ephemeral_startup_s"] = {
        "warm": round(trivial["ephemeral_warm"] - trivial["server"], 3),
        "cold": round(trivial["ephemeral_cold"] - trivial["server"], 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    def samples(tool: str, metric: str) -> str:
        return ", ".join(f"{r[metric]:.1f}" for r in runs[tool])

    wall, cpu = summary["wall_s"], summary["cpu_s"]
    rows = [
        (
            "`dvc repro` (all stages, clean state), median wall",
            f"{wall[f'{DVC}_median']:.1f} s ({samples(DVC, 'wall_s')})",
        ),
        (
            "`digitflow run` (same, Prefect server), median wall",
            f"{wall[f'{FLOW}_median']:.1f} s ({samples(FLOW, 'wall_s')})",
        ),
        (
            "**overhead, wall**",
            f"{wall['overhead_s']:+.1f} s ({wall['overhead_pct']:+.1f} %)",
        ),
        (
            "CPU time `dvc repro` / `digitflow run`, medians",
            f"{cpu[f'{DVC}_median']:.1f} s / {cpu[f'{FLOW}_median']:.1f} s",
        ),
        (
            "**overhead, CPU** (process trees + server)",
            f"{cpu['overhead_s']:+.1f} s ({cpu['overhead_pct']:+.1f} %)",
        ),
        ("trivial flow, Prefect server", f"{trivial['server']:.1f} s"),
        ("trivial flow, ephemeral, used PREFECT_HOME (warm)", f"{trivial['ephemeral_warm']:.1f} s"),
        (
            "trivial flow, ephemeral, fresh PREFECT_HOME (cold)",
            f"{trivial['ephemeral_cold']:.1f} s",
        ),
        (
            "**ephemeral server start-up cost**, warm / cold",
            f"{results['ephemeral_startup_s']['warm']:.1f} s / "
            f"{results['ephemeral_startup_s']['cold']:.1f} s per run",
        ),
        (
            "`prefect server start` until healthy (fresh database)",
            f"{results['server_start_s']:.1f} s",
        ),
    ]
    print("\n| measurement | time |\n|---|---|")
    print("\n".join(f"| {name} | {value} |" for name, value in rows))
    print()
    for metric, label in (("wall_s", "wall"), ("cpu_s", "CPU")):
        verdict = "PASS" if summary[metric]["pass"] else "FAIL"
        print(
            f"{verdict}: {label} overhead {summary[metric]['overhead_pct']:+.1f} % "
            f"(limit {args.limit_pct:.0f} %)"
        )
    print(f"overall: {'PASS' if summary['pass'] else 'FAIL'}")
    if args.repeats % 2:
        print(f"note: {args.repeats} repeat(s): the order is not balanced (use an even number)")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
