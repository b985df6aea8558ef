"""Manifest rows, deterministic splits, data versions, and the clip dataset that feeds models `[B, C, T, H, W]` batches.

Splits come from each file's content hash, so adding files never moves old ones between train / val / test.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Sequence

import numpy as np

from vidopt.config import ClipConfig

SPLITS = ("train", "val", "test")
# torchvision's video models are trained with Kinetics statistics; we keep them so teacher weights stay interchangeable.
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)


def split_for_hash(content_hash: str, fractions: Sequence[float]) -> str:
    """Map a sha256 hex digest to a split; the same content always lands in the same split."""
    u = _unit(content_hash)
    edge = 0.0
    for name, fraction in zip(SPLITS, fractions):
        edge += fraction
        if u < edge:
            return name
    return SPLITS[-1]


def _unit(content_hash: str) -> float:
    return int(content_hash[:15], 16) / float(16**15)   # uniform in [0, 1)


def assign_splits(rows: list[dict], fractions: Sequence[float], stratify: bool = True,
                  min_videos: int = 1) -> None:
    """Set row["split"]. Stratified: within each class the videos, ordered by content hash, are cut at the fractions
    (rounded), so every class has its share of val and test, and at least `min_videos` of each split whose fraction
    is above 0 where the class has enough videos (a class with 3 videos: one each). Not stratified: each video by its
    own hash alone (split_for_hash), which never moves an old video when new ones arrive, at the price of classes
    missing from small val and test splits."""
    if not stratify:
        for row in rows:
            row["split"] = split_for_hash(row["sha256"], fractions)
        return
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    for label_rows in by_label.values():
        label_rows.sort(key=lambda r: (_unit(r["sha256"]), r["sha256"]))
        n = len(label_rows)
        sizes = {split: round(n * f) for split, f in zip(SPLITS, fractions)}
        for split, f in zip(SPLITS[1:], fractions[1:]):   # val, test
            if f > 0 and n >= 1 + min_videos * sum(1 for x in fractions[1:] if x > 0):
                sizes[split] = max(sizes[split], min_videos)
        test, val = sizes["test"], sizes["val"]
        for i, row in enumerate(label_rows):
            row["split"] = "test" if i < test else "val" if i < test + val else "train"


def assign_fold(rows: list[dict], folds: int, fold: int, fractions: Sequence[float], min_videos: int = 1) -> list[dict]:
    """Rows (copies) split for fold `fold` of `folds`-fold cross-validation. Within each class, videos ordered by
    content hash are dealt to the folds in turn, so every fold holds its share of every class; fold `fold` is the test
    split, and of the rest, the val share of `fractions` (val / (train + val), at least `min_videos` per class where
    the class has enough) is val, stratified the same way. Over the k folds every video is tested exactly once."""
    if not 0 <= fold < folds:
        raise ValueError(f"fold {fold} of {folds}: must be 0..{folds - 1}")
    val_share = fractions[1] / max(fractions[0] + fractions[1], 1e-12)
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(dict(row))
    out = []
    for label_rows in by_label.values():
        label_rows.sort(key=lambda r: (_unit(r["sha256"]), r["sha256"]))
        rest = [r for i, r in enumerate(label_rows) if i % folds != fold]
        val = round(len(rest) * val_share)
        if val_share > 0 and len(rest) > min_videos:
            val = max(val, min_videos)
        for i, row in enumerate(label_rows):
            row["split"] = "test" if i % folds == fold else "train"
        for row in rest[:val]:
            row["split"] = "val"
        out += label_rows
    return out


def data_version(rows: list[dict]) -> str:
    """Hash of what the data *is* (content, label, split), not where it lives: re-uploads keep the version."""
    keyed = sorted((r["sha256"], r["label"], r["split"]) for r in rows)
    return hashlib.sha256(json.dumps(keyed).encode()).hexdigest()[:16]


def class_counts(rows: list[dict]) -> dict[str, dict[str, int]]:
    """{label: {split: count, 'total': count}} for every label seen."""
    counts: dict[str, dict[str, int]] = {}
    for (label, split), n in Counter((r["label"], r["split"]) for r in rows).items():
        counts.setdefault(label, {s: 0 for s in (*SPLITS, "total")})
        counts[label][split] += n
        counts[label]["total"] += n
    return dict(sorted(counts.items()))


def sample_clip_indices(
    num_frames: int,
    frames: int,
    stride: int,
    *,
    train: bool,
    rng: np.random.Generator | None = None,
    clip: int = 0,
    clips: int = 1,
) -> list[int]:
    """Frame indices of one clip of `frames` frames, `stride` apart.

    Training: a random offset. Evaluation: clip `clip` of `clips` windows spaced uniformly over the video (one clip:
    the centre). The stride shrinks for videos too short to hold the full span, so every clip has `frames` frames; a
    video with fewer frames than that is padded by repeating its last frame (ingestion quarantines videos shorter
    than data.min_frames).
    """
    if num_frames < 1:
        raise ValueError(f"video has {num_frames} frames")
    if num_frames < frames:
        return list(range(num_frames)) + [num_frames - 1] * (frames - num_frames)
    stride = max(1, min(stride, (num_frames - 1) // max(frames - 1, 1)))
    span = (frames - 1) * stride + 1
    room = num_frames - span
    if train:
        start = int((rng or np.random.default_rng()).integers(0, room + 1))
    else:
        start = int(round(room * (clip + 0.5) / clips))
    return list(range(start, start + span, stride))


def eval_windows(row: dict, clips: ClipConfig) -> int:
    """How many uniformly spaced windows evaluation scores a video on: up to clips.eval_clips_per_video, and no more
    than its length holds with neighbours overlapping by at most half a clip (a 32-frame video and a 29-frame clip:
    one; 142 frames: three). More windows of one video would repeat what the first saw."""
    frames, stride = clips.frames, clip_stride(row, clips)
    stride = max(1, min(stride, (row["num_frames"] - 1) // max(frames - 1, 1)))   # as sample_clip_indices shrinks it
    span = (frames - 1) * stride + 1
    room = row["num_frames"] - span
    return max(1, min(clips.eval_clips_per_video, room // max((span + 1) // 2, 1)))


def clip_stride(row: dict, clips: ClipConfig) -> int:
    """Frames between a clip's frames in this video: clips.stride, or, with clips.seconds, what spans that many
    seconds at the video's frame rate (10 and 30 fps cameras show the model the same stretch of time)."""
    if clips.seconds is None or not row.get("fps"):
        return clips.stride
    return max(1, round(clips.seconds * row["fps"] / max(clips.frames - 1, 1)))


