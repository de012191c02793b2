"""The ``retrain`` flow: train a challenger, promote it over the champion only if it is better.

Promotion scheme (git tags ``model@vN``):

* The champion is the newest tag ``model@vN``; its metrics are read from git
  (``git show model@vN:data/evaluate/<model>/metrics.json``, ``<model>`` being the
  prediction model, params.yaml predict.model). No tag yet: the first
  challenger that completes is promoted as ``model@v1``.
* The challenger runs the ``training_pipeline`` flow in a temporary detached git
  worktree of HEAD (param overrides applied to its params.yaml, Hydra syntax as
  in ``dvc exp run -S``), sharing the main repo's DVC cache. Its stage commands
  import the worktree's ``tasks``/``flows`` (``dvc_env``), i.e. the committed code
  that dvc.lock records. The main working tree, its branch and its outputs are
  never touched.
* The promotion rules (``retrain:`` in params.yaml) are read from HEAD as
  committed, before any override; overriding ``retrain.*`` is refused, so a
  challenger cannot lower the bar it is judged by.
* The worktree is locked with this process's id; at start, worktrees of retrain
  runs whose process is gone (killed) are removed and git's stale worktree
  records pruned.
* Promotion = in the worktree, a commit of dvc.lock, params.yaml and the
  git-tracked metrics/plots, then an annotated tag ``model@v(N+1)`` on that
  commit, created last. The tag is the only ref a promotion writes, and creating
  it is atomic: a crash before it leaves an unreachable commit and no new
  champion; a concurrent promotion of the same N makes ``git tag`` fail.
* ``dvc metrics diff model@v1 model@v2`` compares champions;
  ``git checkout model@v2 && dvc checkout`` restores a champion's weights from the cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.pipeline import (
    EVAL_CLASSES,
    EVAL_METRICS,
    TAG_PREFIX,
    eval_path,
    latest_champion,
    training_pipeline,
)
from tasks.config import RetrainParams

ARTIFACT_DECISION = "digitflow-retrain-decision"
# Fallback identity for the promotion commit when the repo has none configured.
GIT_IDENTITY = ("-c", "user.name=digitflow retrain", "-c", "user.email=digitflow@localhost")
# params.yaml section of the promotion rules: fixed by the committed HEAD, never overridden.
RULES_SECTION = "retrain"
# The challenger worktree: <tmp>/digitflow-retrain-XXXX/challenger, locked with this reason.
WORKTREE_PREFIX = "digitflow-retrain-"
LOCK_REASON = re.compile(r"digitflow retrain pid (?P<pid>\d+) on (?P<host>\S+)")


class RetrainError(RuntimeError):
    """The retrain flow could not run (not a git repo, no commit, tag race, ...)."""


@dataclass
class Decision:
    """Champion vs challenger: whether to promote and why."""

    promote: bool
    reasons: list[str]
    accuracy_gain: float | None = None  # challenger - champion test accuracy
    recall_drops: dict[str, float] = field(default_factory=dict)  # class -> champion - challenger


def _git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RetrainError(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def _recalls(classes: dict[str, Any]) -> dict[str, float]:
    return {str(row["class"]): float(row["recall"]) for row in classes["per_class"]}


def judge(
    champion_metrics: dict[str, Any] | None,
    champion_classes: dict[str, Any] | None,
    challenger_metrics: dict[str, Any],
    challenger_classes: dict[str, Any],
    rules: RetrainParams,
) -> Decision:
    """Promote iff accuracy gains >= min_improvement and no class recall drops > max_class_drop."""
    if champion_metrics is None or champion_classes is None:
        return Decision(True, ["no champion yet: the first model is promoted"])
    gain = float(challenger_metrics["accuracy"]) - float(champion_metrics["accuracy"])
    old, new = _recalls(champion_classes), _recalls(challenger_classes)
    drops = {c: old[c] - new.get(c, 0.0) for c in old}
    reasons = []
    # a tiny epsilon keeps float noise (0.1 + 0.2 style) from deciding an exact tie
    eps = 1e-12
    if gain + eps < rules.min_improvement:
        reasons.append(
            f"test accuracy {challenger_metrics['accuracy']:.4f} vs champion "
            f"{champion_metrics['accuracy']:.4f}: gain {gain:+.4f} < required "
            f"{rules.min_improvement:.4f} (retrain.min_improvement)"
        )
    worst = {c: d for c, d in drops.items() if d > rules.max_class_drop + eps}
    for c, d in sorted(worst.items(), key=lambda kv: -kv[1]):
        reasons.append(
            f"class {c} recall {new.get(c, 0.0):.4f} vs champion {old[c]:.4f}: drop {d:.4f} "
            f"> allowed {rules.max_class_drop:.4f} (retrain.max_class_drop)"
        )
    if reasons:
        return Decision(False, reasons, gain, drops)
    return Decision(
        True,
        [
            f"test accuracy gain {gain:+.4f} >= {rules.min_improvement:.4f} and largest class "
            f"recall drop {max(drops.values(), default=0.0):.4f} <= {rules.max_class_drop:.4f}"
        ],
        gain,
        drops,
    )


def read_at_rev(root: Path, rev: str, path: str) -> dict[str, Any]:
    """A JSON file as committed at ``rev``."""
    return json.loads(_git(root, "show", f"{rev}:{path}").stdout)


def check_overrides(overrides: list[str]) -> None:
    """Refuse overrides that are not Hydra syntax or that change the promotion rules."""
    from dvc.utils.hydra import to_hydra_overrides
    from hydra.errors import OverrideParseException

    try:
        parsed = to_hydra_overrides(overrides)
    except OverrideParseException as exc:
        raise RetrainError(f"invalid param override: {exc}") from exc
    for override in parsed:
        key = override.key_or_group
        if key == RULES_SECTION or key.startswith(f"{RULES_SECTION}."):
            raise RetrainError(
                f"override {override.input_line!r} changes the promotion rule {key!r}: "
                f"the {RULES_SECTION}.* rules come from params.yaml as committed at HEAD "
                "and cannot be overridden by the challenger; commit a change to them instead"
            )


def committed_rules(root: Path) -> RetrainParams:
    """The promotion rules of params.yaml as committed at HEAD (no override applies)."""
    import yaml

    from tasks.config import ParamsError, parse_params

    text = _git(root, "show", "HEAD:params.yaml").stdout
    data = yaml.safe_load(text)
    if data is not None and not isinstance(data, dict):
        raise ParamsError("HEAD:params.yaml: top level must be a mapping of stage sections")
    return parse_params(data).retrain


def _lock_reason() -> str:
    return f"digitflow retrain pid {os.getpid()} on {socket.gethostname()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _worktrees(root: Path) -> list[dict[str, str]]:
    """``git worktree list --porcelain`` as one dict per worktree (the main one first)."""
    out = _git(root, "worktree", "list", "--porcelain").stdout
    entries = []
    for block in out.strip().split("\n\n"):
        entry = {}
        for line in block.splitlines():
            key, _, value = line.partition(" ")
            entry[key] = value
        entries.append(entry)
    return entries


def prune_stale_worktrees(root: Path) -> list[str]:
    """Remove challenger worktrees of retrain runs that died (killed); prune git's records.

    A run locks its worktree with its pid and host; a lock whose process is gone is
    stale. Worktrees of live runs (concurrent retrains) and any other worktree are
    left alone. Returns the paths removed.
    """
    removed = []
    host = socket.gethostname()
    for entry in _worktrees(root)[1:]:
        match = LOCK_REASON.fullmatch(entry.get("locked", ""))
        if not match or match["host"] != host or _pid_alive(int(match["pid"])):
            continue
        path = Path(entry["worktree"])
        _git(root, "worktree", "unlock", str(path), check=False)
        _git(root, "worktree", "remove", "--force", str(path), check=False)
        if path.parent.name.startswith(WORKTREE_PREFIX):
            shutil.rmtree(path.parent, ignore_errors=True)
        removed.append(str(path))
    _git(root, "worktree", "prune")  # records of worktrees whose folder is gone
    return removed


def _add_worktree(root: Path, where: Path) -> None:
    """A detached worktree of HEAD whose DVC cache is the main repo's (no data copied twice)."""
    from dvc.repo import Repo

    # locked with this process's id: prune_stale_worktrees removes it only once we are gone
    lock = ("--lock", "--reason", _lock_reason())
    _git(root, "worktree", "add", "--detach", *lock, str(where), "HEAD")
    with Repo(str(root)) as main:
        cache_dir = main.cache.local_cache_dir
    with Repo(str(where)) as wt, wt.config.edit("local") as conf:
        conf["cache"]["dir"] = cache_dir


