"""Where the commands look by default: params.yaml, the project folder, the stage outputs.

Defaults relative to the project are found from the nearest folder, from the current one
up, that holds dvc.yaml (so `digitflow predict` works from any subfolder); without one,
relative to the current folder.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_PARAMS = Path("params.yaml")
PROJECT_MARKER = "dvc.yaml"
# The stages' outputs, {name} being a pipeline model (a key of params.yaml `models`): the
# CLI's defaults, the flows' and benchmarks' reads. dvc.yaml, the DAG, spells the same paths
# (YAML cannot import them); tests/test_cli_errors.py checks that both agree.
# the params stage's stamp: written only when params.yaml is valid; every stage depends on it
PARAMS_STAMP = "data/params.ok"
RAW_DIR = "data/raw"
LABELED_DIR = "data/labeled"  # your own images: <label>/<file>, a persistent DVC output
LABELED_SPLIT_DIR = "data/labeled_split"  # their train.npz and test.npz
PREPARED_DIR = "data/prepared"
TEST_SET = f"{PREPARED_DIR}/test.npz"
RENDERS = "data/renders/train.npz"  # synthetic photos of training digits, as predict sees them
MODEL_FILE = "data/models/{name}/model.pt"  # predict uses params.yaml predict.model's
TRAIN_DIR = "data/train/{name}"  # dvclive's metrics.json and plots
CHECKPOINT_FILE = "data/checkpoints/{name}.pt"  # transient: git-ignored, not a DVC out
EVAL_DIR = "data/evaluate/{name}"
REPORT_DIR = "data/report/{name}"
# The evaluate stage's files in its folder. The flows publish and judge the prediction
# model's (params.yaml predict.model).
EVAL_METRICS = "metrics.json"
EVAL_CLASSES = "classes.json"
EVAL_CONFUSION = "confusion.csv"
DEFAULT_MODEL = "seed"  # the one model the stage commands' defaults name (params.yaml models)


def project_root(start: Path | None = None) -> Path | None:
    """The nearest folder holding dvc.yaml, from ``start`` (the current folder) up."""
    here = (start or Path.cwd()).absolute()
    for folder in (here, *here.parents):
        if (folder / PROJECT_MARKER).is_file():
            return folder
    return None


def default_path(relative: Path) -> tuple[Path, str]:
    """``relative`` in the project (see project_root), else in the current folder; and where."""
    root = project_root()
    if root is None:
        where = f"relative to the current folder: no {PROJECT_MARKER} in it or above it"
        return relative, where
    return root / relative, f"the project in {root}"


def model_file(name: str) -> Path:
    """The pipeline's model file of model ``name`` (a key of params.yaml `models`)."""
    return Path(MODEL_FILE.format(name=name))


def eval_path(model: str, file: str) -> str:
    """The evaluate stage's output ``file`` for pipeline model ``model``, relative to the repo."""
    return f"{EVAL_DIR.format(name=model)}/{file}"


def stage_path(template: str, name: str = DEFAULT_MODEL) -> Path:
    """One of the templates above for pipeline model ``name``."""
    return Path(template.format(name=name))
