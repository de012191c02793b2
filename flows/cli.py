"""The ``digitflow`` command line: one command per pipeline stage, plus the flows.

Each command reads params.yaml once (``--params``) and passes the typed values
to the step function; dvc.yaml calls these commands.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.signals import sigterm_unwinds

app = typer.Typer(
    help="digitflow: handwritten-digit recognition as a reproducible pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOpt = Annotated[Path, typer.Option("--params", help="params.yaml to read")]
RecipeOpt = Annotated[
    str, typer.Option("--recipe", help="training recipe: a section of params.yaml `train`")
]
DEFAULT_PARAMS = Path("params.yaml")
DEFAULT_RECIPE = "seed"
# JSON {file name: sha256} replacing MNIST's checksums, for MNIST-format data of your own
CHECKSUMS_ENV = "DIGITFLOW_MNIST_CHECKSUMS"


# digitflow's own loggers (the packages of this project): INFO by default. Every other
# logger (httpx, DVC, Prefect's client internals, ...) stays at WARNING: a run's output is
# what digitflow did, not each HTTP request behind it. `-v` lowers both levels one step.
OWN_LOGGERS = ("tasks", "flows")
# Prefect's temporary server, which `digitflow run` / `retrain` / `batch-predict` start when
# no PREFECT_API_URL is set, sends a telemetry heartbeat at start-up: offline it logs an
# ERROR, and its write to the fresh SQLite database races the server's own ("database is
# locked", a 60-line traceback) though the run succeeds. A user's own setting wins.
ANALYTICS_ENV = "PREFECT_SERVER_ANALYTICS_ENABLED"


def quiet_temporary_server() -> None:
    """No telemetry from the Prefect server this process may start (unless the user set it).

    Set in the environment, before Prefect reads its settings: the temporary server runs
    in a child process that inherits it. Only a server reads this setting, so it changes
    nothing when PREFECT_API_URL points at a real server.
    """
    os.environ.setdefault(ANALYTICS_ENV, "false")


def configure_logging(verbose: bool) -> None:
    """digitflow's loggers at INFO (DEBUG with -v), every library at WARNING (INFO with -v)."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


@app.callback()
def _main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="debug logs, and libraries' INFO logs")
    ] = False,
) -> None:
    configure_logging(verbose)


def _fail_cleanly(func: Callable[..., Any]) -> Callable[..., Any]:
    """The CLI's error policy. Expected errors (bad params, a path that is not there, a
    model file that is not ours, no data source reachable) are one line on stderr and
    exit 2; a failure of the work on its data (a malformed IDX or dataset file) is one
    line and exit 1; anything else is a bug and keeps its traceback."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from tasks.config import ParamsError
        from tasks.data import DatasetError
        from tasks.download import DownloadError
        from tasks.idx import IdxError

        try:
            return func(*args, **kwargs)
        # DownloadError: no source configured, none reachable or none with the right files
        # (the message names each one and why), or a bad checksum file: what the command
        # was pointed at is wrong, not the work.
        except (ParamsError, DownloadError, FileNotFoundError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
        except (IdxError, DatasetError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from exc
        except ValueError as exc:
            # ModelFileError, without importing torch (tasks.model) for the light commands:
            # a command that raised it has loaded tasks.model already
            model = sys.modules.get("tasks.model")
            if model is None or not isinstance(exc, model.ModelFileError):
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc

    return wrapper


@app.command()
@_fail_cleanly
def download(
    out: Annotated[Path, typer.Option(help="folder for the raw IDX files")] = Path("data/raw"),
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


@app.command()
@_fail_cleanly
def split(
    raw: Annotated[Path, typer.Option(help="folder of raw IDX files")] = Path("data/raw"),
    out: Annotated[Path, typer.Option(help="folder for train/val/test .npz")] = Path(
        "data/prepared"
    ),
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Parse IDX and write the seeded train/validation split and the test set."""
    from tasks.config import load_params
    from tasks.split import split_dataset

    p = load_params(params).split
    paths = split_dataset(raw, out, p.val_fraction, p.seed)
    typer.echo("wrote " + ", ".join(str(v) for v in paths.values()))


