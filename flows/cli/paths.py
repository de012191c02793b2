"""Where the commands look by default: params.yaml, the project folder, the model files.

Defaults relative to the project are found from the nearest folder, from the current one
up, that holds dvc.yaml (so `digitflow predict` works from any subfolder); without one,
relative to the current folder.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_PARAMS = Path("params.yaml")
PROJECT_MARKER = "dvc.yaml"
# The pipeline's model files (dvc.yaml `train` outs); predict uses params.yaml predict.model
MODEL_FILE = "data/models/{name}/model.pt"


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
