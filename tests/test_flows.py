"""The Prefect flows against a real Prefect API, on tiny data in temporary git + DVC repos.

The stages run for real (``dvc repro --single-item``, the ``digitflow`` commands);
what the flows did is read back through the Prefect client: task runs, logs,
artifacts and the served deployment.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from benchmarks.flow_overhead import DVC, FLOW, abba_order, copy_sources, summarize
from flows.pipeline import (
    ARTIFACT_CONFUSION,
    ARTIFACT_METRICS,
    ARTIFACT_PER_CLASS,
    NETWORK_META,
    repro_status,
    stage_graph,
    training_pipeline,
)
from flows.retrain import ARTIFACT_DECISION, committed_rules, judge, retrain
from tasks.config import RetrainParams

PROJECT = Path(__file__).resolve().parents[1]
# The stages of this project's dvc.yaml these tests rely on (others, like `predict`, may follow):
# train, evaluate and report run once per pipeline model (params.yaml `models`, dvc.yaml foreach).
MODELS = ["seed", "robust"]
STAGES = [
    "params", "download", "split", "render", "labeled-inbox", "labeled",
    *(f"{stage}@{m}" for stage in ("train", "evaluate", "report") for m in MODELS),
]  # fmt: skip
SERVED = "robust"  # params.yaml predict.model: the model the flows publish and judge
BIN = str(Path(sys.executable).parent)
# Tiny-data training that learns: these settings reach ~50% test accuracy after 2 epochs
# and ~90% after 4 on the 600/200 rendered digits (measured; CPU training is seeded).
TINY_TRAIN = {
    "epochs": 1,
    "batch_size": 16,
    "lr": 3e-3,
    "device": "cpu",
    "normalize": {"mean": 0.1307, "std": 0.3081},
}
# Both pipeline models train the tiny recipe in these tests (the flows, not the recipes, are
# under test here); each recipe section is replaced whole.
# (deep copies: one shared dict would be dumped as a YAML alias, and an override of one
# recipe would then change both)
TINY_RECIPES = {m: copy.deepcopy(TINY_TRAIN) for m in MODELS}
TINY_RENDERS = 20  # synthetic photos of the render stage: a second, not a minute
POLL_S = 0.5  # how often to poll the Prefect API for asynchronously written records


# --- helpers -------------------------------------------------------------------------


def _run(cwd: Path, *args: str) -> str:
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _dvc(cwd: Path, *args: str) -> str:
    return _run(cwd, sys.executable, "-m", "dvc", *args)


def _edit_params(repo: Path, **sections: dict[str, Any]) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for name, values in sections.items():
        params[name].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def make_repo(where: Path) -> Path:
    """A committed git + DVC repo with this project's pipeline and tiny-data params."""
    where.mkdir(parents=True)
    copy_sources(where)
    (where / ".dvcignore").write_text("__pycache__/\n")
    (where / ".gitignore").write_text("__pycache__/\n/data/checkpoints/\n")
    _edit_params(
        where,
        # no network here: the local mirror ($MNIST_MIRROR) is the only source
        download={"mirrors": [], "retries": 1, "backoff_s": 0.0},
        train=TINY_RECIPES,
        evaluate={"batch_size": 200},
        report={"n_misclassified": 4},
        render={"count": TINY_RENDERS},
        pipeline={"download_retries": 2, "retry_delay_s": 0.1},
    )
    _run(where, "git", "init", "-q", "-b", "main")
    _run(where, "git", "config", "user.email", "tests@digitflow")
    _run(where, "git", "config", "user.name", "digitflow tests")
    _dvc(where, "init", "-q")
    _run(where, "git", "add", "-A")
    _run(where, "git", "commit", "-q", "-m", "pipeline")
    return where


def _task_runs(flow_run_id: Any) -> list[Any]:
    """Task runs of one flow run, in start order."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
        )


def _wait_for_log(flow_run_id: Any, needle: str, timeout_s: float = 20.0) -> str:
    """All log text of a flow run, once it contains ``needle`` (logs are shipped in batches)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout_s
    text = ""
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )
            text = "\n".join(log.message for log in logs)
            if needle in text:
                return text
            time.sleep(POLL_S)
    raise AssertionError(f"{needle!r} not in the flow run's logs:\n{text[-2000:]}")


