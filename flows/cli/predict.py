"""Prediction: ``digitflow predict`` and ``digitflow batch-predict``.

torch, OpenCV and Prefect are imported inside the commands so the CLI starts fast. Exit
codes: 0 every row ok, 1 some rows empty or error (summary on stderr; ``--allow-failures``
makes it 0: a result of the command), 2 expected errors (no inputs, model file missing or
not ours, bad options or params, an unreachable Dask scheduler: flows/cli/errors.py).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flows.cli.errors import UsageError, expected_errors
from flows.cli.help import Command
from flows.paths import DEFAULT_PARAMS, default_path, model_file
from flows.signals import sigterm_unwinds

if TYPE_CHECKING:
    from tasks.config import PredictParams
    from tasks.predict import PredictSummary

PANEL = "Prediction"  # their group in `digitflow --help`
app = typer.Typer()

DEFAULT_OUT = Path("predictions.csv")  # --out of both commands, in the current folder
MAX_PROBLEMS_SHOWN = 10  # non-ok rows listed on stderr; the output file has them all


class OutputFormat(StrEnum):
    csv = "csv"
    jsonl = "jsonl"


# Hidden from the Arguments panel, where Typer would name it by its Python type
# (<list[str]>): each command's help says what PATHS are, the usage line names it.
PathsArg = Annotated[
    list[str],
    typer.Argument(metavar="PATHS...", hidden=True),
]
ModelOpt = Annotated[
    Path | None,
    typer.Option(
        "--model",
        "-m",
        help="model file (default: the pipeline's model that params.yaml predict.model "
        "names, in the nearest folder holding dvc.yaml from the current one up)",
        show_default=False,
    ),
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="output file, written atomically")]
FormatOpt = Annotated[
    OutputFormat | None,
    typer.Option("--format", "-f", help="output format (default: from --out's suffix, else csv)"),
]
PreprocessOpt = Annotated[
    bool | None,
    typer.Option(
        "--preprocess/--no-preprocess",
        help="MNIST-style preprocessing of photos; --no-preprocess only resizes to 28x28, "
        "for images that are already MNIST-like (default: params, else on)",
        show_default=False,
    ),
]
DebugOpt = Annotated[
    Path | None, typer.Option("--debug-dir", help="save every 28x28 network input here as PNG")
]
BatchOpt = Annotated[
    int | None,
    typer.Option("--batch-size", min=1, help="images per forward pass (default: params)"),
]
WorkersOpt = Annotated[
    int | None, typer.Option("--workers", min=1, help="decoding processes (default: params)")
]
ParamsOpt = Annotated[
    Path | None,
    typer.Option(
        "--params",
        help="params.yaml whose `predict` section gives the options not set here "
        "(default: the project's params.yaml, beside the nearest dvc.yaml from the current "
        "folder up, if present; else built-in defaults)",
        show_default=False,
    ),
]
ReviewOpt = Annotated[
    float | None,
    typer.Option(
        "--review-below",
        min=0.0,
        max=1.0,
        help="flag rows whose confidence is below this for review (default: params)",
        show_default=False,
    ),
]
AllowOpt = Annotated[
    bool,
    typer.Option("--allow-failures", help="exit 0 even if some files are empty or unreadable"),
]
ProgressOpt = Annotated[
    bool | None,
    typer.Option("--progress/--no-progress", help="progress bar (default: on a terminal)"),
]


def _model_path(model: Path | None, name: str) -> Path:
    """--model, or the project's model ``name``; a missing default is a usage error saying where."""
    if model is not None:
        return model
    path, where = default_path(model_file(name))
    if not path.is_file():
        raise UsageError(
            f"model file not found: {path} (the default model, {where}); "
            f"train it with `dvc repro train@{name}` or pass --model"
        )
    return path


def _predict_params(path: Path | None) -> PredictParams:
    """The `predict` section of params.yaml (read only here, at the entry point)."""
    from tasks.config import PredictParams, load_params

    if path is None:
        path, _ = default_path(DEFAULT_PARAMS)
        if not path.is_file():
            return PredictParams()
    return load_params(path).predict


def _format_for(out: Path, fmt: OutputFormat | None) -> str:
    if fmt is not None:
        return fmt.value
    return "jsonl" if out.suffix.lower() in (".jsonl", ".ndjson") else "csv"


