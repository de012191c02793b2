"""glibc malloc thresholds for the training and evaluation commands (tasks/malloc.py)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from tasks.malloc import keep_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_thresholds_are_set_on_glibc() -> None:
    # in a child process: the setting is process-wide and must not leak into this one
    code = "from tasks.malloc import keep_freed_memory as k; raise SystemExit(0 if k() else 1)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_other_c_libraries_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ctypes.util.find_library", lambda name: None)
    assert keep_freed_memory() is False
