"""params files that are wrong, odd or hostile: one line naming the file (and line or key), exit 2.

Each case here was a traceback, a silent default or gigabytes of memory before tasks/config.py
moved to pydantic and a stricter YAML loader.
"""

from __future__ import annotations

import os
import resource
import subprocess
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.config import (
    MAX_ERROR_LINE,
    MAX_PARAMS_BYTES,
    Params,
    ParamsError,
    load_params,
    parse_params_yaml,
)
from tests.memory import digitflow_argv, peak_mb


def _write(tmp_path: Path, text: str | bytes, name: str = "params.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def _error(path: Path) -> str:
    """The ParamsError message load_params raises for ``path``; it must be one line."""
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert "\n" not in message and len(message) <= MAX_ERROR_LINE, message
    return message


def _laughs(levels: int = 10) -> str:
    """A "billion laughs" under train.seed.epochs: 9**levels strings from ~0.5 KB of YAML."""
    lines = [
        "train:",
        "  seed:",
        "    epochs:",
        "      - &a0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]",
    ]
    for i in range(1, levels):
        lines.append(f"      - &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


# --- numbers ------------------------------------------------------------------------------


@pytest.mark.parametrize("written", ["1e-3", "1E-3", "1.0e-3", "+1e-3", "0.1e-2", "1e-03"])
def test_exponent_floats_are_numbers(tmp_path: Path, written: str):
    """YAML 1.2 (and DVC) read 1e-3 as a number; PyYAML's YAML 1.1 read it as a string."""
    p = load_params(_write(tmp_path, f"train:\n  seed:\n    lr: {written}\n"))
    assert p.recipe("seed").lr == float(written)


@settings(max_examples=60, deadline=None)
@given(st.floats(min_value=1e-300, max_value=1e300, allow_nan=False, allow_infinity=False))
def test_any_positive_float_python_writes_reads_back(lr: float):
    # repr() is how a script writing params.yaml spells floats: 1e-05, 1.5e+20, 0.25
    p = parse_params_yaml(f"train:\n  seed:\n    lr: {lr!r}\n", "params.yaml")
    assert p.recipe("seed").lr == lr


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("train:\n  seed:\n    lr: .inf\n", "train.seed.lr"),
        ("train:\n  seed:\n    lr: .nan\n", "train.seed.lr"),
        ("train:\n  seed:\n    normalize:\n      std: .inf\n", "train.seed.normalize.std"),
        ("train:\n  seed:\n    normalize:\n      mean: .nan\n", "train.seed.normalize.mean"),
        ("train:\n  seed:\n    normalize:\n      mean: -.inf\n", "train.seed.normalize.mean"),
        ("download:\n  timeout_s: .inf\n", "download.timeout_s"),
        ("pipeline:\n  retry_delay_s: .inf\n", "pipeline.retry_delay_s"),
        ("train:\n  seed:\n    augment:\n      blur: .nan\n", "train.seed.augment.blur"),
    ],
)
def test_non_finite_numbers_are_refused(tmp_path: Path, yaml_text: str, key: str):
    message = _error(_write(tmp_path, yaml_text))
    assert f": {key}: must be a finite number" in message


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("train:\n  seed:\n    epochs: 100000000000\n", "train.seed.epochs"),
        ("train:\n  seed:\n    batch_size: 100000000000\n", "train.seed.batch_size"),
        ("evaluate:\n  batch_size: 100000000000\n", "evaluate.batch_size"),
        ("predict:\n  batch_size: 100000000000\n", "predict.batch_size"),
        ("predict:\n  workers: 100000\n", "predict.workers"),
        ("download:\n  retries: 1000\n", "download.retries"),
        ("download:\n  timeout_s: 1.0e+300\n", "download.timeout_s"),
        ("split:\n  seed: -1\n", "split.seed"),
        ("train:\n  seed:\n    seed: 100000000000000000000\n", "train.seed.seed"),
        ("report:\n  n_misclassified: 100000000\n", "report.n_misclassified"),
    ],
)
def test_absurd_sizes_are_refused(tmp_path: Path, yaml_text: str, key: str):
    message = _error(_write(tmp_path, yaml_text))
    assert f": {key}: must be " in message


def test_error_line_reads_like_the_key_path(tmp_path: Path):
    path = _write(tmp_path, "train:\n  seed:\n    lr: -1\n")
    assert _error(path) == f"{path}: train.seed.lr: must be > 0 (got -1)"


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_device_strings_torch_knows_are_accepted(tmp_path: Path, device: str):
    p = load_params(_write(tmp_path, f"train:\n  seed:\n    device: {device}\n"))
    assert p.recipe("seed").device == device


