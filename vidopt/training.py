"""The one training loop every stage uses (teacher, distillation, pruning fine-tune, QAT): AdamW with a one-cycle
schedule (warm-up, then cosine decay, stepped per batch), a checkpoint after every epoch, resume from it after a crash,
early stopping on a validation score (top-1 by default, or a loss to minimise), best weights kept.

It is plain PyTorch: on a GPU it moves batches there (non-blocking, from pinned memory) and runs forward passes under
autocast; under DDP the caller passes the wrapped module as `forward` and every rank runs the same loop (scores are
computed on every rank from the same weights, so every rank stops at the same epoch without talking to the others).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal, Protocol

import numpy as np
import torch
from torch import nn

from vidopt.checkpoint import load_checkpoint, save_checkpoint
from vidopt.metrics import top1, top1_per_video
from vidopt.progress import progress_bar

log = logging.getLogger("vidopt.training")


class EpochLogger(Protocol):
    def log(self, name: str, value: float, step: int | None = None) -> None: ...


class CheckpointIO(Protocol):
    """Where `fit` keeps its state between epochs: a local file (FileCheckpoint), or Ray Train's checkpoints in the
    artifact store (workers/train.py). `save` is called by every rank with the same state; one copy is kept."""
    def load(self) -> dict | None: ...
    def save(self, state: dict, metrics: dict[str, float]) -> None: ...


# What `fit` reads from every checkpoint; a state without one of them is not resumed from.
FIT_STATE_KEYS = ("epoch", "model", "optimizer", "scheduler", "best_score", "best_epoch", "history", "best_model")


class FileCheckpoint:
    """The state in one local file, replaced atomically each epoch (tensors and plain values: weights_only loads); a
    truncated or corrupted file is set aside and the one saved before it used (vidopt.checkpoint)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> dict | None:
        return load_checkpoint(self.path, required=FIT_STATE_KEYS)

    def save(self, state: dict, metrics: dict[str, float]) -> None:
        save_checkpoint(self.path, state)


Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class FitSpec:
    epochs: int
    lr: float
    weight_decay: float = 1e-4
    patience: int = 1000           # epochs without a better val score before stopping
    stage: str = "train"           # prefix of logged metric names and progress lines
    channels_last: bool = False    # train with conv weights in channels-last order (see conv_layout)
    score_name: str = "val_top1"   # what score_fn measures: logged as <stage>.<score_name>
    maximize: bool = True          # False: score_fn returns a loss, and the lowest is best
    head_lr_only: tuple[str, float] | None = None  # (classifier name prefix, share of lr for every other layer)
    precision: Precision = "fp32"  # forward passes under autocast to this type on the training device (Autocast);
    #                                fp16 also scales the loss (GradScaler), as its gradients underflow otherwise


# Warm-up share of the one-cycle schedule. Without warm-up (plain cosine from the peak) the demo teacher (r3d_18 w0.25
# from scratch, AdamW 1e-3) was still at chance after 300 steps; with it, at 80% test top-1.
WARMUP_FRACTION = 0.15

# loss_fn(model, batch) -> scalar loss; the batch is whatever the loader yields (it must have a len: batches/epoch).
LossFn = Callable[[nn.Module, tuple], torch.Tensor]


