"""Typed view of params.yaml: one frozen pydantic dataclass per stage section.

params.yaml is read once, at an entry point (CLI command, flow), and the typed
sections are passed to the steps as plain arguments. Unknown keys and
out-of-range values fail here, before any work, in one line naming the key.

params.yaml documents every key (what it does, its unit, the seed report's value);
this module holds only the types and the ranges. The defaults below are the seed
report's values, i.e. params.yaml's ``train.seed`` recipe and sections
(tests/test_config.py checks they stay equal); they fill keys a partial params file
leaves out and serve code that builds a section directly (tests, benchmarks).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import reprlib
import typing
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from tasks.errors import DigitflowError

# The project's params.yaml is ~8 KB; 8x that leaves room for many more recipes, and refusing
# larger files before parsing bounds the pure-Python parse (~1 s for 64 KiB of keys on 2 cores).
MAX_PARAMS_BYTES = 64 * 1024
# params.yaml nests four levels (train -> recipe -> augment -> key); deeper documents are not
# params files, and PyYAML's composer recurses once per level (a RecursionError otherwise).
MAX_YAML_DEPTH = 16
# An error is one line on a terminal: quoted values and the whole line are cut to these.
MAX_QUOTED = 60
MAX_ERROR_LINE = 300

# Upper bounds: values past them are typos, and would fail deep inside a stage with a traceback
# (or run for days) instead of here. MNIST has 60,000 training images: a larger batch holds
# no more of them (and a predict batch is held in memory as float32: 60,000 x 784 x 4 B = 188 MB).
MAX_BATCH = 60_000
MAX_EPOCHS = 1000  # the longest preset trains 20: 50x that is an extra zero or two, a typo
# Seeds seed numpy's default_rng (non-negative only) and torch; train derives per-epoch torch
# seeds as seed * 1_000_003 + epoch, which must stay below torch's 2**64. 32 bits (numpy's
# legacy seed size, which train also seeds) keep every use in range.
SEED_LIMIT = 2**32
# Retries back off exponentially (the delay doubles): 20 attempts already wait 2**19 x the first
# delay (6 days at 1 s); around a thousand, the delay overflows a float (a traceback).
MAX_RETRIES = 20
# Delays and socket timeouts beyond an hour are typos; huge ones overflow socket.settimeout.
MAX_SECONDS = 3600.0
# The widest network (train.*.width) a recipe may ask for: 16x the default width, 256x its
# multiply-adds (~2 G an image). tasks/model.py sizes its model-file bound from it.
MAX_WIDTH = 512
MAX_LABELED_WEIGHT = 1000  # repeats of one labelled image: more only multiplies memory
MAX_RENDERS = 1_000_000  # synthetic photos: ~2 ms each to make, so a million is half an hour
MAX_WORKERS = 256  # decoding processes: beyond any machine's cores they only add memory
MAX_GRID = 1000  # misclassified digits in a 9-wide grid: 112 rows, a figure ~150 inches tall

# extra="forbid": a misspelt key would otherwise keep its default without a word;
# allow_inf_nan=False: inf passes every "> 0" and nan every comparison, to fail in a stage.
# Scalars are Strict* types (no "5" -> 5, no true -> 1): YAML already typed them.
_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)


class ParamsError(DigitflowError, ValueError):
    """params.yaml has an unknown key, a missing section or an invalid value."""


def _quote(value: Any) -> str:
    """repr() cut to a few dozen characters, without walking a huge value (reprlib stops early)."""
    short = reprlib.Repr()  # Python 3.11's Repr takes no keyword arguments yet
    short.maxlevel = 2
    short.maxstring = short.maxother = short.maxlong = MAX_QUOTED
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 4
    return short.repr(value)


def _one_line(text: str) -> str:
    """Newlines folded and the length capped, so an error stays one readable line."""
    line = " ".join(text.splitlines())
    return line if len(line) <= MAX_ERROR_LINE else line[: MAX_ERROR_LINE - 3] + "..."


def _params_error(field_path: str, detail: str) -> PydanticCustomError:
    """A cross-field check's error; ``field_path``, dotted, below the failing section."""
    # the message travels in the context: a "{...}" in a user's recipe name stays literal
    return PydanticCustomError("params", "{detail}", {"field": field_path, "detail": detail})


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