@pytest.mark.parametrize("device", ["cudaXYZ", "cuda:", "cuda:-1", "CPU", "gpu", "cuda:0 ", ""])
def test_other_device_strings_are_refused(tmp_path: Path, device: str):
    message = _error(_write(tmp_path, yaml.safe_dump({"train": {"seed": {"device": device}}})))
    assert ": train.seed.device: must be auto, cpu, mps, cuda or cuda:N" in message


# --- the file itself ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "line", "what"),
    [
        ("split:\n  seed: 1\n  val_fraction: [0.3\n", 4, "expected ',' or ']'"),
        ("split:\n  seed: 1\n    val_fraction: 0.3\n", 3, "mapping values are not allowed"),
        ("split: !!python/object/apply:os.system [echo hi]\n", 1, "python/object/apply"),
        ("split:\n  seed: !!python/name:os.system\n", 2, "python/name"),
        (b"split:\n  seed: 1\n  val_fraction: 0.3 # caf\xe9\n", 3, "not UTF-8 text (byte 0xe9)"),
        ("split:\n  seed: 1\x01\n", 2, "control character U+0001"),
        ("split:\n  seed: 2024-13-45\n", 2, "month must be in 1..12"),
        ("split:\n  seed: !!float\n", 2, "tags ('!!float') are not allowed"),
    ],
)
def test_unreadable_yaml_names_the_file_and_line(
    tmp_path: Path, content: str | bytes, line: int, what: str
):
    path = _write(tmp_path, content)
    message = _error(path)
    assert message.startswith(f"{path}:{line}: "), message
    assert what in message


@pytest.mark.parametrize("content", ["", "\n\n", "# all commented out\n", "{}\n", "---\n"])
def test_a_params_file_without_sections_is_an_error(tmp_path: Path, content: str):
    """An empty file used to run every stage on built-in defaults, silently."""
    assert "has no stage sections" in _error(_write(tmp_path, content))


@pytest.mark.parametrize(
    ("content", "line", "key"),
    [
        ("split:\n  seed: 1\nevaluate:\n  batch_size: 10\nsplit:\n  seed: 2\n", 5, "'split'"),
        ("train:\n  seed:\n    epochs: 1\n    lr: 0.1\n    epochs: 9\n", 5, "'epochs'"),
        ("models: {seed: seed, seed: seed}\n", 1, "'seed'"),
    ],
)
def test_duplicate_keys_are_errors(tmp_path: Path, content: str, line: int, key: str):
    """PyYAML lets the later one win; in a params file that hides an edit."""
    message = _error(_write(tmp_path, content))
    assert message.startswith(f"{tmp_path / 'params.yaml'}:{line}: duplicate key {key}"), message


def test_merge_keys_are_refused(tmp_path: Path):
    message = _error(_write(tmp_path, "split:\n  <<: {seed: 1}\n  seed: 2\n"))
    assert ":2: merge keys (<<) are not allowed" in message


def test_billion_laughs_is_refused_at_its_first_alias(tmp_path: Path):
    # a small one (9**5 strings): in-process, a loader that expands aliases must not eat the
    # machine; the full-size one runs in a memory-capped subprocess below
    text = _laughs(levels=5)
    path = _write(tmp_path, text)
    first_alias = next(i for i, ln in enumerate(text.splitlines(), 1) if "*a" in ln)
    assert _error(path) == f"{path}:{first_alias}: aliases (*name) are not allowed in a params file"


def test_a_quoted_value_is_cut_short(tmp_path: Path):
    """The error quotes what it got, but never more than a line's worth of it."""
    message = _error(_write(tmp_path, f"train:\n  seed:\n    epochs: {'x' * 50_000}\n"))
    assert message.startswith(f"{tmp_path / 'params.yaml'}: train.seed.epochs: must be an integer")
    nested = "[" * 10 + "1" + "]" * 10
    assert "train.seed.lr: must be a number" in _error(
        _write(tmp_path, f"train:\n  seed:\n    lr: {nested}\n")
    )


def test_odd_keys_stay_on_one_line(tmp_path: Path):
    message = _error(_write(tmp_path, yaml.safe_dump({"split": {"line\nbreak": 1}})))
    assert "split.'line\\nbreak': unknown key (expected one of: seed, val_fraction)" in message
    message = _error(_write(tmp_path, "download:\n  mirrors: [https://a.example/, 3]\n"))
    assert message.endswith(": download.mirrors[1]: must be a string (got 3)")


