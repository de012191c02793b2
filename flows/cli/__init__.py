"""The ``digitflow`` command line: one Typer app, in five groups of commands.

- Pipeline stages (flows/cli/stages.py): one command per dvc.yaml stage, which calls them;
- Prediction (flows/cli/predict.py, flows/cli/api.py): ``predict``, ``batch-predict`` and
  ``api`` (predictions over HTTP);
- Your own images (flows/cli/labels.py): ``label``;
- Prefect flows (flows/cli/orchestration.py): ``run``, ``retrain`` and ``serve``;
- Experiments (flows/cli/experiments.py): ``exps``, DVC's experiments as a short table.

Every command follows one error policy (flows/cli/errors.py). Heavy imports (torch,
OpenCV, Prefect, DVC) stay inside the commands, so the CLI starts fast.
"""

from __future__ import annotations

import logging
import os
from typing import Annotated

import typer

from flows.cli import api, experiments, labels, orchestration, predict, stages
from flows.cli.help import Group
from flows.signals import sigterm_unwinds

app = typer.Typer(
    cls=Group,
    help="digitflow: handwritten-digit recognition as a reproducible pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Without a name, add_typer merges each module's commands into this app; each command
# names its --help panel (rich_help_panel) where it is defined.
for _commands in (stages.app, predict.app, api.app, labels.app, orchestration.app, experiments.app):
    app.add_typer(_commands)

# digitflow's own loggers (the packages of this project): INFO by default. Every other
# logger (httpx, DVC, Prefect's client internals, ...) stays at WARNING: a run's output is
# what digitflow did, not each HTTP request behind it. `-v` lowers both levels one step.
OWN_LOGGERS = ("tasks", "flows")
# Prefect's telemetry: its temporary server, which `digitflow run` / `retrain` /
# `batch-predict` start when no PREFECT_API_URL is set, sends a heartbeat at start-up
# (offline: an ERROR, and a "database is locked" traceback when its write races the
# server's own), and the client reports usage events unless DO_NOT_TRACK is set. prefect.toml
# turns the server's off for commands run in the project folder; these cover the others
# (`--root`, another cwd). A user's own setting wins.
TELEMETRY_OFF = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


def quiet_temporary_server() -> None:
    """No telemetry from Prefect's client or a server this process starts (unless the user set it).

    Set in the environment, before Prefect reads its settings: the temporary server runs
    in a child process that inherits it.
    """
    for name, value in TELEMETRY_OFF.items():
        os.environ.setdefault(name, value)


def configure_logging(verbose: bool) -> None:
    """digitflow's loggers at INFO (DEBUG with -v), every library at WARNING (INFO with -v)."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"digitflow {version('digitflow')}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="debug logs, and libraries' INFO logs")
    ] = False,
    _version: Annotated[
        bool,
        typer.Option(
            "--version", help="print the version and exit", callback=_print_version, is_eager=True
        ),
    ] = False,
) -> None:
    configure_logging(verbose)


def main() -> None:
    """Console-script entry point.

    SIGTERM unwinds like Ctrl-C, for every command (flows/signals.py): temp files of
    half-written outputs are removed, and the exit code is 143, as for a killed process.
    """
    quiet_temporary_server()  # before any command imports Prefect
    with sigterm_unwinds():
        app()