def _check_device(value: str) -> str:
    # a bad string would reach torch.device() in train and fail there with a traceback
    if not _DEVICE.fullmatch(value):
        raise _params_error("", "must be auto, cpu, mps, cuda or cuda:N")
    return value


Device = Annotated[StrictStr, AfterValidator(_check_device)]
Seed = Annotated[StrictInt, Field(ge=0, lt=SEED_LIMIT)]
Batch = Annotated[StrictInt, Field(ge=1, le=MAX_BATCH)]
Seconds = Annotated[StrictFloat, Field(ge=0, le=MAX_SECONDS)]
Share = Annotated[StrictFloat, Field(ge=0, le=1)]  # a probability or a share of a batch
Name = StrictStr


@dataclass(frozen=True, config=_CONFIG)
class DownloadParams:
    """params.yaml ``download``."""

    mirrors: list[StrictStr] = field(
        default_factory=lambda: [
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ]
    )
    retries: Annotated[StrictInt, Field(ge=1, le=MAX_RETRIES)] = 3
    backoff_s: Seconds = 1.0
    timeout_s: Annotated[StrictFloat, Field(gt=0, le=MAX_SECONDS)] = 30.0


@dataclass(frozen=True, config=_CONFIG)
class SplitParams:
    """params.yaml ``split``."""

    # both ends excluded: an empty training or validation split has nothing to learn or score
    val_fraction: Annotated[StrictFloat, Field(gt=0, lt=1)] = 0.3
    seed: Seed = 42


@dataclass(frozen=True, config=_CONFIG)
class LabeledParams:
    """params.yaml ``labeled``: your own labelled images (data/labeled)."""

    # both ends excluded: with images, neither side may be empty by construction
    test_fraction: Annotated[StrictFloat, Field(gt=0, lt=1)] = 0.2


@dataclass(frozen=True, config=_CONFIG)
class NormalizeParams:
    """``train.<recipe>.normalize``: x = (pixel / 255 - mean) / std."""

    mean: StrictFloat = 0.0
    std: Annotated[StrictFloat, Field(gt=0)] = 1.0  # the divisor


@dataclass(frozen=True, config=_CONFIG)
class AugmentParams:
    """``train.<recipe>.augment``: all transforms 0 (the seed recipe) switches it off."""

    rotate_deg: Annotated[StrictFloat, Field(ge=0, le=180)] = 0.0  # +-180 covers every angle
    scale: Annotated[StrictFloat, Field(ge=0, lt=1)] = 0.0  # zoom 1 - scale must stay > 0
    translate: Annotated[StrictFloat, Field(ge=0, le=0.5)] = 0.0  # half a side: digit at the edge
    shear_deg: Annotated[StrictFloat, Field(ge=0, lt=90)] = 0.0  # tan(90 deg) is infinite
    # the warp is drawn on a coarse grid of a 28-pixel image: more than 8 px tears the digit
    elastic_px: Annotated[StrictFloat, Field(ge=0, le=8)] = 0.0
    stroke: Share = 0.0
    blur: Share = 0.0
    contrast: Share = 0.0
    share: Share = 1.0

    @property
    def enabled(self) -> bool:
        """Whether any sample of a batch is augmented at all."""
        transforms = dataclasses.astuple(dataclasses.replace(self, share=0.0))
        return self.share > 0 and any(v > 0 for v in transforms)

    @property
    def geometric(self) -> bool:
        """Whether a geometric warp (affine or elastic) is on."""
        return (
            self.rotate_deg > 0 or self.scale > 0 or self.translate > 0
            or self.shear_deg > 0 or self.elastic_px > 0
        )  # fmt: skip


