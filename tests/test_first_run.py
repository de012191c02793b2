"""What a new user sees: quiet, true output of `digitflow run` / `retrain`, a tidy repository.

The commands run for real in subprocesses (the console script, a temporary Prefect server,
git + DVC repos in temporary folders); nothing of digitflow, DVC or Prefect is mocked.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from flows.retrain import (
    Decision,
    check_override_keys,
    decision_markdown,
    validate_overrides,
    write_overrides,
)
from tasks.config import ParamsError

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# A one-stage pipeline: what `digitflow run` prints around a stage, without training anything.
HELLO_DVC_YAML = {
    "stages": {
        "hello": {"cmd": "python -c \"open('hello.txt', 'w').write('hi')\"", "outs": ["hello.txt"]}
    }
}
# `dvc exp show` columns worth a table: the Makefile's `exps` target keeps these for a model.
EXPS_MODEL = "robust"
EXPS_WIDTH = 100  # terminal columns the table must fit without DVC cutting a column off
# A stand-in train stage for the experiments table: writes each model's metrics file where
# the real pipeline does, in a fraction of a second; its "accuracy" follows the recipe's lr
# so that each experiment has its own value.
FAKE_TRAIN = """\
import json, pathlib, sys, yaml
key, recipe = sys.argv[1:3]
p = yaml.safe_load(open("params.yaml"))["train"][recipe]
acc = p["lr"] / (1 + p["lr"])
out = pathlib.Path(f"data/evaluate/{key}")
out.mkdir(parents=True, exist_ok=True)
(out / "metrics.json").write_text(json.dumps({"accuracy": acc, "loss": 1 - acc}))
"""


def _env(tmp: Path) -> dict[str, str]:
    """A user's environment: this venv on PATH, no Prefect server or profile configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp / "prefect-home")
    # a fresh PREFECT_HOME's database is built at start: on 2 busy cores that can take longer
    # than the temporary server's default 20 s start-up limit
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env |= {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}  # fmt: skip
    return env


def _ok(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _git_dvc_repo(where: Path, env: dict[str, str], dvc_yaml: dict) -> Path:
    """A committed git + DVC repo with this project's params.yaml and the given dvc.yaml."""
    where.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "params.yaml", where / "params.yaml")
    (where / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    _ok(["git", "init", "-q", "-b", "main"], where, env)
    _ok([sys.executable, "-m", "dvc", "init", "-q"], where, env)
    _ok(["git", "add", "-A"], where, env)
    _ok(["git", "commit", "-qm", "pipeline"], where, env)
    return where


@pytest.fixture(scope="module")
def hello_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    tmp = tmp_path_factory.mktemp("first_run")
    env = _env(tmp)
    return _git_dvc_repo(tmp / "repo", env, HELLO_DVC_YAML), env


def _digitflow(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "digitflow"), *args], cwd=repo, env=env,
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


# --- issue 10, items 1 and 2: `digitflow run` on the default path ----------------------


@pytest.mark.slow
def test_run_on_the_temporary_server_prints_no_traceback_and_no_library_chatter(
    hello_repo: tuple[Path, dict[str, str]],
) -> None:
    repo, env = hello_repo
    proc = _digitflow(repo, env, "run")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    # the temporary server's telemetry (a failed heartbeat offline, or a "database is
    # locked" traceback when it races the fresh database) is off
    assert "Traceback" not in output and "telemetry" not in output.lower()
    assert " ERROR " not in output and "| ERROR" not in output
    # libraries log warnings only: no `INFO httpx: HTTP Request: ...` per API call
    assert "httpx" not in output and "HTTP Request" not in output
    # what digitflow did is still there: its flow's logs and the stage table
    assert "stages in dependency order: hello" in output
    assert re.search(r"^hello\s+ran\s", proc.stdout, re.MULTILINE), proc.stdout
    assert (repo / "hello.txt").read_text() == "hi"


