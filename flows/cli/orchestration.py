"""Prefect flows: ``digitflow run``, ``retrain`` and ``serve``.

Prefect and DVC are imported inside the commands so that the stage commands (which
dvc.yaml calls) start without them. A flow run that fails is this command's result
(exit 1, the flow's message); what the command was pointed at being wrong is the error
policy's (flows/cli/errors.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli.errors import UsageError, expected_errors
from flows.cli.help import Command
from flows.paths import PROJECT_MARKER

PANEL = "Prefect flows"  # their group in `digitflow --help`
app = typer.Typer()

RootOpt = Annotated[Path, typer.Option("--root", help="root of the git + DVC repository")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set-param",
        "-S",
        metavar="KEY=VALUE",
        help="param override for the challenger, Hydra syntax as in `dvc exp run -S` "
        "(e.g. -S train.robust.epochs=10, -S models.robust=improved); repeatable. "
        "The retrain.* promotion rules cannot be overridden: they are read from "
        "params.yaml as committed at HEAD",
    ),
]
# The URL `prefect server start` serves its API on by default.
DEFAULT_SERVER_API = "http://127.0.0.1:4200/api"
DEPLOYMENT_NAME = "digitflow-retrain"


@app.command("run", rich_help_panel=PANEL, cls=Command)
@expected_errors
def run(
    root: RootOpt = Path("."),
    baseline: Annotated[
        str | None,
        typer.Option(help="revision to diff metrics against (default: champion tag, else HEAD)"),
    ] = None,
) -> None:
    """Run the training pipeline (the dvc.yaml stages) as a Prefect flow."""
    if not (root / PROJECT_MARKER).is_file():  # refused before Prefect starts a server
        raise UsageError(f"no {PROJECT_MARKER} in {root}: --root must be a git + DVC repository")
    from flows.summary import UP_TO_DATE, model_accuracies, pipeline_up_to_date, run_summary
    from tasks.config import load_params

    models = load_params(root / "params.yaml").models  # a bad params.yaml: exit 2 here
    if pipeline_up_to_date(root):  # nothing to run: answered by DVC, no Prefect server started
        typer.echo(f"{UP_TO_DATE} No flow run started.")
        typer.echo(run_summary([], model_accuracies(root, models)))
        return
    refuse_unreachable_api()
    from flows.pipeline import training_pipeline

    state = training_pipeline(root=str(root), baseline=baseline, return_state=True)
    if not state.is_completed():
        typer.echo(f"error: pipeline {state.name}: {state.message}", err=True)
        raise typer.Exit(1)
    typer.echo(run_summary(state.result(), model_accuracies(root, models)))


def _refuse_bad_overrides(root: Path, overrides: list[str]) -> None:
    """Bad overrides (syntax, unknown key, a promotion rule, a bad value): RetrainError or
    ParamsError, one line and exit 2 by the error policy.

    Checked here, before Prefect starts, so the message is printed once, not again by the
    failed flow run's logs and state.
    """
    from flows.retrain import validate_overrides

    validate_overrides(root, overrides)


@app.command("retrain", rich_help_panel=PANEL, cls=Command)
@expected_errors
def retrain(
    root: RootOpt = Path("."),
    set_param: SetOpt = None,
    only_if_new_labels: Annotated[
        bool,
        typer.Option(help="train only if HEAD has labelled images the champion has not seen"),
    ] = False,
) -> None:
    """Train a challenger and promote it (tag model@vN) only if it beats the champion."""
    _refuse_bad_overrides(root, set_param or [])
    refuse_unreachable_api()
    from flows.retrain import retrain as retrain_flow

    state = retrain_flow(
        root=str(root),
        overrides=set_param or [],
        only_if_new_labels=only_if_new_labels,
        return_state=True,
    )
    if not state.is_completed():
        typer.echo(f"error: retrain {state.name}: {state.message}", err=True)
        raise typer.Exit(1)
    result = state.result()
    if not result["trained"]:
        typer.echo(result["reasons"][0])
        return
    verdict = f"promoted {result['tag']}" if result["promoted"] else "rejected"
    typer.echo(f"challenger {verdict} (compared with {result['compared_with'] or 'nothing yet'})")
    for reason in result["reasons"]:
        typer.echo(f"  - {reason}")


def schedule_problem() -> str | None:
    """Why Prefect cannot schedule here (None when a reachable server is configured)."""
    from flows.prefect_api import api_problem, configured_api_url

    url = configured_api_url()
    if url is None:
        return (  # one line, as every expected error
            "no Prefect server configured: Prefect would use a temporary (ephemeral) server "
            "that lives only as long as this process, so nothing could schedule runs; start "
            "one with `prefect server start` (in another terminal, or as a service) and "
            f"`export PREFECT_API_URL={DEFAULT_SERVER_API}`"
        )
    if problem := api_problem(url):
        return f"{problem}; start it with `prefect server start`, or fix PREFECT_API_URL"
    return None


def refuse_unreachable_api() -> None:
    """A set PREFECT_API_URL that does not answer: UsageError now, not minutes into a flow."""
    from flows.prefect_api import unreachable_configured_api

    if problem := unreachable_configured_api():
        raise UsageError(problem)


@app.command("serve", rich_help_panel=PANEL, cls=Command)
@expected_errors
def serve(
    cron: Annotated[str, typer.Option(help="cron schedule of the retrain runs")] = "0 3 * * 1",
    root: RootOpt = Path("."),
    name: Annotated[str, typer.Option(help="deployment name")] = DEPLOYMENT_NAME,
    set_param: SetOpt = None,
    every_run: Annotated[
        bool,
        typer.Option(
            help="train at every scheduled run, not only when HEAD has new labelled images"
        ),
    ] = False,
) -> None:
    """Serve the retrain flow on a cron schedule (needs a running Prefect server).

    A scheduled run trains only when HEAD's labelled images (data/labeled, as dvc.lock
    records them) differ from the champion's; otherwise it ends at once, untrained.
    """
    _refuse_bad_overrides(root, set_param or [])  # refused now, not at every scheduled run
    if problem := schedule_problem():
        raise UsageError(problem)
    from prefect.types.entrypoint import EntrypointType

    from flows.retrain import retrain as retrain_flow

    retrain_flow.serve(
        name=name,
        cron=cron,
        # a scheduled run trains only when HEAD has labelled images the champion has not seen
        parameters={
            "root": str(root.resolve()),
            "overrides": set_param or [],
            "only_if_new_labels": not every_run,
        },
        # the package is installed, so the runner imports the flow by module, from any cwd
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
