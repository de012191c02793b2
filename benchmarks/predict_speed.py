"""Batch prediction speed against a plain PyTorch script and the decode floor, in one run.

Three contenders classify the same image files with the same model file:

* **A** ``digitflow predict`` end to end: the real CLI in a subprocess (start-up,
  model load and CSV writing included), under a wrapper that samples the peak RSS
  of its whole process tree (the CLI and any worker processes, summed);
* **B** the plain script a PyTorch user writes in ten minutes (``plain_script``,
  run as ``python -m benchmarks.predict_speed --plain ...``, end to end too):
  ``DataLoader(num_workers=2, batch_size=256)`` over the files, ``cv2.imread``
  grayscale, ``/255`` for the PNGs and the 20-line MNIST-style preprocessing
  (benchmarks.real_digits.mnist_style_baseline) for the photos, the model in eval mode;
* **C** the decode floor: ``cv2.imread`` alone in as many processes as cores
  (PNG: grayscale; JPEG: ``IMREAD_REDUCED_GRAYSCALE_4`` for 640x480, ``_8`` for phone size).

Sets, written once from the MNIST test digits into ``--workdir`` and reused by later
runs (so a before/after comparison reads the same files):

* ``png28``: 28x28 PNGs (10,000; ``--png N``);
* ``photo640``: 640x480 photo-like JPEGs (2,000; ``--photos N``): dark ink on
  shaded, noisy paper, random position, digit 20-80 % of the frame height;
* ``phone4032``: the same rendering at phone size, 4032x3024 (300; ``--phone N``).

``--quick`` makes the sets 1,000 / 200 / 30 files (about a minute and a half).
Each set runs interleaved A B C C B A (``--rounds`` times); a contender's figure is
the median of its runs. The targets (issue 17) are printed as PASS / FAIL / SKIP lines
and saved with every measurement in ``--out`` (benchmarks/results/predict_speed.json):

* A >= 2x B on png28 and photo640, >= 5x B on phone4032;
* A >= 25 % of C on png28, >= 50 % of C on photo640;
* accuracy of A not lower than the older code's (``--before DIR``: another checkout's
  `digitflow predict` runs in the same interleaved run, as A0: A0 A B C C B A A0) or
  than in ``--baseline`` (an earlier run's JSON): "unchanged";
* peak memory of A <= 1.5 GB; with ``--large`` (100,000 PNGs, A only) within +10 %
  of the png28 run's.

Ratios are what the targets are about; the absolute rates depend on the machine and
on what else runs on it. The exit code is 1 when a target fails.

    flock /tmp/digitflow-cpu.lock .venv/bin/python -m benchmarks.predict_speed \\
        [--quick] [--model data/models/robust/model.pt] [--baseline before.json] [--large]

``--make-inbox DIR`` only writes the example images of data/inbox.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from flows.paths import model_file
from tasks.config import load_params

ROOT = Path(__file__).resolve().parents[1]
PEAK_RSS_LIMIT_MB = 1.5e9 / 2**20  # 1.5 GB, in the MiB that peak_rss_mb counts
LARGE_PEAK_GROWTH = 0.10  # 100k files may peak at most 10 % above 10k files
LARGE_FILES = 100_000
PHOTO_SIZE = (480, 640)  # (height, width) of the rendered photos
PHONE_SIZE = (3024, 4032)  # (height, width): a 12 MP phone camera
DIGIT_HEIGHT = (0.2, 0.8)  # digit height as a fraction of the frame height
JPEG_QUALITY = 90
ACCURACY_TOLERANCE = 0.001  # "unchanged": at most 0.1 percentage point below the baseline
PLAIN_BATCH, PLAIN_WORKERS = 256, 2  # the plain script's DataLoader, as in the issue
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "digitflow-predict-speed"
# A wrapper that runs one command and samples its process tree every 20 ms (psutil): the
# summed RSS (worker processes count too) and each process's own CPU seconds, kept per
# pid (a forkserver's workers are not waited for by the command, so its rusage misses
# them). Also the command's own ru_maxrss.
MEASURE = (
    "import json, resource, subprocess, sys, time, psutil\n"
    "t = time.perf_counter()\n"
    "p = subprocess.Popen(sys.argv[1:])\n"
    "peak, cpu = 0, {}\n"
    "ps = psutil.Process(p.pid)\n"
    "while p.poll() is None:\n"
    "    try:\n"
    "        procs = [ps, *ps.children(recursive=True)]\n"
    "    except psutil.Error:\n"
    "        procs = []\n"
    "    rss = 0\n"
    "    for q in procs:\n"
    "        try:\n"
    "            with q.oneshot():\n"
    "                rss += q.memory_info().rss\n"
    "                c = q.cpu_times()\n"
    "                cpu[q.pid] = c.user + c.system\n"
    "        except psutil.Error:\n"
    "            pass\n"
    "    peak = max(peak, rss)\n"
    "    time.sleep(0.02)\n"
    "s = time.perf_counter() - t\n"
    "r = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(json.dumps({'rc': p.returncode, 'seconds': s, 'peak_rss_mb': max(peak / 2**20,"
    " r.ru_maxrss / 1024), 'main_rss_mb': r.ru_maxrss / 1024,"
    " 'cpu_s': sum(cpu.values())}))\n"
)


@dataclass(frozen=True)
class ImageSet:
    """One benchmark set: its files, how the plain script reads them, the decode floor's flag."""

    name: str
    kind: str  # "png" (MNIST-like, /255) | "photo" (the 20-line preprocessing)
    size: tuple[int, int] | None  # (height, width) of rendered photos; None: 28x28 PNGs
    floor_flag: int  # cv2.imread flag of the decode floor
    min_vs_plain: float  # target: A's rate / B's rate
    min_vs_floor: float | None  # target: A's rate / C's rate (None: no target)


