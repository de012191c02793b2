"""Hostile model files: compression bombs, oversized files and tampered fields are refused.

Every file here starts from a real trained model file (fixture ``trained_model_path``),
edited and re-saved with torch.save, or re-zipped the way an attacker would.
"""

from __future__ import annotations

import math
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from tasks.model import MAX_ZIP_DIRECTORY, ModelFileError, load_model, max_model_bytes

SENTINEL = 77_777  # numel of the placeholder tensor: a BININT in the pickle, unique there
CHUNK = 1 << 20


def write_bomb(model_path: Path, out: Path, unpacked: int) -> Path:
    """A valid-looking model file whose extra tensor unpacks to ``unpacked`` bytes of zeros.

    A small uint8 placeholder is saved by torch; in the re-zipped copy its record holds
    ``unpacked`` deflated zeros (streamed: nothing big in memory) and its size in the pickle
    is patched to match, so torch.load would allocate and accept all of it.
    """
    blob = torch.load(model_path, weights_only=True)
    blob["params"]["padding"] = torch.zeros(SENTINEL, dtype=torch.uint8)
    plain = out.with_suffix(".plain")
    torch.save(blob, plain)
    old_int, new_int = (b"J" + struct.pack("<i", n) for n in (SENTINEL, unpacked))
    zeros = bytes(CHUNK)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            if info.file_size == SENTINEL:  # the placeholder's storage record
                record = zipfile.ZipInfo(info.filename)
                record.compress_type = zipfile.ZIP_DEFLATED
                with dst.open(record, "w", force_zip64=True) as w:
                    for start in range(0, unpacked, CHUNK):
                        w.write(zeros[: min(CHUNK, unpacked - start)])
                continue
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                assert data.count(old_int) == 2  # the storage's numel and the tensor's shape
                data = data.replace(old_int, new_int)
            dst.writestr(info.filename, data)
    plain.unlink()
    return out