@dataclass(frozen=True, config=_CONFIG)
class TrainParams:
    """One training recipe: params.yaml ``train.<recipe>``."""

    model: Literal["seed", "improved"] = "seed"
    epochs: Annotated[StrictInt, Field(ge=1, le=MAX_EPOCHS)] = 5
    batch_size: Batch = 64
    lr: Annotated[StrictFloat, Field(gt=0)] = 1e-3
    seed: Seed = 42
    init: Literal["glorot", "torch"] = "glorot"
    keep: Literal["best", "last"] = "best"
    normalize: NormalizeParams = field(default_factory=NormalizeParams)
    device: Device = "auto"
    batchnorm: StrictBool = False
    dropout: Annotated[StrictFloat, Field(ge=0, lt=1)] = 0.0  # 1 would drop every activation
    width: Annotated[StrictInt, Field(ge=1, le=MAX_WIDTH)] = 32
    augment: AugmentParams = field(default_factory=AugmentParams)
    schedule: Literal["constant", "onecycle"] = "constant"
    channels_last: StrictBool = True
    compile: StrictBool = False
    amp: StrictBool = False
    # the rendered photos' share of the training set (tasks/render.py); below 1: MNIST stays
    renders_share: Annotated[StrictFloat, Field(ge=0, lt=1)] = 0.0
    # each labelled training image of your own (the labeled stage) this many times; 0: none
    labeled_weight: Annotated[StrictInt, Field(ge=0, le=MAX_LABELED_WEIGHT)] = 0

    @model_validator(mode="after")
    def _seed_cnn_layer_for_layer(self) -> TrainParams:
        # the seed CNN is kept layer for layer, so its numbers stay reproducible
        if self.model == "seed" and self.batchnorm:
            raise _params_error(
                "batchnorm", "needs model: improved (the seed CNN has no BatchNorm)"
            )
        if self.model == "seed" and self.dropout:
            raise _params_error("dropout", "needs model: improved (the seed CNN has no Dropout)")
        return self


@dataclass(frozen=True, config=_CONFIG)
class RenderParams:
    """params.yaml ``render``: synthetic photos of MNIST training digits (tasks/render.py)."""

    count: Annotated[StrictInt, Field(ge=1, le=MAX_RENDERS)] = 4000
    seed: Seed = 42
    lined: Share = 0.35
    squared: Share = 0.15
    line_spacing_min: Annotated[StrictFloat, Field(gt=0, le=2)] = 0.25
    line_spacing_max: Annotated[StrictFloat, Field(gt=0, le=2)] = 0.6
    crossing_line: Share = 0.1
    edge_marks: Share = 0.15
    shadow: Share = 0.3
    dark: Share = 0.1
    faint_min: Annotated[StrictFloat, Field(gt=0, le=1)] = 0.35
    noise_max: Annotated[StrictFloat, Field(ge=0, le=64)] = 8.0
    blur_max: Annotated[StrictFloat, Field(ge=0, le=8)] = 2.0
    rotate_deg: Annotated[StrictFloat, Field(ge=0, le=45)] = 8.0
    perspective: Annotated[StrictFloat, Field(ge=0, le=0.25)] = 0.06
    jpeg_min_quality: Annotated[StrictInt, Field(ge=1, le=95)] = 30

    @model_validator(mode="after")
    def _ranges(self) -> RenderParams:
        if self.lined + self.squared > 1:
            raise _params_error("squared", "lined + squared is a share of the renders: <= 1")
        if self.line_spacing_min > self.line_spacing_max:
            raise _params_error("line_spacing_min", "must be <= line_spacing_max")
        return self


@dataclass(frozen=True, config=_CONFIG)
class EvaluateParams:
    """params.yaml ``evaluate``."""

    batch_size: Batch = 1000
    top_confused: Annotated[StrictInt, Field(ge=0)] = 10


