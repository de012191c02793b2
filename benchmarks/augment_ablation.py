"""What each training augmentation of the robust recipe buys, on MNIST and on real photos.

Trains the prediction model's recipe (params.yaml ``train.<models[predict.model]>``) on
the pipeline's split (data/prepared, from `dvc repro split`) once as it is and once per
variant with one augmentation switched off (or all of them), with the real training step
(tasks.train.train). Each model is scored on the MNIST test set (tasks.evaluate, as
the evaluate stage does) and on the real development set through `digitflow predict`
(benchmarks.real_digits: the CLI with default preprocessing). Never trains on the real
images: they only measure.

    flock /tmp/digitflow-cpu.lock .venv/bin/python -m benchmarks.augment_ablation \\
        [--variants full,no-stroke,...] [--folder ../shared/realdigits-dev]

About 1-1.5 minutes of CPU per variant here (2 cores). ``--models-dir DIR`` keeps the
trained models there and reuses each one whose recorded recipe equals its variant's, so a
rerun after a preprocessing change only re-scores. Prints a markdown table and writes
benchmarks/results/augment_ablation.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks import real_digits
from tasks.config import AugmentParams, TrainParams, load_params, to_dict
from tasks.evaluate import evaluate
from tasks.model import load_model
from tasks.train import train

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks/results/augment_ablation.json"
NO_AUGMENT = AugmentParams()
EVAL_BATCH = 1000  # MNIST test images per forward pass (inference only)

# name -> (what it changes, the recipe's augmentation -> the variant's)
VARIANTS: dict[str, tuple[str, Any]] = {
    "full": ("the recipe as in params.yaml", lambda a: a),
    "no-stroke": ("without stroke width (dilate/erode)", lambda a: replace(a, stroke=0.0)),
    "no-elastic": ("without elastic warps", lambda a: replace(a, elastic_px=0.0)),
    "no-shear": ("without shear (slant)", lambda a: replace(a, shear_deg=0.0)),
    "no-blur-contrast": (
        "without blur and contrast",
        lambda a: replace(a, blur=0.0, contrast=0.0),
    ),
    "affine-only": (
        "rotation, zoom and shift only (the improved preset's kind)",
        lambda a: replace(a, shear_deg=0.0, elastic_px=0.0, stroke=0.0, blur=0.0, contrast=0.0),
    ),
    "every-image": ("every image augmented (share 1)", lambda a: replace(a, share=1.0)),
    "none": ("no augmentation", lambda a: NO_AUGMENT),
}


def trained(model: Path, recipe: TrainParams) -> bool:
    """Whether ``model`` exists and was trained with exactly ``recipe``."""
    return model.is_file() and load_model(model).params == to_dict(recipe)


def score_variant(
    recipe: TrainParams, data: Path, folder: Path, work: Path, batch_size: int
) -> dict[str, Any]:
    """Train ``recipe`` into ``work`` (unless done); its MNIST test and real-set accuracy."""
    model = work / "model.pt"
    if not trained(model, recipe):
        train(
            data / "train.npz", data / "val.npz", model, work / "live", work / "ckpt.pt",
            recipe, progress=False,
        )  # fmt: skip
    mnist = evaluate(model, data / "test.npz", work / "evaluate", batch_size, 0, recipe.device)
    report = work / "real.json"
    with contextlib.redirect_stdout(io.StringIO()):  # its full report is in the JSON
        code = real_digits.main([str(folder), "--model", str(model), "--json", str(report)])
    if code != 0:
        raise SystemExit(f"benchmarks.real_digits failed with exit code {code}")
    real = json.loads(report.read_text())
    return {
        "mnist_accuracy": mnist.metrics["accuracy"],
        "real_accuracy": real["overall"]["accuracy"],
        "real_correct": real["overall"]["correct"],
        "real_n": real["overall"]["n"],
        "real_per_group": {g: s["accuracy"] for g, s in real["per_group"].items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of VARIANTS")
    ap.add_argument("--folder", type=Path, default=real_digits.DEFAULT_FOLDER)
    ap.add_argument("--data", type=Path, default=ROOT / "data/prepared")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--models-dir", type=Path, default=None, help="keep and reuse models here")
    args = ap.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants: {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    params = load_params(ROOT / "params.yaml")
    recipe_name = params.models[params.predict.model]
    recipe = params.recipe(recipe_name)
    rows = []
    for name in names:
        what, change = VARIANTS[name]
        variant = replace(recipe, augment=change(recipe.augment))
        with tempfile.TemporaryDirectory(prefix="digitflow-augabl-") as tmp:
            work = args.models_dir / name if args.models_dir else Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            result = score_variant(variant, args.data, args.folder, work, EVAL_BATCH)
        rows.append({"variant": name, "what": what, **result})
        print(
            f"{name}: MNIST {result['mnist_accuracy']:.2%}, real {result['real_accuracy']:.1%}",
            flush=True,
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"recipe": recipe_name, "rows": rows}, indent=2) + "\n")
    groups = list(rows[0]["real_per_group"]) if rows else []
    header = ["MNIST test", "real dev set", *groups]
    print(f"\n| variant of `train.{recipe_name}` | " + " | ".join(header) + " |")
    print("|---|" + "---|" * len(header))
    for r in rows:
        per = " | ".join(f"{r['real_per_group'][g]:.1%}" for g in groups)
        print(
            f"| {r['what']} | {r['mnist_accuracy']:.2%} | {r['real_accuracy']:.1%} "
            f"({r['real_correct']}/{r['real_n']}) | {per} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