def _remove_worktree(root: Path, where: Path) -> None:
    _git(root, "worktree", "unlock", str(where), check=False)
    proc = _git(root, "worktree", "remove", "--force", str(where), check=False)
    if proc.returncode != 0:
        # the folder is gone or broken: drop the leftover bookkeeping instead
        get_run_logger().warning("git worktree remove: %s", proc.stderr.strip())
        _git(root, "worktree", "prune", check=False)


def _promote(worktree: Path, tag: str, message: str) -> str:
    """Commit the challenger's lock, params and metrics in the worktree; tag it last."""
    identity: tuple[str, ...] = ()
    if _git(worktree, "config", "user.email", check=False).returncode != 0:
        identity = GIT_IDENTITY
    # dvc.lock pins every output (weights in the DVC cache); data/ holds the git-tracked
    # metrics and plots (cache: false) and DVC's .gitignore files
    _git(worktree, "add", "--", "dvc.lock", "params.yaml", "data")
    _git(worktree, *identity, "commit", "--allow-empty", "-q", "-m", message)
    commit = _git(worktree, "rev-parse", "HEAD").stdout.strip()
    _tag(worktree, identity, tag, message, commit)
    return commit


def _tag(worktree: Path, identity: tuple[str, ...], tag: str, message: str, commit: str) -> None:
    """The promotion itself: created last, in one atomic ref update (refuses an existing tag)."""
    _git(worktree, *identity, "tag", "-a", tag, "-m", message, commit)


