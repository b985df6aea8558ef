"""Model metrics: multiply-accumulates ("GFLOPs" as torchvision publishes them), parameters, size, top-1 per clip and
per video."""
from __future__ import annotations

import hashlib
import re
from collections import defaultdict

import numpy as np
import torch
from torch import nn

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass over convolutions and linear layers.

    This is the convention behind torchvision's published GFLOPS (r3d_18: 40.70, r2plus1d_18: 40.52 at 16x112x112),
    which counts a multiply-add once and ignores BN, ReLU and pooling.
    """
    total = 0

    def hook(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, CONV_TYPES):
            kernel = int(np.prod(module.kernel_size))
            total += output.numel() * (module.in_channels // module.groups) * kernel
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (*CONV_TYPES, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose argmax is the label. logits [N, classes], labels [N]."""
    return float((logits.argmax(1) == labels).mean()) if len(labels) else float("nan")


def per_video(logits: np.ndarray, labels: np.ndarray, videos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (logits [V, classes], labels [V]): each video's clip logits averaged, videos in order of first appearance.
    The unit every statistic counts: clips of one video are not independent trials."""
    by_video: dict[int, list[int]] = defaultdict(list)
    for i, v in enumerate(videos):
        by_video[int(v)].append(i)
    mean_logits = np.stack([logits[idx].mean(0) for idx in by_video.values()])
    video_labels = np.array([labels[idx[0]] for idx in by_video.values()])
    return mean_logits, video_labels


def top1_per_video(logits: np.ndarray, labels: np.ndarray, videos: np.ndarray) -> float:
    """Average the clip logits of each video, then top-1 over videos."""
    return top1(*per_video(logits, labels, videos))


def metric_names(labels: list[str]) -> dict[str, str]:
    """{label: a name MLflow takes in a metric or tag key}. Labels may be any text; one with characters beyond
    letters, digits, '_', '-', '.' and ' ' gets them as '_' plus a hash of the label, so two labels never share a
    name ('a+b' and 'a_b' stay apart). The label itself stays what reports show."""
    names = {}
    for label in labels:
        safe = re.sub(r"[^A-Za-z0-9_\-. ]", "_", label).strip() or "_"
        names[label] = safe if safe == label else f"{safe}-{hashlib.sha256(label.encode()).hexdigest()[:6]}"
    return names
