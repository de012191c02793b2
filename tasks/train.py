"""Train stage: the CNN on the training split, validated each epoch.

The dataset stays a uint8 tensor on the training device; batches are drawn by
index from a seeded permutation and normalized on the fly, so there is no
per-sample Python (the seed's DataLoader + ToTensor spent most of its time there).

The improved recipe adds, each behind a train.* param: per-sample random affine
augmentation of every batch on the device, a OneCycle learning-rate schedule,
channels_last, torch.compile and bf16 autocast. All off reproduces the seed recipe.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from tasks.config import AugmentParams, TrainParams, to_dict
from tasks.data import load_arrays
from tasks.model import (
    SIZE_MARGIN,
    TorchFileError,
    atomic_torch_save,
    build_model,
    evaluate_arrays,
    normalize_uint8,
    pick_device,
    safe_torch_load,
    save_model,
    state_nbytes,
)

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "digitflow-train-checkpoint"
# copies of the weights a checkpoint holds: the model, Adam's two moments, the best epoch's
CHECKPOINT_COPIES = 4
# ... plus the per-epoch history, the RNG state (5 KB) and the pickles: well under 1 MiB
CHECKPOINT_SLACK = 1 << 20
# The payload's entries: a checkpoint missing any is not one this code wrote.
CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scheduler", "rng_state", "history", "best")
# dvclive metric name -> history column; the same names in metrics.json and the plots
LIVE_METRICS = {
    "train/loss": "loss",
    "train/accuracy": "train_accuracy",
    "val/loss": "val_loss",
    "val/accuracy": "val_accuracy",
}


@dataclass
class TrainResult:
    model_path: Path
    history: list[dict[str, float]]  # one row per epoch: epoch, loss, train_accuracy, val_*
    resumed_from_epoch: int  # 0 when trained from scratch
    kept: dict[str, float]  # the history row of the epoch whose weights the model file holds


def save_checkpoint(path: Path, fingerprint: str, payload: dict[str, Any]) -> None:
    """Write the resume state with a SHA-256 of its bytes, atomically.

    The payload is serialized first and stored as a byte tensor beside its hash, so a
    damaged file (a flipped bit in the weights loads fine otherwise) is caught on resume.
    """
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    atomic_torch_save(
        {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": fingerprint,
            "sha256": hashlib.sha256(data).hexdigest(),
            "payload": torch.frombuffer(bytearray(data), dtype=torch.uint8),
        },
        path,
    )


def load_checkpoint(path: Path, fingerprint: str, max_bytes: int) -> dict[str, Any] | None:
    """The resume state in ``path`` if it belongs to this run (``fingerprint``), else None.

    Loaded on the CPU (torch.set_rng_state needs a CPU tensor); load_state_dict copies the
    weights and optimizer state to the training device.

    Raises TorchFileError when the file is not a checkpoint, is damaged or fails its hash.
    """
    outer = safe_torch_load(path, max_bytes)
    if not isinstance(outer, dict) or outer.get("format") != CHECKPOINT_FORMAT:
        raise TorchFileError("not a digitflow checkpoint (no header)")
    if outer.get("fingerprint") != fingerprint:
        return None
    payload = outer.get("payload")
    if not (isinstance(payload, torch.Tensor) and payload.dtype == torch.uint8):
        raise TorchFileError("no checksummed payload (written by an older digitflow?)")
    data = payload.numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != outer.get("sha256"):
        raise TorchFileError("its SHA-256 does not match its contents")
    state = safe_torch_load(io.BytesIO(data), max_bytes)
    if not isinstance(state, dict) or not all(k in state for k in CHECKPOINT_KEYS):
        raise TorchFileError("its payload lacks the resume state")
    return state


def _set_aside(path: Path, why: object) -> None:
    """Move a damaged checkpoint out of the way (kept for inspection) and say so in one line."""
    aside = path.with_name(path.name + ".corrupt")
    os.replace(path, aside)
    log.warning("%s is damaged: %s; moved it to %s, training from the start", path, why, aside)


def mix_renders(
    images: np.ndarray, labels: np.ndarray, renders_path: Path, share: float
) -> tuple[np.ndarray, np.ndarray]:
    """The training split with rendered photos appended: ``share`` of the result is renders.

    As many as the share asks for (n * share / (1 - share)), at most all of the file's;
    the render stage drew them at random, so its first ones are a random subset.
    """
    rx, ry = load_arrays(renders_path)
    n = min(len(rx), round(len(images) * share / (1 - share)))
    if n < round(len(images) * share / (1 - share)):
        log.info("renders_share %.3g asks for more renders than %s holds: all %d used",
                 share, renders_path, len(rx))  # fmt: skip
    return np.concatenate([images, rx[:n]]), np.concatenate([labels, ry[:n]])


def add_labelled(
    images: np.ndarray, labels: np.ndarray, labeled_path: Path, weight: int
) -> tuple[np.ndarray, np.ndarray]:
    """The training split with your labelled images appended, each ``weight`` times.

    A few hundred photos beside 42,000 MNIST digits would hardly move the weights; repeated,
    they are drawn as often as ``weight`` times their number of MNIST digits would be.
    """
    lx, ly = load_arrays(labeled_path)
    if len(lx) == 0:
        return images, labels
    log.info("training with %d labelled images of your own, each %dx", len(lx), weight)
    return (
        np.concatenate([images, np.repeat(lx, weight, axis=0)]),
        np.concatenate([labels, np.repeat(ly, weight)]),
    )


def _fingerprint(params: TrainParams, *data_paths: Path) -> str:
    """Identity of a training run: params + data content. A checkpoint resumes only its own run."""
    h = hashlib.sha256(repr(sorted(to_dict(params).items())).encode())
    for p in data_paths:
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def seed_everything(seed: int) -> None:
    """Same seed on CPU -> same numbers."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