def fit(model: nn.Module, loss_fn: LossFn, train_batches: Iterable, score_fn: Callable[[nn.Module], float],
        spec: FitSpec, checkpoint: Path | CheckpointIO, logger: EpochLogger | None = None,
        on_epoch_start: Callable[[int], None] | None = None, device: torch.device | None = None,
        forward: nn.Module | None = None) -> dict:
    """Train `model` in place and leave it holding the best-scoring weights. Resumes from `checkpoint` if it holds a
    state. `forward` is what the loss calls (a DDP wrapper of `model`; default `model`); `device` is where batches
    go (default: where they are).

    Returns {"best_score", "best_epoch", "epochs_run", "resumed_from", "history": [{epoch, loss, score, seconds,
    clips, data_seconds, gpu_busy}]}: data_seconds is the time spent waiting for batches, gpu_busy (on CUDA) the share
    of the epoch's training time the GPU was computing.
    """
    store = checkpoint if hasattr(checkpoint, "save") else FileCheckpoint(checkpoint)
    if spec.epochs == 0:   # nothing to train: the model as it came
        return {"best_score": None, "best_epoch": -1, "epochs_run": 0, "resumed_from": 0, "history": []}
    if spec.channels_last:
        conv_layout(model, channels_last=True)
    if spec.precision != "fp32":
        log.info("%s: forward passes in %s autocast (weights, gradients and loss in float32)", spec.stage,
                 spec.precision)
    groups, peaks = _param_groups(model, spec)
    optimizer = torch.optim.AdamW(groups, lr=spec.lr, weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, epochs=spec.epochs,
                                                    steps_per_epoch=max(1, len(train_batches)),
                                                    pct_start=WARMUP_FRACTION)
    device_type = (device or next(model.parameters()).device).type
    scaler = torch.amp.GradScaler(device_type, enabled=spec.precision == "fp16")
    # best_epoch: the weights kept (ties go to the later epoch); improved_epoch: the last strictly better score, which
    # patience counts from, so a plateau of equal scores still stops early
    state = {"epoch": 0, "best_score": None, "best_epoch": -1, "improved_epoch": -1, "history": [], "best_model": None,
             "score_name": spec.score_name}
    saved = store.load()
    resumed_from = 0
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if "scaler" in saved:
            scaler.load_state_dict(saved["scaler"])
        # older checkpoints: best_epoch was strictly better, and every stage chose epochs by val top-1
        saved = {"improved_epoch": saved["best_epoch"], "score_name": "val_top1", **saved}
        state = {k: saved[k] for k in state}
        resumed_from = state["epoch"]
        if state["score_name"] != spec.score_name:  # scores of another kind do not compare: choose among new epochs
            log.warning("%s: the checkpoint chose epochs by %s, this run by %s; only epochs from %d on compete",
                        spec.stage, state["score_name"], spec.score_name, resumed_from + 1)
            state.update(best_score=None, best_epoch=-1, improved_epoch=-1, best_model=None,
                         score_name=spec.score_name)
        log.info("%s: resumed from checkpoint after epoch %d (best %s %s)", spec.stage, resumed_from,
                 spec.score_name, state["best_score"])

    trained = forward or model                             # what the loss calls; `model` itself is scored and saved
    if spec.precision != "fp32":
        trained = Autocast(trained, device_type, spec.precision)
    with progress_bar(spec.stage, "epochs", lines=False) as progress:   # a bar in a terminal; the lines below else
        for epoch in range(state["epoch"], spec.epochs):
            if epoch - state["improved_epoch"] > spec.patience and state["improved_epoch"] >= 0:
                log.info("%s: early stop after epoch %d (no better %s for %d epochs)", spec.stage, epoch,
                         spec.score_name, spec.patience)
                break
            if on_epoch_start:
                on_epoch_start(epoch)
            started = time.monotonic()
            loss, counters = _train_one_epoch(trained, loss_fn, train_batches, optimizer, scheduler, scaler, device,
                                              spec.stage, epoch)
            train_seconds = time.monotonic() - started
            score = score_fn(model)
            seconds = time.monotonic() - started
            # >=: a small val split ties often (72 clips: 0.931 at epochs 18, 25, 27, 29 and 30 of the demo
            # teacher), and of equal scores the later epoch has trained longer, further down the one-cycle schedule
            sign = 1 if spec.maximize else -1
            gain = None if state["best_score"] is None else (score - state["best_score"]) * sign
            if gain is None or gain > 0:
                state["improved_epoch"] = epoch
            if gain is None or gain >= 0:
                state.update(best_score=score, best_epoch=epoch,
                             best_model={k: v.detach().clone() for k, v in model.state_dict().items()})
            state["history"].append({"epoch": epoch, "loss": loss, "score": score, "seconds": seconds,
                                     "train_seconds": train_seconds, **counters})
            state["epoch"] = epoch + 1
            store.save({**state, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()},
                       {"epoch": epoch, "loss": loss, spec.score_name: score})
            log.info("%s: epoch %d/%d loss %.4f %s %.4f (%.1f s)", spec.stage, epoch + 1, spec.epochs, loss,
                     spec.score_name, score, seconds)
            if logger is not None:
                logger.log(f"{spec.stage}.loss", loss, step=epoch)
                logger.log(f"{spec.stage}.{spec.score_name}", score, step=epoch)
                logger.log(f"{spec.stage}.epoch_seconds", seconds, step=epoch)
            progress(epoch + 1, spec.epochs)

    if state["best_model"] is not None:
        model.load_state_dict(state["best_model"])
    if spec.channels_last:
        conv_layout(model, channels_last=False)  # the model leaves as it came: safetensors saves contiguous tensors
    return {"best_score": state["best_score"], "best_epoch": state["best_epoch"], "epochs_run": state["epoch"],
            "resumed_from": resumed_from, "history": state["history"]}


