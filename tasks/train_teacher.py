"""Teacher stage: train a video ResNet (r3d_18 / mc3_18 / r2plus1d_18, width-scaled) on the ingested clips.

    python -m tasks.train_teacher --profile tiny teacher.epochs=3

Runs alone after ingesting `data.source` (ingest is cached in the project dir, so a re-run reuses it). Work lives in
`<project>/stages/train_teacher/<key>/`: `last.pt` after every epoch (a killed run resumes there) and `model/` when done
(a second run with the same inputs returns it without training).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from prefect import task
from torch import nn

from tasks.caching import stage_cache
from tasks.common import (
    CHECKPOINT,
    cached_clip_set,
    finished_artifact,
    log_model_stage,
    model_metrics,
    save_artifact,
    score_fn_with_fallback,
    train_val_rows,
)
from tasks.retry import IO_RETRY_DELAYS, only_io_errors
from vidopt.artifacts import DatasetArtifact, ModelArtifact
from vidopt.augment import augment_clips
from vidopt.checkpoint import load_state_dict_uri
from vidopt.config import PipelineConfig
from vidopt.data import make_loader
from vidopt.distillation import clip_set_top1
from vidopt.models import TeacherArch, build_model
from vidopt.stages import artifact_hash, stage_dir
from vidopt.storage import is_s3, sha256_file
from vidopt.tracking import stage_run
from vidopt.training import FitSpec, bf16_training, fit

log = logging.getLogger("vidopt.train_teacher")
STAGE, SECTIONS = "train_teacher", ["teacher", "clips"]


def work_dir(cfg: PipelineConfig, dataset: DatasetArtifact) -> Path:
    return stage_dir(cfg, STAGE, SECTIONS, [artifact_hash(dataset), *_init_identity(cfg.teacher.init)])


def run(cfg: PipelineConfig, dataset: DatasetArtifact, logger=None) -> ModelArtifact:
    work = work_dir(cfg, dataset)
    done = finished_artifact(work, "teacher", dataset, STAGE)
    if done is not None:
        return done

    t = cfg.teacher
    arch = TeacherArch(arch=t.arch, width=t.width, frame_differences=t.frame_differences,
                       num_classes=len(dataset.classes))
    torch.manual_seed(cfg.run.seed)  # initial weights follow run.seed, which is part of the stage key
    model = build_model(arch)
    notes = {"init": load_init(model, t.init)} if t.init else {}

    train_rows, val_rows = train_val_rows(dataset, STAGE)
    train_loader = make_loader(train_rows, dataset.classes, cfg.clips, train=True, seed=cfg.run.seed)
    # The val clips are the same every epoch: decoded once (cached in the project dir, as later stages reuse them).
    per_video, batch = cfg.clips.eval_clips_per_video, cfg.clips.batch_size
    scored = cached_clip_set(cfg, dataset, val_rows or train_rows, "val" if val_rows else "train", per_video)
    score = score_fn_with_fallback(STAGE, bool(val_rows), lambda m: clip_set_top1(m, scored, batch),
                                   lambda m: clip_set_top1(m, scored, batch))

    augment = torch.Generator() if t.augment else None

    def start_epoch(epoch: int) -> None:
        # New random clip offsets, shuffle and augmentation every epoch, the same ones again after a resume.
        train_loader.dataset.epoch = epoch
        train_loader.generator.manual_seed(cfg.run.seed + epoch)
        if augment is not None:
            augment.manual_seed(cfg.run.seed * 100_003 + epoch)

    def cross_entropy(model: nn.Module, batch: tuple) -> torch.Tensor:
        x, y, _video = batch  # x: [B, C, T, H, W]
        return F.cross_entropy(model(x if augment is None else augment_clips(x, augment)), y)

    log.info("%s: %s width %.3g, %d classes, %d train / %d val videos, work dir %s", STAGE, t.arch, t.width,
             arch.num_classes, len(train_rows), len(val_rows), work)
    result = fit(model, cross_entropy, train_loader, score,
                 FitSpec(epochs=t.epochs, lr=t.lr, weight_decay=t.weight_decay, patience=t.patience, stage=STAGE,
                         channels_last=True, bf16=bf16_training(t.precision),
                         score_name="val_top1" if val_rows else "train_top1"),
                 checkpoint=work / CHECKPOINT, logger=logger, on_epoch_start=start_epoch)
    metrics = model_metrics(model, cfg, dataset, result)
    log.info("%s: done after %d epochs (best %d): %s", STAGE, result["epochs_run"], result["best_epoch"] + 1,
             {k: round(v, 3) for k, v in metrics.items() if "top1" in k})
    return save_artifact(work, model, arch, metrics, cfg, "teacher", dataset, notes)


def load_init(model: nn.Module, uri: str) -> str:
    """Start from a state_dict: every key whose name and shape match is loaded; the rest (the classifier `fc` when the
    class count differs, or layers of another width) keep their fresh initialisation. Returns a one-line summary."""
    source = load_state_dict_uri(uri)
    source = {k.removeprefix("module."): v for k, v in source.items()}  # DataParallel / DDP checkpoints
    own = model.state_dict()
    matched = {k: v for k, v in source.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not matched:
        raise ValueError(f"{STAGE}: teacher.init {uri}: no parameter matches the {type(model).__name__} being trained "
                         f"(names or shapes differ: check teacher.arch and teacher.width); e.g. it has "
                         f"{sorted(source)[:3]}, the model expects {sorted(own)[:3]}")
    model.load_state_dict(matched, strict=False)
    fresh = sorted(k for k in own if k not in matched)
    summary = f"loaded {len(matched)}/{len(own)} tensors from {uri}; fresh: {_short(fresh)}"
    log.info("%s: teacher.init %s", STAGE, summary)
    if any(k.startswith("fc.") for k in fresh):
        log.info("%s: teacher.init: classifier replaced (the checkpoint has other classes)", STAGE)
    return summary


def _short(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "") if keys else "none"


def _init_identity(init: str | None) -> list[str]:
    """The init file's content hash joins the stage key, so replacing the file at the same path trains again.
    (s3:// inits are keyed by URI only: hashing one would mean downloading it just to decide.)"""
    if init is None or is_s3(init) or not Path(init).is_file():
        return [init] if init else []
    return [sha256_file(Path(init))]


# [Prefect] retries cover flaky I/O only; `run` above is the plain function tests call.
@task(name="train_teacher", retries=len(IO_RETRY_DELAYS), retry_delay_seconds=IO_RETRY_DELAYS,
      retry_condition_fn=only_io_errors, **stage_cache(work_dir))
def train_teacher_task(cfg: PipelineConfig, dataset: DatasetArtifact, parent_run_id: str) -> ModelArtifact:
    with stage_run(STAGE, parent_run_id) as stage:  # [MLflow] nested run; per-epoch metrics go through `fit`
        teacher = run(cfg, dataset, logger=stage)
        log_model_stage(stage, cfg, SECTIONS, teacher)
    return teacher


def _standalone(cfg: PipelineConfig) -> ModelArtifact:
    from tasks import ingest

    return run(cfg, ingest.run(cfg))


if __name__ == "__main__":
    from vidopt.config import run_stage_standalone

    run_stage_standalone(_standalone)
