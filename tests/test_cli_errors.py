"""The CLI's one error policy (flows/cli/errors.py) across every command, and its --help groups.

Expected errors: one line on stderr, exit 2, nothing on stdout, no traceback. A bug (an
exception the policy does not name) keeps its traceback, in a real `digitflow` process.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from flows.cli.errors import exit_code_for
from tasks.errors import USAGE_EXIT, WORK_EXIT, DigitflowError

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
PANELS = {
    "Pipeline stages": [
        "check-params",
        "download",
        "split",
        "render",
        "labeled",
        "train",
        "evaluate",
        "report",
    ],
    "Prediction": ["predict", "batch-predict", "api"],
    "Your own images": ["label"],
    "Prefect flows": ["run", "retrain", "serve"],
    "Experiments": ["exps"],
}
# A promotion rule of retrain: never overridable, refused before git or Prefect is asked
FORBIDDEN_OVERRIDE = "retrain.max_class_drop=1"


def _bad_params(tmp_path: Path) -> Path:
    params = tmp_path / "bad-params.yaml"
    params.write_text(yaml.safe_dump({"split": {"val_fraction": 1.5}}))
    return params


def _args(command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``command`` with arguments that make one known expected error (each class once)."""
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not a model" * 10)
    nowhere = tmp_path / "missing"
    if command == "check-params":  # ParamsError, and no stamp written
        return ["check-params", "--out", str(tmp_path / "params.ok"),
                "--params", str(_bad_params(tmp_path))]  # fmt: skip
    if command == "download":  # DownloadError: the only source is not there
        params = tmp_path / "params.yaml"
        params.write_text(yaml.safe_dump({"download": {"mirrors": [], "retries": 1}}))
        monkeypatch.setenv("MNIST_MIRROR", str(nowhere))
        monkeypatch.delenv("DIGITFLOW_MNIST_CHECKSUMS", raising=False)
        return ["download", "--out", str(tmp_path / "raw"), "--params", str(params)]
    if command == "split":  # FileNotFoundError: no raw files
        return ["split", "--raw", str(nowhere), "--out", str(tmp_path / "prep"),
                "--params", str(ROOT / "params.yaml")]  # fmt: skip
    if command == "render":  # FileNotFoundError: no training split
        return ["render", "--data", str(nowhere), "--out", str(tmp_path / "r.npz"),
                "--params", str(ROOT / "params.yaml")]  # fmt: skip
    if command == "train":  # ParamsError
        return ["train", "--data", str(tmp_path), "--model", str(tmp_path / "m.pt"),
                "--params", str(_bad_params(tmp_path))]  # fmt: skip
    if command == "evaluate":  # ModelFileError
        return ["evaluate", "--model", str(junk), "--test", str(tmp_path / "t.npz"),
                "--out", str(tmp_path / "e"), "--params", str(ROOT / "params.yaml")]  # fmt: skip
    if command == "report":  # FileNotFoundError via the model loader
        return ["report", "--model", str(nowhere / "model.pt"), "--eval-dir", str(tmp_path),
                "--test", str(tmp_path / "t.npz"), "--out", str(tmp_path / "r"),
                "--params", str(ROOT / "params.yaml")]  # fmt: skip
    if command == "predict":  # UsageError: no --model, and no project with its default model
        monkeypatch.chdir(tmp_path)
        return ["predict", str(tmp_path), "--out", str(tmp_path / "o.csv")]
    if command == "batch-predict":  # ParamsError, before Prefect is imported
        return ["batch-predict", str(tmp_path), "--model", str(junk),
                "--params", str(_bad_params(tmp_path))]  # fmt: skip
    if command == "labeled":  # ParamsError
        return ["labeled", "--inbox", str(tmp_path), "--out", str(tmp_path / "split"),
                "--params", str(_bad_params(tmp_path))]  # fmt: skip
    if command == "label":  # UsageError: files without --as
        return ["label", str(junk)]
    if command == "api":  # ModelFileError, before anything is bound
        return ["api", "--model", str(junk), "--port", "1"]
    if command in ("run", "exps"):  # UsageError: --root is not a DVC repository
        return [command, "--root", str(nowhere)]
    # retrain, serve: RetrainError (an override of a promotion rule)
    return [command, "--root", str(tmp_path), "-S", FORBIDDEN_OVERRIDE]