def test_run_with_nothing_to_do_says_so_once_and_starts_no_flow(
    hello_repo: tuple[Path, dict[str, str]],
) -> None:
    repo, env = hello_repo
    _ok([sys.executable, "-m", "dvc", "repro"], repo, env)  # now up to date
    proc = _digitflow(repo, env, "run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("up to date") == 1, proc.stdout
    assert "No flow run started" in proc.stdout
    assert "prefect" not in (proc.stdout + proc.stderr).lower()  # no server was started
    # each pipeline model's test accuracy (none evaluated in this repo yet)
    models = yaml.safe_load((repo / "params.yaml").read_text())["models"]
    assert all(re.search(rf"^{m}\s+–$", proc.stdout, re.MULTILINE) for m in models)


def test_run_summary_aligns_its_columns_whatever_the_stage_names() -> None:
    from flows.summary import run_summary

    stages = [
        {"stage": "params", "status": "skipped", "seconds": 0.0},
        {"stage": "train@robust", "status": "ran", "seconds": 123.45},
    ]
    text = run_summary(stages, {"seed": 0.98351, "robust": None})
    table, models = text.split("\n\n")
    rows = table.splitlines()
    statuses = ("status", "skipped", "ran")
    assert {row.index(s) for row, s in zip(rows, statuses, strict=True)} == {14}
    assert {len(row) for row in rows} == {len(rows[0])}  # the time column ends in one place
    assert rows[2].endswith("123.5 s")
    header, seed, robust = models.splitlines()
    assert header.split() == ["model", "test", "accuracy"]
    assert seed.split() == ["seed", "0.9835"] and robust.split() == ["robust", "–"]
    assert len(header) == len(seed) == len(robust)  # numbers aligned right, under the header


def test_quickstart_puts_the_environment_on_path_before_a_command_needs_it() -> None:
    """README's first command that needs the venv (dvc, digitflow, ...) comes after activation."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    needs_venv = re.compile(r"^(dvc|digitflow|prefect|python) ", re.MULTILINE)
    first_use = next(i for i, block in enumerate(blocks) if needs_venv.search(block))
    activated = next(i for i, b in enumerate(blocks) if "source .venv/bin/activate" in b)
    assert activated < first_use
    assert "make env" in blocks[activated]  # the venv exists by then


# --- issue 10, item 4: retrain's messages --------------------------------------------


def test_retrain_refuses_a_mistyped_key_in_one_line_naming_it_and_the_close_ones(
    hello_repo: tuple[Path, dict[str, str]],
) -> None:
    repo, env = hello_repo
    proc = _digitflow(repo, env, "retrain", "-S", "train.epoch=1")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    # params.yaml's `train` holds named recipes: the key is train.<recipe>.epochs
    assert "train.epoch" in lines[0] and "did you mean" in lines[0]
    assert "train.robust.epochs" in lines[0] and "train.seed.epochs" in lines[0]
    assert not (repo / ".git" / "worktrees").exists()  # refused before any work


def test_retrain_refuses_a_promotion_rule_override_once(
    hello_repo: tuple[Path, dict[str, str]],
) -> None:
    repo, env = hello_repo
    proc = _digitflow(repo, env, "retrain", "-S", "retrain.min_improvement=0")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    output = proc.stdout + proc.stderr
    assert output.count("retrain.min_improvement") >= 1
    assert len(output.strip().splitlines()) == 1, output  # once, not again by the flow's logs
    assert "committed at HEAD" in output


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.robust.epochs=0", "train.robust.epochs"),  # a bad value, named by the params check
        ("train.robust.lr=0.1,0.2", "a sweep"),
        ("+train.robust.lr=0.1", "already"),
        ("~train.robust.nope", "no key train.robust.nope"),
        ("models.robus=seed", "did you mean models.robust"),
        ("epochs=3", "train.robust.epochs"),  # a bare name: the keys ending like it
    ],
)
def test_overrides_are_checked_against_head_params_before_any_work(
    hello_repo: tuple[Path, dict[str, str]], override: str, needle: str
) -> None:
    repo, _ = hello_repo
    with pytest.raises(ParamsError) as info:
        validate_overrides(repo, [override])
    assert needle in str(info.value)
    assert "digitflow-overrides-" not in str(info.value)  # no temporary path in the message


def test_valid_overrides_pass_including_a_new_recipe_for_a_model(
    hello_repo: tuple[Path, dict[str, str]],
) -> None:
    repo, _ = hello_repo
    validate_overrides(repo, ["train.robust.epochs=7", "models.robust=improved"])
    check_override_keys(
        ["++train.robust.epochs=3"], yaml.safe_load((repo / "params.yaml").read_text())
    )


def _numeric_leaves(data: dict, prefix: str = "") -> dict[str, float]:
    leaves: dict[str, float] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            leaves |= _numeric_leaves(value, f"{key}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            leaves[key] = value
    return leaves


PARAMS_TEXT = (ROOT / "params.yaml").read_text()
NUMERIC_KEYS = sorted(_numeric_leaves(yaml.safe_load(PARAMS_TEXT)))


@settings(max_examples=25, deadline=None)
@given(
    changes=st.dictionaries(
        st.sampled_from(NUMERIC_KEYS), st.integers(min_value=100, max_value=10**6), max_size=4
    )
)
def test_write_overrides_rewrites_only_the_overridden_lines(
    tmp_path_factory: pytest.TempPathFactory, changes: dict[str, int]
) -> None:
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(PARAMS_TEXT)
    write_overrides(path, [f"{key}={value}" for key, value in changes.items()])
    new_text = path.read_text()
    # the values are those asked for ...
    expected = yaml.safe_load(PARAMS_TEXT)
    for key, value in changes.items():
        *sections, leaf = key.split(".")
        node = expected
        for part in sections:
            node = node[part]
        node[leaf] = value
    assert yaml.safe_load(new_text) == expected
    # ... and every other byte of the file (comments, the mirrors list's indentation) stays
    old_lines, new_lines = PARAMS_TEXT.splitlines(), new_text.splitlines()
    assert len(new_lines) == len(old_lines)
    changed = [i for i, (a, b) in enumerate(zip(old_lines, new_lines, strict=True)) if a != b]
    old_values = _numeric_leaves(yaml.safe_load(PARAMS_TEXT))
    assert len(changed) == sum(old_values[key] != value for key, value in changes.items())
    for i in changed:  # a changed line keeps its key and its comment
        assert new_lines[i].split(":")[0] == old_lines[i].split(":")[0]
        assert new_lines[i].partition("#")[2] == old_lines[i].partition("#")[2]


def test_readme_shows_how_to_keep_or_undo_an_experiment_where_it_introduces_them() -> None:
    text = (ROOT / "README.md").read_text()
    first_exp = text.index("dvc exp run")
    section = text[first_exp : first_exp + 1500]
    assert "dvc exp run --temp" in text[first_exp - 200 : first_exp + 200]
    assert "git checkout -- . && dvc checkout" in section and "dvc exp apply" in section


def test_retrain_decision_names_what_it_compared_with_and_rounds_its_metrics() -> None:
    decision = Decision(promote=False, reasons=["no gain"], recall_drops={"3": 0.0123456})
    champion = {"accuracy": 0.9952, "loss": 0.015143460929393768, "macro_f1": 0.99516, "errors": 48}
    challenger = {"accuracy": 0.9944, "loss": 0.0166961386, "macro_f1": 0.9943309, "errors": 56}
    text = decision_markdown(decision, "HEAD", None, champion, challenger, [])
    assert "| class | recall drop vs `HEAD` |" in text
    assert "| loss | 0.0151 | 0.0167 |" in text and "| errors | 48 | 56 |" in text
    assert "0.015143" not in text
    first = decision_markdown(decision, None, None, None, challenger, [])
    assert "| accuracy | – | 0.9944 |" in first


# --- issue 10, item 6: a readable experiments table ------------------------------------


@pytest.mark.slow
def test_make_exps_shows_one_model_s_recipe_and_accuracy(tmp_path: Path) -> None:
    env = _env(tmp_path)
    env.pop("DVC_EXP_BASELINE_REV", None)
    models = yaml.safe_load(PARAMS_TEXT)["models"]
    stage = {
        "foreach": models,
        "do": {
            "cmd": "python fake_train.py ${key} ${item}",
            "deps": ["fake_train.py"],
            "params": ["train.${item}"],
            "metrics": [{"data/evaluate/${key}/metrics.json": {"cache": False}}],
        },
    }
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "fake_train.py").write_text(FAKE_TRAIN)
    _git_dvc_repo(repo, env, {"stages": {"train": stage}})
    dvc = [sys.executable, "-m", "dvc"]
    _ok([*dvc, "repro", "-q"], repo, env)
    _ok(["git", "add", "-A"], repo, env)
    _ok(["git", "commit", "-qm", "baseline"], repo, env)
    _ok([*dvc, "exp", "run", "-q", "-S", f"train.{EXPS_MODEL}.lr=0.25", "-n", "big-lr"], repo, env)

    table = _ok(["digitflow", "exps", "--model", EXPS_MODEL], repo, {**env, "COLUMNS": "80"})
    lines = table.splitlines()
    assert max(map(len, lines)) <= EXPS_WIDTH
    assert lines[0].split() == ["experiment", "accuracy", "epochs", "batch_size", "lr"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["big-lr"][-1] == "0.25"
    assert rows["big-lr"][1] == f"{0.25 / 1.25:.4f}"  # FAKE_TRAIN's accuracy for this lr
    accuracies = [float(row[1]) for row in rows.values()]
    assert accuracies == sorted(accuracies, reverse=True)  # best first
    assert accuracies[0] == float(rows["big-lr"][1]) > float(rows["main"][1])
    assert set(rows) == {"workspace", "main", "big-lr"}


def test_make_exps_runs_the_experiments_table() -> None:
    dry = _ok(["make", "-s", "-n", "exps", "MODEL=seed"], ROOT, dict(os.environ))
    assert "digitflow exps --model seed" in dry


# --- issue 10, item 7: repository hygiene and DVC's model tooling ------------------------


def test_dvc_plots_output_is_ignored_by_git() -> None:
    proc = subprocess.run(
        ["git", "check-ignore", "-q", "dvc_plots/index.html"], cwd=ROOT, check=False
    )
    assert proc.returncode == 0, "dvc_plots/ (written by `dvc plots show`) is not git-ignored"


def test_predict_default_output_in_the_project_root_is_ignored_by_git() -> None:
    from flows.cli.predict import DEFAULT_OUT

    proc = subprocess.run(["git", "check-ignore", "-q", str(DEFAULT_OUT)], cwd=ROOT, check=False)
    assert proc.returncode == 0, f"`digitflow predict DIR` writes {DEFAULT_OUT}, not git-ignored"


@pytest.mark.slow
def test_every_pipeline_model_is_a_dvc_model_artifact_at_its_train_output() -> None:
    from dvc.repo import Repo

    models = yaml.safe_load(PARAMS_TEXT)["models"]
    with Repo(str(ROOT)) as repo:
        artifacts = repo.artifacts.read().get("dvc.yaml", {})
        train_outs = {
            stage.name: [str(Path(out.fs_path).relative_to(ROOT)) for out in stage.outs]
            for stage in repo.index.stages
            if getattr(stage, "name", "").startswith("train@")
        }
    assert set(artifacts) == set(models)
    for name, artifact in artifacts.items():
        assert artifact.type == "model"
        assert artifact.desc and artifact.labels
        assert artifact.path in train_outs[f"train@{name}"]


def test_files_named_in_the_sources_exist() -> None:
    """Comments and docs point at README files that are there (not at a never-written one)."""
    tracked = subprocess.run(
        ["git", "ls-files", "*.py", "*.yaml", "*.md", "Makefile"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    named = {
        match
        for rel in tracked
        if (ROOT / rel).is_file()
        for match in re.findall(r"\bREADME[\w-]*\.md\b", (ROOT / rel).read_text(errors="replace"))
    }
    assert all((ROOT / name).is_file() for name in named), named
