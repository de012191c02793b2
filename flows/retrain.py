"""The ``retrain`` flow: train a challenger, promote it over the champion only if it is better.

Promotion scheme (git tags ``model@vN``):

* The champion is the newest tag ``model@vN``; its metrics are read from git
  (``git show model@vN:data/evaluate/<model>/metrics.json``, ``<model>`` being the
  prediction model, params.yaml predict.model). No tag yet: the challenger is
  compared with the model committed at HEAD (its metrics in git), so a first
  champion is never worse than what the repository already holds; with no
  committed metrics either, the first challenger that completes is promoted as
  ``model@v1``.
* The challenger runs the ``training_pipeline`` flow in a temporary detached git
  worktree of HEAD (param overrides applied to its params.yaml, Hydra syntax as
  in ``dvc exp run -S``, checked against HEAD's params.yaml before any work and
  written without reformatting the rest of the file), sharing the main repo's
  DVC cache. Its stage commands import the worktree's ``tasks``/``flows``
  (``dvc_env``), i.e. the committed code that dvc.lock records. The main working
  tree, its branch and its outputs are never touched.
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

import contextlib
import difflib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.paths import (
    EVAL_CLASSES,
    EVAL_METRICS,
    LABELED_DIR,
    LABELED_SPLIT_DIR,
    eval_path,
    model_file,
)
from flows.pipeline import TAG_PREFIX, latest_champion, training_pipeline
from tasks.config import ParamsError, RetrainParams
from tasks.errors import DigitflowError
from tasks.io import atomic_write_text

ARTIFACT_DECISION = "digitflow-retrain-decision"
# Fallback identity for the promotion commit when the repo has none configured.
GIT_IDENTITY = ("-c", "user.name=digitflow retrain", "-c", "user.email=digitflow@localhost")
# params.yaml section of the promotion rules: fixed by the committed HEAD, never overridden.
RULES_SECTION = "retrain"
# The challenger worktree: <tmp>/digitflow-retrain-XXXX/challenger, locked with this reason.
WORKTREE_PREFIX = "digitflow-retrain-"
LOCK_REASON = re.compile(r"digitflow retrain pid (?P<pid>\d+) on (?P<host>\S+)")
# What the challenger is judged against when no model@vN tag exists yet.
HEAD_BASELINE = "HEAD"
INBOX_STAGE = "labeled-inbox"  # dvc.yaml's stage whose output is data/labeled
LABELED_TEST = f"{LABELED_SPLIT_DIR}/test.npz"  # the labelled test images, once split
# difflib similarity (0..1) above which a known key is offered for a mistyped one: 0.6 is
# difflib's own default, close enough for `train.epoch` -> `train.robust.epochs`.
SUGGEST_CUTOFF = 0.6
SUGGEST_MAX = 3  # keys offered in one "did you mean"
# YAML block styles (mapping indent, sequence indent, dash offset) a params file may use.
# ruamel writes the one it is given and does not detect it (its load_yaml_guess_indent
# reports 4 for params.yaml, the sequence indent, where mappings indent by 2): the style
# whose round trip reproduces the file unchanged is the file's own.
YAML_STYLES = ((2, 4, 2), (2, 2, 0), (4, 4, 2), (4, 4, 0), (4, 6, 4))
# Line width for ruamel: wide enough that it never folds a long value (a mirror URL) anew.
YAML_WIDTH = 4096
# params.yaml as committed at HEAD: what `git show` reads and what errors name
HEAD_PARAMS = "HEAD:params.yaml"


class RetrainError(DigitflowError, RuntimeError):
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
    against: str = "champion",
) -> Decision:
    """Promote iff accuracy gains >= min_improvement and no class recall drops > max_class_drop.

    ``against`` names the model compared with in the reasons (the champion tag's, or HEAD's).
    """
    if champion_metrics is None or champion_classes is None:
        return Decision(
            True, ["no champion yet and no model committed at HEAD: the first model is promoted"]
        )
    if "real" in challenger_metrics and "real" in champion_metrics:
        return judge_on_labels(champion_metrics, challenger_metrics, rules, against)
    gain = float(challenger_metrics["accuracy"]) - float(champion_metrics["accuracy"])
    old, new = _recalls(champion_classes), _recalls(challenger_classes)
    drops = {c: old[c] - new.get(c, 0.0) for c in old}
    reasons = []
    # a tiny epsilon keeps float noise (0.1 + 0.2 style) from deciding an exact tie
    eps = 1e-12
    if gain + eps < rules.min_improvement:
        reasons.append(
            f"test accuracy {challenger_metrics['accuracy']:.4f} vs {against} "
            f"{champion_metrics['accuracy']:.4f}: gain {gain:+.4f} < required "
            f"{rules.min_improvement:.4f} (retrain.min_improvement)"
        )
    worst = {c: d for c, d in drops.items() if d > rules.max_class_drop + eps}
    for c, d in sorted(worst.items(), key=lambda kv: -kv[1]):
        reasons.append(
            f"class {c} recall {new.get(c, 0.0):.4f} vs {against} {old[c]:.4f}: drop {d:.4f} "
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


def judge_on_labels(
    champion: dict[str, Any], challenger: dict[str, Any], rules: RetrainParams, against: str
) -> Decision:
    """With labelled test images: they must improve, MNIST may drop only a little.

    Both ``real`` figures are on the same images (the challenger's labelled test split,
    the champion re-scored on it).
    """
    eps = 1e-12  # float noise never decides an exact tie
    drop = float(champion["accuracy"]) - float(challenger["accuracy"])
    old, new = float(champion["real"]["accuracy"]), float(challenger["real"]["accuracy"])
    count = challenger["real"]["count"]
    reasons = []
    if drop > rules.max_mnist_drop + eps:
        reasons.append(
            f"MNIST test accuracy {challenger['accuracy']:.4f} vs {against} "
            f"{champion['accuracy']:.4f}: drop {drop:.4f} > allowed {rules.max_mnist_drop:.4f} "
            "(retrain.max_mnist_drop)"
        )
    if new - old + eps < rules.min_improvement:
        reasons.append(
            f"labelled test images ({count}): accuracy {new:.4f} vs {against} {old:.4f}: gain "
            f"{new - old:+.4f} < required {rules.min_improvement:.4f} (retrain.min_improvement)"
        )
    if reasons:
        return Decision(False, reasons, -drop)
    why = (
        f"labelled test images ({count}): accuracy {new:.4f} vs {against} {old:.4f} "
        f"(gain {new - old:+.4f}); MNIST test accuracy drop {drop:+.4f} <= "
        f"{rules.max_mnist_drop:.4f}"
    )
    return Decision(True, [why], -drop)


def rescore_champion(root: Path, rev: str, model_path: str, real_test: Path) -> dict[str, Any]:
    """The model committed at ``rev`` scored on ``real_test`` (the challenger's labelled split).

    Its weights come from the DVC cache through DVC's API, as ``rev``'s dvc.lock names them.
    """
    import dvc.api

    from tasks.evaluate import real_metrics
    from tasks.model import max_model_bytes

    cap = max_model_bytes()  # what load_model accepts: no bigger file is read whole
    with tempfile.TemporaryDirectory(prefix="digitflow-champion-") as tmp:
        local = Path(tmp) / "model.pt"
        with dvc.api.open(model_path, repo=str(root), rev=rev, mode="rb") as src:
            local.write_bytes(src.read(cap + 1))
        if local.stat().st_size > cap:
            raise RetrainError(f"{model_path} at {rev}: larger than {cap} bytes")
        scored = real_metrics(local, real_test)
    if scored is None:
        raise RetrainError(f"{real_test}: no labelled test images to score {rev}'s model on")
    return scored


def labels_unchanged_since(root: Path, rev: str) -> bool:
    """Whether HEAD's labelled images (dvc.lock's hash of data/labeled) are those of ``rev``."""
    return _labeled_hash(root, "HEAD") == _labeled_hash(root, rev)


def _labeled_hash(root: Path, rev: str) -> str | None:
    proc = _git(root, "show", f"{rev}:dvc.lock", check=False)
    if proc.returncode != 0:
        return None
    stage = (yaml.safe_load(proc.stdout) or {}).get("stages", {}).get(INBOX_STAGE, {})
    return next((out.get("md5") for out in stage.get("outs", [])), None)


def read_at_rev(root: Path, rev: str, path: str) -> dict[str, Any]:
    """A JSON file as committed at ``rev``."""
    return json.loads(_git(root, "show", f"{rev}:{path}").stdout)


def committed_evaluation(
    root: Path, rev: str, metrics_file: str, classes_file: str
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The evaluate stage's metrics and per-class file as committed at ``rev`` (None if absent)."""
    for path in (metrics_file, classes_file):
        if _git(root, "cat-file", "-e", f"{rev}:{path}", check=False).returncode != 0:
            return None
    return read_at_rev(root, rev, metrics_file), read_at_rev(root, rev, classes_file)


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