def _param_groups(model: nn.Module, spec: FitSpec) -> tuple[list[dict], list[float]]:
    """One group at spec.lr, or, with head_lr_only, the classifier at spec.lr and the rest at its share of it."""
    if spec.head_lr_only is None:
        return [{"params": list(model.parameters())}], [spec.lr]
    prefix, share = spec.head_lr_only
    head = [p for name, p in model.named_parameters() if name.startswith(prefix)]
    rest = [p for name, p in model.named_parameters() if not name.startswith(prefix)]
    return [{"params": rest}, {"params": head}], [spec.lr * share, spec.lr]


def bf16_training(precision: str) -> bool:
    """Whether a CPU training stage runs its forward passes in bfloat16 (teacher.precision): "bf16", "fp32", or "auto"
    = bf16 where the CPU has AMX (Intel Sapphire Rapids and later), whose tile units multiply bfloat16 several times
    faster than AVX-512 multiplies float32; elsewhere oneDNN emulates bfloat16 or lacks the units (not measured)."""
    if precision == "auto":
        return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    return precision == "bf16"


class Autocast(nn.Module):
    """`model` called under autocast to bfloat16 or float16 on its device, its output cast back to float32: convs and
    matmuls run in the low precision (oneDNN's AMX kernels on CPUs, tensor cores on GPUs), while the weights, their
    gradients, AdamW's state and BatchNorm's running statistics stay float32, and the loss is computed in float32.
    Mixed precision, not a low-precision model: the saved weights are float32 and evaluation runs in float32. One CPU
    training step at batch 16, 8x64x64, on a 2-core AMX Xeon in bfloat16: the demo teacher (r3d_18 width 0.25)
    0.174 -> 0.077 s, the demo student 0.027 -> 0.019 s."""

    def __init__(self, model: nn.Module, device_type: str, precision: Precision):
        super().__init__()
        self.model, self.device_type = model, device_type
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.model(x)
        return out.float()


def conv_layout(model: nn.Module, channels_last: bool) -> None:
    """Conv2d / Conv3d weights in channels-last order (stored [O, (T,) H, W, I]) or back to the default. The values are
    the same; oneDNN picks channels-last kernels, and activations follow the weights' layout. Measured on this 2-core
    CPU, one training step at batch 16, 8x64x64: r3d_18 at width 0.25 0.47 -> 0.27 s, the 2D
    student 0.055 -> 0.046 s."""
    for module in model.modules():
        if isinstance(module, nn.Conv3d):
            module.to(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
        elif isinstance(module, nn.Conv2d):
            module.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _train_one_epoch(model, loss_fn, batches, optimizer, scheduler, scaler, device, stage: str,
                     epoch: int) -> tuple[float, dict]:
    """One pass over `batches` -> (mean loss, {clips, data_seconds, gpu_busy}). data_seconds: waiting for the next
    batch (decoding not hidden behind compute); gpu_busy: CUDA event time of the steps over the epoch's wall time."""
    model.train()
    total, count, clips, data_seconds, last_report = 0.0, 0, 0, 0.0, time.monotonic()
    cuda = device is not None and device.type == "cuda"
    events, started = [], time.monotonic()
    iterator = iter(batches)
    while True:
        waited = time.monotonic()
        batch = next(iterator, None)
        data_seconds += time.monotonic() - waited
        if batch is None:
            break
        if device is not None:
            batch = to_device(batch, device)
        if cuda:
            events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            events[-1][0].record()
        loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if cuda:
            events[-1][1].record()
        total, count, clips = total + loss.item(), count + 1, clips + len(batch[0])
        if time.monotonic() - last_report > 30:  # long epochs still show they are alive
            log.info("%s: epoch %d batch %d/%d loss %.4f", stage, epoch + 1, count, len(batches), total / count)
            last_report = time.monotonic()
    counters = {"clips": clips, "data_seconds": data_seconds}
    if cuda:
        torch.cuda.synchronize()
        busy_ms = sum(start.elapsed_time(end) for start, end in events)
        counters["gpu_busy"] = busy_ms / 1000 / max(time.monotonic() - started, 1e-9)
    return total / max(count, 1), counters


def to_device(batch: tuple, device: torch.device) -> tuple:
    """Tensors of a batch on `device`; non-blocking, which overlaps the copy with compute when they are pinned."""
    return tuple(t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in batch)


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits [N, classes], labels [N] and video indices [N] over (clip [B, C, T, H, W], label, video) batches."""
    model.eval()
    logits, labels, videos = [], [], []
    for x, y, v in batches:
        logits.append(model(x).float().numpy())
        labels.append(np.asarray(y))
        videos.append(np.asarray(v))
    return np.concatenate(logits), np.concatenate(labels), np.concatenate(videos)


def evaluate(model: nn.Module, batches: Iterable) -> dict[str, float]:
    logits, labels, videos = predict(model, batches)
    return {"top1_clip": top1(logits, labels), "top1_video": top1_per_video(logits, labels, videos)}
