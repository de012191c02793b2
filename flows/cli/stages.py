"""Pipeline stages: one ``digitflow`` command per dvc.yaml stage, which calls them.

Each command reads params.yaml once (``--params``) and passes the typed values to the
step function in tasks/.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from flows.cli.errors import expected_errors
from flows.cli.help import Command
from flows.paths import (
    CHECKPOINT_FILE,
    DEFAULT_PARAMS,
    EVAL_DIR,
    LABELED_DIR,
    LABELED_SPLIT_DIR,
    MODEL_FILE,
    PARAMS_STAMP,
    PREPARED_DIR,
    RAW_DIR,
    RENDERS,
    REPORT_DIR,
    TEST_SET,
    TRAIN_DIR,
    stage_path,
)
from tasks.digits import CLASSES

PANEL = "Pipeline stages"  # their group in `digitflow --help`
app = typer.Typer()

ParamsOpt = Annotated[Path, typer.Option("--params", help="params.yaml to read")]
RecipeOpt = Annotated[
    str, typer.Option("--recipe", help="training recipe: a section of params.yaml `train`")
]
DEFAULT_RECIPE = "seed"
# The stage commands' defaults: the default model's outputs, where dvc.yaml puts them
DEFAULT_MODEL_FILE = stage_path(MODEL_FILE)
DEFAULT_TRAIN_DIR = stage_path(TRAIN_DIR)
DEFAULT_CHECKPOINT = stage_path(CHECKPOINT_FILE)
DEFAULT_EVAL_DIR = stage_path(EVAL_DIR)
DEFAULT_REPORT_DIR = stage_path(REPORT_DIR)
# JSON {file name: sha256} replacing MNIST's checksums, for MNIST-format data of your own
CHECKSUMS_ENV = "DIGITFLOW_MNIST_CHECKSUMS"


@app.command("check-params", rich_help_panel=PANEL, cls=Command)
@expected_errors
def check_params(
    out: Annotated[Path, typer.Option(help="stamp written when the params are valid")] = Path(
        PARAMS_STAMP
    ),
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Validate params.yaml; the first stage, so a bad value fails before DVC removes outputs."""
    from tasks.config import load_params
    from tasks.io import atomic_write_text

    load_params(params)
    # the same bytes every time: a valid edit of params.yaml re-runs only the stages whose
    # own params changed, not every stage that depends on this stamp
    atomic_write_text(out, f"{params.name}: valid\n")
    typer.echo(f"{params}: valid")