def params_keys(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every dotted key of a params mapping, sections included (``train``, ``train.seed.lr``)."""
    keys = []
    for name, value in data.items():
        key = f"{prefix}{name}"
        keys.append(key)
        if isinstance(value, Mapping):
            keys += params_keys(value, f"{key}.")
    return keys


def did_you_mean(key: str, known: list[str]) -> str:
    """`` (did you mean a or b?)`` for the known keys closest to ``key``; empty if none is."""
    close = difflib.get_close_matches(key, known, n=SUGGEST_MAX, cutoff=SUGGEST_CUTOFF)
    if not close:  # a bare or misplaced name (`epochs`): the keys whose last part is like it
        leaf_of = {k: k.rsplit(".", 1)[-1] for k in known}
        leaf = key.rsplit(".", 1)[-1]
        names = difflib.get_close_matches(leaf, set(leaf_of.values()), n=1, cutoff=SUGGEST_CUTOFF)
        close = [k for k, name in leaf_of.items() if names and name == names[0]][:SUGGEST_MAX]
    if not close:
        return ""
    listed = close[0] if len(close) == 1 else f"{', '.join(close[:-1])} or {close[-1]}"
    return f" (did you mean {listed}?)"


def _has_key(data: Mapping[str, Any], key: str) -> bool:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def check_override_keys(overrides: list[str], params: Mapping[str, Any]) -> None:
    """Each override names a key of ``params`` (``+key`` one that is not there yet).

    Hydra (``dvc exp run -S``) refuses an unknown key with a traceback that never names
    it; this names it and the closest keys. One challenger per run: no sweeps.
    """
    from dvc.utils.hydra import to_hydra_overrides

    known = params_keys(params)
    for override in to_hydra_overrides(overrides):
        key, line = override.key_or_group, override.input_line
        if override.is_sweep_override():
            raise ParamsError(
                f"-S {line}: a sweep; retrain trains one challenger, give one value "
                "(sweeps: `dvc exp run --queue -S`)"
            )
        exists = _has_key(params, key)
        if override.is_add() and exists:
            raise ParamsError(f"-S {line}: params.yaml has {key} already; drop the '+' to set it")
        if not (override.is_add() or override.is_force_add()) and not exists:
            raise ParamsError(f"-S {line}: params.yaml has no key {key}{did_you_mean(key, known)}")


def _round_trip_yaml(text: str) -> Any:
    """A ruamel round-trip YAML that writes ``text`` back byte for byte when nothing changed."""
    from ruamel.yaml import YAML

    def make(mapping: int, sequence: int, offset: int) -> Any:
        yaml = YAML()  # round trip: comments, key order and number spellings kept
        yaml.indent(mapping=mapping, sequence=sequence, offset=offset)
        yaml.width = YAML_WIDTH
        yaml.preserve_quotes = True
        return yaml

    for style in YAML_STYLES:
        yaml = make(*style)
        out = io.StringIO()
        yaml.dump(yaml.load(text), out)
        if out.getvalue() == text:
            return yaml
    # a layout none of the styles writes: the values are still right, the layout is ruamel's
    return make(*YAML_STYLES[0])


def write_overrides(path: Path, overrides: list[str]) -> None:
    """Apply ``-S`` overrides to a params.yaml, leaving every other line as it was.

    The values are composed exactly as ``dvc exp run -S`` does (DVC's Hydra helpers), so
    an override means the same thing here and there; only the writing differs: DVC
    re-dumps the whole file in ruamel's default style (re-indenting lists), this keeps the
    file's own style, comments included. Written atomically.
    """
    from dvc.utils.collections import merge_dicts, remove_missing_keys, to_omegaconf
    from dvc.utils.hydra import to_hydra_overrides
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    text = path.read_text(encoding="utf-8")
    yaml = _round_trip_yaml(text)
    data = yaml.load(text)
    config = OmegaConf.create(to_omegaconf(data), flags={"allow_objects": True})
    OmegaConf.set_struct(config, True)  # as DVC: a plain override may not invent a key
    try:
        ConfigLoaderImpl._apply_overrides_to_config(to_hydra_overrides(overrides), config)
    except ConfigCompositionException as exc:
        raise ParamsError(f"-S {' '.join(overrides)}: {exc}") from exc
    new_data = OmegaConf.to_object(config)
    merge_dicts(data, new_data)
    remove_missing_keys(data, new_data)
    out = io.StringIO()
    yaml.dump(data, out)
    atomic_write_text(path, out.getvalue())


def validate_overrides(root: Path, overrides: list[str]) -> None:
    """Refuse, before any work, overrides the challenger could not train with.

    Syntax and the promotion rules (RetrainError), then each key against params.yaml as
    committed at HEAD (the challenger's), then the overridden values (ParamsError).
    """
    from tasks.config import load_params, read_params_yaml

    check_overrides(overrides)
    if not overrides:
        return
    text = _git(root, "show", HEAD_PARAMS).stdout
    data = read_params_yaml(text, HEAD_PARAMS)
    check_override_keys(overrides, data)
    with tempfile.TemporaryDirectory(prefix="digitflow-overrides-") as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(text, encoding="utf-8")
        write_overrides(path, overrides)
        try:
            load_params(path)
        except ParamsError as exc:
            # the temporary copy's path means nothing to the user: name what it stands for
            where = "params.yaml (HEAD, with the -S overrides)"
            raise ParamsError(str(exc).replace(str(path), where)) from exc


def committed_rules(root: Path) -> RetrainParams:
    """The promotion rules of params.yaml as committed at HEAD (no override applies)."""
    from tasks.config import parse_params_yaml

    return parse_params_yaml(_git(root, "show", HEAD_PARAMS).stdout, HEAD_PARAMS).retrain


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
        # DVC stages what it writes (the promotion commits it): no "To track the changes
        # with git, run: git add dvc.lock" hint in the stage logs, which would be wrong here
        conf["core"]["autostage"] = True
    _checkout_labels(where)


def _checkout_labels(worktree: Path) -> None:
    """HEAD's labelled images into the worktree, from the shared DVC cache.

    Git does not hold them (a DVC output); without them the inbox stage would start empty
    and the challenger would train without the images HEAD's dvc.lock names.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    with contextlib.chdir(worktree), Repo(str(worktree)) as wt:
        try:
            wt.checkout(targets=[LABELED_DIR])
        except DvcException as exc:  # not in this cache, or not in HEAD's pipeline: start empty
            get_run_logger().warning("labelled images of HEAD not checked out: %s", exc)


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


def _metric(value: Any) -> str:
    """A metric in a table cell: 4 decimals for a float (a loss of 0.015143460929393768 reads
    0.0151), integers as they are, '–' when there is none."""
    if value is None:
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


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
    lines += [f"- compared with: `{champion}`" if champion else "- compared with: nothing yet"]
    lines += [f"- overrides: `{' '.join(overrides)}`" if overrides else "- overrides: none", ""]
    lines += ["## Why", "", *[f"- {r}" for r in decision.reasons], ""]
    lines += [f"| metric | {champion or 'champion'} | challenger |", "|---|---|---|"]
    for key in ("accuracy", "loss", "macro_f1", "errors"):
        old = champion_metrics.get(key) if champion_metrics else None
        lines.append(f"| {key} | {_metric(old)} | {_metric(challenger_metrics[key])} |")
    if "real" in challenger_metrics:  # the same labelled test images for both
        old_real = (champion_metrics or {}).get("real", {})
        for key in ("accuracy", "count"):
            new = challenger_metrics["real"][key]
            lines.append(f"| labelled {key} | {_metric(old_real.get(key))} | {_metric(new)} |")
    if decision.recall_drops:
        # what the challenger was compared with: the champion tag, or HEAD before the first
        against = f"`{champion}`" if champion else "the champion"
        lines += ["", f"| class | recall drop vs {against} |", "|---|---|"]
        lines += [f"| {c} | {d:+.4f} |" for c, d in sorted(decision.recall_drops.items())]
    return "\n".join(lines) + "\n"


def _nothing_new(champion_tag: str) -> dict[str, Any]:
    reason = f"no new labelled images since {champion_tag}: nothing to train"
    get_run_logger().info(reason)
    return {
        "promoted": False, "tag": None, "champion": champion_tag, "compared_with": None,
        "reasons": [reason], "commit": None, "accuracy": None, "trained": False,
    }  # fmt: skip


def _checked_repo(root: Path, overrides: list[str]) -> Path:
    """The repository's top folder, once it has a commit and ``overrides`` are valid.

    Before any work (`digitflow retrain` and `serve` check first too; a served run starts
    here). Worktrees that retrain runs left behind when they died are removed.
    """
    repo_root = Path(_git(root, "rev-parse", "--show-toplevel").stdout.strip())
    if _git(repo_root, "rev-parse", "--verify", "--quiet", "HEAD", check=False).returncode:
        raise RetrainError(f"{repo_root}: no commit yet; commit the pipeline first")
    validate_overrides(repo_root, overrides)
    for path in prune_stale_worktrees(repo_root):
        get_run_logger().warning("removed the worktree of a retrain run that died: %s", path)
    return repo_root


def _bar(
    repo_root: Path, champion_tag: str | None, metrics_file: str, classes_file: str
) -> tuple[dict | None, dict | None, str | None]:
    """(metrics, classes, revision) of the model the challenger must beat; Nones: nothing yet.

    The champion's as committed at its tag; with no champion yet, the model HEAD holds.
    """
    if champion_tag:
        metrics = read_at_rev(repo_root, champion_tag, metrics_file)
        return metrics, read_at_rev(repo_root, champion_tag, classes_file), champion_tag
    committed = committed_evaluation(repo_root, HEAD_BASELINE, metrics_file, classes_file)
    if committed:  # no champion yet: the model the repository holds is the bar, not nothing
        return committed[0], committed[1], HEAD_BASELINE
    return None, None, None


def _record(
    worktree: Path,
    tag: str | None,
    decision: Decision,
    challenger_metrics: dict,
    against: str | None,
    overrides: list[str],
) -> str | None:
    """Promote (commit and tag ``tag``) or log the rejection; the promotion's commit."""
    logger = get_run_logger()
    why = "; ".join(decision.reasons)
    if not tag:
        logger.warning("challenger rejected, %s stays: %s", against, why)
        return None
    message = (
        f"retrain: promote {tag} (test accuracy {challenger_metrics['accuracy']:.4f}"
        + (f", compared with {against}" if against else "")
        + ")\n\n"
        + "\n".join(decision.reasons)
        + (f"\n\noverrides: {' '.join(overrides)}" if overrides else "")
    )
    commit = _promote(worktree, tag, message)
    logger.info("promoted %s (commit %s): %s", tag, commit[:12], why)
    return commit


@flow(name="retrain")
def retrain(
    root: str = ".", overrides: list[str] | None = None, only_if_new_labels: bool = False
) -> dict[str, Any]:
    """Train a challenger from HEAD (+ ``overrides``); promote it as ``model@vN`` if better.

    ``only_if_new_labels`` (the scheduled runs of `digitflow serve`): with a champion whose
    labelled images (dvc.lock's hash of data/labeled) are HEAD's, return at once, untrained.
    Returns {promoted, tag, champion, compared_with, reasons, commit, accuracy, trained}.
    The main working tree is never modified.
    """
    from tasks.config import load_params

    logger = get_run_logger()
    overrides = list(overrides or [])
    repo_root = _checked_repo(Path(root), overrides)
    # the bar the challenger is judged by: HEAD's, as committed, before any override
    rules = committed_rules(repo_root)
    champion = latest_champion(repo_root)
    champion_tag, champion_n = champion if champion else (None, 0)
    logger.info("champion: %s", champion_tag or "none yet")
    if only_if_new_labels and champion_tag and labels_unchanged_since(repo_root, champion_tag):
        return _nothing_new(champion_tag)

    tmp = Path(tempfile.mkdtemp(prefix="digitflow-retrain-"))
    worktree = tmp / "challenger"
    try:
        _add_worktree(repo_root, worktree)
        if overrides:
            write_overrides(worktree / "params.yaml", overrides)
        served = load_params(worktree / "params.yaml").predict.model  # the model judged
        # the worktree is a scratch copy: DVC's "Use `dvc push`" hint does not apply to it
        training_pipeline(root=str(worktree), baseline=champion_tag, dvc_push_hint=False)

        metrics_file, classes_file = (
            eval_path(served, EVAL_METRICS),
            eval_path(served, EVAL_CLASSES),
        )
        challenger_metrics = json.loads((worktree / metrics_file).read_text())
        challenger_classes = json.loads((worktree / classes_file).read_text())
        champion_metrics, champion_classes, against = _bar(
            repo_root, champion_tag, metrics_file, classes_file
        )
        logger.info("compared with: %s", against or "nothing yet (no committed metrics)")
        if champion_metrics is not None and "real" in challenger_metrics:
            # the same labelled test images for both: the champion re-scored on the challenger's
            real = rescore_champion(
                repo_root, against, model_file(served).as_posix(), worktree / LABELED_TEST
            )
            champion_metrics = {**champion_metrics, "real": real}
        decision = judge(
            champion_metrics,
            champion_classes,
            challenger_metrics,
            challenger_classes,
            rules,
            against=against or "champion",
        )
        tag = f"{TAG_PREFIX}{champion_n + 1}" if decision.promote else None
        commit = _record(worktree, tag, decision, challenger_metrics, against, overrides)
        create_markdown_artifact(
            key=ARTIFACT_DECISION,
            markdown=decision_markdown(
                decision, against, tag, champion_metrics, challenger_metrics, overrides
            ),
            description="champion/challenger decision of the retrain flow",
        )
        return {
            "promoted": decision.promote,
            "tag": tag,
            "champion": champion_tag,
            "compared_with": against,  # the champion tag, HEAD (no tag yet) or None
            "reasons": decision.reasons,
            "commit": commit,
            "accuracy": challenger_metrics["accuracy"],
            "trained": True,
        }
    finally:
        _remove_worktree(repo_root, worktree)
        shutil.rmtree(tmp, ignore_errors=True)