def _logs_with_subflows(flow_run_id: Any, needle: str, timeout_s: float = 20.0) -> str:
    """All log text of a flow run and its subflow runs, once it contains ``needle``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )

    deadline = time.monotonic() + timeout_s
    text = ""
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])
            )
        )
        ids = [flow_run_id, *(child.id for child in children)]
        while time.monotonic() < deadline:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
            text = "\n".join(log.message for log in logs)
            if needle in text:
                return text
            time.sleep(POLL_S)
    raise AssertionError(f"{needle!r} not in the flow runs' logs:\n{text[-2000:]}")


def _artifact(key: str, flow_run_id: Any) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
            )
        )
    assert len(found) == 1, f"artifact {key}: {found}"
    return found[0]


def _data(artifact: Any) -> Any:
    """Table artifacts are stored as JSON text."""
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


# --- the stage graph -----------------------------------------------------------------


def test_stage_graph_is_read_from_dvc_yaml_and_picks_up_new_stages(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    stages = stage_graph(repo)
    assert [s.name for s in stages][: len(STAGES)] == STAGES
    for m in MODELS:
        assert set(next(s for s in stages if s.name == f"evaluate@{m}").upstream) == {
            "params",
            f"train@{m}",
            "split",
            "labeled",  # the labelled test images
        }
    # a stage added to dvc.yaml (like the coming `predict`) is run with no code change
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    dvc_yaml["stages"] = {
        "audit": {  # listed first, but it depends on the model: it must run after train
            "cmd": "echo audit",
            "deps": [f"data/models/{SERVED}/model.pt"],
            "outs": ["data/audit"],
        },
        **dvc_yaml["stages"],
    }
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    names = [s.name for s in stage_graph(repo)]
    assert set(names) == {s.name for s in stages} | {"audit"}
    assert names.index("audit") > names.index(f"train@{SERVED}")
    assert names.index("download") < names.index("split") < names.index("train@seed")


def _mini_repo(where: Path, stages: dict[str, Any]) -> Path:
    """A git + DVC repo of cheap shell stages (no project code), this project's params.yaml."""
    where.mkdir(parents=True)
    shutil.copy(PROJECT / "params.yaml", where / "params.yaml")
    _edit_params(where, pipeline={"download_retries": 2, "retry_delay_s": 0.1})
    (where / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    _run(where, "git", "init", "-q", "-b", "main")
    _dvc(where, "init", "-q")
    return where


def test_network_stages_are_the_ones_dvc_yaml_marks(tmp_path: Path) -> None:
    """The flow's retried stages come from dvc.yaml `meta`, not from a name in the code."""
    repo = make_repo(tmp_path / "repo")
    assert [s.name for s in stage_graph(repo) if s.network] == ["download"]
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    del dvc_yaml["stages"]["download"]["meta"][NETWORK_META]
    dvc_yaml["stages"]["split"]["meta"] = {NETWORK_META: True}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    assert [s.name for s in stage_graph(repo) if s.network] == ["split"]


# the stage's command logs each real run to runs.log (not a DVC output): ground truth for
# whether `dvc repro` ran it, independent of DVC's messages
COPY_STAGE = {"cmd": "echo run >> runs.log && cp in.txt out.txt", "deps": ["in.txt"],
              "outs": ["out.txt"]}  # fmt: skip


@pytest.mark.slow
def test_repro_status_predicts_what_dvc_repro_then_does(tmp_path: Path) -> None:
    repo = _mini_repo(tmp_path / "repo", {"copy": COPY_STAGE})
    runs, lock, out = repo / "runs.log", repo / "dvc.lock", repo / "out.txt"

    def text(path: Path) -> str:
        return path.read_text() if path.exists() else ""

    def step() -> tuple[str, str]:
        """(predicted status, what `dvc repro --single-item copy` then did)."""
        predicted = repro_status(repo, "copy")
        runs_before, lock_before, had_out = text(runs), text(lock), out.exists()
        _dvc(repo, "repro", "--single-item", "copy")
        assert out.read_text() == (repo / "in.txt").read_text()
        if text(runs) != runs_before:
            return predicted, "ran"
        if text(lock) != lock_before or not had_out:  # outputs back, the command not run
            return predicted, "restored"
        return predicted, "skipped"

    seen = []
    for content, remove_out in [("a", False), ("a", False), ("b", False), ("a", False),
                                ("a", True)]:  # fmt: skip
        (repo / "in.txt").write_text(content)
        if remove_out:
            out.unlink()
        predicted, did = step()
        assert predicted == did, f"step {len(seen)} (in.txt={content!r}): {predicted} != {did}"
        seen.append(did)
    # new content runs, unchanged is skipped, content seen before comes from the run cache,
    # and so does a deleted output
    assert seen == ["ran", "skipped", "ran", "restored", "restored"]


@pytest.mark.slow
def test_flow_retries_the_network_stages_only_and_reports_their_status(
    prefect_api: None, tmp_path: Path
) -> None:
    fetch = {  # fails on its first attempt only (a server that comes back)
        "cmd": "test -f tried || { touch tried; exit 1; }; cp in.txt fetched.txt",
        "meta": {NETWORK_META: True},
        "deps": ["in.txt"],
        "outs": ["fetched.txt"],
    }
    build = {"cmd": "exit 3", "deps": ["fetched.txt"], "outs": ["built.txt"]}
    repo = _mini_repo(tmp_path / "repo", {"build": build, "fetch": fetch})
    (repo / "in.txt").write_text("a")

    state = training_pipeline(root=str(repo), return_state=True)

    assert state.is_failed() and "stage 'build' failed" in state.message
    runs = {r.name: r for r in _task_runs(state.state_details.flow_run_id)}
    assert list(runs) == ["fetch", "build"]  # dependency order, not dvc.yaml order
    assert runs["fetch"].run_count == 2 and runs["fetch"].state.is_completed()
    assert runs["build"].run_count == 1  # not marked: not retried
    assert runs["build"].empirical_policy.retries in (0, None)

    # the status of each stage as DVC saw it: fixed build runs, then is up to date
    build["cmd"] = "cp fetched.txt built.txt"
    (repo / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {"build": build, "fetch": fetch}}, sort_keys=False)
    )
    state = training_pipeline(root=str(repo), return_state=True)
    assert state.is_completed(), state.message
    assert {r["stage"]: r["status"] for r in state.result()} == {"fetch": "skipped", "build": "ran"}
    (repo / "built.txt").unlink()
    state = training_pipeline(root=str(repo), return_state=True)
    assert {r["stage"]: r["status"] for r in state.result()} == {
        "fetch": "skipped", "build": "restored",
    }  # fmt: skip