def decode_size(row: dict, clips: ClipConfig) -> tuple[int, int]:
    """(height, width) to decode a video at: the clip size itself with clips.resize "squash"; with "crop", the video
    scaled (aspect ratio kept) to just cover the clip size, a crop of which the clip then is."""
    if clips.resize == "squash" or not row.get("width") or not row.get("height"):
        return clips.height, clips.width
    scale = max(clips.height / row["height"], clips.width / row["width"])
    return max(clips.height, round(row["height"] * scale)), max(clips.width, round(row["width"] * scale))


def crop_to_clip(frames, clips: ClipConfig, rng: np.random.Generator | None = None):
    """[T, h, w, C] decoded at decode_size -> [T, H, W, C]: the centre, or a random window when training (rng)."""
    room_h, room_w = frames.shape[1] - clips.height, frames.shape[2] - clips.width
    if room_h == room_w == 0:
        return frames
    top = int(rng.integers(0, room_h + 1)) if rng is not None else room_h // 2
    left = int(rng.integers(0, room_w + 1)) if rng is not None else room_w // 2
    return frames[:, top:top + clips.height, left:left + clips.width]


def _import_torch():
    import torch

    return torch


def normalise_clips(clips):
    """uint8 clips [..., T, H, W, C] -> float [..., C, T, H, W], scaled to [0, 1] and standardised per channel."""
    torch = _import_torch()
    x = clips.float().div_(255.0).movedim(-1, -4)  # [..., T, H, W, C] -> [..., C, T, H, W]
    mean = torch.tensor(KINETICS_MEAN, device=x.device).view(3, 1, 1, 1)
    std = torch.tensor(KINETICS_STD, device=x.device).view(3, 1, 1, 1)
    return (x - mean) / std


