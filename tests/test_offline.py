"""No command of the project reaches the internet on its own (issue 15.4): the settings.

DVC's usage analytics and version check, and Prefect's server and client telemetry, are
off in the project's own config, as DVC and Prefect read it from the project folder.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _user_env() -> dict[str, str]:
    """A user's environment: none of the opt-outs set by hand."""
    drop = ("PREFECT_", "DVC_NO_", "DO_NOT_TRACK")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


@pytest.mark.parametrize("key", ["core.analytics", "core.check_update"])
def test_dvc_reports_nothing_and_checks_no_version(key: str) -> None:
    proc = subprocess.run(
        [str(BIN / "dvc"), "config", key], cwd=ROOT, env=_user_env(),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert proc.stdout.strip() == "false"


def test_prefect_servers_started_in_the_project_send_no_telemetry(tmp_path: Path) -> None:
    code = (
        "from prefect.settings import get_current_settings as s; "
        "print(s().server.analytics_enabled)"
    )
    env = _user_env() | {"PREFECT_HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert proc.stdout.strip() == "False"


def test_digitflow_turns_prefect_telemetry_off_wherever_it_runs(tmp_path: Path) -> None:
    """From another folder too (`--root`): the client's DO_NOT_TRACK and the server's setting."""
    code = (
        "import os; from flows.cli import quiet_temporary_server; quiet_temporary_server(); "
        "from prefect.settings import get_current_settings as s; "
        "print(os.environ['DO_NOT_TRACK'], s().server.analytics_enabled)"
    )
    env = _user_env() | {"PREFECT_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    assert proc.stdout.split() == ["1", "False"]
    # a user's own choice is kept
    env["DO_NOT_TRACK"] = "0"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    assert proc.stdout.split()[0] == "0"


@pytest.mark.slow
def test_dvc_plots_page_loads_nothing_from_the_network(tmp_path: Path) -> None:
    """`dvc plots show` writes a page with vega's scripts inline, not from a CDN."""
    out = tmp_path / "plots"
    subprocess.run(
        [str(BIN / "dvc"), "plots", "show", "-o", str(out)], cwd=ROOT, env=_user_env(),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    page = (out / "index.html").read_text()
    # the page's own tags, the scripts' text left out
    tags = re.sub(r"(<script\b[^>]*>).*?</script>", r"\1", page, flags=re.DOTALL | re.IGNORECASE)
    assert not re.search(r"<(script|link|img)\b[^>]*\b(src|href)=", tags, re.IGNORECASE)
    assert "vega-embed@6" in page and "vegaEmbed(" in page  # the scripts, and plots that use them
