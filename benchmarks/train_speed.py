"""Training speed: wall time per epoch and time to reach a test accuracy, per recipe.

One run trains, on the same machine and back to back:

* ``reference``: the seed report's style (torchvision MNIST + ToTensor + DataLoader,
  batch 64; benchmarks/reference.py), test accuracy after each epoch;
* ``seed``: our loop with the default params (the same network, optimizer and batch;
  Glorot init, NHWC);
* ``seed-torch-init``: the same with PyTorch's default init, as the reference has;
* ``seed-bf16``: ``seed`` with ``amp`` (bf16 autocast);
* ``fast``: the improved network with BatchNorm, no augmentation, a one-epoch OneCycle;
* ``robust``: the prediction model's recipe (params.yaml ``train.robust``), on the
  pipeline's 70/30 split;
* ``improved``: the 20-epoch preset (params.yaml ``train.improved``).

Only the training steps are timed; the test-set evaluations between them are not. Our
recipes are evaluated ``evals`` times per epoch (the reference once per epoch), so the
seed-vs-reference comparison below uses epoch boundaries only, for equal footing.

    flock /tmp/digitflow-cpu.lock .venv/bin/python -m benchmarks.train_speed --raw data/raw
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.reference import train_reference
from tasks.config import AugmentParams, TrainParams, load_params, to_dict
from tasks.data import load_arrays
from tasks.model import evaluate_arrays, pick_device
from tasks.split import split_dataset
from tasks.train import build_training, seed_everything, train_epoch

# the seed report's 98.35 %, then 99.0 and 99.5 %; 98.0 % is one every recipe reaches
THRESHOLDS = (0.98, 0.9835, 0.99, 0.995)

ROOT = Path(__file__).resolve().parents[1]
IMPROVED_VAL_FRACTION = 0.1  # the improved preset holds out 10 % (the seed: 30 %)
SEED_CAP = 10  # the seed report's 5 epochs may end short of its 98.35 %: allow up to 10


@dataclass(frozen=True)
class Recipe:
    params: TrainParams
    val_fraction: float  # share of the 60k training images held out (not trained on)
    evals: int  # test evaluations per epoch
    # end after the first epoch at this test accuracy: params.epochs is then only a cap
    # (the seed recipe's constant rate does not depend on the epoch count)
    stop_at: float | None = None


def recipes() -> dict[str, Recipe]:
    """The recipes timed here; robust and improved as params.yaml defines them."""
    params = load_params(ROOT / "params.yaml")
    improved, robust = params.recipe("improved"), params.recipe("robust")
    split = params.split.val_fraction
    return {
        # the default params (Glorot init, NHWC): what `dvc repro` trains
        "seed": Recipe(TrainParams(epochs=SEED_CAP), 0.3, evals=4, stop_at=0.9835),
        # the same with PyTorch's default init, as the reference has: separates the speed of
        # our loop from what the init changes about the time to an accuracy
        "seed-torch-init": Recipe(
            TrainParams(epochs=SEED_CAP, init="torch"), 0.3, evals=4, stop_at=0.9835
        ),
        # the same with bf16 autocast (runs on this CPU's AMX units): numerically close to,
        # but not bit-equal with, seed
        "seed-bf16": Recipe(TrainParams(epochs=SEED_CAP, amp=True), 0.3, evals=4, stop_at=0.9835),
        # BatchNorm + OneCycle when only time-to-98.35 % matters: one short cycle, no augmentation
        "fast": Recipe(
            replace(improved, epochs=1, batch_size=256, dropout=0.0, augment=AugmentParams()),
            IMPROVED_VAL_FRACTION,
            evals=8,
        ),
        "robust": Recipe(robust, split, evals=1),
        "improved": Recipe(improved, IMPROVED_VAL_FRACTION, evals=1),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_recipe(
    recipe: Recipe, raw_dir: Path, device: torch.device, epochs: int | None = None
) -> dict[str, Any]:
    """Train one recipe; returns per-epoch wall times and (train_s, test accuracy) points."""
    params = replace(recipe.params, epochs=epochs or recipe.params.epochs)
    mean, std = params.normalize.mean, params.normalize.std
    with tempfile.TemporaryDirectory() as tmp:
        paths = split_dataset(raw_dir, Path(tmp), recipe.val_fraction, seed=42)
        (train_x, train_y), (test_x, test_y) = (
            load_arrays(paths["train"]),
            load_arrays(paths["test"]),
        )
    seed_everything(params.seed)
    xs, ys = torch.from_numpy(train_x).to(device), torch.from_numpy(train_y).to(device)
    tx, ty = torch.from_numpy(test_x).to(device), torch.from_numpy(test_y).to(device)
    model, step_model, optimizer, scheduler = build_training(params, device, len(xs))
    elapsed, epoch_s, points = 0.0, [], []
    for epoch in range(1, params.epochs + 1):
        # the same (seed, epoch) streams as tasks/train.py, so the numbers match a real run
        gen = torch.Generator().manual_seed(params.seed * 1_000_003 + epoch)
        order = torch.randperm(len(xs), generator=gen).to(device)
        aug_gen = torch.Generator(device).manual_seed(params.seed * 1_000_003 + epoch + 1)
        # cut the epoch into `evals` chunks of whole batches, evaluating after each
        n_batches = -(-len(order) // params.batch_size)
        cuts = [
            round(n_batches * k / recipe.evals) * params.batch_size for k in range(recipe.evals + 1)
        ]
        epoch_t = 0.0
        for k in range(recipe.evals):
            chunk = order[cuts[k] : min(cuts[k + 1], len(order))]
            if len(chunk) == 0:  # fewer batches than evaluations (tiny data)
                continue
            _sync(device)
            t0 = time.perf_counter()
            train_epoch(
                step_model, optimizer, xs, ys, chunk, params.batch_size, mean, std,
                augment=params.augment, aug_gen=aug_gen, scheduler=scheduler,
                channels_last=params.channels_last, amp=params.amp,
            )  # fmt: skip
            _sync(device)
            epoch_t += time.perf_counter() - t0
            _, acc, _ = evaluate_arrays(model, tx, ty, mean, std)
            points.append(
                {"epoch": epoch - 1 + (k + 1) / recipe.evals, "train_s": elapsed + epoch_t,
                 "test_accuracy": acc}
            )  # fmt: skip
        elapsed += epoch_t
        epoch_s.append(epoch_t)
        print(f"  epoch {epoch}: {epoch_t:.1f} s, test accuracy {points[-1]['test_accuracy']:.4f}")
        if recipe.stop_at is not None and points[-1]["test_accuracy"] >= recipe.stop_at:
            break
    return {
        "params": to_dict(params), "val_fraction": recipe.val_fraction,
        "n_train": len(xs), "epoch_s": epoch_s, "points": points,
    }  # fmt: skip


def run_reference(raw_dir: Path, device: torch.device, epochs: int) -> dict[str, Any]:
    """The seed-style reference, evaluated on the test set after each epoch.

    Like the seed recipe, it stops after the first epoch at 98.35 % (``epochs`` is a cap).
    """
    epoch_s: list[float] = []
    points: list[dict[str, float]] = []

    def on_epoch(epoch: int, elapsed: float, acc: float) -> None:
        epoch_s.append(elapsed - (points[-1]["train_s"] if points else 0.0))
        points.append({"epoch": epoch, "train_s": elapsed, "test_accuracy": acc})
        print(f"  epoch {epoch}: {epoch_s[-1]:.1f} s, test accuracy {acc:.4f}")

    train_reference(raw_dir, epochs=epochs, on_epoch=on_epoch, device=str(device), stop_at=0.9835)
    return {"val_fraction": 0.3, "n_train": 42_000, "epoch_s": epoch_s, "points": points}


def time_to(points: list[dict[str, float]], threshold: float, whole_epochs: bool = False):
    """Training seconds until test accuracy first reached ``threshold``; None if never."""
    for p in points:
        if whole_epochs and p["epoch"] != int(p["epoch"]):
            continue
        if p["test_accuracy"] >= threshold:
            return p["train_s"]
    return None


def _fmt(x: float | None, unit: str = " s") -> str:
    return "—" if x is None else f"{x:.1f}{unit}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Time-to-accuracy per recipe and the ratios the targets are about."""
    for r in results.values():
        r["mean_epoch_s"] = sum(r["epoch_s"]) / len(r["epoch_s"])
        r["final_test_accuracy"] = r["points"][-1]["test_accuracy"]
        r["time_to"] = {str(t): time_to(r["points"], t) for t in THRESHOLDS}
        r["time_to_whole_epochs"] = {str(t): time_to(r["points"], t, True) for t in THRESHOLDS}
    ref, seed = results.get("reference"), results.get("seed")
    ratios: dict[str, float | None] = {}
    if ref and seed:
        ratios["reference/seed epoch time"] = ref["mean_epoch_s"] / seed["mean_epoch_s"]
        ratios["reference/seed time to 98.35 % (epoch boundaries)"] = _ratio(
            ref["time_to_whole_epochs"]["0.9835"], seed["time_to_whole_epochs"]["0.9835"]
        )
    init = results.get("seed-torch-init")
    if ref and init:
        ratios["reference/seed-torch-init epoch time"] = ref["mean_epoch_s"] / init["mean_epoch_s"]
        ratios["reference/seed-torch-init time to 98.35 % (epoch boundaries)"] = _ratio(
            ref["time_to_whole_epochs"]["0.9835"], init["time_to_whole_epochs"]["0.9835"]
        )
    if seed:
        for name in ("seed-bf16", "fast", "improved"):
            if name in results:
                ratios[f"seed/{name} time to 98.35 %"] = _ratio(
                    seed["time_to"]["0.9835"], results[name]["time_to"]["0.9835"]
                )
    return ratios


