"""The one training loop: channels-last conv weights while training, the caller's layout back afterwards; bf16
autocast; which epoch is kept and when it stops."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vidopt.training import FitSpec, bf16_training, fit


def test_channels_last_training_leaves_the_model_contiguous(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 4, 1), nn.Flatten(1, 2),
                          nn.Conv2d(4 * 2, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x, y = torch.randn(8, 3, 2, 6, 6), torch.randint(0, 4, (8,))
    layouts = []

    def loss_fn(m, batch):
        conv3d, conv2d = m[0].weight, m[4].weight
        layouts.append((conv3d.is_contiguous(memory_format=torch.channels_last_3d),
                        conv2d.is_contiguous(memory_format=torch.channels_last)))
        return F.cross_entropy(m(batch[0]), batch[1])

    result = fit(model, loss_fn, [(x, y)] * 3, lambda m: 0.5, FitSpec(epochs=2, lr=1e-2, channels_last=True),
                 tmp_path / "last.pt")
    assert result["epochs_run"] == 2 and layouts == [(True, True)] * 6  # every step trained channels-last
    assert all(p.is_contiguous() for p in model.parameters())          # and the model left in the default layout


def test_bf16_training_multiplies_in_bfloat16_and_keeps_float32_weights_and_loss(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 4, (16,))
    conv_outputs, logits, losses = [], [], []
    model[0].register_forward_hook(lambda m, i, out: conv_outputs.append(out.dtype))

    def loss_fn(m, batch):
        out = m(batch[0])
        logits.append(out.dtype)
        loss = F.cross_entropy(out, batch[1])
        losses.append(loss.item())
        return loss

    fit(model, loss_fn, [(x, y)] * 4, lambda m: 0.5, FitSpec(epochs=3, lr=1e-2, precision="bf16"), tmp_path / "last.pt")
    assert set(conv_outputs) == {torch.bfloat16}                 # the conv ran in bfloat16 ...
    assert set(logits) == {torch.float32}                        # ... the loss saw float32 logits
    assert all(t.dtype == torch.float32 for t in [*model.parameters(), model[1].running_mean, model[1].running_var])
    assert losses[-1] < losses[0]                                # and it trained
    with torch.no_grad():
        assert model.eval()(x).dtype == torch.float32            # outside training nothing is autocast


def test_precision_auto_means_bf16_exactly_where_the_cpu_has_amx():
    assert bf16_training("bf16") and not bf16_training("fp32")
    assert bf16_training("auto") == torch.cpu._is_amx_tile_supported()


def test_a_tied_val_score_keeps_the_later_epoch(tmp_path):
    """On a small val split scores tie often; the later epoch has trained longer at a lower learning rate."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randn(6, 3, 4), torch.randint(0, 3, (6,))
    scores = iter([0.5, 0.8, 0.6, 0.8, 0.7])
    seen = {}

    def score(m):
        seen[len(seen)] = m[1].weight.detach().clone()
        return next(scores)

    result = fit(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), [(x, y)], score, FitSpec(epochs=5, lr=1e-2),
                 tmp_path / "last.pt")
    assert result["best_epoch"] == 3 and result["best_score"] == 0.8
    assert torch.equal(model[1].weight, seen[3])  # the model holds epoch 3's weights, not epoch 1's


def test_a_plateau_of_equal_scores_still_stops_early(tmp_path):
    """Ties move the kept weights to the later epoch, but patience counts from the last strictly better score."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randn(6, 3, 4), torch.randint(0, 3, (6,))
    result = fit(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), [(x, y)], lambda m: 0.5,
                 FitSpec(epochs=10, lr=1e-2, patience=2), tmp_path / "last.pt")
    assert result["epochs_run"] == 3 and result["best_epoch"] == 2  # stopped after 2 epochs without improvement


def test_a_loss_score_keeps_the_lowest_epoch_and_stops_on_patience(tmp_path):
    """maximize=False: score_fn returns a loss; the kept weights are the lowest-loss epoch's, patience counts from it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randn(6, 3, 4), torch.randint(0, 3, (6,))
    losses = iter([0.9, 0.4, 0.6, 0.5, 0.45, 0.3])
    seen = {}

    def loss(m):
        seen[len(seen)] = m[1].weight.detach().clone()
        return next(losses)

    logged = []

    class Logger:
        def log(self, name, value, step=None):
            logged.append(name)

    result = fit(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), [(x, y)], loss,
                 FitSpec(epochs=6, lr=1e-2, patience=3, score_name="val_kd_loss", maximize=False),
                 tmp_path / "last.pt", logger=Logger())
    assert result["best_epoch"] == 1 and result["best_score"] == 0.4
    assert result["epochs_run"] == 5                 # epochs 2-4 were no lower than 0.4: stopped before 0.3
    assert torch.equal(model[1].weight, seen[1])
    assert "train.val_kd_loss" in logged and "train.val_top1" not in logged


def test_a_checkpoint_scored_another_way_resumes_without_comparing_scores(tmp_path, caplog):
    """A crashed run whose checkpoint chose epochs by val top-1, resumed by a version that minimises a loss: the old
    best (a top-1 of 0.1) says nothing about losses, so only the resumed epochs compete."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randn(6, 3, 4), torch.randint(0, 3, (6,))
    train = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    # read as losses, 0.1 would beat every real one below
    with pytest.raises(KeyboardInterrupt):
        fit(model, train, [(x, y)], scores_then_crash([0.1, 0.1]), FitSpec(epochs=4, lr=1e-2), tmp_path / "last.pt")
    losses = iter([0.5, 0.7])
    with caplog.at_level("WARNING", logger="vidopt"):
        result = fit(model, train, [(x, y)], lambda m: next(losses),
                     FitSpec(epochs=4, lr=1e-2, score_name="val_kd_loss", maximize=False), tmp_path / "last.pt")
    assert result["resumed_from"] == 2 and result["best_epoch"] == 2 and result["best_score"] == 0.5
    assert "the checkpoint chose epochs by val_top1, this run by val_kd_loss" in caplog.text


def scores_then_crash(scores: list[float]):
    """A score_fn for `fit` that returns `scores` one epoch at a time, then dies as a killed process would."""
    remaining = iter(scores)

    def score(model):
        value = next(remaining, None)
        if value is None:
            raise KeyboardInterrupt("killed")
        return value

    return score