def decision_markdown(
    decision: Decision,
    champion: str | None,
    tag: str | None,
    champion_metrics: dict[str, Any] | None,
    challenger_metrics: dict[str, Any],
    overrides: list[str],
) -> str:
    """The artifact explaining the decision."""
    verdict = f"promoted as `{tag}`" if decision.promote else "rejected"
    lines = [f"# Retrain: challenger {verdict}", ""]
    lines += [f"- champion: `{champion}`" if champion else "- champion: none"]
    lines += [f"- overrides: `{' '.join(overrides)}`" if overrides else "- overrides: none", ""]
    lines += ["## Why", "", *[f"- {r}" for r in decision.reasons], ""]
    lines += ["| metric | champion | challenger |", "|---|---|---|"]
    for key in ("accuracy", "loss", "macro_f1", "errors"):
        old = champion_metrics.get(key) if champion_metrics else None
        lines.append(f"| {key} | {old if old is not None else '–'} | {challenger_metrics[key]} |")
    if decision.recall_drops:
        lines += ["", "| class | recall drop vs champion |", "|---|---|"]
        lines += [f"| {c} | {d:+.4f} |" for c, d in sorted(decision.recall_drops.items())]
    return "\n".join(lines) + "\n"


@flow(name="retrain")
def retrain(root: str = ".", overrides: list[str] | None = None) -> dict[str, Any]:
    """Train a challenger from HEAD (+ ``overrides``); promote it as ``model@vN`` if better.

    Returns {promoted, tag, champion, reasons, commit}. The main working tree is never modified.
    """
    from dvc.utils.hydra import apply_overrides

    from tasks.config import load_params

    logger = get_run_logger()
    overrides = list(overrides or [])
    check_overrides(overrides)
    repo_root = Path(_git(Path(root), "rev-parse", "--show-toplevel").stdout.strip())
    if _git(repo_root, "rev-parse", "--verify", "--quiet", "HEAD", check=False).returncode:
        raise RetrainError(f"{repo_root}: no commit yet; commit the pipeline first")
    for path in prune_stale_worktrees(repo_root):
        logger.warning("removed the worktree of a retrain run that died: %s", path)
    # the bar the challenger is judged by: HEAD's, as committed, before any override
    rules = committed_rules(repo_root)
    champion = latest_champion(repo_root)
    champion_tag, champion_n = champion if champion else (None, 0)
    logger.info("champion: %s", champion_tag or "none yet")

    tmp = Path(tempfile.mkdtemp(prefix="digitflow-retrain-"))
    worktree = tmp / "challenger"
    try:
        _add_worktree(repo_root, worktree)
        if overrides:
            apply_overrides(worktree / "params.yaml", overrides)
        # validated here (overrides included): bad overrides fail before any training
        served = load_params(worktree / "params.yaml").predict.model  # the model judged
        training_pipeline(root=str(worktree), baseline=champion_tag)

        metrics_file, classes_file = (
            eval_path(served, EVAL_METRICS),
            eval_path(served, EVAL_CLASSES),
        )
        challenger_metrics = json.loads((worktree / metrics_file).read_text())
        challenger_classes = json.loads((worktree / classes_file).read_text())
        champion_metrics = champion_classes = None
        if champion_tag:
            champion_metrics = read_at_rev(repo_root, champion_tag, metrics_file)
            champion_classes = read_at_rev(repo_root, champion_tag, classes_file)
        decision = judge(
            champion_metrics, champion_classes, challenger_metrics, challenger_classes, rules
        )
        tag = f"{TAG_PREFIX}{champion_n + 1}" if decision.promote else None
        commit = None
        if tag:
            message = (
                f"retrain: promote {tag} (test accuracy {challenger_metrics['accuracy']:.4f}"
                + (f", champion {champion_tag}" if champion_tag else "")
                + ")\n\n"
                + "\n".join(decision.reasons)
                + (f"\n\noverrides: {' '.join(overrides)}" if overrides else "")
            )
            commit = _promote(worktree, tag, message)
            why = "; ".join(decision.reasons)
            logger.info("promoted %s (commit %s): %s", tag, commit[:12], why)
        else:
            why = "; ".join(decision.reasons)
            logger.warning("challenger rejected, champion %s stays: %s", champion_tag, why)
        create_markdown_artifact(
            key=ARTIFACT_DECISION,
            markdown=decision_markdown(
                decision, champion_tag, tag, champion_metrics, challenger_metrics, overrides
            ),
            description="champion/challenger decision of the retrain flow",
        )
        return {
            "promoted": decision.promote,
            "tag": tag,
            "champion": champion_tag,
            "reasons": decision.reasons,
            "commit": commit,
            "accuracy": challenger_metrics["accuracy"],
        }
    finally:
        _remove_worktree(repo_root, worktree)
        shutil.rmtree(tmp, ignore_errors=True)
