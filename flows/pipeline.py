"""The ``training_pipeline`` flow: the stages of dvc.yaml as Prefect tasks, run through DVC.

dvc.yaml stays the one definition of the DAG: the stage graph is read through
DVC's Python API and each stage runs as ``dvc repro --single-item <stage>``, so
dvc.lock records every stage and up-to-date stages are skipped by DVC itself.
A failed stage fails the flow with the stage's own output; a rerun resumes there
because the stages before it are up to date in dvc.lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows.paths import EVAL_CLASSES, EVAL_CONFUSION, EVAL_METRICS, eval_path

# Stable artifact keys (Prefect keeps their history across runs under the same key).
ARTIFACT_METRICS = "digitflow-metrics"
ARTIFACT_PER_CLASS = "digitflow-per-class"
ARTIFACT_CONFUSION = "digitflow-confusion-matrix"

# dvc.yaml `meta` key marking a stage that talks to the network (today: download). The flow
# gives such stages Prefect-level retries (params.yaml pipeline.download_retries): a server
# may come back, a local step that failed will fail again. Read from dvc.yaml, the one
# definition of the DAG, not named here: DVC has no notion of "network stage" of its own
# (a stage's deps are the repo's files, its cmd is opaque text) and ignores `meta`.
NETWORK_META = "network"
# Seconds a stopped stage's DVC process gets to end after SIGTERM before SIGKILL: it has no
# handler and ends at once; this bounds only a DVC that is stuck.
STOP_GRACE_S = 10
# Lines of a failed stage's output quoted in the exception (the full output is in the logs).
ERROR_TAIL_LINES = 40
# Champion tags written by the retrain flow: model@v1, model@v2, ...
TAG_PREFIX = "model@v"
# Metrics of the headline table, in this order (others still show in the diff section).
HEADLINE = ("accuracy", "loss", "macro_precision", "macro_recall", "macro_f1", "errors")


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message carries the tail of its output."""


@dataclass(frozen=True)
class Stage:
    """One pipeline stage of dvc.yaml, as DVC's index sees it."""

    name: str  # the stage name in dvc.yaml: the Prefect task name
    target: str  # DVC's address for `dvc repro` (``name``, or ``sub/dvc.yaml:name``)
    upstream: tuple[str, ...]  # names of the stages it depends on
    network: bool = False  # dvc.yaml `meta: {network: true}`: retried by the flow


def stage_graph(root: Path) -> list[Stage]:
    """The stages with a command, in dependency order (dvc.yaml order among independents)."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        position = {stage: i for i, stage in enumerate(repo.index.stages)}
        order = nx.lexicographical_topological_sort(
            graph.reverse(copy=True), key=lambda s: position.get(s, len(position))
        )
        # .dvc files of tracked data are graph nodes too, but have no command to run
        return [
            Stage(
                name=_stage_name(stage),
                target=_stage_target(stage, root),
                upstream=tuple(_stage_name(dep) for dep in graph.successors(stage) if dep.cmd),
                network=bool((stage.meta or {}).get(NETWORK_META, False)),
            )
            for stage in order
            if stage.cmd
        ]


def _stage_name(stage: Any) -> str:
    return getattr(stage, "name", None) or Path(stage.path).name


def _stage_target(stage: Any, root: Path) -> str:
    """The stage's address relative to ``root`` (DVC's ``addressing`` is relative to the cwd)."""
    rel = Path(stage.path).resolve().relative_to(root.resolve())
    name = getattr(stage, "name", None)
    if name is None:  # a .dvc file: addressed by its path
        return str(rel)
    return name if str(rel) == "dvc.yaml" else f"{rel}:{name}"


def dvc_env(root: str | Path) -> dict[str, str]:
    """The environment for DVC and the stage commands it starts, reproducing ``root``.

    ``digitflow ...`` resolves to this venv's command (PATH), and the ``tasks`` /
    ``flows`` packages it imports resolve to ``root``'s checkout: ``root`` goes first
    on PYTHONPATH, ahead of the editable install (a meta-path finder that maps them
    to the tree the venv was installed from). Without it a retrain challenger in a
    git worktree would run the main tree's, possibly uncommitted, code while
    dvc.lock records the worktree's committed hashes.
    """
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(root).resolve()), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    )
    return env


def dvc_command(*args: str) -> list[str]:
    """``dvc <args>`` with this interpreter's DVC (no reliance on PATH order)."""
    return [sys.executable, "-m", "dvc", *args]


