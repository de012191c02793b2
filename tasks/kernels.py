"""The same numbers on every x86-64 CPU: PyTorch's CPU kernels capped at AVX2.

PyTorch picks its CPU kernels by the instruction set it finds (ATen: AVX2 or AVX-512;
oneDNN: up to AVX-512 and AMX), and kernels of different widths sum in different orders.
From the same data and seed, the seed recipe trained on an AVX-512 machine ends at 98.38 %
test accuracy and on an AVX2 one at 98.64 %; capped at AVX2, the AVX-512 machine trains
the AVX2 machine's model bit for bit (same file hash). The pipeline's stages that train
and score models cap them, so `dvc repro` gives the committed numbers on either machine.
"""

from __future__ import annotations

import os
import sys

# ATen's kernel dispatch, and oneDNN's (convolutions): read once, when torch loads them
CPU_KERNELS_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def same_kernels_on_every_cpu() -> bool:
    """Cap this process's CPU kernels at AVX2 (a user's own setting wins).

    Must run before torch is imported; returns False (and sets nothing) if it already is.
    """
    if "torch" in sys.modules:
        return False
    for name, value in CPU_KERNELS_ENV.items():
        os.environ.setdefault(name, value)
    return True
