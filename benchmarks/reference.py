"""The seed report's own style of training, as the reference for benchmarks.

torchvision ``datasets.MNIST`` + ``ToTensor`` + ``DataLoader(batch_size=64,
shuffle=True)``, the same network and optimizer: per-sample PIL -> tensor
conversion in Python, which is what our index-batched loader replaces.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from tasks.download import MNIST_FILES
from tasks.model import SeedCNN


def _torchvision_root(raw_dir: Path, into: Path) -> Path:
    """torchvision wants ROOT/MNIST/raw/<files>: link our raw IDX files there."""
    target = into / "MNIST" / "raw"
    target.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES.values():
        (target / name).symlink_to((raw_dir / name).resolve())
    return into


def train_reference(
    raw_dir: Path,
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 42,
    val_fraction: float = 0.3,
    on_epoch: Callable[[int, float, float], None] | None = None,
    device: str = "cpu",
    stop_at: float | None = None,
) -> dict:
    """Train the seed way; returns wall time (training only), per-epoch test accuracy.

    ``on_epoch(epoch, elapsed_train_s, test_accuracy)`` is called after each epoch;
    the test evaluation is not counted in the elapsed training time. On ``device``
    "cuda" each batch is copied to the GPU, as the seed-style loop would do there.
    With ``stop_at``, training ends after the first epoch whose test accuracy reaches it.
    """
    from torchvision import datasets, transforms

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = _torchvision_root(raw_dir, Path(tmp))
        full = datasets.MNIST(root, train=True, download=False, transform=transforms.ToTensor())
        test = datasets.MNIST(root, train=False, download=False, transform=transforms.ToTensor())
        n_val = round(len(full) * val_fraction)
        train_set, _ = torch.utils.data.random_split(
            full, [len(full) - n_val, n_val], generator=torch.Generator().manual_seed(seed)
        )
        loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True)
        test_loader = torch.utils.data.DataLoader(test, batch_size=1000)
        model = SeedCNN().to(device)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        elapsed, history = 0.0, []
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            model.train()
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            elapsed += time.perf_counter() - t0
            model.eval()
            correct = 0
            with torch.inference_mode():
                for x, y in test_loader:
                    correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
            acc = correct / len(test)
            history.append({"epoch": epoch, "train_s": elapsed, "test_accuracy": acc})
            if on_epoch is not None:
                on_epoch(epoch, elapsed, acc)
            if stop_at is not None and acc >= stop_at:
                break
    return {"train_s": elapsed, "test_accuracy": history[-1]["test_accuracy"], "history": history}
