import torch

from vidopt.augment import augment_clips


def test_one_transform_per_clip_applied_to_every_frame():
    frame = torch.randn(2, 3, 1, 16, 16)
    still = frame.expand(2, 3, 8, 16, 16).contiguous()  # [B, C, T, H, W]: the same frame 8 times
    out = augment_clips(still, torch.Generator().manual_seed(0))
    assert out.shape == still.shape
    assert torch.equal(out, out[:, :, :1].expand_as(out))  # still frames stay identical to each other
    assert not torch.allclose(out, still)                   # ... but the clip did change


def test_motion_survives_the_shift():
    """A bright dot moving right one pixel per frame still moves right one pixel per frame after augmentation."""
    clip = torch.zeros(1, 3, 6, 32, 32)
    for t in range(6):
        clip[0, :, t, 16, 10 + t] = 5.0
    out = augment_clips(clip, torch.Generator().manual_seed(3))
    peaks = [int(out[0, :, t].abs().sum(0).flatten().argmax()) % 32 for t in range(6)]
    assert [b - a for a, b in zip(peaks, peaks[1:])] == [1] * 5


def test_same_seed_same_augmentation():
    x = torch.randn(4, 3, 4, 24, 24)
    a = augment_clips(x, torch.Generator().manual_seed(7))
    b = augment_clips(x, torch.Generator().manual_seed(7))
    c = augment_clips(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_hflip_mirrors_the_clips_it_draws_and_changes_nothing_else():
    import torch

    from vidopt.augment import apply_augmentation, draw_augmentation

    x = torch.randn(6, 3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = draw_augmentation(6, 3, 8, 8, torch.Generator().manual_seed(1))
    flipping = draw_augmentation(6, 3, 8, 8, torch.Generator().manual_seed(1), hflip=True)
    assert all(torch.equal(plain[k], flipping[k]) for k in plain)   # the other draws are unchanged
    flip = flipping["flip"]
    assert 0 < int(flip.sum()) < 6
    out, reference = apply_augmentation(x, flipping), apply_augmentation(x, plain)
    assert torch.equal(out[flip], reference[flip].flip(-1)) and torch.equal(out[~flip], reference[~flip])