@dataclass(frozen=True, config=_CONFIG)
class ReportParams:
    """params.yaml ``report``."""

    n_misclassified: Annotated[StrictInt, Field(ge=0, le=MAX_GRID)] = 36


@dataclass(frozen=True, config=_CONFIG)
class PredictParams:
    """params.yaml ``predict``."""

    # a key of `models`; params.yaml names its robust model, the built-in `models` know only
    # the seed report's (the one default that differs from params.yaml)
    model: Name = "seed"
    batch_size: Batch = 256
    workers: Annotated[StrictInt, Field(ge=1, le=MAX_WORKERS)] = 2
    preprocess: StrictBool = True
    chunk_size: Annotated[StrictInt, Field(ge=1)] = 1000
    # a softmax confidence: 0 flags no ok row, 1 (or more than any confidence) flags all
    review_below: Annotated[StrictFloat, Field(ge=0, le=1)] = 0.9


@dataclass(frozen=True, config=_CONFIG)
class PipelineParams:
    """params.yaml ``pipeline``."""

    download_retries: Annotated[StrictInt, Field(ge=0, le=MAX_RETRIES)] = 3
    retry_delay_s: Seconds = 2.0


@dataclass(frozen=True, config=_CONFIG)
class RetrainParams:
    """params.yaml ``retrain``: absolute accuracy differences, so below 1."""

    min_improvement: Annotated[StrictFloat, Field(ge=0, lt=1)] = 0.001
    max_class_drop: Annotated[StrictFloat, Field(ge=0, lt=1)] = 0.01
    # with labelled images: how much MNIST test accuracy may fall for a gain on them
    max_mnist_drop: Annotated[StrictFloat, Field(ge=0, lt=1)] = 0.002


def _default_recipes() -> dict[str, TrainParams]:
    return {"seed": TrainParams()}


def _default_models() -> dict[str, str]:
    return {"seed": "seed"}


@dataclass(frozen=True, config=_CONFIG)
class Params:
    """The whole of params.yaml, validated: one attribute per section."""

    download: DownloadParams = field(default_factory=DownloadParams)
    split: SplitParams = field(default_factory=SplitParams)
    labeled: LabeledParams = field(default_factory=LabeledParams)
    # named training recipes; `models` says which one each pipeline model is trained with
    train: Annotated[dict[Name, TrainParams], Field(min_length=1)] = field(
        default_factory=_default_recipes
    )
    models: Annotated[dict[Name, Name], Field(min_length=1)] = field(
        default_factory=_default_models
    )
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    report: ReportParams = field(default_factory=ReportParams)
    render: RenderParams = field(default_factory=RenderParams)
    predict: PredictParams = field(default_factory=PredictParams)
    pipeline: PipelineParams = field(default_factory=PipelineParams)
    retrain: RetrainParams = field(default_factory=RetrainParams)

    @model_validator(mode="after")
    def _names_resolve(self) -> Params:
        recipes = ", ".join(self.train)
        for name, recipe in self.models.items():
            if recipe not in self.train:
                raise _params_error(
                    f"models.{name}",
                    f"unknown recipe {_quote(recipe)} (the train section has: {recipes})",
                )
        if self.predict.model not in self.models:
            raise _params_error(
                "predict.model",
                f"unknown model {_quote(self.predict.model)} (models: {', '.join(self.models)})",
            )
        return self

    def recipe(self, name: str) -> TrainParams:
        """The training recipe ``train.<name>``; an unknown name is a ParamsError."""
        if name not in self.train:
            raise ParamsError(
                _one_line(
                    f"params: train.{name}: no such recipe "
                    f"(the train section has: {', '.join(self.train)})"
                )
            )
        return self.train[name]


