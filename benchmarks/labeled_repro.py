"""Benchmark: the whole pipeline with 250 labelled photos in data/labeled vs without them.

Runs every dvc.yaml stage (benchmarks/pipeline.py's run_pipeline) four times, side by
side, each in its own scratch folder, interleaved A B B A: A with an empty labelled-images
inbox, B with ``--count`` labelled photos in ``data/labeled/<label>/``; each figure is
the mean of its two runs. The photos stand in for a user's own: phone-size JPEGs (longer
side ``--side`` px) rendered by tasks/render.py from MNIST *training* digits, so the
labelled stage decodes photo-sized files and the robust recipe trains on them
(``labeled_weight``). Never real dev-set
images: those are a measuring stick, not training data.
The target (issue: labelled images): the pipeline with them within 1.2x of without.

    MNIST_MIRROR=../shared/mnist flock /tmp/digitflow-cpu.lock \\
        .venv/bin/python -m benchmarks.labeled_repro

Writes benchmarks/results/labeled_repro.json and prints a Markdown table and PASS/FAIL.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import yaml

from benchmarks.pipeline import ROOT, bench_env, run_pipeline
from tasks.config import RenderParams
from tasks.idx import read_images, read_labels
from tasks.render import render_photo

TARGET_RATIO = 1.2  # the pipeline with the labelled photos, at most this times without
JPEG_QUALITY = 90  # a phone camera's usual setting


def write_labelled(inbox: Path, count: int, side: int, seed: int) -> None:
    """``count`` rendered photos of MNIST training digits in ``inbox/<label>/``."""
    if count == 0:  # the empty inbox: no need to read 60,000 training digits
        return
    mirror = Path(os.environ["MNIST_MIRROR"])
    images = read_images(mirror / "train-images-idx3-ubyte.gz")
    labels = read_labels(mirror / "train-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(seed)
    p = RenderParams(seed=seed)
    for i, k in enumerate(rng.choice(len(images), size=count, replace=False)):
        photo = render_photo(images[k], p, rng)
        scale = side / max(photo.shape[:2])  # renders are small; a user's photos are not
        photo = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        ok, buf = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        assert ok, "OpenCV could not encode a JPEG"
        folder = inbox / str(int(labels[k]))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"photo{i:04d}.jpg").write_bytes(buf.tobytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=250, help="labelled photos (default 250)")
    ap.add_argument("--side", type=int, default=2000, help="photos' longer side, px")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/labeled_repro.json")
    args = ap.parse_args()
    env = bench_env()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    runs: dict[str, dict] = {}
    for name, count in (("without", 0), ("with", args.count), ("with", args.count), ("without", 0)):

        def setup(work: Path, count: int = count) -> None:
            write_labelled(work / "data/labeled", count, args.side, seed=0)

        print(f"--- pipeline {name} labelled photos ({count})", flush=True)
        with tempfile.TemporaryDirectory(prefix="digitflow-bench-") as tmp:
            stages, metrics = run_pipeline(Path(tmp), params, env, setup)
        run = runs.setdefault(name, {"repeats": [], "labelled_photos": count})
        run["repeats"].append(stages)
        run["metrics"] = metrics
    for run in runs.values():  # each stage's mean over the repeats
        names = run["repeats"][0]
        run["stages"] = {
            stage: {"wall_s": float(np.mean([r[stage]["wall_s"] for r in run["repeats"]]))}
            for stage in names
        }
        run["total_s"] = sum(r["wall_s"] for r in run["stages"].values())
    ratio = runs["with"]["total_s"] / runs["without"]["total_s"]
    summary = {"runs": runs, "ratio": ratio, "target": TARGET_RATIO, "cpu_count": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")

    names = list(runs["with"]["stages"])
    print("\n| stage | without (s) | with (s) |\n|---|---:|---:|")
    for stage in names:
        a, b = (runs[r]["stages"][stage]["wall_s"] for r in ("without", "with"))
        print(f"| {stage} | {a:.1f} | {b:.1f} |")
    print(f"| **total** | {runs['without']['total_s']:.1f} | {runs['with']['total_s']:.1f} |")
    real = runs["with"]["metrics"].get("robust", {}).get("real", {})
    print(f"labelled test images scored by evaluate@robust: {real.get('count', 0)}")
    verdict = "PASS" if ratio <= TARGET_RATIO else "FAIL"
    print(
        f"{verdict}: pipeline with {args.count} labelled photos {ratio:.2f}x the time without "
        f"(target <= {TARGET_RATIO}x)"
    )
    sys.exit(0 if verdict == "PASS" else 1)


if __name__ == "__main__":
    main()