def test_nesting_depth_is_bounded(tmp_path: Path):
    """PyYAML's composer recurses once per level: 50,000 brackets were a RecursionError."""
    message = _error(_write(tmp_path, "split: " + "[" * 50_000 + "\n"))
    assert message.startswith(f"{tmp_path / 'params.yaml'}:1: nested deeper than")


def test_file_size_is_capped_before_parsing(tmp_path: Path):
    fits = "split:\n  seed: 7\n" + "#" * (MAX_PARAMS_BYTES - 20) + "\n"
    assert len(fits.encode()) <= MAX_PARAMS_BYTES
    assert load_params(_write(tmp_path, fits, "fits.yaml")).split.seed == 7
    too_big = _write(tmp_path, fits + "#" * 10, "big.yaml")
    assert f"larger than {MAX_PARAMS_BYTES} bytes" in _error(too_big)


def test_a_folder_or_fifo_is_not_read(tmp_path: Path):
    """A FIFO would block the read forever; a folder is no file."""
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    assert _error(fifo) == f"{fifo}: not a regular file"
    assert _error(tmp_path) == f"{tmp_path}: not a regular file"


# YAML fragments, good and hostile, that a fuzzed params file is assembled from
_FRAGMENTS = [
    b"train:", b"seed:", b"lr:", b"epochs:", b"split:", b"models:", b"predict:", b"model:",
    b"1e-3", b"5", b"-1", b".inf", b".nan", b"0x1F", b"2024-01-01", b"2024-13-45", b"yes", b"~",
    b"&a", b"*a", b"<<:", b"!!python/name:os.system", b"!!binary", b"!!float", b"!!int", b"[",
    b"]", b"{", b"}", b",", b"- ", b"? ", b": ", b"\n", b"  ", b"\t", b"#", b"'", b'"', b"---",
    b"...", b"%YAML 1.1", b"\xff", b"\x00", "\u2028".encode(), "\u00e9".encode(),
]  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=40))
def test_any_text_is_params_or_one_line_params_error(parts: list[bytes]):
    """Whatever the file holds: valid params, or a ParamsError of one short line; no traceback."""
    try:
        result = parse_params_yaml(b"".join(parts), "params.yaml")
    except ParamsError as exc:
        message = str(exc)
        assert message.startswith("params.yaml") and "\n" not in message, message
        assert len(message) <= MAX_ERROR_LINE
    else:
        assert isinstance(result, Params)


# --- the command line, in a real subprocess ---------------------------------------------------


def _run_cli(params: Path, memory_cap: int) -> tuple[int, str, float]:
    """`digitflow split --params <params>`: exit code, stderr and the child's peak RSS in MB."""

    def cap_address_space() -> None:  # the old code grew to gigabytes: keep the machine safe
        resource.setrlimit(resource.RLIMIT_AS, (memory_cap, memory_cap))

    peak_file = params.parent / "peak_kb"
    args = ["split", "--raw", str(params.parent / "raw"), "--out", str(params.parent / "out"),
            "--params", str(params)]  # fmt: skip
    proc = subprocess.Popen(
        digitflow_argv(peak_file, args),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=cap_address_space,
    )  # fmt: skip
    _, stderr = proc.communicate()
    return proc.returncode, stderr, peak_mb(peak_file)


@pytest.mark.parametrize(
    "content",
    [
        b"split:\n  seed: [1\n",
        b"split: !!python/object/apply:os.system [echo pwned]\n",
        b"split:\n  seed: \xff\n",
        b"split:\n  seed: 1\nsplit:\n  seed: 2\n",
        b"",
        b"split:\n  seed: -5\n",
    ],
    ids=["malformed", "python-tag", "not-utf8", "duplicate", "empty", "out-of-range"],
)
def test_cli_bad_params_exit_2_with_one_line(tmp_path: Path, content: bytes):
    params = _write(tmp_path, content)
    code, stderr, _ = _run_cli(params, memory_cap=1 << 30)
    assert code == 2, stderr
    assert stderr.count("\n") == 1 and str(params) in stderr, stderr
    assert not (tmp_path / "out").exists()


def test_cli_billion_laughs_is_short_and_bounded_in_memory(tmp_path: Path):
    params = _write(tmp_path, _laughs())
    code, stderr, peak_mb = _run_cli(params, memory_cap=1 << 30)
    assert code == 2, stderr[:500]
    assert stderr.count("\n") == 1 and len(stderr) < MAX_ERROR_LINE + 10
    assert "aliases (*name) are not allowed" in stderr
    assert peak_mb < 300, f"peak RSS {peak_mb:.0f} MB"
