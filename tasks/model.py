"""The CNNs, the self-describing model file and how a model is scored.

A model file is a plain dict of tensors and builtins, so it loads with
``torch.load(weights_only=True)``: no pickled code is ever executed. Scoring
(evaluate_arrays) lives here, with the model, so the train stage's validation and
the evaluate stage's test score are one function and evaluate needs no train code.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
import torch.nn.functional as F
from torch import nn

from tasks.config import MAX_WIDTH
from tasks.digits import CLASSES, N_CLASSES
from tasks.errors import DigitflowError
from tasks.io import atomic_open

FORMAT = "digitflow-model"
FORMAT_VERSION = 1


class SeedCNN(nn.Module):
    """The seed report's network, layer for layer.

    (B, 1, 28, 28) -conv3-> 26 -pool-> 13 -conv3-> 11 -pool-> 5 -conv3-> 3 -pool-> 1
    so the flattened feature vector is exactly 64 wide.

    Each block is written Conv -> MaxPool -> ReLU rather than the report's Conv -> ReLU ->
    MaxPool: the two compute the same function bit for bit (ReLU is monotonic, so
    max(relu(a), relu(b)) == relu(max(a, b)), and the gradients match too), but pooling
    first applies ReLU and its backward to 4x fewer values. The parameter names are the
    same either way (features.0/3/6 are the convs), so model files load in both orders.
    """

    def __init__(self, num_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 64, 3), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(64, 64, 3), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(64, 64, 3), nn.MaxPool2d(2), nn.ReLU(),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 64), nn.ReLU(),
            nn.Linear(64, 32), nn.ReLU(),
            nn.Linear(32, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,1,28,28) -> (B,10) logits
        return self.classifier(self.features(x))


def _conv_block(c_in: int, c_out: int, kernel: int, batchnorm: bool) -> list[nn.Module]:
    """'same'-padded conv (+ BatchNorm) + 2x2 max-pool + ReLU: halves H and W (floor).

    Pool before ReLU: the same function as ReLU before pool (see SeedCNN), 4x cheaper ReLU.
    """
    # a conv followed by BatchNorm needs no bias: BN's shift replaces it
    conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=not batchnorm)
    norm = nn.BatchNorm2d(c_out) if batchnorm else nn.Identity()
    return [conv, norm, nn.MaxPool2d(2), nn.ReLU()]


class ImprovedCNN(nn.Module):
    """The seed report's proposals: same-padded convs, BatchNorm, Dropout.

    (B, 1, 28, 28) -conv5-> 32x28 -pool-> 14 -conv3-> 64x14 -pool-> 7 -conv3-> 128x7 -pool-> 3
    -> flatten 1152 -> 128 -> 10. 'same' padding keeps the border strokes the seed's valid
    convs cut off; the widths grow as the maps shrink, so each block costs about the same
    (~3.6 M multiply-adds for the last two): ~7.6 M per image vs the seed's ~5.3 M.
    ``batchnorm`` and ``dropout`` are switches so the ablation (docs/recipes.md) adds them singly;
    ``width`` scales the channels (w, 2w, 4w): the multiply-adds grow with its square.
    """

    def __init__(
        self,
        num_classes: int = N_CLASSES,
        batchnorm: bool = True,
        dropout: float = 0.0,
        width: int = 32,
    ):
        super().__init__()
        w = width  # channels of the first block; each block doubles them
        self.features = nn.Sequential(
            *_conv_block(1, w, 5, batchnorm),  # 5x5 first: a wider view of the thin strokes
            *_conv_block(w, 2 * w, 3, batchnorm),
            *_conv_block(2 * w, 4 * w, 3, batchnorm),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (B, 4w, 3, 3) -> (B, 36w): 1152 at the default width 32
            nn.Dropout(dropout),
            nn.Linear(4 * w * 3 * 3, 128, bias=not batchnorm),
            nn.BatchNorm1d(128) if batchnorm else nn.Identity(),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,1,28,28) -> (B,10) logits
        return self.classifier(self.features(x))


ARCHITECTURES: dict[str, type[nn.Module]] = {"seed": SeedCNN, "improved": ImprovedCNN}


def build_model(arch: str, num_classes: int = N_CLASSES, **arch_kwargs: Any) -> nn.Module:
    """A fresh, untrained network of the named architecture.

    ``arch_kwargs`` are the architecture's switches (ImprovedCNN: batchnorm, dropout); the
    model file stores them, so load_model rebuilds exactly the trained network.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r} (known: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[arch](num_classes=num_classes, **arch_kwargs)


class TorchFileError(ValueError):
    """A file that should be a PyTorch file is unreadable, foreign, damaged or too big."""


class ModelFileError(DigitflowError, TorchFileError):
    """The file is not a digitflow model (or is damaged)."""


# Headroom over the largest weights for what else a model file holds: the pickled metadata
# (params, per-epoch history: ~100 bytes an epoch) and the zip's headers and 64-byte
# alignment padding of each tensor record (a few KB). 1.5x the weights is far more than that
# yet refuses a compression bomb of a few hundred MB before it is unpacked.
SIZE_MARGIN = 1.5
# A digitflow model has ~20-40 zip records, a checkpoint ~100: a central directory of a few
# KB. zipfile parses it into ~600 bytes of Python objects per record, 12x its size on disk,
# so it is capped before parsing (a 150 MB directory of empty records would take ~2 GB).
MAX_ZIP_DIRECTORY = 1 << 20


def state_nbytes(model: nn.Module) -> int:
    """Bytes of ``model``'s weights and buffers (as torch.save stores them)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@functools.cache
def max_model_bytes() -> int:
    """The most a digitflow model file may unpack to: the largest architecture's weights x margin.

    The networks are built on the meta device: shapes only, no memory, no time.
    """
    with torch.device("meta"):
        largest = max(
            state_nbytes(build_model("seed")),
            state_nbytes(build_model("improved", batchnorm=True, width=MAX_WIDTH)),
        )  # 0.3 MB and 104 MB: every other recipe lies between
    return int(largest * SIZE_MARGIN)


def _first_line(exc: BaseException, width: int = 120) -> str:
    """The start of an exception's message: one line for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0][:width] if text else ""


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


class _CappedReads:
    """Read-only view of a binary file that refuses any single read over ``cap`` bytes.

    zipfile.ZipFile reads the whole central directory in one read() before it parses it, so
    capping reads bounds the parsing's memory; zipfile offers no such limit of its own.
    """

    def __init__(self, fh: IO[bytes], cap: int) -> None:
        self._fh, self._cap = fh, cap

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:  # "to the end": zipfile reads the last few KB this way
            here = self._fh.tell()
            n = self._fh.seek(0, os.SEEK_END) - here
            self._fh.seek(here)
        if n > self._cap:
            raise TorchFileError(f"its zip directory is over {_mb(self._cap)}")
        return self._fh.read(n)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def seekable(self) -> bool:
        return True


def check_torch_zip(fh: IO[bytes], max_bytes: int) -> None:
    """Refuse a file that is not a PyTorch zip or would unpack to more than ``max_bytes``.

    Reads only the zip's central directory (the sizes it declares; nothing is unpacked):
    torch.load itself trusts those sizes, so a small file of deflated zeros would otherwise
    allocate gigabytes. torch.save never compresses, so its own files unpack to their size.
    Raises TorchFileError naming the reason; leaves ``fh`` at its start.
    """
    size = fh.seek(0, os.SEEK_END)
    fh.seek(0)
    if size > max_bytes:
        raise TorchFileError(f"the file is {_mb(size)}, over the {_mb(max_bytes)} limit")
    try:
        with zipfile.ZipFile(_CappedReads(fh, MAX_ZIP_DIRECTORY)) as archive:  # type: ignore[arg-type]
            records = archive.infolist()
    except TorchFileError:
        raise
    # zipfile parses untrusted bytes: BadZipFile for junk and truncated files (the directory
    # is at the end), but damaged directories also raise UnicodeDecodeError,
    # NotImplementedError, struct.error...: any of them describes the bytes, not our code
    except Exception as exc:
        raise TorchFileError(
            f"not a PyTorch file ({type(exc).__name__}: {_first_line(exc)})"
        ) from exc
    finally:
        fh.seek(0)
    unpacked = sum(r.file_size for r in records)
    if unpacked > max_bytes:
        raise TorchFileError(
            f"it would unpack to {_mb(unpacked)}, over the {_mb(max_bytes)} limit "
            "(a compressed archive: torch.save never compresses)"
        )


def safe_torch_load(source: Path | IO[bytes], max_bytes: int, map_location: Any = "cpu") -> Any:
    """torch.load(weights_only=True) of a PyTorch zip file that unpacks to at most ``max_bytes``.

    Raises TorchFileError, in words, for anything unreadable: not a zip, too big, code or
    foreign objects in the pickle (torch's own message advises weights_only=False: never
    repeated), damaged records.
    """
    with contextlib.ExitStack() as stack:
        fh = stack.enter_context(open(source, "rb")) if isinstance(source, Path) else source
        check_torch_zip(fh, max_bytes)
        try:
            return torch.load(fh, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:  # the weights-only unpickler met code or objects
            raise TorchFileError(
                "it holds pickled objects other than tensors and plain data, "
                "which digitflow never loads"
            ) from exc
        # torch reports damaged records and pickles as RuntimeError, KeyError, IndexError,
        # UnicodeDecodeError, AssertionError... (no common base): all describe the bytes
        except Exception as exc:
            raise TorchFileError(
                f"a damaged PyTorch file ({type(exc).__name__}: {_first_line(exc)})"
            ) from exc


@dataclass
class LoadedModel:
    model: nn.Module  # in eval mode, on the requested device
    arch: str
    arch_kwargs: dict[str, Any]  # the architecture's switches, e.g. batchnorm / dropout
    mean: float  # normalization used in training: x = (pixel/255 - mean) / std
    std: float
    classes: list[str]
    params: dict[str, Any]  # the train params the model was made with
    metrics: dict[str, Any]
    history: list[dict[str, float]]  # per-epoch training curves


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temp file in the same folder, then rename over ``path``."""
    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)


def save_model(
    path: Path,
    model: nn.Module,
    arch: str,
    mean: float,
    std: float,
    params: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    classes: list[str] | None = None,
    history: list[dict[str, float]] | None = None,
    arch_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Write weights + architecture + params + normalization + class names, atomically.

    ``arch_kwargs`` (builtins only) are passed back to build_model on load. Files written
    before they existed have none, which rebuilds the architecture's defaults (format 1).
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    meta = {
        "arch_kwargs": dict(arch_kwargs or {}),
        "normalize": {"mean": float(mean), "std": float(std)},
        "classes": list(classes or CLASSES),
        "params": params,
        "metrics": metrics or {},
        "history": list(history or []),
    }
    # Rebuilt from JSON so the same values always pickle to the same bytes: pickle writes a
    # string once per object, then refers back to it, so the history of a resumed run (its
    # early rows unpickled from the checkpoint, with their own key strings) pickled larger
    # than an uninterrupted run's and DVC saw a changed model file. JSON also keeps the
    # metadata to plain builtins.
    meta = json.loads(json.dumps(meta))
    atomic_torch_save(
        {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": arch, "state_dict": state}
        | meta,
        path,
    )
    return path


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_weights(arch: str, arch_kwargs: dict[str, Any], state: Any, n_classes: int) -> None:
    """The stored tensors must be exactly the architecture's: names, shapes, dtypes, finite.

    Compared with the network built on the meta device (no memory), so a file declaring a
    huge width is refused before anything is allocated for it.
    """
    with torch.device("meta"):
        expected = build_model(arch, num_classes=n_classes, **arch_kwargs).state_dict()
    if not isinstance(state, dict) or set(state) != set(expected):
        missing = sorted(set(expected) - set(state)) if isinstance(state, dict) else []
        raise ValueError(f"tensors differ from the architecture's (missing: {missing[:3]})")
    for name, ref in expected.items():
        t = state[name]
        if not isinstance(t, torch.Tensor) or t.shape != ref.shape or t.dtype != ref.dtype:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} is {got}, expected {ref.dtype} {tuple(ref.shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} holds NaN or infinite values")


def load_model(path: Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model file safely; anything that is not ours raises ModelFileError.

    Bounded before anything is unpacked (see check_torch_zip), and every field is checked,
    so a damaged or tampered file is refused in words, never run into a traceback or NaNs.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        blob = safe_torch_load(path, max_model_bytes())
    except TorchFileError as exc:
        raise ModelFileError(f"{path} is not a digitflow model file: {exc}") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a digitflow model file (no '{FORMAT}' header)")
    version = blob.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        shown = repr(version) if isinstance(version, (int, str)) else type(version).__name__
        raise ModelFileError(
            f"{path}: model format version {shown} is not supported (expected {FORMAT_VERSION})"
        )

    def bad(what: str) -> ModelFileError:
        return ModelFileError(f"{path}: damaged digitflow model file: {what}")

    classes = blob.get("classes")
    if not (
        isinstance(classes, list)
        and len(classes) == len(CLASSES)
        and all(isinstance(c, str) and c for c in classes)
        and len(set(classes)) == len(classes)
    ):
        raise bad(f"'classes' must be {len(CLASSES)} distinct names")
    norm = blob.get("normalize")
    if not (
        isinstance(norm, dict) and _is_number(norm.get("mean")) and _is_number(norm.get("std"))
    ):
        raise bad("'normalize' must hold finite numbers 'mean' and 'std'")
    if norm["std"] <= 0:
        raise bad(f"'normalize.std' must be > 0, got {norm['std']}")
    arch, arch_kwargs = blob.get("arch"), blob.get("arch_kwargs", {})
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise bad(f"unknown architecture {arch!r}"[:200])
    if not (isinstance(arch_kwargs, dict) and all(isinstance(k, str) for k in arch_kwargs)):
        raise bad("'arch_kwargs' must be a dict of named switches")
    for key, kind in (("params", dict), ("metrics", dict), ("history", list)):
        if not isinstance(blob.get(key, kind()), kind):
            raise bad(f"{key!r} must be a {kind.__name__}")
    history = blob.get("history", [])
    numbers = (int, float)  # NaN allowed: a diverged epoch's loss is still its history
    if not all(
        isinstance(r, dict) and all(isinstance(v, numbers) for v in r.values()) for r in history
    ):
        raise bad("'history' rows must map names to numbers")
    try:
        _check_weights(arch, arch_kwargs, blob.get("state_dict"), len(classes))
        model = build_model(arch, num_classes=len(classes), **arch_kwargs)
        model.load_state_dict(blob["state_dict"])
    except (ValueError, RuntimeError, TypeError) as exc:  # TypeError: bad arch_kwargs
        raise ModelFileError(f"{path}: weights do not fit the architecture: {exc}") from exc
    model.eval()
    mean, std = float(norm["mean"]), float(norm["std"])
    # finite weights can still overflow (e.g. 1e30 everywhere): probe a blank and a fully
    # inked image, so such a model is refused here rather than printing NaN probabilities
    probe = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1).expand(2, 28, 28)
    with torch.inference_mode():
        if not bool(torch.isfinite(model(normalize_uint8(probe, mean, std))).all()):
            raise bad("its outputs overflow to NaN or infinity")
    model.to(device)
    return LoadedModel(
        model=model,
        arch=arch,
        arch_kwargs=dict(arch_kwargs),
        mean=mean,
        std=std,
        classes=list(classes),
        params=dict(blob.get("params", {})),
        metrics=dict(blob.get("metrics", {})),
        history=list(history),
    )


def normalize_uint8(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 (B, 28, 28) or (B, 1, 28, 28) -> float32 (B, 1, 28, 28), normalized.

    Done on the fly on the compute device, so datasets stay compact uint8.
    """
    if images.dim() == 3:
        images = images.unsqueeze(1)
    x = images.to(torch.float32).div_(255.0)
    if mean != 0.0 or std != 1.0:
        x = x.sub_(mean).div_(std)
    return x


@torch.inference_mode()
def evaluate_arrays(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
    mean: float, std: float, batch_size: int = 1000,
) -> tuple[float, float, torch.Tensor]:  # fmt: skip
    """(mean loss, accuracy, predictions) of ``model`` on uint8 images (N, 28, 28)."""
    model.eval()
    total_loss, preds = 0.0, []
    for i in range(0, len(images), batch_size):
        logits = model(normalize_uint8(images[i : i + batch_size], mean, std))
        y = labels[i : i + batch_size].long()
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        preds.append(logits.argmax(1))
    pred = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    n = max(len(images), 1)
    return total_loss / n, (pred == labels.long()).float().sum().item() / n, pred


def pick_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