def markdown(results: dict[str, dict[str, Any]], ratios: dict[str, Any]) -> str:
    head = "| recipe | train images | epochs | s / epoch | final test acc | " + " | ".join(
        f"to {t:.2%}" for t in THRESHOLDS
    )
    lines = [head + " |", "|" + "---|" * (5 + len(THRESHOLDS))]
    for name, r in results.items():
        cells = [
            name, f"{r['n_train']:,}", str(len(r["epoch_s"])), f"{r['mean_epoch_s']:.1f}",
            f"{r['final_test_accuracy']:.2%}",
            *(_fmt(r["time_to"][str(t)]) for t in THRESHOLDS),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v, '×')} |" for k, v in ratios.items()]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw", type=Path, default=Path("data/raw"), help="raw MNIST IDX files")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/train_speed.json"))
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    ap.add_argument("--recipes", nargs="+", default=None)
    ap.add_argument("--reference-epochs", type=int, default=10, help="cap; stops at 98.35 %%")
    ap.add_argument("--improved-epochs", type=int, default=None, help="default: the preset's")
    args = ap.parse_args()
    known = recipes()
    names = args.recipes or ["reference", *known]
    unknown = sorted(set(names) - {"reference", *known})
    if unknown:
        ap.error(f"unknown recipes: {', '.join(unknown)} (known: reference, {', '.join(known)})")

    device = pick_device(args.device)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        print(f"{name} on {device}:", flush=True)
        if name == "reference":
            results[name] = run_reference(args.raw, device, args.reference_epochs)
        else:
            epochs = args.improved_epochs if name == "improved" else None
            results[name] = run_recipe(known[name], args.raw, device, epochs)
    ratios = summarize(results)
    report = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "thresholds": THRESHOLDS, "recipes": results, "ratios": ratios,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print()
    print(markdown(results, ratios))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