SETS = {
    "png28": ImageSet("png28", "png", None, cv2.IMREAD_GRAYSCALE, 2.0, 0.25),
    "photo640": ImageSet("photo640", "photo", PHOTO_SIZE, cv2.IMREAD_REDUCED_GRAYSCALE_4, 2.0, 0.5),
    "phone4032": ImageSet(
        "phone4032", "photo", PHONE_SIZE, cv2.IMREAD_REDUCED_GRAYSCALE_8, 5.0, None
    ),
}
FULL = {"png28": 10_000, "photo640": 2_000, "phone4032": 300}  # the sizes the issue names
QUICK = {"png28": 1_000, "photo640": 200, "phone4032": 30}


# --------------------------------------------------------------------------- the image sets


def render_photo(
    digit: np.ndarray, rng: np.random.Generator, size: tuple[int, int] = PHOTO_SIZE
) -> np.ndarray:
    """A 28x28 MNIST digit as a photo (h, w) of dark ink on light, shaded, noisy paper."""
    h, w = size
    rows, cols = np.flatnonzero(digit.max(1) > 0), np.flatnonzero(digit.max(0) > 0)
    crop = digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    k = rng.uniform(*DIGIT_HEIGHT) * h / crop.shape[0]
    size = (min(w - 2, max(1, round(crop.shape[1] * k))), max(1, round(crop.shape[0] * k)))
    ink = np.clip(cv2.resize(crop, size, interpolation=cv2.INTER_CUBIC) / 255.0, 0, 1)
    ih, iw = ink.shape
    y0, x0 = int(rng.integers(0, h - ih + 1)), int(rng.integers(0, w - iw + 1))
    cover = np.zeros((h, w), np.float32)
    cover[y0 : y0 + ih, x0 : x0 + iw] = ink
    # a row and a column broadcast: the same values as a full np.mgrid, far less memory
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    paper = (
        rng.uniform(170, 235)
        + rng.uniform(-25, 25) * (xx / w - 0.5)  # uneven lighting
        + rng.uniform(-25, 25) * (yy / h - 0.5)
    )
    img = paper * (1 - cover) + rng.uniform(10, 70) * cover
    img += rng.normal(0, rng.uniform(2, 8), (h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_pngs(folder: Path, images: np.ndarray, labels: np.ndarray, repeat: int = 1) -> int:
    """``{index}_{label}.png`` for every image (``repeat`` times over, in subfolders)."""
    n = 0
    for r in range(repeat):
        sub = folder / f"r{r:02d}" if repeat > 1 else folder
        sub.mkdir(parents=True, exist_ok=True)
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            ok, buf = cv2.imencode(".png", img)
            assert ok
            (sub / f"{i:05d}_{label}.png").write_bytes(buf.tobytes())
            n += 1
    return n


def write_photos(
    folder: Path,
    images: np.ndarray,
    labels: np.ndarray,
    seed: int,
    size: tuple[int, int] = PHOTO_SIZE,
) -> None:
    """``{index}_{label}.jpg``: each digit rendered as a (h, w) photo (``render_photo``)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        ok, buf = cv2.imencode(
            ".jpg", render_photo(img, rng, size), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
        )
        assert ok
        (folder / f"{i:05d}_{label}.jpg").write_bytes(buf.tobytes())


def make_set(work: Path, spec: ImageSet, n: int, images: np.ndarray, labels: np.ndarray) -> Path:
    """The folder of ``n`` files of ``spec``, written unless a complete one is there."""
    folder = work / f"{spec.name}_{n}"
    done = folder / ".complete"  # hidden: predict skips it; written last
    if done.exists():
        return folder
    if spec.size is None:
        write_pngs(folder, images[:n], labels[:n])
    else:
        write_photos(folder, images[:n], labels[:n], seed=0, size=spec.size)
    done.write_text("")
    return folder


# The example images of data/inbox (the DVC predict stage's input): test digits, varied.
INBOX = [  # (test index, kind)
    (0, "photo"), (1, "photo"), (2, "photo"), (3, "ruled"),
    (4, "photo"), (8, "transparent"), (11, "mnist"), (18, "photo"),
]  # fmt: skip


def make_inbox(folder: Path, images: np.ndarray, labels: np.ndarray) -> list[Path]:
    """Write the small example images of data/inbox (each well under 50 KB)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    written = []
    for index, kind in INBOX:
        digit, label = images[index], labels[index]
        if kind == "mnist":  # already MNIST-like: 28x28, white on black
            name, data = f"mnist_{label}.png", cv2.imencode(".png", digit)[1]
        elif kind == "transparent":  # black ink on a transparent background
            rgba = np.zeros((112, 112, 4), np.uint8)
            rgba[..., 3] = cv2.resize(digit, (112, 112), interpolation=cv2.INTER_CUBIC)
            name, data = f"transparent_{label}.png", cv2.imencode(".png", rgba)[1]
        else:
            img = render_photo(digit, rng, (240, 320))
            if kind == "ruled":  # ruled paper: lines under the ink
                ruled = img.copy()
                ruled[12::24] = np.minimum(ruled[12::24], 140)
                img = np.minimum(img, ruled)
            ext = ".png" if kind == "ruled" else ".jpg"
            name, data = f"{kind}_{label}{ext}", cv2.imencode(ext, img)[1]
        path = folder / name
        path.write_bytes(data.tobytes())
        written.append(path)
    return written


def test_digits(test_npz: Path) -> tuple[np.ndarray, np.ndarray]:
    """The MNIST test digits: the split stage's test.npz, else the raw files in $MNIST_MIRROR."""
    if test_npz.is_file():
        from tasks.data import load_arrays

        return load_arrays(test_npz)
    mirror = os.environ.get("MNIST_MIRROR")
    if not mirror:
        sys.exit(f"no {test_npz} and no $MNIST_MIRROR: run `dvc repro split` or pass --test")
    from tasks.idx import read_images, read_labels

    return (
        read_images(Path(mirror) / "t10k-images-idx3-ubyte.gz"),
        read_labels(Path(mirror) / "t10k-labels-idx1-ubyte.gz"),
    )


# --------------------------------------------------------------------------- B: plain script


def plain_script(folder: Path, model_path: Path, out: Path, kind: str) -> None:
    """The plain PyTorch script: DataLoader over the files, the same model, CSV path,label."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    from benchmarks.real_digits import mnist_style_baseline
    from tasks.model import load_model

    paths = sorted(str(p) for p in folder.iterdir() if not p.name.startswith("."))

    class Files(Dataset):
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int) -> torch.Tensor:
            img = cv2.imread(paths[i], cv2.IMREAD_GRAYSCALE)
            if kind == "photo":
                img = mnist_style_baseline(img)
                if img is None:  # no ink found: a blank input
                    img = np.zeros((28, 28), np.uint8)
            return torch.from_numpy(img).float().div(255).unsqueeze(0)

    loaded = load_model(model_path)
    model = loaded.model.eval()
    loader = DataLoader(Files(), batch_size=PLAIN_BATCH, num_workers=PLAIN_WORKERS)
    labels = []
    with torch.no_grad():
        for x in loader:
            labels += model((x - loaded.mean) / loaded.std).argmax(1).tolist()
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows((p, loaded.classes[k]) for p, k in zip(paths, labels, strict=True))


# --------------------------------------------------------------------------- C: decode floor


def _decode_all(job: tuple[list[str], int]) -> int:
    paths, flag = job
    return sum(cv2.imread(p, flag) is not None for p in paths)


def decode_floor(folder: Path, flag: int, processes: int) -> dict[str, Any]:
    """cv2.imread of every file in ``processes`` processes, one slice each, timed once started.

    Spawned, not forked: a fork of this process, whose OpenCV calls (writing the sets)
    started OpenCV's thread pool, can hang in the child's first OpenCV call.
    """
    paths = sorted(str(p) for p in folder.iterdir() if not p.name.startswith("."))
    jobs = [(paths[i::processes], flag) for i in range(processes)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes, initializer=cv2.setNumThreads, initargs=(1,)) as pool:
        pool.map(_decode_all, [([], flag)] * processes)  # started and imported: not timed
        t = time.perf_counter()
        decoded = sum(pool.map(_decode_all, jobs))
        seconds = time.perf_counter() - t
    return {"seconds": seconds, "files": len(paths), "decoded": decoded,
            "images_per_s": len(paths) / seconds}  # fmt: skip


# --------------------------------------------------------------------------- A and B, timed


def measured(cmd: Sequence[str], root: Path = ROOT) -> dict[str, Any]:
    """Run ``cmd`` in ``root`` under the MEASURE wrapper: seconds, exit code, peak RSS, CPU."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, *cmd], cwd=root, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"measure wrapper failed: {proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["rc"] not in (0, 1):  # 1: predict with some rows not ok (counted below)
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {result['rc']}: {proc.stderr[-2000:]}")
    return result


def scored(result: dict[str, Any], out: Path) -> dict[str, Any]:
    """Add files, rows not ok, accuracy (the label is the file name's suffix) and img/s."""
    with out.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    truth = [Path(r["path"]).stem.rsplit("_", 1)[1] for r in rows]
    result["files"] = len(rows)
    result["not_ok"] = sum(r.get("status", "ok") != "ok" for r in rows)
    result["accuracy"] = float(np.mean([r["label"] == t for r, t in zip(rows, truth, strict=True)]))
    result["images_per_s"] = len(rows) / result["seconds"]
    out.unlink()
    return result


def run_digitflow(
    folder: Path, model: Path, out: Path, *extra: str, root: Path = ROOT
) -> dict[str, Any]:
    """A: `digitflow predict` end to end (python -m flows.cli, as the installed script runs it).

    ``root``: the checkout whose code runs (``--before``: an older one, as A0).
    """
    cmd = [sys.executable, "-m", "flows.cli", "predict", str(folder), "--model", str(model),
           "--out", str(out), "--no-progress", "--allow-failures", *extra]  # fmt: skip
    return scored(measured(cmd, root), out)


def run_plain(folder: Path, model: Path, out: Path, kind: str) -> dict[str, Any]:
    """B: the plain script end to end, in its own process."""
    cmd = [sys.executable, "-m", "benchmarks.predict_speed", "--plain", str(folder),
           "--model", str(model), "--plain-out", str(out), "--plain-kind", kind]  # fmt: skip
    return scored(measured(cmd), out)


# --------------------------------------------------------------------------- targets


def _check(name: str, value: str, target: str, passed: bool | None, note: str = "") -> dict:
    return {"check": name, "value": value, "target": target, "passed": passed, "note": note}


def check_targets(results: dict[str, Any], baseline: dict[str, Any] | None) -> list[dict]:
    """Each target as {check, value, target, passed (None: skipped), note}."""
    checks = []
    for name, r in results["sets"].items():
        spec = SETS[name]
        a, b, c = r["median"]["A"], r["median"]["B"], r["median"]["C"]
        small = "" if r["files"] == FULL[name] else f"{r['files']} files, not {FULL[name]:,}"
        checks.append(
            _check(
                f"{name}: digitflow / plain script", f"{a / b:.2f}x",
                f">= {spec.min_vs_plain:g}x", a / b >= spec.min_vs_plain, small,
            )
        )  # fmt: skip
        if spec.min_vs_floor is not None:
            checks.append(
                _check(
                    f"{name}: digitflow / decode floor", f"{a / c:.0%}",
                    f">= {spec.min_vs_floor:.0%}", a / c >= spec.min_vs_floor, small,
                )
            )  # fmt: skip
        acc = r["accuracy"]["A"]
        before = (baseline or {}).get("sets", {}).get(name)
        if "A0" in r["accuracy"]:  # --before: the older code, same run, same files
            before = {"files": r["files"], "accuracy": {"A": r["accuracy"]["A0"]}}
        if before is None or before["files"] != r["files"]:
            checks.append(
                _check(
                    f"{name}: accuracy unchanged",
                    f"{acc:.2%}",
                    "baseline",
                    None,
                    "no --before, nor a --baseline run of this set and size",
                )
            )
        else:
            was = before["accuracy"]["A"]
            checks.append(
                _check(
                    f"{name}: accuracy unchanged", f"{acc:.2%} (was {was:.2%})",
                    f">= {was - ACCURACY_TOLERANCE:.2%}", acc >= was - ACCURACY_TOLERANCE,
                )
            )  # fmt: skip
        checks.append(
            _check(
                f"{name}: peak memory", f"{r['peak_rss_mb']:.0f} MB",
                f"<= {PEAK_RSS_LIMIT_MB:.0f} MB (1.5 GB)", r["peak_rss_mb"] <= PEAK_RSS_LIMIT_MB,
            )
        )  # fmt: skip
    big, png = results.get("large"), results["sets"].get("png28")
    if big and png:
        limit = png["peak_rss_mb"] * (1 + LARGE_PEAK_GROWTH)
        checks.append(
            _check(
                "peak memory flat png28 -> 100k files",
                f"{big['peak_rss_mb']:.0f} MB vs {png['peak_rss_mb']:.0f} MB",
                f"<= {limit:.0f} MB (+{LARGE_PEAK_GROWTH:.0%})", big["peak_rss_mb"] <= limit,
            )
        )  # fmt: skip
    return checks


def print_checks(checks: list[dict[str, Any]]) -> None:
    for c in checks:
        word = {True: "PASS", False: "FAIL", None: "SKIP"}[c["passed"]]
        note = f" ({c['note']})" if c["note"] else ""
        print(f"{word}: {c['check']}: {c['value']} (target {c['target']}){note}")


def print_table(results: dict[str, Any]) -> None:
    print(
        "| set (files) | digitflow predict img/s | plain script img/s | decode floor img/s "
        "| digitflow / plain | digitflow / floor | accuracy digitflow / plain | peak RSS |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|")  # fmt: skip
    for name, r in results["sets"].items():
        a, b, c = (r["median"][k] for k in "ABC")
        print(
            f"| {name} ({r['files']:,}) | {a:,.0f} | {b:,.0f} | {c:,.0f} | {a / b:.2f}x "
            f"| {a / c:.0%} | {r['accuracy']['A']:.2%} / {r['accuracy']['B']:.2%} "
            f"| {r['peak_rss_mb']:.0f} MB |"
        )
    if not all("A0" in r["median"] for r in results["sets"].values()):
        return
    print()
    print(
        "| set (files) | before -> after img/s | vs plain script | vs decode floor "
        "| CPU ms/img | accuracy |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in results["sets"].items():
        a0, a, b, c = (r["median"][k] for k in ("A0", "A", "B", "C"))
        cpu, acc = r["cpu_ms_per_image"], r["accuracy"]
        print(
            f"| {name} ({r['files']:,}) | {a0:,.0f} -> {a:,.0f} ({a / a0:.2f}x) "
            f"| {a0 / b:.2f}x -> {a / b:.2f}x | {a0 / c:.0%} -> {a / c:.0%} "
            f"| {cpu['A0']:.2f} -> {cpu['A']:.2f} | {acc['A0']:.2%} -> {acc['A']:.2%} |"
        )


# --------------------------------------------------------------------------- main


def bench_set(
    spec: ImageSet,
    folder: Path,
    model: Path,
    work: Path,
    rounds: int,
    processes: int,
    before: Path | None = None,
) -> dict[str, Any]:
    """A B C C B A (``rounds`` times) on one set; every run, the medians, accuracies.

    With ``before`` (an older checkout), its `digitflow predict` runs too, as A0, on
    the outside: A0 A B C C B A A0.
    """
    out = work / "out.csv"
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "A": lambda: run_digitflow(folder, model, out),
        "B": lambda: run_plain(folder, model, out, spec.kind),
        "C": lambda: decode_floor(folder, spec.floor_flag, processes),
    }
    order = "ABCCBA"
    if before is not None:
        runners["A0"] = lambda: run_digitflow(folder, model, out, root=before)
        order = ["A0", *order, "A0"]
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in runners}
    for _ in range(rounds):
        for key in order:
            r = runners[key]()
            runs[key].append(r)
            print(f"  {spec.name} {key}: {r['images_per_s']:,.0f} img/s", flush=True)
    return {
        "files": runs["A"][0]["files"],
        "runs": runs,
        "median": {k: statistics.median(r["images_per_s"] for r in v) for k, v in runs.items()},
        "accuracy": {k: v[0]["accuracy"] for k, v in runs.items() if k != "C"},
        "cpu_ms_per_image": {
            k: statistics.median(1e3 * r["cpu_s"] / r["files"] for r in v)
            for k, v in runs.items()
            if k != "C"
        },
        "not_ok": runs["A"][0]["not_ok"],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs["A"]),
    }


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    served = load_params(ROOT / "params.yaml").predict.model  # the model predict uses
    ap.add_argument("--model", type=Path, default=ROOT / model_file(served))
    ap.add_argument("--test", type=Path, default=ROOT / "data/prepared/test.npz")
    ap.add_argument("--quick", action="store_true", help="small sets: 1,000 / 200 / 30 files")
    ap.add_argument("--png", type=int, help="28x28 PNGs (default 10,000)")
    ap.add_argument("--photos", type=int, help="640x480 photo JPEGs (default 2,000)")
    ap.add_argument("--phone", type=int, help="4032x3024 phone-size JPEGs (default 300)")
    ap.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    ap.add_argument("--rounds", type=int, default=1, help="A B C C B A this many times")
    ap.add_argument("--large", action="store_true", help="also 100,000 PNGs, A only (memory)")
    ap.add_argument("--baseline", type=Path, help="an earlier run's JSON: accuracy unchanged")
    ap.add_argument(
        "--before", type=Path,
        help="an older checkout: its digitflow predict runs too (A0), for a before/after table",
    )  # fmt: skip
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="the sets, kept")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/predict_speed.json")
    ap.add_argument("--make-inbox", type=Path, help="only write the data/inbox examples here")
    ap.add_argument("--plain", type=Path, help=argparse.SUPPRESS)  # B's own process
    ap.add_argument("--plain-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--plain-kind", choices=("png", "photo"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.plain:
        plain_script(args.plain, args.model, args.plain_out, args.plain_kind)
        return
    if args.make_inbox:
        for path in make_inbox(args.make_inbox, *test_digits(args.test)):
            print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")
        return
    if not args.model.is_file():
        sys.exit(f"no model at {args.model}: run `dvc repro train` or pass --model")
    sizes = dict(QUICK if args.quick else FULL)
    for name, flag in (("png28", args.png), ("photo640", args.photos), ("phone4032", args.phone)):
        if flag is not None:
            sizes[name] = flag
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    images, labels = test_digits(args.test)
    args.workdir.mkdir(parents=True, exist_ok=True)
    processes = os.cpu_count() or 1
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {processes} cpus",
        "model": str(args.model),
        "sets": {},
    }
    for name in args.sets:
        spec = SETS[name]
        n = min(sizes[name], len(images))
        print(f"{name}: {n} files", flush=True)
        folder = make_set(args.workdir, spec, n, images, labels)
        results["sets"][name] = bench_set(
            spec, folder, args.model, args.workdir, args.rounds, processes, args.before
        )
    if args.large:
        big = args.workdir / f"png28_x10_{LARGE_FILES}"
        if not (big / ".complete").exists():
            write_pngs(big, images, labels, repeat=LARGE_FILES // len(images))
            (big / ".complete").write_text("")
        results["large"] = run_digitflow(big, args.model, args.workdir / "out.csv")

    results["checks"] = check_targets(results, baseline)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"{results['date']}, {results['machine']}, model {results['model']}")
    print_table(results)
    print_checks(results["checks"])
    print(f"wrote {args.out}")
    if any(c["passed"] is False for c in results["checks"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