@app.command()
@_fail_cleanly
def train(
    data: Annotated[Path, typer.Option(help="folder with train.npz and val.npz")] = Path(
        "data/prepared"
    ),
    model: Annotated[Path, typer.Option(help="model file to write")] = Path(
        "data/models/seed/model.pt"
    ),
    live_dir: Annotated[Path, typer.Option(help="dvclive metrics/plots folder")] = Path(
        "data/train/seed"
    ),
    checkpoint: Annotated[Path, typer.Option(help="resume checkpoint (removed when done)")] = Path(
        "data/checkpoints/seed.pt"
    ),
    recipe: RecipeOpt = DEFAULT_RECIPE,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Train the CNN with a recipe; resumes from the checkpoint of an interrupted identical run."""
    from tasks.config import load_params
    from tasks.malloc import keep_freed_memory
    from tasks.train import train as train_step

    keep_freed_memory()  # before any tensor: each step reuses its memory (tasks/malloc.py)

    p = load_params(params).recipe(recipe)
    result = train_step(data / "train.npz", data / "val.npz", model, live_dir, checkpoint, p)
    kept = result.kept  # the epoch whose weights the model file holds (train.keep)
    typer.echo(
        f"wrote {model}: epoch {int(kept['epoch'])} of {len(result.history)}, "
        f"val_accuracy {kept['val_accuracy']:.4f}"
    )


@app.command()
@_fail_cleanly
def evaluate(
    model: Annotated[Path, typer.Option(help="model file")] = Path("data/models/seed/model.pt"),
    test: Annotated[Path, typer.Option(help="test set .npz")] = Path("data/prepared/test.npz"),
    out: Annotated[Path, typer.Option(help="folder for metrics and plots")] = Path(
        "data/evaluate/seed"
    ),
    recipe: RecipeOpt = DEFAULT_RECIPE,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Test accuracy, per-class metrics, confusion matrix, most-confused pairs."""
    from tasks.config import load_params
    from tasks.evaluate import evaluate as evaluate_step
    from tasks.malloc import keep_freed_memory

    keep_freed_memory()  # 1000-image batches reuse their memory (tasks/malloc.py)

    all_params = load_params(params)
    p = all_params.evaluate
    device = all_params.recipe(recipe).device  # where the recipe trains, the model is scored
    result = evaluate_step(model, test, out, p.batch_size, p.top_confused, device)
    typer.echo(f"test accuracy {result.metrics['accuracy']:.4f} -> {result.metrics_path}")


@app.command()
@_fail_cleanly
def report(
    model: Annotated[Path, typer.Option(help="model file")] = Path("data/models/seed/model.pt"),
    eval_dir: Annotated[Path, typer.Option(help="evaluate stage output")] = Path(
        "data/evaluate/seed"
    ),
    test: Annotated[Path, typer.Option(help="test set .npz")] = Path("data/prepared/test.npz"),
    out: Annotated[Path, typer.Option(help="report folder")] = Path("data/report/seed"),
    recipe: RecipeOpt = DEFAULT_RECIPE,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Markdown report with figures, filled from this run."""
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


# --- commands defined in their own modules (their heavy imports stay inside the functions) ---
# (registered below this line)
from flows import flow_cmds, predict_cmd  # noqa: E402

app.command("predict")(predict_cmd.predict)
app.command("batch-predict")(predict_cmd.batch_predict)

app.command("run")(flow_cmds.run)
app.command("retrain")(flow_cmds.retrain)
app.command("serve")(flow_cmds.serve)


def main() -> None:
    """Console-script entry point.

    SIGTERM unwinds like Ctrl-C, for every command (flows/signals.py): temp files of
    half-written outputs are removed, and the exit code is 143, as for a killed process.
    """
    quiet_temporary_server()  # before any command imports Prefect
    with sigterm_unwinds():
        app()


if __name__ == "__main__":
    sys.exit(main())