def _clean_output(text: str) -> str:
    """Progress bars rewrite lines with '\\r': keep only each line's final state."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines()).strip()


# What `dvc repro` prints after every stage it ran, whatever the repo's remotes (DVC has no
# switch for it). True in a checkout that is shared; a retrain challenger's scratch worktree
# is not, so there it is left out of the stage's log.
DVC_PUSH_HINT = "Use `dvc push` to send your updates to remote storage."


def _without_push_hint(output: str) -> str:
    return "\n".join(line for line in output.splitlines() if line.strip() != DVC_PUSH_HINT)


def repro_status(root: str | Path, target: str) -> str:
    """What ``dvc repro --single-item <target>`` is about to do, asked of DVC's API.

    'skipped' (up to date), 'restored' (outputs checked out of the run cache) or 'ran'.
    The same checks, in the same order, as DVC's ``Stage.reproduce`` and ``run_stage``:
    ``Stage.changed()``, then ``StageCache.restore(dry=True)`` (no checkout). Asked under
    the repo's lock right before the stage runs: DVC then decides the same way, unless
    someone edits the workspace in between.
    """
    root = Path(root).resolve()  # absolute: _repro_status changes into it
    # A dry restore still logs "is cached - skipping run, checking out outputs": not true
    # of a dry run, and the stage's own log (dvc repro's output) says it when it happens.
    cache_log = logging.getLogger("dvc.stage.cache")
    level = cache_log.level
    cache_log.setLevel(logging.WARNING)
    try:
        return _repro_status(root, target)
    finally:
        cache_log.setLevel(level)


def _repro_status(root: Path, target: str) -> str:
    from dvc.dependency.base import DependencyDoesNotExistError
    from dvc.repo import Repo
    from dvc.stage.cache import RunCacheNotFoundError
    from dvc_data.hashfile.hash_info import HashInfo

    # From the repo's root, as the `dvc` command always runs: DVC's run-cache lookup builds
    # the cached stage from a path relative to the cwd (StageCache._create_stage), and from
    # elsewhere it fails. The flow runs its stages one after another, in this thread.
    with contextlib.chdir(root), Repo(str(root)) as repo, repo.lock:
        stage = next(s for s in repo.index.stages if _stage_target(s, root) == target)
        if not stage.changed():
            return "skipped"
        try:
            if not stage.deps_cached():
                # The deps differ from dvc.lock. A real restore() then looks the run cache
                # up by their current hashes (it saves them, in memory, first; a dry one
                # does not, so `dvc repro --dry` looks up dvc.lock's), and dvc.lock's
                # outputs, made from the old deps, are no answer.
                stage.save_deps()
                for out in stage.outs:
                    out.hash_info = HashInfo()
            repo.stage_cache.restore(stage, dry=True)
        except RunCacheNotFoundError:
            return "ran"
        except DependencyDoesNotExistError:
            # `dvc repro` fails the same way, and its output (the StageFailed message)
            # says which; the status of a failed stage is never reported.
            return "ran"
        return "restored"


def _run_stoppable(cmd: list[str], cwd: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``subprocess.run`` (output captured), except that a stop reaches the whole stage.

    When the flow is stopped (SIGTERM, which digitflow's CLI and Prefect turn into an
    exception, or Ctrl-C), ``subprocess.run`` would SIGKILL its child, DVC, alone: the
    stage command DVC started would run on, orphaned, and a stopped one never removes its
    temp files. Started in a process group of its own, every process of the stage gets
    SIGTERM instead (a digitflow command unwinds and removes its temp files); DVC, which
    does not handle SIGTERM, ends at once, and is killed if it has not after STOP_GRACE_S.
    """
    with subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group, apart from the terminal's too
    ) as proc:  # fmt: skip
        try:
            stdout, stderr = proc.communicate()
        except BaseException:
            _stop_group(proc)
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return  # every process of the group has ended already
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@task(cache_policy=NO_CACHE)  # DVC decides what is up to date, not Prefect
def run_stage(root: str, target: str, dvc_push_hint: bool = True) -> dict[str, Any]:
    """Reproduce one stage with ``dvc repro --single-item``; raise StageFailed on failure.

    ``dvc_push_hint=False`` leaves DVC's "Use `dvc push`" line out of the logged output.
    The status returned is what DVC's API said the stage needed (repro_status), not a
    reading of DVC's messages.
    """
    logger = get_run_logger()
    status = repro_status(root, target)
    if status == "skipped":  # DVC would do nothing: spare its start-up (seconds a stage)
        logger.info("stage %s is up to date", target)
        return {"stage": target, "status": status, "seconds": 0.0}
    start = time.perf_counter()
    proc = _run_stoppable(dvc_command("repro", "--single-item", target), root, dvc_env(root))
    seconds = time.perf_counter() - start
    output = _clean_output(proc.stdout + "\n" + proc.stderr)
    if not dvc_push_hint:
        output = _without_push_hint(output)
    if proc.returncode != 0:
        tail = "\n".join(output.splitlines()[-ERROR_TAIL_LINES:])
        logger.error("stage %s failed (exit %d):\n%s", target, proc.returncode, output)
        raise StageFailed(f"stage {target!r} failed (exit {proc.returncode}):\n{tail}")
    logger.info("stage %s %s in %.1f s\n%s", target, status, seconds, output)
    return {"stage": target, "status": status, "seconds": round(seconds, 3)}


