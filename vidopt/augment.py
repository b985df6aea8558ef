"""Label-preserving augmentation of training clips for the student stages (distillation, pruning fine-tune, QAT).

One random transform per clip, the same for all its frames, so the motion that defines a class is untouched while what
identifies one training video — its colours, its brightness, where things sit in the frame — changes every epoch.
Without it the 2D+1D student memorised the demo's 448 training videos (train top-1 100%, test ~20%); with it, it has to
learn the motion (DESIGN.md). Flips only where asked (augment.hflip): a mirrored "move left" clip is a "move right"
clip.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

GAIN = (0.6, 1.4)        # contrast: multiplies the normalised clip
OFFSET = (-0.5, 0.5)     # brightness / colour cast per channel, in normalised units (about +-0.12 of the 0-1 range)
SHIFT_FRACTION = 8       # translate by up to 1/8 of the frame size in each direction (edge pixels repeated)


def augment_clips(x: torch.Tensor, generator: torch.Generator, hflip: bool = False) -> torch.Tensor:
    """x: normalised clips [B, C, T, H, W] -> augmented clips of the same shape (a new tensor)."""
    b, c, _, h, w = x.shape
    return apply_augmentation(x, draw_augmentation(b, c, h, w, generator, hflip))


def draw_augmentation(b: int, c: int, h: int, w: int, generator: torch.Generator,
                      hflip: bool = False) -> dict[str, torch.Tensor]:
    """The random transform of each of b clips, drawn on the CPU generator: a data-parallel worker draws those of the
    whole global batch and applies its own rows (shard_augmentation), so its clips get what one worker's would.
    hflip: also mirror half the clips, for classes a mirror image keeps (never for left vs right)."""
    order = torch.stack([torch.randperm(c, generator=generator) for _ in range(b)])  # [B, C] channel order per clip
    gain = torch.empty(b, 1, 1, 1, 1).uniform_(*GAIN, generator=generator)
    offset = torch.empty(b, c, 1, 1, 1).uniform_(*OFFSET, generator=generator)
    pad_h, pad_w = max(1, h // SHIFT_FRACTION), max(1, w // SHIFT_FRACTION)
    dy = torch.randint(0, 2 * pad_h + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad_w + 1, (b,), generator=generator)
    drawn = {"order": order, "gain": gain, "offset": offset, "dy": dy, "dx": dx}
    if hflip:   # drawn last: without it every other draw is what it always was
        drawn["flip"] = torch.rand(b, generator=generator) < 0.5
    return drawn


def shard_augmentation(params: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in params.items()}


def apply_augmentation(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """x [B, C, T, H, W] on any device, params of its B clips (drawn on the CPU) -> augmented clips."""
    b, c, t, h, w = x.shape
    order, gain, offset = (params[k].to(x.device) for k in ("order", "gain", "offset"))
    x = torch.gather(x, 1, order.view(b, c, 1, 1, 1).expand_as(x))
    x = x * gain + offset
    pad_h, pad_w = max(1, h // SHIFT_FRACTION), max(1, w // SHIFT_FRACTION)
    padded = F.pad(x.reshape(b, c * t, h, w), (pad_w, pad_w, pad_h, pad_h), mode="replicate")  # [B, C*T, H', W']
    dy, dx = params["dy"].tolist(), params["dx"].tolist()
    shifted = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
    out = shifted.reshape(b, c, t, h, w)
    if "flip" in params:
        flip = params["flip"].to(x.device).view(b, 1, 1, 1, 1)
        out = torch.where(flip, out.flip(-1), out)
    return out
