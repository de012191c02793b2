"""Tables in the terminal: what ``digitflow run`` did (or that it had nothing to do), experiments.

Kept apart from flows/pipeline.py, which imports Prefect: a run with nothing to do is
answered from DVC alone, without starting a Prefect server.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flows.paths import EVAL_METRICS, eval_path

UP_TO_DATE = "Data and pipelines are up to date."


def pipeline_up_to_date(root: Path) -> bool:
    """True when ``dvc status`` finds no stage of ``root``'s pipeline to run."""
    import contextlib

    from dvc.repo import Repo

    # from the repo's root, as the `dvc` command runs (relative paths in dvc.yaml)
    with contextlib.chdir(root), Repo(str(root)) as repo:
        return not repo.status()


def model_accuracies(root: Path, models: Iterable[str]) -> dict[str, float | None]:
    """Each pipeline model's test accuracy from its evaluate stage (None before the first run)."""
    accuracies: dict[str, float | None] = {}
    for model in models:
        path = root / eval_path(model, EVAL_METRICS)
        accuracies[model] = json.loads(path.read_text())["accuracy"] if path.is_file() else None
    return accuracies


def text_table(header: tuple[str, ...], rows: list[tuple[str, ...]], right: set[int]) -> list[str]:
    """Columns as wide as their widest cell; the columns in ``right`` aligned right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return [line(header), *(line(row) for row in rows)]


def run_summary(stages: Iterable[Mapping[str, Any]], accuracies: Mapping[str, float | None]) -> str:
    """The stages' status and time, then each model's test accuracy, as aligned tables."""
    stage_rows = [(s["stage"], s["status"], f"{s['seconds']:.1f} s") for s in stages]
    lines = text_table(("stage", "status", "time"), stage_rows, right={2}) if stage_rows else []
    model_rows = [(name, "–" if acc is None else f"{acc:.4f}") for name, acc in accuracies.items()]
    if lines:
        lines.append("")
    lines += text_table(("model", "test accuracy"), model_rows, right={1})
    return "\n".join(lines)