class FrameStore:
    """Every frame of some videos, decoded once at clip size: uint8 [frames, H, W, C] per video, in memory.

    Training draws a new random window per clip every epoch; for a dataset this small, decoding each window from the
    file again costs more than the model's step on 2 cores (decoder workers and the model compete for them)."""

    def __init__(self, videos: list):
        self.videos = videos  # one uint8 tensor [num_frames, H, W, C] per manifest row

    @staticmethod
    def nbytes(rows: list[dict], clips: ClipConfig) -> int:
        return sum(r["num_frames"] * int(np.prod(decode_size(r, clips))) * 3 for r in rows)

    @classmethod
    def decode_if_fits(cls, rows: list[dict], clips: ClipConfig) -> FrameStore | None:
        if cls.nbytes(rows, clips) > clips.memory_cache_mb * 2**20:
            return None
        from vidopt.video import read_frames

        torch = _import_torch()
        return cls([torch.from_numpy(read_frames(r["path"], range(r["num_frames"]), decoder=r["decoder"],
                                                 size=decode_size(r, clips))) for r in rows])


class ClipDataset:
    """Clips of manifest videos.

    Item: (clip, label index, video index); clip is float [C, T, H, W] normalised, or uint8 [T, H, W, C] with
    normalise=False (for caching). A DataLoader stacks them to `[B, C, T, H, W]`. Decoding happens in __getitem__, so
    DataLoader workers decode in parallel; each row names the decoder that ingestion verified for that file.
    """

    def __init__(self, rows: list[dict], classes: list[str], clips: ClipConfig, *, train: bool, seed: int = 0,
                 per_video: int | None = None, normalise: bool = True, store: FrameStore | None = None):
        """per_video: that many clips of every video; None: one random clip (train), or the evaluation windows
        (`eval_windows`: up to clips.eval_clips_per_video, as many as the video's length holds)."""
        self.rows, self.clips, self.train, self.seed, self.normalise = rows, clips, train, seed, normalise
        self.store = store  # decoded frames of `rows`, when they fit in memory
        self.class_index = {c: i for i, c in enumerate(classes)}
        counts = [per_video or (1 if train else eval_windows(row, clips)) for row in rows]
        self.items = [(video, clip, n) for video, n in enumerate(counts) for clip in range(n)]  # (video, window, of)
        self.epoch = 0  # bump between epochs so random offsets change

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item: int):
        from vidopt.video import read_frames

        torch = _import_torch()
        video, clip, clips = self.items[item]
        row = self.rows[video]
        rng = np.random.default_rng([self.seed, self.epoch, item]) if self.train else None
        indices = sample_clip_indices(row["num_frames"], self.clips.frames, clip_stride(row, self.clips),
                                      train=self.train, rng=rng, clip=clip, clips=clips)
        if self.store is not None:
            frames = self.store.videos[video][indices]  # [T, h, w, C] uint8
        else:
            frames = torch.from_numpy(read_frames(row["path"], indices, decoder=row["decoder"],
                                                  size=decode_size(row, self.clips)))  # [T, h, w, C] uint8
        frames = crop_to_clip(frames, self.clips, rng)   # [T, H, W, C]
        return (normalise_clips(frames) if self.normalise else frames), self.class_index[row["label"]], video