# Elastic warps: a random displacement per node of a coarse grid, upsampled bicubically to
# a smooth field (Simard et al. smooth a per-pixel field with a Gaussian; a 4x4 grid of
# nodes gives the same few-bumps-per-digit look with one tiny interpolate instead of a blur).
ELASTIC_NODES = 4
# Stroke width and blur work with 3x3 neighbourhoods: one pixel of dilation or erosion at
# 28x28 is a third to a half of an MNIST stroke (2-3 px), the range real pens span.
MORPH_KERNEL = 3
BLUR_SIGMA = 1.0  # px at 28x28: a slightly out-of-focus photo after downscaling


def random_affine(x: torch.Tensor, aug: AugmentParams, gen: torch.Generator) -> torch.Tensor:
    """Rotate, zoom, shift, shear and elastically warp every image of a float batch (B, 1, H, W)
    by its own random amount.

    torchvision.transforms.v2.RandomAffine on a batch tensor draws ONE transform for the
    whole batch, so all 64..256 digits would move together; a per-sample loop of v2 calls is
    back to per-sample Python. Instead we draw B parameter sets at once and apply them with
    one affine_grid + grid_sample: the same bilinear warp v2 does, per sample, on the device.
    ``x`` must have background 0 (pixels in [0, 1], before mean/std): zero padding fills the
    borders uncovered by the warp. Shear and elastic draw from ``gen`` only when enabled, so
    recipes without them see the same numbers as before they existed.
    """
    b, _, h, w = x.shape
    u = torch.rand(b, 4, generator=gen, device=x.device) * 2 - 1  # (B, 4) uniform in [-1, 1)
    angle = u[:, 0] * torch.pi * aug.rotate_deg / 180
    zoom = 1 + u[:, 1] * aug.scale  # > 1 makes the digit larger
    # affine_grid coordinates span [-1, 1], i.e. 2 units per image side
    shift = u[:, 2:] * 2 * aug.translate  # (B, 2): x, y
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # theta maps output to input coordinates: sampling the input at coords/zoom enlarges it
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )  # (B, 2, 3)
    if aug.shear_deg > 0:
        # x_in += tan(shear) * y_out: slants the digit like a hand leaning left or right
        shear = torch.tan(
            (torch.rand(b, generator=gen, device=x.device) * 2 - 1) * torch.pi * aug.shear_deg / 180
        )  # (B,)
        theta = theta.clone()
        theta[:, 0, 1] = theta[:, 0, 1] + shear * theta[:, 1, 1]
        theta[:, 0, 0] = theta[:, 0, 0] + shear * theta[:, 1, 0]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    if aug.elastic_px > 0:
        nodes = torch.rand(b, 2, ELASTIC_NODES, ELASTIC_NODES, generator=gen, device=x.device)
        field = F.interpolate(nodes * 2 - 1, size=(h, w), mode="bicubic", align_corners=True)
        # pixels -> grid units (2 per side); (B, 2, H, W) -> (B, H, W, 2) like the grid
        scale = torch.tensor([2 / w, 2 / h], device=x.device) * aug.elastic_px
        grid = grid + field.permute(0, 2, 3, 1) * scale
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _blend(x: torch.Tensor, target: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """x + share * (target - x), with one share per sample: (B,) broadcast over (B, 1, H, W)."""
    return torch.lerp(x, target, share.view(-1, 1, 1, 1))


def random_appearance(x: torch.Tensor, aug: AugmentParams, gen: torch.Generator) -> torch.Tensor:
    """Change stroke width, focus and ink strength of every image of a [0, 1] batch (B, 1, H, W).

    Stroke width: grayscale dilation (a 3x3 max) or erosion (a 3x3 min) blended in by a
    per-sample amount drawn from [-stroke, +stroke] (negative thins), so widths vary
    continuously between about one pixel thinner and one pixel thicker than the pen's.
    Blur: a blend towards a Gaussian-blurred copy. Contrast: ink scaled down (faint pens).
    """
    b = x.shape[0]
    pad = MORPH_KERNEL // 2
    if aug.stroke > 0:
        amount = (torch.rand(b, generator=gen, device=x.device) * 2 - 1) * aug.stroke  # (B,)
        thick = F.max_pool2d(x, MORPH_KERNEL, stride=1, padding=pad)
        thin = -F.max_pool2d(-x, MORPH_KERNEL, stride=1, padding=pad)
        x = torch.where(
            (amount >= 0).view(-1, 1, 1, 1),
            _blend(x, thick, amount.clamp(min=0)),
            _blend(x, thin, (-amount).clamp(min=0)),
        )
    if aug.blur > 0:
        blurred = _gaussian_blur(x, BLUR_SIGMA)
        x = _blend(x, blurred, torch.rand(b, generator=gen, device=x.device) * aug.blur)
    if aug.contrast > 0:
        gain = 1 - torch.rand(b, generator=gen, device=x.device) * aug.contrast  # (B,)
        x = x * gain.view(-1, 1, 1, 1)
    return x


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W), kernel 3 sigma either side, zero padded."""
    radius = max(1, round(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(x, k.view(1, 1, 1, -1), padding=(0, radius))
    return F.conv2d(x, k.view(1, 1, -1, 1), padding=(radius, 0))


def train_batch_inputs(
    images: torch.Tensor, mean: float, std: float,
    augment: AugmentParams | None = None, gen: torch.Generator | None = None,
) -> torch.Tensor:  # fmt: skip
    """uint8 (B, 28, 28) -> float32 (B, 1, 28, 28): augmented (if on), then normalized."""
    if augment is None or not augment.enabled:
        return normalize_uint8(images, mean, std)  # the seed path, op for op
    if gen is None:
        raise ValueError("augmentation needs a seeded generator (for reproducible runs)")
    clean = normalize_uint8(images, 0.0, 1.0)  # (B, 1, 28, 28) in [0, 1]
    x = random_affine(clean, augment, gen) if augment.geometric else clean  # still in [0, 1]
    x = random_appearance(x, augment, gen)
    if augment.share < 1:
        # one draw per sample after the transforms' draws: recipes with share 1 draw as before
        keep = torch.rand(len(x), generator=gen, device=x.device) >= augment.share  # (B,)
        x = torch.where(keep.view(-1, 1, 1, 1), clean, x)
    if mean != 0.0 or std != 1.0:
        x = x.sub_(mean).div_(std)
    return x


def train_epoch(
    model: nn.Module, optimizer: torch.optim.Optimizer,
    images: torch.Tensor, labels: torch.Tensor, order: torch.Tensor,
    batch_size: int, mean: float, std: float, progress: Any = None,
    augment: AugmentParams | None = None, aug_gen: torch.Generator | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    channels_last: bool = False, amp: bool = False,
) -> tuple[float, float]:  # fmt: skip
    """One pass over ``images`` in ``order``; returns (mean loss, accuracy).

    ``scheduler`` steps once per batch; ``amp`` runs forward and loss under bf16 autocast.
    """
    model.train()
    device = images.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        x = train_batch_inputs(images[idx], mean, std, augment, aug_gen)  # (B, 1, 28, 28) f32
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = labels[idx].long()  # (B,)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)  # (B, 10)
            loss = F.cross_entropy(logits, y)  # autocast computes it in float32
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        # accumulate on device: a .item() per batch would sync every step
        loss_sum += loss.detach() * len(idx)
        correct += (logits.argmax(1) == y).sum()
        if progress is not None:
            progress.update(len(idx))
    n = len(order)
    return loss_sum.item() / n, correct.item() / n


def arch_kwargs(params: TrainParams) -> dict[str, Any]:
    """The architecture switches of ``params.model``, as stored in the model file."""
    if params.model == "seed":
        return {}  # the seed CNN has no switches
    return {"batchnorm": params.batchnorm, "dropout": params.dropout, "width": params.width}


def init_weights(model: nn.Module, scheme: str) -> nn.Module:
    """Re-initialize conv and linear layers: ``glorot`` (zero bias) or ``torch`` (as built).

    PyTorch's layer default (kaiming-uniform with a=sqrt(5): weight variance 1/(3 fan_in))
    shrinks the activations' variance ~6x per ReLU layer, so the seed CNN's logits start
    near zero and its first epochs are slow. Glorot keeps the variance roughly constant
    (it is Keras' default). Measured on real MNIST, the seed recipe's 5th epoch, seeds
    42/0/1: 98.01/97.78/97.48 % with torch init, 97.95/98.33/98.43 % with glorot (docs/recipes.md).
    BatchNorm layers keep their defaults (weight 1, bias 0).
    """
    if scheme == "torch":
        return model
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def build_training(
    params: TrainParams, device: torch.device, n_train: int
) -> tuple[
    nn.Module, nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None
]:
    """(model, step_model, optimizer, scheduler) for ``params`` on ``n_train`` images.

    ``step_model`` is what the training steps call: ``model`` itself, or its torch.compile
    wrapper (which shares its parameters; ``model`` stays the one to evaluate and save).
    """
    model = init_weights(build_model(params.model, **arch_kwargs(params)), params.init)
    model = model.to(device)
    if params.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr)
    scheduler = None
    if params.schedule == "onecycle":
        steps = params.epochs * -(-n_train // params.batch_size)  # ceil: the last short batch
        # warm up to lr over the first 30 % of steps, then cosine-anneal to lr / 2.5e5
        # (torch's defaults); it also cycles Adam's beta1 between 0.95 and 0.85
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=params.lr, total_steps=steps
        )
    step_model = torch.compile(model) if params.compile else model
    return model, step_model, optimizer, scheduler


@dataclass
class _Run:
    """A training run's state: what a checkpoint saves and a resume restores."""

    model: nn.Module
    step_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    history: list[dict[str, float]]
    start: int  # epochs already done
    # train.keep = best: the weights of the epoch with the highest validation accuracy so far
    best: dict[str, Any]

    @classmethod
    def fresh(cls, params: TrainParams, device: torch.device, n_train: int) -> _Run:
        parts = build_training(params, device, n_train)
        return cls(
            *parts, history=[], start=0, best={"epoch": 0, "val_accuracy": -1.0, "state": None}
        )

    def checkpoint(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "rng_state": torch.get_rng_state(),
            "history": self.history,
            "best": self.best,
        }


def _training_data(
    params: TrainParams,
    train_path: Path,
    val_path: Path,
    renders_path: Path | None,
    labeled_path: Path | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[Path]]:
    """(train x, train y, val x, val y, the files read): MNIST plus renders and labels."""
    train_x, train_y = load_arrays(train_path)
    data_paths = [train_path, val_path]
    if params.renders_share > 0:
        if renders_path is None:
            raise ValueError("train.renders_share > 0 needs the renders file (--renders)")
        train_x, train_y = mix_renders(train_x, train_y, renders_path, params.renders_share)
        data_paths.append(renders_path)
    if params.labeled_weight > 0 and labeled_path is not None:
        train_x, train_y = add_labelled(train_x, train_y, labeled_path, params.labeled_weight)
        data_paths.append(labeled_path)
    val_x, val_y = load_arrays(val_path)
    return train_x, train_y, val_x, val_y, data_paths


def _resume(
    checkpoint_path: Path, fingerprint: str, params: TrainParams, device: torch.device, n: int
) -> _Run:
    """A fresh run, or the one ``checkpoint_path`` saved for these params and data."""
    run = _Run.fresh(params, device, n)
    if not checkpoint_path.is_file():
        return run
    max_bytes = int(CHECKPOINT_COPIES * state_nbytes(run.model) * SIZE_MARGIN) + CHECKPOINT_SLACK
    try:
        ckpt = load_checkpoint(checkpoint_path, fingerprint, max_bytes)
        if ckpt is None:
            log.info(
                "ignoring %s: it belongs to another run (params or data differ)", checkpoint_path
            )
            return run
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        if run.scheduler is not None:
            run.scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng_state"])
        run.history, run.start = list(ckpt["history"]), int(ckpt["epoch"])
        run.best = dict(ckpt["best"])
        log.info("resuming from %s after epoch %d", checkpoint_path, run.start)
        return run
    # TorchFileError: unreadable or failed its hash; the others: a payload that passed
    # its hash yet does not fit this run's model or optimizer (written by other code)
    except (TorchFileError, KeyError, ValueError, RuntimeError, TypeError) as exc:
        _set_aside(checkpoint_path, exc)
        # the state may be half loaded: rebuild it exactly as a fresh run does
        seed_everything(params.seed)
        return _Run.fresh(params, device, n)


def _one_epoch(
    run: _Run,
    epoch: int,
    params: TrainParams,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    progress: bool | None,
) -> dict[str, float]:
    """Train one epoch, validate, note the best weights; the epoch's metrics row."""
    xs, ys, vx, vy = data
    mean, std = params.normalize.mean, params.normalize.std
    # a per-epoch generator: the order depends only on (seed, epoch), so resume is exact
    gen = torch.Generator().manual_seed(params.seed * 1_000_003 + epoch)
    order = torch.randperm(len(xs), generator=gen).to(xs.device)
    # augmentation draws from its own (seed, epoch) generator on the device, for the
    # same reason; dropout draws from the global RNG, saved in the checkpoint
    aug_gen = torch.Generator(xs.device).manual_seed(params.seed * 1_000_003 + epoch + 1)
    # disable=None: a bar on a terminal only, so DVC and CI logs stay clean
    bar = tqdm(
        total=len(xs), desc=f"epoch {epoch}/{params.epochs}", unit="img", leave=False,
        dynamic_ncols=True, disable=None if progress is None else not progress,
    )  # fmt: skip
    loss, acc = train_epoch(
        run.step_model, run.optimizer, xs, ys, order, params.batch_size, mean, std, bar,
        augment=params.augment, aug_gen=aug_gen, scheduler=run.scheduler,
        channels_last=params.channels_last, amp=params.amp,
    )  # fmt: skip
    bar.close()
    val_loss, val_acc, _ = evaluate_arrays(run.model, vx, vy, mean, std)
    row = {
        "epoch": epoch, "loss": loss, "train_accuracy": acc,
        "val_loss": val_loss, "val_accuracy": val_acc,
    }  # fmt: skip
    run.history.append(row)
    # strict: ties keep the earlier epoch; keep=last needs no copy of the weights
    if params.keep == "best" and val_acc > run.best["val_accuracy"]:
        state = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}
        run.best = {"epoch": epoch, "val_accuracy": val_acc, "state": state}
    log.info(
        "epoch %d/%d loss %.4f train_acc %.4f val_loss %.4f val_acc %.4f",
        epoch, params.epochs, loss, acc, val_loss, val_acc,
    )  # fmt: skip
    return row


