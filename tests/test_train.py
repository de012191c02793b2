"""The train step on tiny rendered digits: loss goes down, determinism, resume, model file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tasks.config import NormalizeParams, TrainParams
from tasks.model import SeedCNN, load_model
from tasks.train import init_weights, train


def _run(prepared: Path, out: Path, **kw) -> object:
    params = TrainParams(**{"epochs": 2, "batch_size": 32, "device": "cpu", **kw})
    return train(
        prepared / "train.npz", prepared / "val.npz", out / "model.pt", out / "live",
        out / "ckpt.pt", params, progress=False,
    )  # fmt: skip


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
    result = _run(tiny_prepared, tmp_path, epochs=3, batch_size=16, lr=3e-3,
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
    assert metrics["val"]["accuracy"] == pytest.approx(result.history[-1]["val_accuracy"])
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
    one = load_model(_run(tiny_prepared, tmp_path / "one", epochs=1, keep="last").model_path)

    # make validation say epoch 1 was the best of three: the real accuracy, scaled down later
    real, calls = tr.evaluate_arrays, []

    def worse_after_first(*args, **kwargs):
        loss, acc, pred = real(*args, **kwargs)
        calls.append(1)
        return loss, acc / len(calls), pred

    monkeypatch.setattr(tr, "evaluate_arrays", worse_after_first)
    best = _run(tiny_prepared, tmp_path / "best", epochs=3, keep="best")
    calls.clear()
    last = _run(tiny_prepared, tmp_path / "last", epochs=3, keep="last")
    assert [r["epoch"] for r in best.history] == [1, 2, 3]  # every epoch still trained and logged
    kept, final = load_model(best.model_path), load_model(last.model_path)
    assert kept.metrics["epoch"] == 1 and final.metrics["epoch"] == 3
    assert _weights_equal(kept, one)
    assert not _weights_equal(final, one)
    summary = json.loads((tmp_path / "best" / "live" / "metrics.json").read_text())
    assert summary["kept_epoch"] == 1


def test_same_seed_same_numbers(tiny_prepared: Path, tmp_path: Path):
    a = _run(tiny_prepared, tmp_path / "a", epochs=1)
    b = _run(tiny_prepared, tmp_path / "b", epochs=1)
    c = _run(tiny_prepared, tmp_path / "c", epochs=1, seed=1)
    assert a.history == b.history
    assert a.history != c.history
    wa = load_model(a.model_path).model.state_dict()
    wb = load_model(b.model_path).model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_interrupted_run_resumes_from_checkpoint(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    full = _run(tiny_prepared, tmp_path / "full", epochs=2)

    # simulate a crash after epoch 1: a 1-epoch run's checkpoint, relabelled as the 2-epoch run's
    part = tmp_path / "part"
    params1 = TrainParams(epochs=1, batch_size=32, device="cpu")

    class Stop(Exception):
        pass

    import tasks.train as tr

    def crash(*a, **k):
        raise Stop

    # fault injection: the process "dies" after the epoch-1 checkpoint, before the model file
    with monkeypatch.context() as m:
        m.setattr(tr, "save_model", crash)
        with pytest.raises(Stop):
            train(tiny_prepared / "train.npz", tiny_prepared / "val.npz", part / "model.pt",
                  part / "live", part / "ckpt.pt", params1, progress=False)  # fmt: skip
    assert not (part / "model.pt").exists()
    ckpt = torch.load(part / "ckpt.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    # the fingerprint ties a checkpoint to its run: retarget it to the 2-epoch run
    ckpt["fingerprint"] = tr._fingerprint(
        TrainParams(epochs=2, batch_size=32, device="cpu"),
        tiny_prepared / "train.npz", tiny_prepared / "val.npz",
    )  # fmt: skip
    torch.save(ckpt, part / "ckpt.pt")

    resumed = _run(tiny_prepared, part, epochs=2)
    assert resumed.resumed_from_epoch == 1
    assert resumed.history == full.history  # resuming gives exactly the uninterrupted numbers
    # ... and the same kept weights (the best epoch so far travels in the checkpoint)
    assert _weights_equal(load_model(resumed.model_path), load_model(full.model_path))


def test_checkpoint_of_another_run_is_ignored(tiny_prepared: Path, tmp_path: Path):
    first = _run(tiny_prepared, tmp_path, epochs=1)
    torch.save({"format": "digitflow-train-checkpoint", "fingerprint": "other", "epoch": 1},
               tmp_path / "ckpt.pt")  # fmt: skip
    again = _run(tiny_prepared, tmp_path, epochs=1)
    assert again.resumed_from_epoch == 0 and again.history == first.history