@pytest.mark.parametrize("command", [c for cs in PANELS.values() for c in cs])
def test_each_command_makes_an_expected_error_one_line_and_exit_2(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = runner.invoke(app, _args(command, tmp_path, monkeypatch))
    assert result.exit_code == USAGE_EXIT, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output


# Each expected error of the project and the exit code it carries (tasks/errors.py)
EXPECTED_ERRORS = [
    ("flows.cli.errors", "UsageError", USAGE_EXIT),
    ("tasks.config", "ParamsError", USAGE_EXIT),
    ("tasks.download", "DownloadError", USAGE_EXIT),
    ("tasks.model", "ModelFileError", USAGE_EXIT),
    ("flows.api", "ModelCheckError", USAGE_EXIT),
    ("tasks.predict", "PredictUsageError", USAGE_EXIT),
    ("flows.retrain", "RetrainError", USAGE_EXIT),
    ("tasks.idx", "IdxError", WORK_EXIT),
    ("tasks.data", "DatasetError", WORK_EXIT),
    ("tasks.predict", "PredictOutputError", WORK_EXIT),  # the output's disk is full
]


@pytest.mark.parametrize(("module_name", "class_name", "code"), EXPECTED_ERRORS)
def test_each_expected_error_carries_its_exit_code(
    module_name: str, class_name: str, code: int
) -> None:
    cls = getattr(importlib.import_module(module_name), class_name)
    assert issubclass(cls, DigitflowError), (module_name, class_name)
    assert exit_code_for(cls("x")) == code


def test_a_missing_file_is_expected_and_anything_else_a_bug() -> None:
    from tasks.model import TorchFileError

    assert exit_code_for(FileNotFoundError("x")) == USAGE_EXIT
    for bug in (ValueError("x"), KeyError("x"), RuntimeError("x"), TorchFileError("x")):
        assert exit_code_for(bug) is None, bug


def test_the_error_policy_imports_neither_torch_nor_prefect() -> None:
    """A light command (download, split) classifies its errors without the heavy libraries."""
    code = (
        "import sys, flows.cli.errors\n"
        "heavy = [m for m in ('torch', 'prefect') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr


def test_help_groups_the_commands_in_three_panels() -> None:
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    text = result.output
    starts = {panel: text.index(panel) for panel in PANELS}
    order = sorted(starts, key=starts.get)
    for i, panel in enumerate(order):
        end = starts[order[i + 1]] if i + 1 < len(order) else len(text)
        section = text[starts[panel] : end].split()
        assert all(command in section for command in PANELS[panel]), (panel, section)


# A bug inside the work: an exception the policy does not name, raised where the step runs.
# Injected in a real `digitflow` process (flows.cli.main), whose stderr is what a user sees.
_WITH_A_BUG = """
import sys
import {module} as m
def broken(*args, **kwargs):
    raise {error}("injected bug")
m.{function} = broken
from flows.cli import main
sys.argv[0] = "digitflow"
main()
"""


@pytest.mark.parametrize(
    ("module", "function", "error", "args"),
    [
        ("tasks.split", "split_dataset", "ValueError", ["split", "--raw", "{tmp}"]),
        ("tasks.predict", "predict_paths", "KeyError", ["predict", "{tmp}", "--model", "x.pt"]),
    ],
)
def test_a_bug_keeps_its_traceback(
    module: str, function: str, error: str, args: list[str], tmp_path: Path
) -> None:
    code = _WITH_A_BUG.format(module=module, function=function, error=error)
    argv = [a.format(tmp=tmp_path) for a in args] + ["--params", str(ROOT / "params.yaml")]
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr
    assert f"{error}: " in proc.stderr and "injected bug" in proc.stderr
    assert "error: " not in proc.stderr.splitlines()[-1]  # not turned into an expected error


def test_version_prints_the_installed_version() -> None:
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"digitflow {version('digitflow')}"


@pytest.mark.parametrize("command", [c for cs in PANELS.values() for c in cs])
def test_help_names_values_as_a_person_would(command: str) -> None:
    """`--out OUT`, a bare `--verbose`, `PATHS...`: not `<path>`, `<bool>` or `{paths}...`."""
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    usage = result.output.strip().splitlines()[0]
    assert not re.search(r"[{}<>]", usage), usage
    assert not re.search(r"<(bool|path|str|int|float|list)\b", result.output), result.output
    main = runner.invoke(app, ["--help"], env={"COLUMNS": "100"}).output
    assert "<bool>" not in main and "--version" in main