def latest_champion(root: Path) -> tuple[str, int] | None:
    """The newest ``model@vN`` tag and its N, or None before the first promotion."""
    proc = subprocess.run(
        ["git", "tag", "--list", f"{TAG_PREFIX}*"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    versions = [
        int(tag[len(TAG_PREFIX) :])
        for tag in proc.stdout.split()
        if tag[len(TAG_PREFIX) :].isdigit()
    ]
    if not versions:
        return None
    best = max(versions)
    return f"{TAG_PREFIX}{best}", best


def _has_commit(root: Path, rev: str) -> bool:
    proc = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
        cwd=root,
        capture_output=True,
        check=False,
    )
    return proc.returncode == 0


def metrics_diff(root: Path, baseline: str) -> dict[str, dict[str, dict[str, Any]]]:
    """``dvc metrics diff <baseline>`` (baseline vs workspace) through DVC's API."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        result = repo.metrics.diff(a_rev=baseline, b_rev="workspace")
    return result.get("diff", {}) if result else {}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "–" if value is None else str(value)


def _fmt_change(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:+.4f}"
    if isinstance(value, int):
        return f"{value:+d}"
    return "–"


def metrics_markdown(
    metrics: dict[str, Any],
    diff: dict[str, dict[str, dict[str, Any]]],
    baseline: str | None,
    stages: Iterable[dict[str, Any]],
) -> str:
    """The run's headline metrics, the diff against ``baseline`` and what each stage did."""
    lines = ["# digitflow pipeline run", "", "## Test metrics", ""]
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(metrics[k])} |" for k in HEADLINE if k in metrics]
    lines += ["", f"## Metrics diff against `{baseline}`" if baseline else "## Metrics diff", ""]
    rows = [
        f"| {path} | {name} | {_fmt(d.get('old'))} | {_fmt(d.get('new'))} "
        f"| {_fmt_change(d.get('diff'))} |"
        for path, by_name in sorted(diff.items())
        for name, d in sorted(by_name.items())
    ]
    if rows:
        lines += ["| file | metric | old | new | change |", "|---|---|---|---|---|", *rows]
    else:
        lines.append("No baseline revision to compare with." if not baseline else "No changes.")
    lines += ["", "## Stages", "", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']:.1f} |" for s in stages]
    return "\n".join(lines) + "\n"


def confusion_rows(confusion_csv: Path) -> list[dict[str, Any]]:
    """The 10x10 confusion matrix (rows: actual, columns: predicted) from per-image rows."""
    from tasks.digits import N_CLASSES
    from tasks.metrics import confusion_matrix, read_confusion_rows

    counts = confusion_matrix(*read_confusion_rows(confusion_csv)).tolist()
    classes = range(N_CLASSES)
    return [{"actual": str(a), **{str(p): counts[a][p] for p in classes}} for a in classes]


def publish_artifacts(
    root: Path, baseline: str | None, stages: list[dict[str, Any]], model: str
) -> None:
    """Markdown (headline metrics + diff), per-class table and confusion-matrix artifacts
    of pipeline model ``model``."""
    logger = get_run_logger()
    metrics_path = root / eval_path(model, EVAL_METRICS)
    if not metrics_path.is_file():
        logger.warning("no %s: this pipeline has no evaluate stage; no artifacts", metrics_path)
        return
    metrics = json.loads(metrics_path.read_text())
    diff = metrics_diff(root, baseline) if baseline else {}
    create_markdown_artifact(
        key=ARTIFACT_METRICS,
        markdown=metrics_markdown(metrics, diff, baseline, stages),
        description=f"test metrics of model {model!r} in {root.name}, diff against {baseline}",
    )
    per_class = json.loads((root / eval_path(model, EVAL_CLASSES)).read_text())["per_class"]
    create_table_artifact(
        key=ARTIFACT_PER_CLASS,
        table=[
            {
                "class": str(row["class"]),
                **{k: round(float(row[k]), 4) for k in ("precision", "recall", "f1")},
                "support": int(row["support"]),
            }
            for row in per_class
        ],
        description="per-class precision / recall / F1 on the test set",
    )
    create_table_artifact(
        key=ARTIFACT_CONFUSION,
        table=confusion_rows(root / eval_path(model, EVAL_CONFUSION)),
        description="confusion matrix on the test set (rows: actual, columns: predicted)",
    )


def default_baseline(root: Path) -> str | None:
    """The champion tag when there is one, else HEAD (None in a repo without commits)."""
    champion = latest_champion(root)
    if champion is not None:
        return champion[0]
    return "HEAD" if _has_commit(root, "HEAD") else None


@flow(name="training_pipeline")
def training_pipeline(
    root: str = ".", baseline: str | None = None, dvc_push_hint: bool = True
) -> list[dict[str, Any]]:
    """Run every dvc.yaml stage in dependency order; publish metrics artifacts.

    ``baseline`` is the revision the metrics are diffed against (default: the
    champion tag ``model@vN``, else HEAD). ``dvc_push_hint=False`` (a scratch checkout,
    e.g. the retrain worktree) drops DVC's "Use `dvc push`" line from the stage logs.
    Returns one {stage, status, seconds} per stage.
    """
    from tasks.config import load_params

    repo_root = Path(root).resolve()
    params = load_params(repo_root / "params.yaml")  # read once, here at the entry point
    logger = get_run_logger()
    stages = stage_graph(repo_root)
    logger.info("stages in dependency order: %s", " -> ".join(s.name for s in stages))
    results = []
    for stage in stages:
        options: dict[str, Any] = {"name": stage.name, "task_run_name": stage.name}
        if stage.network and params.pipeline.download_retries > 0:
            options["retries"] = params.pipeline.download_retries
            options["retry_delay_seconds"] = exponential_backoff(
                backoff_factor=params.pipeline.retry_delay_s
            )
        results.append(
            run_stage.with_options(**options)(str(repo_root), stage.target, dvc_push_hint)
        )
    publish_artifacts(
        repo_root, baseline or default_baseline(repo_root), results, params.predict.model
    )
    return results
