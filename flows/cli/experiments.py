"""``digitflow exps``: DVC's experiments of one pipeline model, as a table that fits 100 columns.

``dvc exp show`` names each column by its full key (``train.robust.batch_size``,
``data/evaluate/robust/metrics.json:accuracy``) and cuts columns off where the terminal
ends; it cannot rename them. The rows come from DVC's public API (``dvc.api.exp_show``),
the columns are named by their last part.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from flows.cli.errors import UsageError, expected_errors
from flows.cli.help import Command
from flows.paths import EVAL_METRICS, PROJECT_MARKER, eval_path

PANEL = "Experiments"  # their group in `digitflow --help`
app = typer.Typer()
PARAMS_SHOWN = ("epochs", "batch_size", "lr")  # the recipe's values most often swept


def experiment_rows(root: Path, model: str, recipe: str) -> list[dict[str, Any]]:
    """One dict per experiment (and the workspace and its commit): name, accuracy, params."""
    import dvc.api

    accuracy_key = f"{eval_path(model, EVAL_METRICS)}:accuracy"
    rows = []
    for exp in dvc.api.exp_show(repo=str(root)):
        row = {"experiment": exp.get("Experiment") or exp["rev"], "accuracy": exp.get(accuracy_key)}
        row |= {name: exp.get(f"train.{recipe}.{name}") for name in PARAMS_SHOWN}
        rows.append(row)
    # best first; an experiment without metrics (failed, or queued) last
    return sorted(rows, key=lambda r: (r["accuracy"] is None, -(r["accuracy"] or 0.0)))


def _cell(value: Any, column: str) -> str:
    if value is None:
        return "–"
    if column == "accuracy":
        return f"{value:.4f}"
    # DVC's API gives every number as a float: 5, not 5.0, as params.yaml has it
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


@app.command("exps", rich_help_panel=PANEL, cls=Command)
@expected_errors
def exps(
    model: Annotated[str, typer.Option(help="pipeline model (params.yaml `models`)")] = "robust",
    root: Annotated[Path, typer.Option(help="root of the git + DVC repository")] = Path("."),
) -> None:
    """The experiments of one model: test accuracy and its recipe's epochs, batch size, lr."""
    from flows.summary import text_table
    from tasks.config import load_params

    if not (root / PROJECT_MARKER).is_file():
        raise UsageError(f"no {PROJECT_MARKER} in {root}: --root must be a git + DVC repository")
    models = load_params(root / "params.yaml").models
    if model not in models:
        raise UsageError(f"unknown model {model!r} (params.yaml models: {', '.join(models)})")
    rows = experiment_rows(root, model, models[model])
    header = ("experiment", "accuracy", *PARAMS_SHOWN)
    cells = [tuple(_cell(row[c], c) for c in header) for row in rows]
    typer.echo("\n".join(text_table(header, cells, right=set(range(1, len(header))))))
