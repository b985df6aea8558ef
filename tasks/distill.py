"""Distillation stage: train the small (2+1)D student (per-frame Conv2d encoder + temporal Conv1d head) to match the
teacher's soft predictions and the labels.

    python -m tasks.distill --profile tiny distill.epochs=4

Runs alone: it first ingests `data.source` and trains the teacher (both cached in the project dir, so a re-run reuses
them). The training clips are decoded once and the teacher runs once over them (`train_clips.pt`,
`teacher_logits.pt` in the stage dir); the student then trains for many cheap epochs on those fixed clips. A killed run
resumes from `last.pt`; a finished one is returned without training.
"""
from __future__ import annotations

import logging

import torch
from prefect import task

from tasks.caching import stage_cache
from tasks.common import (
    CHECKPOINT,
    EpochBatches,
    finished_artifact,
    load_artifact_model,
    log_model_stage,
    model_metrics,
    save_artifact,
    score_fn_with_fallback,
    train_val_rows,
)
from tasks.retry import IO_RETRY_DELAYS, only_io_errors
from vidopt.artifacts import DatasetArtifact, ModelArtifact
from vidopt.config import PipelineConfig
from vidopt.distillation import attach_teacher_logits, clip_set_top1, decode_clip_set, distillation_loss
from vidopt.models import StudentArch, build_model
from vidopt.stages import artifact_hash, stage_dir
from vidopt.tracking import stage_run
from vidopt.training import FitSpec, fit

log = logging.getLogger("vidopt.distill")
STAGE, SECTIONS = "distill", ["distill", "clips"]


def student_arch(cfg: PipelineConfig, num_classes: int) -> StudentArch:
    c = cfg.clips
    return StudentArch(frames=c.frames, height=c.height, width=c.width, num_classes=num_classes,
                       **cfg.distill.architecture())


def work_dir(cfg: PipelineConfig, dataset: DatasetArtifact, teacher: ModelArtifact) -> Path:
    return stage_dir(cfg, STAGE, SECTIONS, [artifact_hash(dataset), artifact_hash(teacher)])


def run(cfg: PipelineConfig, dataset: DatasetArtifact, teacher: ModelArtifact, logger=None) -> ModelArtifact:
    work = work_dir(cfg, dataset, teacher)
    done = finished_artifact(work, "student", dataset, STAGE)
    if done is not None:
        return done

    d, batch = cfg.distill, cfg.clips.batch_size
    train_rows, val_rows = train_val_rows(dataset, STAGE)
    log.info("%s: decoding %d clips per train video (%d videos), cached in %s", STAGE, d.cached_clips_per_video,
             len(train_rows), work)
    train_set = decode_clip_set(train_rows, dataset.classes, cfg.clips, per_video=d.cached_clips_per_video,
                                cache=work / "train_clips.pt")
    logits_cache = work / "teacher_logits.pt"
    teacher_model = None  # only loaded when its logits are not cached yet: a resumed run never runs it again
    if not logits_cache.exists():
        log.info("%s: running the teacher (%s) once over %d training clips", STAGE, teacher.uri, len(train_set.labels))
        teacher_model = load_artifact_model(teacher)
    train_set = attach_teacher_logits(train_set, teacher_model, batch, cache=logits_cache)
    val_set = decode_clip_set(val_rows, dataset.classes, cfg.clips, per_video=cfg.clips.eval_clips_per_video,
                              cache=work / "val_clips.pt") if val_rows else None
    score = score_fn_with_fallback(STAGE, val_set is not None, lambda m: clip_set_top1(m, val_set, batch),
                                   lambda m: clip_set_top1(m, train_set, batch))

    arch = student_arch(cfg, len(dataset.classes))
    torch.manual_seed(cfg.run.seed)  # initial weights follow run.seed, which is part of the stage key
    student = build_model(arch)

    def loss_fn(model, batch_):
        x, labels, teacher_logits = batch_  # x: [B, C, T, H, W]; teacher_logits: [B, classes]
        return distillation_loss(model(x), teacher_logits, labels, d.alpha, d.temperature)

    batches = EpochBatches(train_set, batch, cfg.run.seed, augment=d.augment)
    result = fit(student, loss_fn, batches, score,
                 FitSpec(epochs=d.epochs, lr=d.lr, weight_decay=d.weight_decay, patience=d.patience, stage=STAGE,
                         channels_last=True, score_name="val_top1" if val_set is not None else "train_top1"),
                 checkpoint=work / CHECKPOINT, logger=logger, on_epoch_start=batches.start_epoch)

    metrics = model_metrics(student, cfg, dataset, result)
    if "test_top1_clip" in metrics and "test_top1_clip" in teacher.metrics:
        # Positive: the student is that much worse than its teacher on the same test clips.
        metrics["test_top1_gap_to_teacher"] = teacher.metrics["test_top1_clip"] - metrics["test_top1_clip"]
    log.info("%s: done after %d epochs (best %d): %s", STAGE, result["epochs_run"], result["best_epoch"] + 1,
             {k: round(v, 3) for k, v in metrics.items() if "top1" in k})
    notes = {"teacher": f"{teacher.uri} (sha256 {teacher.weights_sha256[:12]})",
             "distillation": f"alpha {d.alpha}, temperature {d.temperature}, {len(train_set.labels)} cached clips"}
    return save_artifact(work, student, arch, metrics, cfg, "student", dataset, notes)


# [Prefect] retries cover flaky I/O only; `run` above is the plain function tests call.
@task(name="distill", retries=len(IO_RETRY_DELAYS), retry_delay_seconds=IO_RETRY_DELAYS,
      retry_condition_fn=only_io_errors, **stage_cache(work_dir))
def distill_task(cfg: PipelineConfig, dataset: DatasetArtifact, teacher: ModelArtifact,
                 parent_run_id: str) -> ModelArtifact:
    with stage_run(STAGE, parent_run_id) as stage:  # [MLflow] nested run; per-epoch metrics go through `fit`
        student = run(cfg, dataset, teacher, logger=stage)
        log_model_stage(stage, cfg, SECTIONS, student)
    return student


def _standalone(cfg: PipelineConfig) -> ModelArtifact:
    """Ingest and the teacher first: both are cached in the project dir, so a re-run (or a resumed one) reuses them."""
    from tasks import ingest, train_teacher

    dataset = ingest.run(cfg)
    return run(cfg, dataset, train_teacher.run(cfg, dataset))


if __name__ == "__main__":
    from vidopt.config import run_stage_standalone

    run_stage_standalone(_standalone)