def _peak_rss_mb(model: Path) -> tuple[float, str]:
    """Load ``model`` in a fresh process: (its peak RSS in MB, what load_model said)."""
    # VmHWM, not ru_maxrss: that one starts at pytest's own peak in a forked child and
    # survives exec, so late in a session both runs would report pytest's memory
    code = (
        "import re, sys\n"
        "from tasks.model import load_model, ModelFileError\n"
        "try:\n"
        "    load_model(sys.argv[1]); said = 'loaded'\n"
        "except ModelFileError as e:\n"
        "    said = str(e)\n"
        "status = open('/proc/self/status').read()\n"
        "print(int(re.search(r'VmHWM:\\s+(\\d+)', status)[1]) / 1024)\n"
        "print(said)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(model)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    peak, said = proc.stdout.split("\n", 1)
    return float(peak), said.strip()


@pytest.mark.slow
def test_compression_bomb_is_refused_before_it_is_unpacked(
    trained_model_path: Path, tmp_path: Path
):
    unpacked = 2 * max_model_bytes()  # twice what the widest allowed network needs (~310 MB)
    bomb = write_bomb(trained_model_path, tmp_path / "bomb.pt", unpacked)
    assert bomb.stat().st_size < unpacked / 100  # small on disk: it is a bomb
    peak_bomb, said = _peak_rss_mb(bomb)
    peak_model, said_model = _peak_rss_mb(trained_model_path)
    assert said_model == "loaded"
    assert "not a digitflow model file" in said and "unpack" in said, said
    # the bomb costs no more than loading the real model (before: +its unpacked size)
    assert peak_bomb < peak_model + 32, (peak_bomb, peak_model)


def test_small_compressed_file_within_the_limit_loads(trained_model_path: Path, tmp_path: Path):
    """The control for the bomb: the same surgery, a few KB of padding, is still a model."""
    small = write_bomb(trained_model_path, tmp_path / "small.pt", 4096)
    loaded = load_model(small)
    assert loaded.params["padding"].numel() == 4096


def test_oversized_file_is_refused_without_reading_it(tmp_path: Path):
    big = tmp_path / "big.pt"
    with big.open("wb") as fh:
        fh.truncate(max_model_bytes() + 1)  # sparse: no disk, and nothing may read it
    with pytest.raises(ModelFileError, match="over the .* limit"):
        load_model(big)


def test_zip_with_a_huge_directory_is_refused_before_parsing(tmp_path: Path):
    many = tmp_path / "many.pt"
    with zipfile.ZipFile(many, "w") as z:
        # ~60 bytes of directory each: just over the cap, parsed it would be ~20 MB of objects
        for i in range(MAX_ZIP_DIRECTORY // 50):
            z.writestr(f"archive/{i}", b"")
    with pytest.raises(ModelFileError, match="zip directory is over"):
        load_model(many)


def _set(path: tuple, value) -> Callable[[dict], None]:
    def edit(blob: dict) -> None:
        target = blob
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


def _weights(fill: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    def edit(blob: dict) -> None:
        name = "features.0.weight"
        blob["state_dict"][name] = fill(blob["state_dict"][name])

    return edit


def _one(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def fill(w: torch.Tensor) -> torch.Tensor:
        w = w.clone()
        w.view(-1)[0] = value
        return w

    return fill


TAMPERED: dict[str, Callable[[dict], None]] = {
    "normalize is a list": _set(("normalize",), [0, 1]),
    "std is a string": _set(("normalize", "std"), "abc"),
    "std is 0": _set(("normalize", "std"), 0.0),
    "std is negative": _set(("normalize", "std"), -0.3),
    "mean is NaN": _set(("normalize", "mean"), math.nan),
    "std is inf": _set(("normalize", "std"), math.inf),
    "std is a bool": _set(("normalize", "std"), True),
    "a NaN weight": _weights(_one(math.nan)),
    "an infinite weight": _weights(_one(math.inf)),
    "integer weights": _weights(lambda w: w.round().to(torch.int32)),
    "double weights": _weights(lambda w: w.double()),
    "weights that overflow": _weights(lambda w: torch.full_like(w, 3e38)),
    "nine classes": _set(("classes",), [str(d) for d in range(9)]),
    "classes are ints": _set(("classes",), list(range(10))),
    "classes is a string": _set(("classes",), "0123456789"),
    "duplicate classes": _set(("classes",), ["0"] * 10),
    "format version is a tensor": _set(("format_version",), torch.tensor([1, 2])),
    "architecture is a list": _set(("arch",), ["seed"]),
    "a huge width": lambda blob: blob.update(arch="improved", arch_kwargs={"width": 10**7}),
    "unknown switch": _set(("arch_kwargs",), {"depth": 3}),
    "params is a string": _set(("params",), "abc"),
    "history of numbers": _set(("history",), [1, 2]),
    "state_dict is a list": _set(("state_dict",), [1, 2]),
}


@pytest.mark.parametrize("case", TAMPERED)
def test_tampered_model_file_is_refused_in_words(
    case: str, trained_model_path: Path, tmp_path: Path
):
    blob = torch.load(trained_model_path, weights_only=True)
    TAMPERED[case](blob)
    path = tmp_path / "tampered.pt"
    torch.save(blob, path)
    with pytest.raises(ModelFileError) as refused:
        load_model(path)
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)


def test_unedited_resave_still_loads(trained_model_path: Path, tmp_path: Path):
    """The control for the tampered cases: load, re-save unchanged, load again."""
    path = tmp_path / "resaved.pt"
    torch.save(torch.load(trained_model_path, weights_only=True), path)
    assert load_model(path).classes == [str(d) for d in range(10)]


def test_predict_cli_refuses_a_tampered_model_with_exit_2(trained_model_path: Path, tmp_path: Path):
    """No traceback and no NaN probabilities: one line naming the file, exit 2, no output."""
    blob = torch.load(trained_model_path, weights_only=True)
    _weights(lambda w: torch.full_like(w, 3e38))(blob)  # finite, but the outputs overflow
    model = tmp_path / "overflow.pt"
    torch.save(blob, model)
    image = tmp_path / "digit.png"
    digit = Image.new("L", (28, 28), 0)
    digit.paste(255, (12, 4, 16, 24))  # a "1": ink, so a model is really asked
    digit.save(image)
    out = tmp_path / "preds.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "predict", str(image), "--model", str(model),
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and str(model) in proc.stderr
    assert not out.exists()