@app.command(rich_help_panel=PANEL, cls=Command)
@expected_errors
def download(
    out: Annotated[Path, typer.Option(help="folder for the raw IDX files")] = Path(RAW_DIR),
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Fetch the four MNIST files ($MNIST_MIRROR first, then the configured mirrors)."""
    from tasks.config import load_params
    from tasks.download import download_mnist, load_checksums, sources_in_order

    p = load_params(params).download
    checksums = None
    if custom := os.environ.get(CHECKSUMS_ENV):
        # a private MNIST-format dataset (or the tests' synthetic one): its own checksums
        logging.getLogger(__name__).warning("checking files against %s, not MNIST's", custom)
        checksums = load_checksums(Path(custom))
    files = download_mnist(
        out,
        sources_in_order(os.environ.get("MNIST_MIRROR"), p.mirrors),
        retries=p.retries,
        backoff_s=p.backoff_s,
        timeout_s=p.timeout_s,
        checksums=checksums,
    )
    typer.echo(f"downloaded {len(files)} files to {out}")


@app.command(rich_help_panel=PANEL, cls=Command)
@expected_errors
def split(
    raw: Annotated[Path, typer.Option(help="folder of raw IDX files")] = Path(RAW_DIR),
    out: Annotated[Path, typer.Option(help="folder for train/val/test .npz")] = Path(PREPARED_DIR),
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Parse IDX and write the seeded train/validation split and the test set."""
    from tasks.config import load_params
    from tasks.split import split_dataset

    p = load_params(params).split
    paths = split_dataset(raw, out, p.val_fraction, p.seed)
    typer.echo("wrote " + ", ".join(str(v) for v in paths.values()))


@app.command("labeled-inbox", rich_help_panel=PANEL, cls=Command)
@expected_errors
def labeled_inbox(
    out: Annotated[Path, typer.Option(help="the inbox: one folder per class")] = Path(LABELED_DIR),
) -> None:
    """Create the labelled-images inbox (data/labeled/0 … 9); what is in it stays."""
    for label in CLASSES:
        (out / label).mkdir(parents=True, exist_ok=True)
    typer.echo(f"{out}: {sum(1 for f in out.rglob('*') if f.is_file())} files")


@app.command(rich_help_panel=PANEL, cls=Command)
@expected_errors
def labeled(
    inbox: Annotated[Path, typer.Option(help="labelled images: <label>/<file>")] = Path(
        LABELED_DIR
    ),
    out: Annotated[Path, typer.Option(help="folder for train.npz and test.npz")] = Path(
        LABELED_SPLIT_DIR
    ),
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Your labelled images, preprocessed as predict does, split by content hash."""
    from tasks.config import load_params
    from tasks.label_split import split_labelled

    p = load_params(params).labeled
    result = split_labelled(inbox, out, p.test_fraction)
    left_out = f", {len(result.problems)} left out" if result.problems else ""
    typer.echo(f"labelled images: {result.train} train, {result.test} test{left_out} -> {out}")


@app.command(rich_help_panel=PANEL, cls=Command)
@expected_errors
def render(
    data: Annotated[Path, typer.Option(help="folder with train.npz")] = Path(PREPARED_DIR),
    out: Annotated[Path, typer.Option(help=".npz of the rendered 28x28 inputs")] = Path(RENDERS),
    params: ParamsOpt = DEFAULT_PARAMS,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="processes reading renders back (default: predict.workers)"),
    ] = None,
) -> None:
    """Render synthetic photos of training digits, read back as `predict` reads photos."""
    from tasks.config import load_params
    from tasks.render import render_dataset

    all_params = load_params(params)
    p = all_params.render
    # the worker count changes no render: the stage's params leave it out
    result = render_dataset(data / "train.npz", out, p, workers or all_params.predict.workers)
    typer.echo(
        f"wrote {result.path}: {result.n} of {p.count} renders "
        f"(left out: {result.empty} found empty, {result.lost} with the digit lost)"
    )


@app.command(rich_help_panel=PANEL, cls=Command)
@expected_errors
def train(
    data: Annotated[Path, typer.Option(help="folder with train.npz and val.npz")] = Path(
        PREPARED_DIR
    ),
    model: Annotated[Path, typer.Option(help="model file to write")] = DEFAULT_MODEL_FILE,
    live_dir: Annotated[
        Path, typer.Option(help="dvclive metrics/plots folder")
    ] = DEFAULT_TRAIN_DIR,
    checkpoint: Annotated[
        Path, typer.Option(help="resume checkpoint (removed when done)")
    ] = DEFAULT_CHECKPOINT,
    renders: Annotated[
        Path,
        typer.Option(help="the render stage's .npz (read when train.<recipe>.renders_share > 0)"),
    ] = Path(RENDERS),
    labeled: Annotated[
        Path | None,
        typer.Option(help="your labelled training images (the labeled stage's train.npz)"),
    ] = None,
    recipe: RecipeOpt = DEFAULT_RECIPE,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Train the CNN with a recipe; resumes from the checkpoint of an interrupted identical run."""
    from tasks.kernels import same_kernels_on_every_cpu

    same_kernels_on_every_cpu()  # before torch loads: the committed numbers on any x86 CPU
    from tasks.config import load_params
    from tasks.malloc import keep_freed_memory
    from tasks.train import train as train_step

    keep_freed_memory()  # before any tensor: each step reuses its memory (tasks/malloc.py)

    p = load_params(params).recipe(recipe)
    result = train_step(
        data / "train.npz", data / "val.npz", model, live_dir, checkpoint, p,
        renders_path=renders, labeled_path=labeled,
    )  # fmt: skip
    kept = result.kept  # the epoch whose weights the model file holds (train.keep)
    typer.echo(
        f"wrote {model}: epoch {int(kept['epoch'])} of {len(result.history)}, "
        f"val_accuracy {kept['val_accuracy']:.4f}"
    )


@app.command(rich_help_panel=PANEL, cls=Command)
@expected_errors
def evaluate(
    model: Annotated[Path, typer.Option(help="model file")] = DEFAULT_MODEL_FILE,
    test: Annotated[Path, typer.Option(help="test set .npz")] = Path(TEST_SET),
    out: Annotated[Path, typer.Option(help="folder for metrics and plots")] = DEFAULT_EVAL_DIR,
    real_test: Annotated[
        Path | None, typer.Option(help="your labelled test images (the labeled stage's test.npz)")
    ] = None,
    recipe: RecipeOpt = DEFAULT_RECIPE,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Test accuracy, per-class metrics, confusion matrix, most-confused pairs."""
    from tasks.kernels import same_kernels_on_every_cpu

    same_kernels_on_every_cpu()  # scored as trained: the committed metrics on any x86 CPU
    from tasks.config import load_params
    from tasks.evaluate import evaluate as evaluate_step
    from tasks.malloc import keep_freed_memory

    keep_freed_memory()  # 1000-image batches reuse their memory (tasks/malloc.py)

    all_params = load_params(params)
    p = all_params.evaluate
    device = all_params.recipe(recipe).device  # where the recipe trains, the model is scored
    result = evaluate_step(model, test, out, p.batch_size, p.top_confused, device, real_test)
    real = result.metrics.get("real")
    on_real = f", labelled images {real['accuracy']:.4f} ({real['count']})" if real else ""
    typer.echo(f"test accuracy {result.metrics['accuracy']:.4f}{on_real} -> {result.metrics_path}")


@app.command(rich_help_panel=PANEL, cls=Command)
@expected_errors
def report(
    model: Annotated[Path, typer.Option(help="model file")] = DEFAULT_MODEL_FILE,
    eval_dir: Annotated[Path, typer.Option(help="evaluate stage output")] = DEFAULT_EVAL_DIR,
    test: Annotated[Path, typer.Option(help="test set .npz")] = Path(TEST_SET),
    out: Annotated[Path, typer.Option(help="report folder")] = DEFAULT_REPORT_DIR,
    recipe: RecipeOpt = DEFAULT_RECIPE,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Markdown report with figures, filled from this run."""
    from tasks.kernels import same_kernels_on_every_cpu

    same_kernels_on_every_cpu()  # the report's figures from the same scores as evaluate's
    from tasks.config import load_params, to_dict
    from tasks.report import write_report

    p = load_params(params)
    # the sections that shaped this run's numbers (the report stage's params in dvc.yaml)
    shown = {
        "split": to_dict(p.split),
        f"train.{recipe}": to_dict(p.recipe(recipe)),
        "evaluate": to_dict(p.evaluate),
        "report": to_dict(p.report),
    }
    path = write_report(model, eval_dir, test, out, shown, p.report.n_misclassified)
    typer.echo(f"wrote {path}")
