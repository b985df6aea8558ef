"""Knowledge distillation: the loss, and a fixed set of clips decoded once.

Fixed clips (K uniformly spaced windows per training video) make the teacher's answer per clip reusable: the teacher
runs once per clip, not once per clip per epoch. The decoded clips are kept as uint8 (16x64x64x3 = 196 KB a clip), so
the many cheap student epochs decode nothing either. Used by distillation, pruning fine-tune and QAT alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vidopt.config import ClipConfig
from vidopt.data import ClipDataset, normalise_clips
from vidopt.storage import atomic_path


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      alpha: float, temperature: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """alpha * CE(labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T)).

    T^2 keeps the soft term's gradient scale independent of T (Hinton et al., 2015).
    """
    hard = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1), F.log_softmax(teacher_logits / temperature, dim=1),
                    reduction="batchmean", log_target=True)
    return alpha * hard + (1 - alpha) * temperature**2 * soft


@dataclass
class ClipSet:
    """Decoded clips in memory. clips: uint8 [N, T, H, W, C]; labels [N]; videos [N]."""
    clips: torch.Tensor
    labels: torch.Tensor
    videos: torch.Tensor

    def batches(self, batch_size: int, shuffle: bool, seed: int = 0):
        """Yield (x [B, C, T, H, W] float normalised, labels, videos)."""
        order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(seed)) if shuffle \
            else torch.arange(len(self.labels))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            yield normalise_clips(self.clips[idx]), self.labels[idx], self.videos[idx]


def decode_clip_set(rows: list[dict], classes: list[str], clips: ClipConfig, per_video: int | None,
                    cache: Path | None = None) -> ClipSet:
    """Decode `per_video` uniformly spaced clips of every row once (cached on disk at `cache` if given); None: the
    evaluation windows (vidopt/data.py eval_windows)."""
    if cache is not None and cache.exists():
        return ClipSet(**torch.load(cache, weights_only=True))
    dataset = ClipDataset(rows, classes, clips, train=False, per_video=per_video, normalise=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=clips.batch_size, num_workers=clips.loader_workers)
    xs, ys, vs = [], [], []
    for x, y, v in loader:
        xs.append(x)
        ys.append(y)
        vs.append(v)
    result = ClipSet(torch.cat(xs), torch.cat(ys), torch.cat(vs))
    if cache is not None:
        with atomic_path(cache) as tmp:
            torch.save({"clips": result.clips, "labels": result.labels, "videos": result.videos}, tmp)
    return result
