"""The CNNs and the self-describing model file.

A model file is a plain dict of tensors and builtins, so it loads with
``torch.load(weights_only=True)``: no pickled code is ever executed.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.io import atomic_open

FORMAT = "digitflow-model"
FORMAT_VERSION = 1
CLASSES = [str(d) for d in range(10)]


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

    def __init__(self, num_classes: int = 10) -> None:
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
    ``batchnorm`` and ``dropout`` are switches so the README's ablation can add them one at a time;
    ``width`` scales the channels (w, 2w, 4w): the multiply-adds grow with its square.
    """

    def __init__(
        self, num_classes: int = 10, batchnorm: bool = True, dropout: float = 0.0, width: int = 32
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


def build_model(arch: str, num_classes: int = 10, **arch_kwargs: Any) -> nn.Module:
    """A fresh, untrained network of the named architecture.

    ``arch_kwargs`` are the architecture's switches (ImprovedCNN: batchnorm, dropout); the
    model file stores them, so load_model rebuilds exactly the trained network.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r} (known: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[arch](num_classes=num_classes, **arch_kwargs)


class ModelFileError(ValueError):
    """The file is not a digitflow model (or is damaged)."""


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
    atomic_torch_save(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "arch": arch,
            "arch_kwargs": dict(arch_kwargs or {}),
            "state_dict": state,
            "normalize": {"mean": float(mean), "std": float(std)},
            "classes": list(classes or CLASSES),
            "params": params,
            "metrics": metrics or {},
            "history": list(history or []),
        },
        path,
    )
    return path


def load_model(path: Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model file safely; anything that is not ours raises ModelFileError."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # the weights-only unpickler met code or objects
        # (torch's own message suggests weights_only=False: never repeat that advice)
        raise ModelFileError(
            f"{path} is not a digitflow model file: it holds pickled objects other than "
            "tensors and plain data, which digitflow never loads"
        ) from exc
    except Exception as exc:  # zip/pickle errors for junk, truncation
        raise ModelFileError(
            f"{path} is not a digitflow model file (not a readable PyTorch file: "
            f"{type(exc).__name__})"
        ) from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a digitflow model file (no '{FORMAT}' header)")
    if blob.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model format version {blob.get('format_version')!r} is not supported "
            f"(expected {FORMAT_VERSION})"
        )
    classes = list(blob.get("classes") or CLASSES)
    try:
        arch_kwargs = dict(blob.get("arch_kwargs") or {})
        model = build_model(blob["arch"], num_classes=len(classes), **arch_kwargs)
        model.load_state_dict(blob["state_dict"])
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:  # TypeError: bad arch_kwargs
        raise ModelFileError(f"{path}: weights do not fit the architecture: {exc}") from exc
    model.to(device).eval()
    norm = blob.get("normalize") or {}
    return LoadedModel(
        model=model,
        arch=blob["arch"],
        arch_kwargs=arch_kwargs,
        mean=float(norm.get("mean", 0.0)),
        std=float(norm.get("std", 1.0)),
        classes=classes,
        params=dict(blob.get("params") or {}),
        metrics=dict(blob.get("metrics") or {}),
        history=list(blob.get("history") or []),
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


def pick_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
