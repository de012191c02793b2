"""Typed view of params.yaml: one frozen dataclass per stage section.

params.yaml is read once, at an entry point (CLI command, flow), and the typed
sections are passed to the steps as plain arguments. Unknown keys and
out-of-range values fail here, before any work, naming the offending key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class ParamsError(ValueError):
    """params.yaml has an unknown key, a missing section or an invalid value."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ParamsError(f"params: {key}: {msg}")


@dataclass(frozen=True)
class DownloadParams:
    # Tried in order after $MNIST_MIRROR; the two mirrors torchvision uses.
    mirrors: list[str] = field(
        default_factory=lambda: [
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ]
    )
    retries: int = 3  # attempts per file and source on transient HTTP errors
    backoff_s: float = 1.0  # first retry delay; doubles on each further attempt
    timeout_s: float = 30.0  # socket timeout of one request

    def validate(self, p: str) -> None:
        _check(self.retries >= 1, f"{p}.retries", f"must be >= 1, got {self.retries}")
        _check(self.backoff_s >= 0, f"{p}.backoff_s", f"must be >= 0, got {self.backoff_s}")
        _check(self.timeout_s > 0, f"{p}.timeout_s", f"must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class SplitParams:
    val_fraction: float = 0.3  # the seed report's 70/30 train/validation split
    seed: int = 42

    def validate(self, p: str) -> None:
        _check(
            0.0 < self.val_fraction < 1.0,
            f"{p}.val_fraction",
            f"must be in (0, 1), got {self.val_fraction}",
        )


@dataclass(frozen=True)
class NormalizeParams:
    # x = (pixel / 255 - mean) / std. The seed used plain [0, 1] pixels.
    mean: float = 0.0
    std: float = 1.0

    def validate(self, p: str) -> None:
        _check(self.std > 0, f"{p}.std", f"must be > 0, got {self.std}")


@dataclass(frozen=True)
class AugmentParams:
    # Per-sample random augmentation of each training batch, on the training device.
    # All zero (the seed recipe) switches augmentation off. The geometric ones model where
    # and how a hand puts a digit; stroke, blur and contrast model the pens and cameras
    # that real photos come from (MNIST's strokes are all one pen, ~2-3 px at 28x28).
    rotate_deg: float = 0.0  # rotation drawn uniformly from [-rotate_deg, +rotate_deg] degrees
    scale: float = 0.0  # zoom factor drawn from [1 - scale, 1 + scale]
    translate: float = 0.0  # shift per axis, fraction of the image side, in [-t, +t]
    shear_deg: float = 0.0  # horizontal shear (slant) drawn from [-shear_deg, +shear_deg]
    elastic_px: float = 0.0  # max displacement of a smooth random warp, in pixels
    stroke: float = 0.0  # stroke width change: thin (erode) .. thicken (dilate) by up to this
    blur: float = 0.0  # blend towards a Gaussian-blurred copy by up to this share
    contrast: float = 0.0  # ink intensity scaled by a factor drawn from [1 - contrast, 1]
    # share of each batch that is augmented; the rest stays as MNIST drew it, so a short
    # training run learns the clean digits (the test set) as well as the varied ones
    share: float = 1.0

    @property
    def enabled(self) -> bool:
        transforms = dataclasses.astuple(dataclasses.replace(self, share=0.0))
        return self.share > 0 and any(v > 0 for v in transforms)

    @property
    def geometric(self) -> bool:
        return (
            self.rotate_deg > 0 or self.scale > 0 or self.translate > 0
            or self.shear_deg > 0 or self.elastic_px > 0
        )  # fmt: skip

    def validate(self, p: str) -> None:
        _check(
            0 <= self.rotate_deg <= 180,
            f"{p}.rotate_deg",
            f"must be in [0, 180], got {self.rotate_deg}",
        )
        _check(0 <= self.scale < 1, f"{p}.scale", f"must be in [0, 1), got {self.scale}")
        _check(
            0 <= self.translate <= 0.5,
            f"{p}.translate",
            f"must be in [0, 0.5], got {self.translate}",
        )
        _check(
            0 <= self.shear_deg < 90, f"{p}.shear_deg", f"must be in [0, 90), got {self.shear_deg}"
        )
        _check(
            0 <= self.elastic_px <= 8,
            f"{p}.elastic_px",
            f"must be in [0, 8] pixels, got {self.elastic_px}",
        )
        for name in ("stroke", "blur", "contrast", "share"):
            value = getattr(self, name)
            _check(0 <= value <= 1, f"{p}.{name}", f"must be in [0, 1], got {value}")


@dataclass(frozen=True)
class TrainParams:
    model: Literal["seed", "improved"] = "seed"
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3  # Adam learning rate; the peak rate under the onecycle schedule
    seed: int = 42
    # initial weights: glorot (Glorot/Xavier-uniform weights, zero biases) | torch (PyTorch's
    # layer defaults, which shrink the signal through the seed's six ReLU layers: slower start)
    init: Literal["glorot", "torch"] = "glorot"
    # the weights the model file keeps: best (the epoch with the highest validation accuracy:
    # what the validation split is for) | last (the final epoch)
    keep: Literal["best", "last"] = "best"
    normalize: NormalizeParams = field(default_factory=NormalizeParams)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # improved model only (the seed CNN has neither): BatchNorm after each conv / hidden layer
    batchnorm: bool = False
    dropout: float = 0.0  # improved model only: dropout before each linear layer
    width: int = 32  # improved model only: channels of its first block (then 2x, 4x)
    augment: AugmentParams = field(default_factory=AugmentParams)
    schedule: Literal["constant", "onecycle"] = "constant"  # learning rate per step
    # NHWC activations: torch's CPU max-pool is ~20x faster on NHWC than on NCHW maps
    channels_last: bool = True
    compile: bool = False  # torch.compile the training forward/backward
    amp: bool = False  # bf16 autocast for the training steps (CUDA; CPUs with AMX)

    def validate(self, p: str) -> None:
        _check(self.epochs >= 1, f"{p}.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"{p}.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.lr > 0, f"{p}.lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.dropout < 1, f"{p}.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(1 <= self.width <= 512, f"{p}.width", f"must be in [1, 512], got {self.width}")
        # the seed CNN is kept layer for layer, so its numbers stay reproducible
        _check(
            self.model != "seed" or not self.batchnorm,
            f"{p}.batchnorm",
            "needs model: improved (the seed CNN has no BatchNorm)",
        )
        _check(
            self.model != "seed" or self.dropout == 0,
            f"{p}.dropout",
            "needs model: improved (the seed CNN has no Dropout)",
        )
        _check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"{p}.device",
            f"must be auto, cpu or cuda[:N], got {self.device!r}",
        )


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 1000  # inference only: bigger batches, fewer calls
    top_confused: int = 10  # how many (actual, predicted) pairs to list

    def validate(self, p: str) -> None:
        _check(self.batch_size >= 1, f"{p}.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.top_confused >= 0, f"{p}.top_confused", "must be >= 0")


@dataclass(frozen=True)
class ReportParams:
    n_misclassified: int = 36  # digits in the grid of misclassified test images

    def validate(self, p: str) -> None:
        _check(self.n_misclassified >= 0, f"{p}.n_misclassified", "must be >= 0")


@dataclass(frozen=True)
class PredictParams:
    # the pipeline model `digitflow predict` and the DVC predict stage use (a key of `models`;
    # params.yaml names the robust one, these built-in defaults know only the seed report's)
    model: str = "seed"
    batch_size: int = 256  # images per forward pass
    workers: int = 2  # decoding threads (cv2 releases the GIL); this machine has 2 cores
    preprocess: bool = True  # MNIST-style preprocessing of photos; false for MNIST-like inputs
    chunk_size: int = 1000  # files per Prefect task in the batch_predict flow

    def validate(self, p: str) -> None:
        _check(self.batch_size >= 1, f"{p}.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.workers >= 1, f"{p}.workers", f"must be >= 1, got {self.workers}")
        _check(self.chunk_size >= 1, f"{p}.chunk_size", f"must be >= 1, got {self.chunk_size}")


@dataclass(frozen=True)
class PipelineParams:
    download_retries: int = 3  # Prefect task retries of the download stage
    retry_delay_s: float = 2.0  # first Prefect retry delay; doubles each retry

    def validate(self, p: str) -> None:
        _check(self.download_retries >= 0, f"{p}.download_retries", "must be >= 0")
        _check(self.retry_delay_s >= 0, f"{p}.retry_delay_s", "must be >= 0")


@dataclass(frozen=True)
class RetrainParams:
    # promote a challenger only when test accuracy improves by at least this much (absolute)
    min_improvement: float = 0.001
    # ...and no class's recall drops by more than this (absolute) vs the champion
    max_class_drop: float = 0.01

    def validate(self, p: str) -> None:
        _check(0 <= self.min_improvement < 1, f"{p}.min_improvement", "must be in [0, 1)")
        _check(0 <= self.max_class_drop < 1, f"{p}.max_class_drop", "must be in [0, 1)")


def _default_recipes() -> dict[str, TrainParams]:
    return {"seed": TrainParams()}


def _default_models() -> dict[str, str]:
    return {"seed": "seed"}


@dataclass(frozen=True)
class Params:
    download: DownloadParams = field(default_factory=DownloadParams)
    split: SplitParams = field(default_factory=SplitParams)
    # named training recipes; `models` says which one each pipeline model is trained with
    train: dict[str, TrainParams] = field(default_factory=_default_recipes)
    models: dict[str, str] = field(default_factory=_default_models)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    report: ReportParams = field(default_factory=ReportParams)
    predict: PredictParams = field(default_factory=PredictParams)
    pipeline: PipelineParams = field(default_factory=PipelineParams)
    retrain: RetrainParams = field(default_factory=RetrainParams)

    def validate(self, p: str = "") -> None:
        """Sections validate themselves (_validate_tree walks into them); here, what links them."""
        _check(bool(self.train), "train", "needs at least one recipe")
        _check(bool(self.models), "models", "needs at least one model")
        for name, recipe in self.models.items():
            _check(
                recipe in self.train,
                f"models.{name}",
                f"unknown recipe {recipe!r} (the train section has: {', '.join(self.train)})",
            )
        _check(
            self.predict.model in self.models,
            "predict.model",
            f"unknown model {self.predict.model!r} (models: {', '.join(self.models)})",
        )

    def recipe(self, name: str) -> TrainParams:
        """The training recipe ``train.<name>``; an unknown name is a ParamsError."""
        _check(
            name in self.train,
            f"train.{name}",
            f"no such recipe (the train section has: {', '.join(self.train)})",
        )
        return self.train[name]


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or fail naming the key."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is Literal:
        _check(value in get_args(tp), key, f"must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin is dict:
        _check(isinstance(value, dict), key, f"must be a mapping, got {type(value).__name__}")
        key_type, item = get_args(tp)
        for k in value:
            _check(isinstance(k, key_type), f"{key}.{k}", "keys must be names (strings)")
        return {k: _coerce(v, item, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        _check(isinstance(value, list), key, f"must be a list, got {type(value).__name__}")
        (item,) = get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        inner = [a for a in get_args(tp) if a is not type(None)]
        return _coerce(value, inner[0], key)
    if tp is bool:
        _check(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        _check(
            isinstance(value, int) and not isinstance(value, bool),
            key,
            f"must be an integer, got {value!r}",
        )
        return value
    if tp is float:
        _check(
            isinstance(value, (int, float)) and not isinstance(value, bool),
            key,
            f"must be a number, got {value!r}",
        )
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported params type {tp!r} for {key}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    where = f"{prefix}." if prefix else ""
    _check(
        not unknown,
        ", ".join(where + k for k in unknown),
        f"unknown key (expected one of: {', '.join(sorted(names))})",
    )
    kwargs = {k: _coerce(v, hints[k], where + k) for k, v in data.items()}
    return cls(**kwargs)


def _validate_tree(obj: Any, prefix: str) -> None:
    """Run ``validate(prefix)`` of ``obj`` and of every dataclass nested in it."""
    for f in dataclasses.fields(obj):
        child = getattr(obj, f.name)
        where = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(child):
            _validate_tree(child, where)
        elif isinstance(child, dict):  # named sections, e.g. the train recipes
            for k, v in child.items():
                if dataclasses.is_dataclass(v):
                    _validate_tree(v, f"{where}.{k}")
    obj.validate(prefix)


def parse_params(data: dict[str, Any] | None) -> Params:
    """Build and validate Params from a parsed params.yaml mapping."""
    params = _build(Params, data or {}, "")
    _validate_tree(params, "")
    return params


def load_params(path: Path = Path("params.yaml")) -> Params:
    """Read params.yaml once; unknown keys or invalid values raise ParamsError."""
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    with path.open() as fh:
        data = yaml.safe_load(fh)
    if data is not None and not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping of stage sections")
    return parse_params(data)


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain-dict form of a params section, for checkpoints and reports."""
    return dataclasses.asdict(obj)
