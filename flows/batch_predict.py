"""The ``batch_predict`` flow: a folder too big for one process, in chunks over a task runner.

The inputs are expanded and sorted once, cut into chunks of ``chunk_size`` files
and mapped over the task runner: local threads by default, or a Dask cluster
(``dask_address``) whose workers see the same paths (a shared filesystem). Each
chunk task returns its rows (no images); the flow writes them in input order to
a temp file renamed at the end. Chunking and batching do not depend on the
runner, so the output is byte-for-byte the same either way.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.model import load_model
from tasks.predict import (
    DEFAULTS,
    PredictSummary,
    PredictUsageError,
    Row,
    chunked,
    plan_inputs,
    predict_chunk,
    write_predictions,
)

# Locally, one chunk at a time: a chunk already keeps every core busy (decode processes
# overlapping inference); more chunks at once would only hold more rows in memory.
LOCAL_CHUNKS_AT_ONCE = 1
# Seconds to reach the Dask scheduler (distributed's default is 30): a wrong or dead
# address is a usage error, reported before the flow starts.
DASK_CONNECT_TIMEOUT_S = 5


@task(name="predict-chunk", cache_policy=NO_CACHE, persist_result=False)
def predict_chunk_task(
    paths: Sequence[str],
    model_path: str,
    batch_size: int,
    workers: int,
    preprocess: bool,
    debug_dir: str | None,
    index_offset: int,
) -> list[Row]:
    """Rows of one chunk (runs on whichever worker the task runner picks)."""
    return predict_chunk(
        paths, model_path, batch_size, workers, preprocess, debug_dir, index_offset
    )


@flow(name="batch_predict", task_runner=ThreadPoolTaskRunner(max_workers=LOCAL_CHUNKS_AT_ONCE))
def batch_predict(
    inputs: list[str],
    model_path: Path,
    out_path: Path,
    fmt: str = "csv",
    chunk_size: int = 1000,
    batch_size: int = DEFAULTS.batch_size,
    workers: int = DEFAULTS.workers,
    preprocess: bool = True,
    debug_dir: Path | None = None,
    progress: bool | None = None,
    review_below: float = DEFAULTS.review_below,
) -> PredictSummary:
    """Classify every image under ``inputs`` into ``out_path``, chunk by chunk.

    ``progress``: a bar over the files, moved as the chunks are written (None: on a terminal).
    """
    log = get_run_logger()
    if chunk_size < 1:
        raise PredictUsageError(f"chunk size must be >= 1, got {chunk_size}")
    planned = plan_inputs(
        inputs, Path(out_path), fmt, batch_size, workers, debug_dir, Path(model_path)
    )
    paths = planned.paths
    # refuse a bad model here, once, rather than in every chunk task
    loaded = load_model(Path(model_path))
    chunks = chunked(paths, chunk_size)
    log.info("%d files in %d chunks of <= %d", len(paths), len(chunks), chunk_size)
    futures = predict_chunk_task.map(
        chunks,
        unmapped(str(model_path)),
        unmapped(batch_size),
        unmapped(workers),
        unmapped(preprocess),
        unmapped(None if debug_dir is None else str(debug_dir)),
        [i * chunk_size for i in range(len(chunks))],
    )
    pending = deque(futures)  # popped once written, so a chunk's rows are freed
    del futures

    def rows_in_order() -> Iterator[Row]:
        while pending:  # in input order, whatever order the chunks finish in
            yield from pending.popleft().result()

    n_classes = len(loaded.classes)
    summary = write_predictions(
        rows_in_order(), out_path, fmt, n_classes, len(paths), progress, "batch-predict",
        review_below,
    )  # fmt: skip
    summary.skipped = planned.skipped
    return summary


def check_dask_scheduler(address: str, timeout: float = DASK_CONNECT_TIMEOUT_S) -> None:
    """Connect to the Dask scheduler once; PredictUsageError when it cannot be reached.

    A bare comm (distributed's connect and handshake), not a Client: a Client that
    failed to connect would still try to close itself at exit, with a traceback.
    """
    import asyncio

    from distributed.comm import connect

    async def probe() -> None:
        comm = await connect(address, timeout=timeout)  # retries until the timeout
        await comm.close()

    try:
        # connect's timeout bounds the TCP connection only: a server that accepts and never
        # answers distributed's handshake (a web server) would hold it without end
        asyncio.run(asyncio.wait_for(probe(), timeout))
    except (OSError, TimeoutError, ValueError) as exc:  # refused, timed out, bad address
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {timeout:g} s"
        else:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PredictUsageError(
            f"cannot reach the Dask scheduler at {address} ({reason}); "
            "check --dask-address (e.g. tcp://scheduler:8786) and that `dask scheduler` runs"
        ) from exc


def run_batch_predict(
    inputs: Sequence[Path | str],
    model_path: Path,
    out_path: Path,
    fmt: str = "csv",
    chunk_size: int = 1000,
    batch_size: int = DEFAULTS.batch_size,
    workers: int = DEFAULTS.workers,
    preprocess: bool = True,
    debug_dir: Path | None = None,
    dask_address: str | None = None,
    progress: bool | None = None,
    review_below: float = DEFAULTS.review_below,
) -> PredictSummary:
    """Run the flow on local threads, or on the Dask scheduler at ``dask_address``.

    Raises PredictUsageError when the scheduler cannot be reached within
    ``DASK_CONNECT_TIMEOUT_S`` seconds.
    """
    flow_ = batch_predict
    if dask_address:
        from prefect_dask import DaskTaskRunner

        check_dask_scheduler(dask_address)
        runner = DaskTaskRunner(
            address=dask_address, client_kwargs={"timeout": DASK_CONNECT_TIMEOUT_S}
        )
        flow_ = batch_predict.with_options(task_runner=runner)
    t0 = time.perf_counter()
    summary = flow_(
        inputs=[str(p) for p in inputs],
        model_path=Path(model_path),
        out_path=Path(out_path),
        fmt=fmt,
        chunk_size=chunk_size,
        batch_size=batch_size,
        workers=workers,
        preprocess=preprocess,
        debug_dir=debug_dir,
        progress=progress,
        review_below=review_below,
    )
    summary.seconds = time.perf_counter() - t0
    return summary
