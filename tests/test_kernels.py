"""The pipeline's stages use the same CPU kernels on every x86 machine (tasks/kernels.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "from tasks.kernels import same_kernels_on_every_cpu as pin; first = pin(); "
    "import torch; print(first, pin(), torch.backends.cpu.get_cpu_capability())"
)


def _probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY",)}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], env=clean | {"PYTHONPATH": str(ROOT), **env},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return proc.stdout.split()


def test_kernels_are_capped_at_avx2_before_torch_loads_and_not_after() -> None:
    first, again, capability = _probe()
    assert (first, again) == ("True", "False")  # once torch is loaded it is too late
    assert capability in ("AVX2", "DEFAULT")  # never AVX512, whatever the machine has


def test_a_users_own_choice_wins() -> None:
    assert _probe(ATEN_CPU_CAPABILITY="default")[2] == "DEFAULT"
