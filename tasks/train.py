"""Train stage: the CNN on the training split, validated each epoch.

The dataset stays a uint8 tensor on the training device; batches are drawn by
index from a seeded permutation and normalized on the fly, so there is no
per-sample Python (the seed's DataLoader + ToTensor spent most of its time there).
"""

from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tasks.config import TrainParams, to_dict
from tasks.data import load_arrays
from tasks.model import (
    atomic_torch_save,
    build_model,
    normalize_uint8,
    pick_device,
    save_model,
)

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "digitflow-train-checkpoint"


@dataclass
class TrainResult:
    model_path: Path
    history: list[dict[str, float]]  # one row per epoch: epoch, loss, train_accuracy, val_*
    resumed_from_epoch: int  # 0 when trained from scratch


def _fingerprint(params: TrainParams, train_path: Path, val_path: Path) -> str:
    """Identity of a training run: params + data content. A checkpoint resumes only its own run."""
    h = hashlib.sha256(repr(sorted(to_dict(params).items())).encode())
    for p in (train_path, val_path):
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def seed_everything(seed: int) -> None:
    """Same seed on CPU -> same numbers."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


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


def train_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer,
    images: torch.Tensor, labels: torch.Tensor, order: torch.Tensor,
    batch_size: int, mean: float, std: float, progress: Any = None,
) -> tuple[float, float]:  # fmt: skip
    """One pass over ``images`` in ``order``; returns (mean loss, accuracy)."""
    model.train()
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        x = normalize_uint8(images[idx], mean, std)  # (B, 1, 28, 28) float32
        y = labels[idx].long()  # (B,)
        logits = model(x)  # (B, 10)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # accumulate on device: a .item() per batch would sync every step
        loss_sum += loss.detach() * len(idx)
        correct += (logits.argmax(1) == y).sum()
        if progress is not None:
            progress.update(len(idx))
    n = len(order)
    return loss_sum.item() / n, correct.item() / n


def _progress(total: int, desc: str, enabled: bool | None) -> Any:
    """A tqdm bar on a terminal, nothing otherwise (logs stay clean in DVC/CI)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True)


def train(
    train_path: Path,
    val_path: Path,
    model_path: Path,
    live_dir: Path,
    checkpoint_path: Path,
    params: TrainParams,
    progress: bool | None = None,
) -> TrainResult:
    """Train ``params.model`` and write the self-describing model file.

    After each epoch a resume checkpoint is written to ``checkpoint_path``; a
    rerun of the same run (same params and data) continues from it, and it is
    removed once the model file is written. Per-epoch metrics go through
    dvclive to ``live_dir`` (metrics.json + plots/metrics/*.tsv).
    """
    from dvclive import Live

    device = pick_device(params.device)
    mean, std = params.normalize.mean, params.normalize.std
    seed_everything(params.seed)
    train_x, train_y = load_arrays(train_path)
    val_x, val_y = load_arrays(val_path)
    # (N, 28, 28) uint8 on the device: 33 MB for MNIST, cheap to keep resident
    xs, ys = torch.from_numpy(train_x).to(device), torch.from_numpy(train_y).to(device)
    vx, vy = torch.from_numpy(val_x).to(device), torch.from_numpy(val_y).to(device)

    model = build_model(params.model).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr)
    fingerprint = _fingerprint(params, train_path, val_path)
    history: list[dict[str, float]] = []
    start = 0
    if checkpoint_path.is_file():
        ckpt = torch.load(checkpoint_path, map_location=device, weights_only=True)
        if ckpt.get("format") == CHECKPOINT_FORMAT and ckpt.get("fingerprint") == fingerprint:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            torch.set_rng_state(ckpt["rng_state"])
            history, start = list(ckpt["history"]), int(ckpt["epoch"])
            log.info("resuming from %s after epoch %d", checkpoint_path, start)
        else:
            log.info("ignoring %s: it belongs to another run (params or data differ)", checkpoint_path)

    # dvclive rewrites its folder from scratch; on resume, replay the finished epochs
    with Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None) as live:
        for row in history:
            _log_epoch(live, row)
        for epoch in range(start + 1, params.epochs + 1):
            # a per-epoch generator: the order depends only on (seed, epoch), so resume is exact
            gen = torch.Generator().manual_seed(params.seed * 1_000_003 + epoch)
            order = torch.randperm(len(xs), generator=gen).to(device)
            bar = _progress(len(xs), f"epoch {epoch}/{params.epochs}", progress)
            loss, acc = train_epoch(
                model, optimizer, xs, ys, order, params.batch_size, mean, std, bar
            )
            if bar is not None:
                bar.close()
            val_loss, val_acc, _ = evaluate_arrays(model, vx, vy, mean, std)
            row = {
                "epoch": epoch, "loss": loss, "train_accuracy": acc,
                "val_loss": val_loss, "val_accuracy": val_acc,
            }  # fmt: skip
            history.append(row)
            _log_epoch(live, row)
            log.info(
                "epoch %d/%d loss %.4f train_acc %.4f val_loss %.4f val_acc %.4f",
                epoch, params.epochs, loss, acc, val_loss, val_acc,
            )  # fmt: skip
            atomic_torch_save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "fingerprint": fingerprint,
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng_state": torch.get_rng_state(),
                    "history": history,
                },
                checkpoint_path,
            )

    final = history[-1]
    save_model(
        model_path, model, arch=params.model, mean=mean, std=std,
        params=to_dict(params),
        metrics={k: v for k, v in final.items() if k != "epoch"},
    )  # fmt: skip
    checkpoint_path.unlink(missing_ok=True)
    return TrainResult(model_path=model_path, history=history, resumed_from_epoch=start)


def _log_epoch(live: Any, row: dict[str, float]) -> None:
    live.log_metric("train/loss", row["loss"])
    live.log_metric("train/accuracy", row["train_accuracy"])
    live.log_metric("val/loss", row["val_loss"])
    live.log_metric("val/accuracy", row["val_accuracy"])
    live.next_step()
