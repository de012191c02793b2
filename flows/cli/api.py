"""``digitflow api``: predictions over HTTP and a page to try the model (flows/api.py).

FastAPI and uvicorn are imported inside the command, so the CLI starts fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli.errors import UsageError, expected_errors
from flows.cli.help import Command
from flows.cli.predict import ModelOpt, ParamsOpt, _model_path, _predict_params

PANEL = "Prediction"  # beside predict and batch-predict in `digitflow --help`
app = typer.Typer()


@app.command("api", rich_help_panel=PANEL, cls=Command)
@expected_errors
def api(
    host: Annotated[str, typer.Option("--host", help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="TCP port")] = 8000,
    model: ModelOpt = None,
    params: ParamsOpt = None,
    workers: Annotated[
        int,
        typer.Option(
            "--workers", min=1, help="uvicorn worker processes; they share only the model file"
        ),
    ] = 1,
    accept_labels: Annotated[
        bool,
        typer.Option(
            "--accept-labels", help="the page offers 'wrong? it is a ...': stores the image"
        ),
    ] = False,
    labels_dir: Annotated[
        Path,
        typer.Option("--labels-dir", help="where --accept-labels stores images, by label"),
    ] = Path("data/labeled"),
    max_body_mb: Annotated[
        float, typer.Option("--max-body-mb", min=0.001, help="request body limit, MiB")
    ] = 8.0,
    max_files: Annotated[int, typer.Option("--max-files", min=1, help="images per request")] = 16,
    time_limit: Annotated[
        float, typer.Option("--time-limit", min=0.1, help="seconds per request, all included")
    ] = 10.0,
    slots: Annotated[
        int, typer.Option("--slots", min=1, help="requests computing at once (per worker)")
    ] = 2,
    queue: Annotated[
        int, typer.Option("--queue", min=0, help="requests waiting for a slot; more get 503")
    ] = 64,
    poll: Annotated[
        float, typer.Option("--poll", min=0.05, help="seconds between model file checks")
    ] = 1.0,
) -> None:
    """Serve predictions over HTTP: POST /predict, GET /health, a page at /, docs at /docs.

    The model file is watched: a changed file is loaded, checked and swapped in without a
    restart; one that fails the checks is refused and the old model keeps serving.
    """
    from flows.api import ApiSettings, serve

    p = _predict_params(params)
    path = _model_path(model, p.model)
    if not path.is_file():
        raise UsageError(f"model file not found: {path}")
    settings = ApiSettings(
        model=str(path),
        preprocess=p.preprocess,
        review_below=p.review_below,
        max_body_bytes=int(max_body_mb * 2**20),
        max_files=max_files,
        time_limit_s=time_limit,
        compute_slots=slots,
        queue=queue,
        poll_s=poll,
        accept_labels=accept_labels,
        labels_root=str(labels_dir),
    )
    serve(settings, host, port, workers)
