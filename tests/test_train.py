"""The train step on tiny rendered digits: loss goes down, determinism, resume, model file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from tasks.config import NormalizeParams
from tasks.model import SeedCNN, load_model
from tasks.train import init_weights
from tests.training import run_interrupted, run_train


def test_seed_cnn_shapes():
    model = SeedCNN()
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)
    assert model.features(torch.zeros(1, 1, 28, 28)).shape == (1, 64, 1, 1)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 64, (3, 3)), (64, 64, (3, 3)), (64, 64, (3, 3))
    ]  # fmt: skip


@pytest.mark.training
def test_loss_goes_down_and_model_file_is_self_describing(tiny_prepared: Path, tmp_path: Path):
    result = run_train(tiny_prepared, tmp_path, epochs=3, batch_size=16, lr=3e-3,
                  normalize=NormalizeParams(0.1307, 0.3081))  # fmt: skip
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < losses[0] * 0.7, losses
    assert result.history[-1]["val_accuracy"] > 0.5
    loaded = load_model(result.model_path)
    assert loaded.arch == "seed" and loaded.classes == [str(d) for d in range(10)]
    assert (loaded.mean, loaded.std) == pytest.approx((0.1307, 0.3081))
    assert loaded.params["epochs"] == 3 and len(loaded.history) == 3
    # the resume checkpoint is gone once the model file is written
    assert not (tmp_path / "ckpt.pt").exists()
    # dvclive wrote per-epoch metrics and plot files for DVC
    metrics = json.loads((tmp_path / "live" / "metrics.json").read_text())
    # keep=best: metrics.json describes the kept epoch, the best (earliest of ties)
    best = max(result.history, key=lambda r: r["val_accuracy"])
    assert metrics["kept_epoch"] == best["epoch"] == loaded.metrics["epoch"]
    assert metrics["val"]["accuracy"] == best["val_accuracy"] == result.kept["val_accuracy"]
    assert metrics["train"]["loss"] == best["loss"]
    tsv = (tmp_path / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert len(tsv) == 1 + 3


def _weights_equal(a, b) -> bool:
    wa, wb = a.model.state_dict(), b.model.state_dict()
    return all(torch.equal(wa[k], wb[k]) for k in wa)


def test_pool_before_relu_is_the_reports_network_bit_for_bit():
    """SeedCNN pools before ReLU; the report's order (ReLU, then pool) gives identical numbers."""
    torch.manual_seed(0)
    ours = SeedCNN()
    f = ours.features
    reports = torch.nn.Sequential(
        f[0], torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        f[3], torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        f[6], torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        ours.classifier,
    )  # fmt: skip
    x = torch.rand(8, 1, 28, 28) - 0.3  # negative pixels too: whole pooling windows below 0
    grads = []
    for net in (ours, reports):
        net.zero_grad()
        out = net(x)
        out.square().sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in ours.parameters()]))
    (out_a, g_a), (out_b, g_b) = grads
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(a, b) for a, b in zip(g_a, g_b, strict=True))


def test_glorot_init_is_uniform_within_bound_with_zero_bias():
    torch.manual_seed(0)
    model = init_weights(SeedCNN(), "glorot")
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            fan_in = m.weight[0].numel()
            fan_out = m.weight.shape[0] * m.weight[0, 0].numel()
            bound = (6 / (fan_in + fan_out)) ** 0.5
            assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.9 * bound
            assert torch.count_nonzero(m.bias) == 0
    torch.manual_seed(0)
    default = SeedCNN()
    assert init_weights(default, "torch") is default
    assert torch.count_nonzero(default.features[0].bias) > 0  # PyTorch's defaults, untouched