def train(
    train_path: Path,
    val_path: Path,
    model_path: Path,
    live_dir: Path,
    checkpoint_path: Path,
    params: TrainParams,
    progress: bool | None = None,
    renders_path: Path | None = None,
    labeled_path: Path | None = None,
) -> TrainResult:
    """Train ``params.model`` and write the self-describing model file.

    With ``params.renders_share`` > 0, the synthetic photos of ``renders_path`` (the
    render stage's 28x28 network inputs) join the training split (mix_renders). With
    ``params.labeled_weight`` > 0, so do your labelled training images of ``labeled_path``
    (the labeled stage's train.npz), each that many times (add_labelled).

    After each epoch a resume checkpoint is written to ``checkpoint_path``; a
    rerun of the same run (same params and data) continues from it, and it is
    removed once the model file is written. Per-epoch metrics go through
    dvclive to ``live_dir`` (metrics.json + plots/metrics/*.tsv).
    """
    from dvclive import Live

    device = pick_device(params.device)
    seed_everything(params.seed)
    train_x, train_y, val_x, val_y, data_paths = _training_data(
        params, train_path, val_path, renders_path, labeled_path
    )
    # (N, 28, 28) uint8 on the device: 33 MB for MNIST, cheap to keep resident
    data = tuple(torch.from_numpy(a).to(device) for a in (train_x, train_y, val_x, val_y))
    fingerprint = _fingerprint(params, *data_paths)
    run = _resume(checkpoint_path, fingerprint, params, device, len(train_x))

    # dvclive rewrites its folder from scratch; on resume, replay the finished epochs
    with Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None) as live:
        for row in run.history:
            _log_epoch(live, row)
        for epoch in range(run.start + 1, params.epochs + 1):
            _log_epoch(live, _one_epoch(run, epoch, params, data, progress))
            save_checkpoint(checkpoint_path, fingerprint, run.checkpoint(epoch))
        history = run.history
        kept = run.best["epoch"] if params.keep == "best" else history[-1]["epoch"]
        # metrics.json's values describe the model file (dvc metrics show/diff read them):
        # the kept epoch's, not the last one's; the plots keep every epoch. Written when the
        # Live context ends.
        for name, column in LIVE_METRICS.items():
            live.log_metric(name, history[kept - 1][column], plot=False)
        live.summary["kept_epoch"] = kept

    if params.keep == "best" and run.best["epoch"] != history[-1]["epoch"]:
        run.model.load_state_dict(run.best["state"])
        log.info("keeping epoch %d (best validation accuracy %.4f)", kept, run.best["val_accuracy"])
    save_model(
        model_path, run.model, arch=params.model, mean=params.normalize.mean,
        std=params.normalize.std, params=to_dict(params), arch_kwargs=arch_kwargs(params),
        metrics=history[kept - 1],  # the kept epoch's row: epoch, loss, accuracies
        history=history,
    )  # fmt: skip
    checkpoint_path.unlink(missing_ok=True)
    return TrainResult(
        model_path=model_path, history=history, resumed_from_epoch=run.start, kept=history[kept - 1]
    )


def _log_epoch(live: Any, row: dict[str, float]) -> None:
    live.step = int(row["epoch"])  # DVC plots' x axis ("step") is the epoch number, from 1
    for name, column in LIVE_METRICS.items():
        live.log_metric(name, row[column])
    live.next_step()