# --- reading YAML ------------------------------------------------------------------------


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, stricter where a params file gains nothing from YAML's latitude.

    params.yaml has no use for anchors: refusing aliases (``*name``) is what stops a "billion
    laughs" (aliases of aliases, exponential on expansion) from growing downstream (an error
    quoting the value, a validator walking it). No explicit tags (``!!python/...``), no merge
    keys or duplicate keys (a later section would silently win), a bounded nesting depth, and
    YAML 1.2 floats (``1e-3``: YAML 1.1 reads it as a string; DVC, which edits params.yaml
    for ``-S``, reads YAML 1.2).
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise ComposerError(
                None, None, "aliases (*name) are not allowed in a params file",
                self.peek_event().start_mark,
            )  # fmt: skip
        event = self.peek_event()
        tag = getattr(event, "tag", None)
        if tag not in (None, "!"):  # "!" is YAML's "plain string"; no other type is needed here
            # explicit tags are how YAML names Python objects (!!python/...), and PyYAML's
            # constructors fail on odd ones with bare IndexErrors (`!!float` of nothing)
            written = tag.replace("tag:yaml.org,2002:", "!!")
            raise ComposerError(
                None, None, f"tags ({_quote(written)}) are not allowed in a params file",
                event.start_mark,
            )  # fmt: skip
        if self._depth >= MAX_YAML_DEPTH:
            raise ComposerError(
                None, None, f"nested deeper than {MAX_YAML_DEPTH} levels",
                self.peek_event().start_mark,
            )  # fmt: skip
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:
            # a scalar that has a type's form but not a valid value (the date 2024-13-45):
            # PyYAML lets the constructor's own error escape, without a line
            raise ConstructorError(
                None, None, f"invalid value {_quote(node.value)}: {exc}", node.start_mark
            ) from exc

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise ConstructorError(
                        None, None, "merge keys (<<) are not allowed in a params file",
                        key_node.start_mark,
                    )  # fmt: skip
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:
                    continue  # unhashable: the base class refuses it, with its line
                if duplicate:
                    raise ConstructorError(
                        None, None, f"duplicate key {_quote(key)} (a later one would silently win)",
                        key_node.start_mark,
                    )  # fmt: skip
                seen.add(key)
        return super().construct_mapping(node, deep)