# --- the training pipeline flow ------------------------------------------------------


@pytest.mark.slow
def test_failing_download_is_retried_then_fails_the_flow_with_its_message(
    prefect_api: None, tiny_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo(tmp_path / "repo")
    missing = tmp_path / "no-such-mirror"
    monkeypatch.setenv("MNIST_MIRROR", str(missing))

    state = training_pipeline(root=str(repo), return_state=True)

    assert state.is_failed()
    assert "stage 'download' failed" in state.message
    assert str(missing) in state.message  # the stage's own error output, not just an exit code
    runs = _task_runs(state.state_details.flow_run_id)
    # the params check passed; nothing downstream of download was attempted
    assert [r.name for r in runs] == ["params", "download"]
    assert runs[0].run_count == 1  # a local stage: never retried
    runs = runs[1:]
    assert runs[0].run_count == 3  # 1 try + pipeline.download_retries (2)
    assert runs[0].state.is_failed()
    # exponential backoff: pipeline.retry_delay_s (0.1) first, doubling on each further retry
    policy = runs[0].empirical_policy
    assert policy.retries == 2
    assert policy.retry_delay == pytest.approx([0.1, 0.2])
    logs = _wait_for_log(state.state_details.flow_run_id, "Retry 2/2")
    assert "Retry 1/2 will start 0.1 second(s) from now" in logs
    assert "Retry 2/2 will start 0.2 second(s) from now" in logs
    assert str(missing) in logs
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert list(lock["stages"]) == ["params"]  # the failed download recorded nothing


def _patch_source(path: Path, old: str, new: str) -> None:
    """Replace the first match of the regex ``old`` (``new`` may use its groups)."""
    text = path.read_text()
    patched, count = re.subn(old, new, text, count=1)
    assert count == 1, f"{path} no longer matches {old!r}: update this test"
    path.write_text(patched)


@pytest.mark.slow
def test_stage_commands_import_the_code_of_the_repo_being_reproduced(
    prefect_api: None, tiny_env: Path, tmp_path: Path
) -> None:
    """Not the editable install's tree (this checkout): a retrain worktree runs its own code."""
    repo = make_repo(tmp_path / "repo")
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    # cheap: download and the params check it depends on
    dvc_yaml["stages"] = {name: dvc_yaml["stages"][name] for name in ("params", "download")}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    # harmless edits of this repo's copy of the code the stage command runs
    _patch_source(  # the log line naming each downloaded file and where it came from
        repo / "tasks/download.py",
        r'log\.info\("%s <- %s", (\w+), (\w+)\)',
        r'log.info("%s <- %s [tasks of the reproduced repo]", \1, \2)',
    )
    _patch_source(
        repo / "flows/cli/stages.py",
        re.escape('typer.echo(f"downloaded {len(files)} files to {out}")'),
        'typer.echo(f"downloaded {len(files)} files to {out} [flows of the reproduced repo]")',
    )

    state = training_pipeline(root=str(repo), return_state=True)

    assert state.is_completed(), state.message
    logs = _wait_for_log(state.state_details.flow_run_id, "[flows of the reproduced repo]")
    assert "[tasks of the reproduced repo]" in logs
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    dep = next(d for d in lock["stages"]["download"]["deps"] if d["path"] == "tasks/download.py")
    assert dep["md5"] == _md5(repo / "tasks/download.py")  # the code that ran is the one recorded


@pytest.mark.slow
def test_pipeline_runs_stages_in_order_resumes_after_a_failure_and_skips_when_up_to_date(
    prefect_api: None, tiny_env: Path, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo")
    # 1. train fails (no such device: fails with or without a GPU): download and split done
    _edit_params(repo, train={"seed": {**TINY_TRAIN, "device": "cuda:99"}})
    failed = training_pipeline(root=str(repo), return_state=True)
    assert failed.is_failed() and "stage 'train@seed' failed" in failed.message
    runs = _task_runs(failed.state_details.flow_run_id)
    assert [r.name for r in runs] == [*STAGES[:6], "train@seed"]
    assert [r.state.type.value for r in runs] == ["COMPLETED"] * 6 + ["FAILED"]

    # 2. fixed: the rerun resumes at train (DVC skips download, split and render)
    _edit_params(repo, train=TINY_RECIPES)
    state = training_pipeline(root=str(repo), return_state=True)
    assert state.is_completed(), state.message
    statuses = {r["stage"]: r["status"] for r in state.result()}
    assert {k: statuses[k] for k in STAGES} == {
        # the edited params.yaml is checked again; the data stages are up to date
        "params": "ran", **dict.fromkeys(STAGES[1:6], "skipped"),
        **dict.fromkeys(STAGES[6:], "ran"),
    }  # fmt: skip
    flow_run_id = state.state_details.flow_run_id
    assert [r.name for r in _task_runs(flow_run_id)][: len(STAGES)] == STAGES  # dependency order
    assert all((repo / f"data/report/{m}/report.md").is_file() for m in MODELS)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(STAGES) <= set(lock["stages"])  # dvc.lock stays the record

    # the artifacts describe the prediction model
    metrics = json.loads((repo / f"data/evaluate/{SERVED}/metrics.json").read_text())
    markdown = _artifact(ARTIFACT_METRICS, flow_run_id).data
    assert f"{metrics['accuracy']:.4f}" in markdown
    assert "Metrics diff against `HEAD`" in markdown  # no champion yet: the previous commit
    per_class = _data(_artifact(ARTIFACT_PER_CLASS, flow_run_id))
    assert [row["class"] for row in per_class] == [str(c) for c in range(10)]
    assert {"precision", "recall", "f1"} <= set(per_class[0])
    confusion = _data(_artifact(ARTIFACT_CONFUSION, flow_run_id))
    assert sum(row[str(p)] for row in confusion for p in range(10)) == metrics["n_test"]
    assert sum(confusion[a][str(a)] for a in range(10)) == metrics["n_test"] - metrics["errors"]

    # 3. nothing changed: every stage is skipped
    again = training_pipeline(root=str(repo), return_state=True)
    assert {r["status"] for r in again.result()} == {"skipped"}


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # the state field follows "(comm)"


@pytest.mark.slow
def test_sigterm_to_digitflow_run_stops_the_stage_command_too(
    prefect_api: None, tmp_path: Path
) -> None:
    """Not only DVC: the stage command it started (a digitflow command) would run on."""
    from prefect.settings import PREFECT_API_URL

    # the shell execs sleep: the pid written is the stage command's own
    stage = {"cmd": "echo $$ > stage.pid && exec sleep 600", "outs": ["never.txt"]}
    repo = _mini_repo(tmp_path / "repo", {"slow": stage})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "ph")}
    proc = subprocess.Popen(
        [str(Path(BIN) / "digitflow"), "run", "--root", str(repo)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    pid_file = repo / "stage.pid"
    try:
        deadline = time.monotonic() + 120  # CLI start-up, flow run, dvc start-up: a hang guard
        while not (pid_file.exists() and pid_file.read_text().strip()):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the stage never started"
            time.sleep(POLL_S)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stage_pid = int(pid_file.read_text())
    try:
        assert proc.returncode == 128 + signal.SIGTERM, output
        deadline = time.monotonic() + 30  # SIGTERM ends sleep at once: a bound, not a timing
        while _running(stage_pid) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        assert not _running(stage_pid), "the stage command runs on after the flow was stopped"
    finally:
        if _running(stage_pid):
            os.kill(stage_pid, signal.SIGKILL)  # the sleep this test started


# --- retraining: champion / challenger -------------------------------------------------


def _classes(recalls: list[float]) -> dict[str, Any]:
    return {"per_class": [{"class": str(c), "recall": r} for c, r in enumerate(recalls)]}


def test_judge_needs_the_accuracy_gain_and_no_large_class_recall_drop() -> None:
    rules = RetrainParams(min_improvement=0.01, max_class_drop=0.05)
    base = _classes([0.9] * 10)
    assert judge(None, None, {"accuracy": 0.1}, base, rules).promote  # first model
    better = judge({"accuracy": 0.90}, base, {"accuracy": 0.92}, _classes([0.9] * 10), rules)
    assert better.promote and better.accuracy_gain == pytest.approx(0.02)
    small = judge({"accuracy": 0.90}, base, {"accuracy": 0.905}, base, rules)
    assert not small.promote and "min_improvement" in small.reasons[0]
    dropped = judge(
        {"accuracy": 0.90}, base, {"accuracy": 0.95}, _classes([0.9] * 9 + [0.8]), rules
    )
    assert not dropped.promote
    assert dropped.reasons == [dropped.reasons[0]] and "class 9" in dropped.reasons[0]
    assert "max_class_drop" in dropped.reasons[0]


def _tags(repo: Path) -> list[str]:
    return _run(repo, "git", "tag", "--list", "model@v*").split()


def _snapshot(repo: Path) -> tuple[str, str, str]:
    """HEAD, the working tree's status and the worktree list: what retrain must not change."""
    return (
        _run(repo, "git", "rev-parse", "HEAD"),
        _run(repo, "git", "status", "--porcelain", "--untracked-files=all"),
        _run(repo, "git", "worktree", "list", "--porcelain"),
    )


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _worktree_paths(repo: Path) -> list[Path]:
    lines = _run(repo, "git", "worktree", "list", "--porcelain").splitlines()
    return [Path(line.split(" ", 1)[1]).resolve() for line in lines if line.startswith("worktree ")]


def test_retrain_rules_are_read_from_head_as_committed(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    _edit_params(repo, retrain={"min_improvement": 0.25, "max_class_drop": 0.5})
    _run(repo, "git", "commit", "-qam", "stricter rules")
    _edit_params(repo, retrain={"min_improvement": -1.0, "max_class_drop": 1.0})  # uncommitted
    assert committed_rules(repo) == RetrainParams(min_improvement=0.25, max_class_drop=0.5)


@pytest.mark.parametrize(
    ("override", "key"),
    [("retrain.min_improvement=-1", "retrain.min_improvement"), ("~retrain", "retrain")],
)
@pytest.mark.slow
def test_retrain_refuses_overrides_of_its_promotion_rules(
    prefect_api: None, tmp_path: Path, override: str, key: str
) -> None:
    repo = make_repo(tmp_path / "repo")
    before = _snapshot(repo)
    state = retrain(
        root=str(repo), overrides=[f"train.{SERVED}.epochs=2", override], return_state=True
    )
    assert state.is_failed()
    assert f"promotion rule {key!r}" in state.message and override in state.message
    assert _tags(repo) == [] and _snapshot(repo) == before  # refused before any worktree


@pytest.mark.slow
def test_retrain_crash_before_the_tag_promotes_nothing_and_stale_worktrees_are_pruned(
    prefect_api: None, tiny_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo(tmp_path / "repo")
    before = _snapshot(repo)
    host = socket.gethostname()
    # left by a retrain that was killed: its locked worktree (pid now gone) is still on disk
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = tmp_path / "digitflow-retrain-killed" / "challenger"
    _run(repo, "git", "worktree", "add", "--detach", "--lock", "--reason",
         f"digitflow retrain pid {dead.pid} on {host}", str(killed), "HEAD")  # fmt: skip
    # ... and one whose folder is gone (temp files cleaned): only git's record is left
    gone = tmp_path / "gone"
    _run(repo, "git", "worktree", "add", "--detach", str(gone), "HEAD")
    shutil.rmtree(gone)
    # a concurrent retrain, still running (this process), keeps its worktree
    live = tmp_path / "digitflow-retrain-live" / "challenger"
    _run(repo, "git", "worktree", "add", "--detach", "--lock", "--reason",
         f"digitflow retrain pid {os.getpid()} on {host}", str(live), "HEAD")  # fmt: skip

    committed: list[str] = []

    def crash(worktree: Path, identity: Any, tag: str, message: str, commit: str) -> None:
        committed.append(commit)
        raise RuntimeError(f"killed after the commit, before tagging {tag}")

    monkeypatch.setattr("flows.retrain._tag", crash)
    state = retrain(root=str(repo), return_state=True)

    assert state.is_failed() and "before tagging model@v1" in state.message
    assert len(committed) == 1  # the promotion commit was made ...
    assert _run(repo, "git", "cat-file", "-t", committed[0]).strip() == "commit"
    assert _tags(repo) == []  # ... but no tag: no new champion
    refs = _run(repo, "git", "for-each-ref", "--contains", committed[0])
    assert refs == ""  # and nothing else points at it
    assert not killed.parent.exists()
    assert _worktree_paths(repo) == [repo.resolve(), live.resolve()]
    _run(repo, "git", "worktree", "unlock", str(live))
    _run(repo, "git", "worktree", "remove", "--force", str(live))
    assert _snapshot(repo) == before  # HEAD, branch, working tree; only the main worktree
    assert _worktree_paths(repo) == [repo.resolve()]


@pytest.mark.slow
def test_retrain_promotes_a_better_challenger_and_rejects_a_worse_one(
    prefect_api: None, tiny_env: Path, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path / "repo")
    # no champion tag yet, but a committed model that no 2-epoch challenger can beat
    # (every test image right): the challenger is judged against HEAD's, not promoted
    # because there is no tag
    committed = repo / f"data/evaluate/{SERVED}"
    committed.mkdir(parents=True)
    (committed / "metrics.json").write_text(
        json.dumps({"accuracy": 1.0, "loss": 0.0, "macro_f1": 1.0, "errors": 0})
    )
    (committed / "classes.json").write_text(json.dumps(_classes([1.0] * 10)))
    _run(repo, "git", "add", "data")
    _run(repo, "git", "commit", "-qm", "a model committed before any retrain")
    overrides = [f"train.{SERVED}.epochs=2"]
    state = retrain(root=str(repo), overrides=overrides, return_state=True)
    at_head = state.result()
    assert not at_head["promoted"] and at_head["tag"] is None, at_head["reasons"]
    assert at_head["champion"] is None and at_head["compared_with"] == "HEAD"
    assert any("vs HEAD 1.0000" in r for r in at_head["reasons"]), at_head["reasons"]
    assert _tags(repo) == []
    # the challenger's stage logs (in its scratch worktree) carry no `git add` / `dvc push`
    # hints: neither applies there
    logs = _logs_with_subflows(state.state_details.flow_run_id, f"stage report@{SERVED}")
    assert f"Running stage 'train@{SERVED}'" in logs
    assert "git add" not in logs and "dvc push" not in logs

    _run(repo, "git", "rm", "-rq", "data/evaluate")
    _run(repo, "git", "commit", "-qm", "no committed model: the first challenger wins")
    before = _snapshot(repo)

    # (the same challenger as above: DVC's run cache restores its stages)
    first = retrain(root=str(repo), overrides=overrides)
    assert first["promoted"] and first["tag"] == "model@v1" and first["champion"] is None
    assert first["accuracy"] == at_head["accuracy"]

    better = retrain(root=str(repo), overrides=[f"train.{SERVED}.epochs=4"])
    assert better["promoted"] and better["tag"] == "model@v2", better["reasons"]
    assert better["champion"] == "model@v1" and better["accuracy"] > first["accuracy"]

    # honestly worse: half the epochs of the champion
    state = retrain(root=str(repo), overrides=[f"train.{SERVED}.epochs=2"], return_state=True)
    worse = state.result()
    assert not worse["promoted"] and worse["tag"] is None and worse["champion"] == "model@v2"
    assert any("min_improvement" in r for r in worse["reasons"]), worse["reasons"]
    decision = _artifact(ARTIFACT_DECISION, state.state_details.flow_run_id).data
    assert "rejected" in decision and "min_improvement" in decision

    assert _tags(repo) == ["model@v1", "model@v2"]
    assert _snapshot(repo) == before  # branch, working tree and worktrees as they were

    # a challenger that crashes midway (its train stage fails) promotes nothing
    crashed = retrain(
        root=str(repo), overrides=[f"train.{SERVED}.device=cuda:99"], return_state=True
    )
    assert crashed.is_failed() and f"stage 'train@{SERVED}' failed" in crashed.message
    assert _tags(repo) == ["model@v1", "model@v2"]
    assert _snapshot(repo) == before

    # the promotions are ordinary git + DVC revisions
    diff = json.loads(_dvc(repo, "metrics", "diff", "model@v1", "model@v2", "--json"))
    accuracy = diff[f"data/evaluate/{SERVED}/metrics.json"]["accuracy"]
    assert accuracy["old"] == pytest.approx(first["accuracy"])
    assert accuracy["new"] == pytest.approx(better["accuracy"])
    params_v1 = yaml.safe_load(_run(repo, "git", "show", "model@v1:params.yaml"))
    assert params_v1["train"][SERVED]["epochs"] == 2
    # the promoted params.yaml is HEAD's with the overridden line changed, nothing else
    head_lines = (repo / "params.yaml").read_text().splitlines()
    v1_lines = _run(repo, "git", "show", "model@v1:params.yaml").splitlines()
    assert len(v1_lines) == len(head_lines)
    assert sum(a != b for a, b in zip(head_lines, v1_lines, strict=True)) <= 1
    _run(repo, "git", "checkout", "-q", "model@v1")
    _dvc(repo, "checkout", "-q")
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = lock["stages"][f"train@{SERVED}"]["outs"]
    model_out = next(o for o in outs if o["path"].endswith(".pt"))
    assert _md5(repo / f"data/models/{SERVED}/model.pt") == model_out["md5"]


# --- serving on a schedule -----------------------------------------------------------


def _serve_without_server(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`digitflow serve ARGS` with no Prefect API configured (the ephemeral default)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # no profile with an API URL
    return subprocess.run(
        [str(Path(BIN) / "digitflow"), "serve", *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_serve_refuses_the_ephemeral_api_with_what_to_run(tmp_path: Path) -> None:
    proc = _serve_without_server(tmp_path, "--cron", "0 3 * * 1")
    assert proc.returncode == 2
    assert "prefect server start" in proc.stderr and "PREFECT_API_URL" in proc.stderr


def test_serve_refuses_overrides_of_the_promotion_rules(tmp_path: Path) -> None:
    proc = _serve_without_server(tmp_path, "-S", "retrain.max_class_drop=1")
    assert proc.returncode == 2
    assert "retrain.max_class_drop" in proc.stderr and "committed at HEAD" in proc.stderr


@pytest.mark.slow
def test_serve_creates_a_deployment_with_the_cron_schedule(
    prefect_api: None, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import DeploymentStatus
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path / "ph")}
    cron = "0 3 * * 1"
    proc = subprocess.Popen(
        [str(Path(BIN) / "digitflow"), "serve", "--cron", cron, "--root", str(tmp_path),
         "--name", "test-serve"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deployment = None
    try:
        deadline = time.monotonic() + 60  # CLI start-up plus deployment registration
        with get_client(sync_client=True) as client:
            # until the runner polls for its runs (the deployment turns READY): only a
            # started runner pauses its schedules when stopped
            while time.monotonic() < deadline:
                assert proc.poll() is None, proc.communicate()[0]
                try:
                    deployment = client.read_deployment_by_name("retrain/test-serve")
                except Exception:  # ObjectNotFound until the runner has registered it
                    deployment = None
                if deployment is not None and deployment.status == DeploymentStatus.READY:
                    break
                time.sleep(POLL_S)
    finally:
        proc.send_signal(signal.SIGTERM)  # what Ctrl-C / a service stop does
        try:
            output = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0]
    assert deployment is not None, "the served deployment never appeared"
    assert deployment.status == DeploymentStatus.READY, "the runner never polled"
    assert not deployment.paused
    assert [s.schedule.cron for s in deployment.schedules] == [cron]
    assert deployment.parameters == {
        "root": str(tmp_path.resolve()),
        "overrides": [],
        "only_if_new_labels": True,  # a scheduled run trains only on new labelled images
    }
    assert deployment.entrypoint == "flows.retrain.retrain"

    # stopped: a graceful exit that paused the schedule (no runs pile up with no runner)
    assert proc.returncode == 0, output
    with get_client(sync_client=True) as client:
        stopped = client.read_deployment(deployment.id)
    assert stopped.paused, output
    assert [s.schedule.cron for s in stopped.schedules] == [cron]


# --- the overhead benchmark's bookkeeping (the benchmark itself runs on real MNIST) ----


def test_overhead_benchmark_alternates_the_order_and_judges_medians() -> None:
    order = abba_order(2)
    assert order == [DVC, FLOW, FLOW, DVC]
    order = abba_order(4)
    for tool in (DVC, FLOW):  # each tool equally often, at the same mean position
        assert order.count(tool) == 4
        assert sum(i for i, t in enumerate(order) if t == tool) == sum(range(8)) / 2

    def runs(walls: list[float], cpus: list[float]) -> list[dict[str, float]]:
        return [{"wall_s": w, "cpu_s": c} for w, c in zip(walls, cpus, strict=True)]

    # one disturbed dvc run (500 s) moves the mean, not the median: +7.8 % wall
    summary = summarize(
        {DVC: runs([100, 102, 500], [90, 90, 90]), FLOW: runs([108, 110, 111], [95, 99, 99])},
        limit_pct=10,
    )
    assert summary["wall_s"]["overhead_pct"] == pytest.approx(100 * 8 / 102, abs=0.01)
    assert summary["wall_s"]["pass"] and summary["cpu_s"]["pass"] and summary["pass"]
    # 10 % more CPU than the limit allows: FAIL overall even though wall time passes
    summary = summarize(
        {DVC: runs([100, 100], [90, 90]), FLOW: runs([105, 105], [100, 100])}, limit_pct=10
    )
    assert summary["wall_s"]["pass"] and not summary["cpu_s"]["pass"] and not summary["pass"]