def test_keep_best_saves_the_best_validation_epoch(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import tasks.train as tr

    # the weights after epoch 1 (constant learning rate: the first epoch is the same in any run)
    one = load_model(run_train(tiny_prepared, tmp_path / "one", epochs=1, keep="last").model_path)

    # make validation say epoch 1 was the best of three: the real accuracy, scaled down later
    real, calls = tr.evaluate_arrays, []

    def worse_after_first(*args, **kwargs):
        loss, acc, pred = real(*args, **kwargs)
        calls.append(1)
        return loss, acc / len(calls), pred

    monkeypatch.setattr(tr, "evaluate_arrays", worse_after_first)
    best = run_train(tiny_prepared, tmp_path / "best", epochs=3, keep="best")
    calls.clear()
    last = run_train(tiny_prepared, tmp_path / "last", epochs=3, keep="last")
    assert [r["epoch"] for r in best.history] == [1, 2, 3]  # every epoch still trained and logged
    kept, final = load_model(best.model_path), load_model(last.model_path)
    assert kept.metrics["epoch"] == 1 and final.metrics["epoch"] == 3
    assert _weights_equal(kept, one)
    assert not _weights_equal(final, one)
    summary = json.loads((tmp_path / "best" / "live" / "metrics.json").read_text())
    assert summary["kept_epoch"] == 1 and best.kept["epoch"] == 1
    # the values dvc metrics show/diff read are the kept model's, not the last epoch's
    # (validation was scaled down after epoch 1, so the two differ)
    assert (
        summary["val"]["accuracy"]
        == best.history[0]["val_accuracy"]
        == kept.metrics["val_accuracy"]
    )
    assert summary["val"]["accuracy"] > best.history[-1]["val_accuracy"]
    assert summary["val"]["loss"] == best.history[0]["val_loss"]
    assert summary["train"]["accuracy"] == best.history[0]["train_accuracy"]
    # ... while the curves keep every epoch
    tsv = tmp_path / "best" / "live" / "plots" / "metrics" / "val" / "accuracy.tsv"
    assert len(tsv.read_text().splitlines()) == 1 + 3


def test_same_seed_same_numbers(tiny_prepared: Path, tmp_path: Path):
    a = run_train(tiny_prepared, tmp_path / "a", epochs=1)
    b = run_train(tiny_prepared, tmp_path / "b", epochs=1)
    c = run_train(tiny_prepared, tmp_path / "c", epochs=1, seed=1)
    assert a.history == b.history
    assert a.history != c.history
    wa = load_model(a.model_path).model.state_dict()
    wb = load_model(b.model_path).model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_interrupted_run_resumes_to_the_same_bytes(tiny_prepared: Path, tmp_path: Path):
    # keep=best with a constant lr: epoch 3's weights are kept only if its val is the best
    full = run_train(tiny_prepared, tmp_path / "full", epochs=3)
    part = tmp_path / "part"
    run_interrupted(tiny_prepared, part, after_epochs=2, epochs=3)

    resumed = run_train(tiny_prepared, part, epochs=3)
    assert resumed.resumed_from_epoch == 2
    assert resumed.history == full.history  # resuming gives exactly the uninterrupted numbers
    assert resumed.kept == full.kept  # the best epoch so far travels in the checkpoint
    # the same bytes, so DVC sees an unchanged output and does not rerun what depends on it
    # (before: the resumed history pickled larger, 2009 vs 1941 bytes)
    for name in ["model.pt", "live/metrics.json", "live/plots/metrics/val/accuracy.tsv"]:
        assert _sha256(part / name) == _sha256(tmp_path / "full" / name), name
    assert not (part / "ckpt.pt").exists()


def test_checkpoint_of_another_run_is_ignored(tiny_prepared: Path, tmp_path: Path):
    first = run_train(tiny_prepared, tmp_path, epochs=1)
    torch.save({"format": "digitflow-train-checkpoint", "fingerprint": "other", "epoch": 1},
               tmp_path / "ckpt.pt")  # fmt: skip
    again = run_train(tiny_prepared, tmp_path, epochs=1)
    assert again.resumed_from_epoch == 0 and again.history == first.history
