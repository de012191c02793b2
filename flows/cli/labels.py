"""``digitflow label``: your own images into the labelled inbox (data/labeled/<label>/).

Each image is stored under the SHA-256 of its bytes (tasks/labels.py): labelling an
image twice stores it once. The next `dvc repro` splits the inbox into train and test
(the labeled stage) and trains on it.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Annotated

import typer

from flows.cli.errors import UsageError, expected_errors
from flows.cli.help import Command
from flows.paths import LABELED_DIR, default_path
from tasks.digits import CLASSES

PANEL = "Your own images"  # their group in `digitflow --help`
app = typer.Typer()
CSV_FIELD_LIMIT = 1 << 16  # bytes per CSV field: a path, a label; a longer one is not ours


def _from_csv(path: Path) -> list[tuple[Path, str]]:
    """(file, label text) per row of a predictions CSV whose label column a person checked."""
    csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
            reader = csv.DictReader(fh)
            if not {"path", "label"} <= set(reader.fieldnames or ()):
                raise UsageError(f"{path}: needs the columns path and label (a predictions CSV)")
            return [(Path(row["path"]), (row["label"] or "").strip()) for row in reader]
    except (OSError, csv.Error) as exc:
        raise UsageError(f"{path}: cannot read it as CSV ({exc})") from exc


@app.command("label", rich_help_panel=PANEL, cls=Command)
@expected_errors
def label(
    files: Annotated[
        list[Path] | None, typer.Argument(metavar="FILES...", hidden=True)  # see predict's PathsArg
    ] = None,
    as_label: Annotated[
        int | None, typer.Option("--as", metavar="DIGIT", min=0, max=9, help="their label, 0-9")
    ] = None,
    from_csv: Annotated[
        Path | None,
        typer.Option(metavar="CSV", help="a predictions CSV whose label column you corrected"),
    ] = None,
    to: Annotated[
        Path | None, typer.Option(metavar="DIR", help="the inbox (default: the project's)")
    ] = None,
) -> None:
    """Copy images into data/labeled/<label>/ under a content-hash name (deduplicated).

    FILES: the images to label, all with the one label --as gives.
    """
    from tasks.labels import NotAnImage, label_file

    if bool(files) == (from_csv is not None) or bool(files) != (as_label is not None):
        raise UsageError("give FILES with --as DIGIT, or --from-csv CSV")
    items = [(f, str(as_label)) for f in files or []] if files else _from_csv(from_csv)
    inbox = to or default_path(Path(LABELED_DIR))[0]
    stored = known = 0
    problems = []
    for path, text in items:
        if text not in CLASSES:
            problems.append(f"{path}: label {text!r} is not a digit 0-9, skipped")
            continue
        try:
            _, new = label_file(path, int(text), inbox)
        except NotAnImage as exc:
            problems.append(f"{exc}, skipped")
            continue
        stored, known = stored + new, known + (not new)
    for problem in problems:
        typer.echo(f"  {problem}", err=True)
    typer.echo(f"{stored} stored in {inbox}, {known} already there, {len(problems)} skipped")
    if problems:
        raise typer.Exit(1)