# YAML 1.2 floats with an exponent, with or without a dot (1e-3, 2E5, 1.5e3); YAML 1.1's
# resolver needs both a dot and a signed exponent. The others (0.001, .inf, .nan) resolve as before.
_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_error(exc: yaml.YAMLError, text: str, source: str) -> ParamsError:
    """One line naming the file and the line of a YAML syntax, tag or reader error."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        what = exc.problem or exc.context or "invalid YAML"
    elif isinstance(exc, yaml.reader.ReaderError):  # a control character in the text
        line = f":{text[: exc.position].count(chr(10)) + 1}"
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        what = f"control character U+{char:04X} is not allowed in YAML"
    else:  # PyYAML raises no other kind from load(); kept readable if a version does
        line, what = "", str(exc)
    return ParamsError(_one_line(f"{source}{line}: {what}"))


def read_params_yaml(raw: bytes | str, source: str) -> dict[str, Any]:
    """The text of a params file as a mapping, read strictly; ``source`` names it in errors.

    An empty document, a syntax error, non-UTF-8 bytes, an alias or a duplicate key is a
    ParamsError of one line. The values are not validated (see :func:`parse_params_yaml`).
    """
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "replace"))
    if size > MAX_PARAMS_BYTES:
        raise ParamsError(f"{source}: larger than {MAX_PARAMS_BYTES} bytes: not a params file")
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise ParamsError(
                f"{source}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x})"
            ) from exc
    else:
        text = raw
    try:
        data = yaml.load(text, Loader=_ParamsLoader)  # a SafeLoader subclass: safe
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, text, source) from exc
    if not data:  # None for an empty or comments-only file
        # defaults for everything would silently run the stages on something nobody wrote
        raise ParamsError(f"{source}: has no stage sections (empty)")
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: top level must be a mapping of stage sections")
    return data


def parse_params_yaml(raw: bytes | str, source: str) -> Params:
    """Parse and validate the text of a params file; any problem is a one-line ParamsError."""
    return parse_params(read_params_yaml(raw, source), source)


def load_params(path: Path = Path("params.yaml")) -> Params:
    """Read params.yaml once (size-capped); any problem with it raises a one-line ParamsError."""
    if not path.exists():
        raise ParamsError(f"params file not found: {path}")
    if not path.is_file():  # a folder, a FIFO or a device would block or never end
        raise ParamsError(f"{path}: not a regular file")
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_PARAMS_BYTES + 1)  # one byte more tells "too large"
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read: {exc.strerror}") from exc
    return parse_params_yaml(raw, str(path))


# --- validation errors as one line -------------------------------------------------------

_TYPE_MESSAGES = {
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "dataclass_type": "must be a mapping",
    "finite_number": "must be a finite number",
    "too_short": "needs at least one entry",
}
_BOUNDS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}
_UNKNOWN_KEY = ("extra_forbidden", "unexpected_keyword_argument")


def _key_part(part: str) -> str:
    """A key as written in params.yaml; odd ones (long, control characters, dots) quoted."""
    if part and part.isprintable() and "." not in part and len(part) <= MAX_QUOTED:
        return part
    return _quote(part)


def _section_fields(loc: tuple[str | int, ...]) -> list[str]:
    """The key names the section at ``loc`` accepts (for "unknown key" errors)."""
    tp: Any = Params
    for part in loc:
        if dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp)[part]
        else:  # dict[str, section]: the part is a recipe name
            tp = typing.get_args(tp)[-1]
    return sorted(f.name for f in dataclasses.fields(tp))


def _describe(error: Mapping[str, Any]) -> str:
    """``key.path: what is wrong (got value)`` for one pydantic error."""
    loc = tuple(error["loc"])
    kind = error["type"]
    ctx = error.get("ctx") or {}
    got = f" (got {_quote(error.get('input'))})"
    if loc and loc[-1] == "[key]":
        loc, message = loc[:-1], "keys must be names (strings)"
    elif kind in _UNKNOWN_KEY:
        message = f"unknown key (expected one of: {', '.join(_section_fields(loc[:-1]))})"
    elif kind in _BOUNDS:
        name, op = _BOUNDS[kind]
        bound = ctx[name]
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)  # "> 0", not "> 0.0", for a float key
        message = f"must be {op} {bound}{got}"
    elif kind == "literal_error":
        message = f"must be {ctx['expected']}{got}"
    elif kind == "params":  # our cross-field checks: the key is below the failing section
        loc += tuple(p for p in ctx["field"].split(".") if p)
        message = ctx["detail"] + (got if ctx["field"] == "" else "")
    elif kind in _TYPE_MESSAGES:
        message = _TYPE_MESSAGES[kind] + got
    else:  # any other pydantic check: its own sentence
        message = error["msg"] + got
    return f"{_key_path(loc)}: {message}"


def _key_path(loc: tuple[str | int, ...]) -> str:
    """``train.seed.lr``; list items as ``download.mirrors[1]``."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + _key_part(part)
    return path or "(top level)"


@functools.cache
def _validator() -> TypeAdapter[Params]:
    return TypeAdapter(Params)


def parse_params(data: Mapping[str, Any] | None, source: str = "params") -> Params:
    """Build and validate Params from a parsed params.yaml mapping (missing keys: defaults).

    The first problem found is a one-line ParamsError: ``<source>: key.path: what (got value)``.
    """
    if data is None:
        raise ParamsError(f"{source}: has no stage sections (empty)")
    try:
        return _validator().validate_python(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ParamsError(_one_line(f"{source}: {_describe(errors[0])}{more}")) from exc


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain-dict form of a params section, for checkpoints and reports."""
    return dataclasses.asdict(obj)
