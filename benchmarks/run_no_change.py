"""A no-change ``digitflow run`` vs ``dvc repro``, in this checkout, interleaved (ABBA).

Run in a checkout whose pipeline is up to date (after ``dvc repro``): both commands then
have nothing to do, and what is measured is what each costs to find that out.

    flock /tmp/digitflow-cpu.lock .venv/bin/python benchmarks/run_no_change.py

Prints the medians, the ratio and a PASS/FAIL line against RATIO_LIMIT; writes
benchmarks/results/run_no_change.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.flow_overhead import DVC, FLOW, abba_order

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RATIO_LIMIT = 3.0  # a no-change `digitflow run` may take at most 3x `dvc repro`'s time
COMMANDS = {DVC: [str(BIN / "dvc"), "repro"], FLOW: [str(BIN / "digitflow"), "run"]}


def timed(command: list[str]) -> float:
    """Wall seconds of one run of ``command`` in the project; it must succeed."""
    start = time.perf_counter()
    subprocess.run(command, cwd=PROJECT, capture_output=True, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="ABBA pairs per command")
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {DVC: [], FLOW: []}
    for name in abba_order(args.repeats):
        seconds[name].append(timed(COMMANDS[name]))
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    ratio = medians[FLOW] / medians[DVC]
    result = {"seconds": seconds, "median_s": medians, "ratio": ratio, "limit": RATIO_LIMIT}
    out = PROJECT / "benchmarks/results/run_no_change.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"dvc repro (no change):     {medians[DVC]:6.2f} s median of {len(seconds[DVC])}")
    print(f"digitflow run (no change): {medians[FLOW]:6.2f} s median of {len(seconds[FLOW])}")
    verdict = "PASS" if ratio <= RATIO_LIMIT else "FAIL"
    print(f"{verdict}: digitflow run / dvc repro = {ratio:.2f} (limit {RATIO_LIMIT:.0f}x)")


if __name__ == "__main__":
    main()