def _report(summary: PredictSummary, allow_failures: bool) -> None:
    """Summary line (and the first problems) on stderr; exit 1 if any row is not ok."""
    rate = summary.total / summary.seconds if summary.seconds > 0 else 0.0
    counts = f"{summary.ok} ok, {summary.empty} empty, {summary.error} error"
    skipped = f"; {summary.skipped} non-image files skipped" if summary.skipped else ""
    typer.echo(
        f"{summary.total} files: {counts}, {summary.review} to review{skipped} -> "
        f"{summary.out_path} ({summary.seconds:.1f} s, {rate:.0f} files/s)",
        err=True,
    )
    for row in summary.first_problems[:MAX_PROBLEMS_SHOWN]:
        typer.echo(f"  {row.status}: {row.path}: {row.message}", err=True)
    if summary.failed > len(summary.first_problems[:MAX_PROBLEMS_SHOWN]):
        typer.echo(f"  ... see {summary.out_path} for all {summary.failed}", err=True)
    if summary.failed and not allow_failures:
        raise typer.Exit(1)


@app.command("predict", rich_help_panel=PANEL, cls=Command)
@expected_errors
def predict(
    paths: PathsArg,
    model: ModelOpt = None,
    out: OutOpt = DEFAULT_OUT,
    fmt: FormatOpt = None,
    preprocess: PreprocessOpt = None,
    debug_dir: DebugOpt = None,
    batch_size: BatchOpt = None,
    workers: WorkersOpt = None,
    review_below: ReviewOpt = None,
    review_dir: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="copy the rows flagged for review to DIR/<predicted label>/, with review.csv",
        ),
    ] = None,
    params: ParamsOpt = None,
    allow_failures: AllowOpt = False,
    progress: ProgressOpt = None,
) -> None:
    """Classify images (files, folders, globs): one row per file, sorted by path.

    PATHS: image files, folders (searched recursively) or glob patterns.

    Columns: path, label, confidence, p0..p9, status (ok/empty/error), message, review
    (true where a person should check the row: low confidence, empty or unreadable).
    """
    from tasks.predict import predict_paths

    p = _predict_params(params)
    with sigterm_unwinds():  # also when called without main(): typer.run, tests
        summary = predict_paths(
            paths,
            model_path=_model_path(model, p.model),
            out_path=out,
            fmt=_format_for(out, fmt),
            batch_size=batch_size or p.batch_size,
            workers=workers or p.workers,
            preprocess=p.preprocess if preprocess is None else preprocess,
            debug_dir=debug_dir,
            progress=progress,
            review_below=p.review_below if review_below is None else review_below,
        )
        if review_dir is not None and summary.review:
            from tasks.labels import copy_for_review

            copied = copy_for_review(out, _format_for(out, fmt), review_dir)
            typer.echo(f"{copied} files to review copied to {review_dir}", err=True)
    _report(summary, allow_failures)


@app.command("batch-predict", rich_help_panel=PANEL, cls=Command)
@expected_errors
def batch_predict(
    paths: PathsArg,
    model: ModelOpt = None,
    out: OutOpt = DEFAULT_OUT,
    fmt: FormatOpt = None,
    preprocess: PreprocessOpt = None,
    debug_dir: DebugOpt = None,
    batch_size: BatchOpt = None,
    workers: WorkersOpt = None,
    chunk_size: Annotated[
        int | None,
        typer.Option("--chunk-size", min=1, help="files per Prefect task (default: params)"),
    ] = None,
    dask_address: Annotated[
        str | None,
        typer.Option(
            "--dask-address",
            help="run the chunks on this Dask scheduler, e.g. tcp://host:8786, whose "
            "workers see the same paths (default: local threads)",
        ),
    ] = None,
    review_below: ReviewOpt = None,
    params: ParamsOpt = None,
    allow_failures: AllowOpt = False,
    progress: ProgressOpt = None,
) -> None:
    """Classify images as a Prefect flow: chunks of files mapped over a task runner.

    PATHS: image files, folders (searched recursively) or glob patterns.

    Same output as `predict`, whether the chunks run locally or on a Dask cluster.
    """
    p = _predict_params(params)  # bad params are refused before Prefect is imported
    from flows.cli.orchestration import refuse_unreachable_api

    refuse_unreachable_api()
    from flows.batch_predict import run_batch_predict

    with sigterm_unwinds():  # also when called without main(): typer.run, tests
        summary = run_batch_predict(
            paths,
            model_path=_model_path(model, p.model),
            out_path=out,
            fmt=_format_for(out, fmt),
            chunk_size=chunk_size or p.chunk_size,
            batch_size=batch_size or p.batch_size,
            workers=workers or p.workers,
            preprocess=p.preprocess if preprocess is None else preprocess,
            debug_dir=debug_dir,
            dask_address=dask_address,
            progress=progress,
            review_below=p.review_below if review_below is None else review_below,
        )
    _report(summary, allow_failures)
