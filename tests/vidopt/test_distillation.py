"""The distillation objective over a clip set: the batch-size-independent mean of distillation_loss."""
import pytest
import torch
from torch import nn

from vidopt.distillation import ClipSet, clip_set_distillation_loss, distillation_loss
from vidopt.data import normalise_clips


def _clip_set(n: int = 10) -> ClipSet:
    g = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 256, (n, 2, 4, 4, 3), dtype=torch.uint8, generator=g)  # [N, T, H, W, C]
    return ClipSet(clips, torch.randint(0, 3, (n,), generator=g), torch.arange(n),
                   teacher_logits=torch.randn(n, 3, generator=g))


def test_clip_set_loss_is_the_mean_over_every_clip_whatever_the_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 4 * 4, 3))
    clips = _clip_set()
    with torch.no_grad():
        whole = distillation_loss(model(normalise_clips(clips.clips)), clips.teacher_logits, clips.labels, 0.3, 4.0)
    for batch in (1, 3, 10):  # 3: a short last batch, weighted by its size
        assert clip_set_distillation_loss(model, clips, batch, 0.3, 4.0) == pytest.approx(float(whole), rel=1e-5)


def test_clip_set_loss_without_teacher_logits_says_what_is_missing():
    clips = _clip_set()
    clips.teacher_logits = None
    with pytest.raises(ValueError, match="teacher's logits"):
        clip_set_distillation_loss(nn.Flatten(), clips, 4, 0.5, 4.0)
