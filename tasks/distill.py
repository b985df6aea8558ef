"""Distillation stage: train the small (2+1)D student (per-frame Conv2d encoder + temporal Conv1d head) to match the
teacher's soft predictions and the labels.

    python -m tasks.distill --profile tiny distill.epochs=4

Runs alone: it first ingests `data.source` and trains the teacher (both cached in the project dir, so a re-run reuses
them). The training clips are decoded once (a clip set in the artifact store) and the teacher runs once over them
(`teacher_logits.pt` in the stage's place); the student then trains for many cheap epochs on those fixed clips. A
killed run resumes from `last.pt`; a finished one is returned without training.
"""
from __future__ import annotations

import logging

import torch
from prefect import task

from tasks.caching import sealed, stage_cache
from tasks.common import (
    TrainingReads,
    artifact_model_spec,
    clip_set,
    finished_artifact,
    log_model_stage,
    logits_of,
    model_metrics,
    placement,
    put_weights,
    save_artifact,
    selection,
    stage_config,
    train_val_rows,
)
from tasks.retry import IO_RETRY_DELAYS, only_io_errors
from tasks.train_teacher import load_trained, training_notes
from vidopt.artifacts import DatasetArtifact, ModelArtifact
from vidopt.config import AugmentConfig, DistillConfig, PipelineConfig
from vidopt.models import StudentArch, build_model
from vidopt.stages import StageWork, artifact_hash, stage_work
from vidopt.stats import ALPHA, above_rate, format_top1, majority_rate
from vidopt.tracking import stage_run
from vidopt.train_jobs import FixedClips, Objective, TrainJob
from workers.train import run_training

log = logging.getLogger("vidopt.distill")
STAGE, CHECKPOINT = "distill", "last"


class Reads(TrainingReads):
    distill: DistillConfig
    augment: AugmentConfig


def student_arch(cfg: PipelineConfig | Reads, num_classes: int) -> StudentArch:
    c = cfg.clips
    return StudentArch(frames=c.frames, height=c.height, width=c.width, num_classes=num_classes,
                       **cfg.distill.architecture())


def work_dir(cfg: PipelineConfig | Reads, dataset: DatasetArtifact, teacher: ModelArtifact) -> StageWork:
    return stage_work(Reads.of(cfg), STAGE, [artifact_hash(dataset), artifact_hash(teacher)])


def run(cfg: PipelineConfig | Reads, dataset: DatasetArtifact, teacher: ModelArtifact, logger=None) -> ModelArtifact:
    cfg = Reads.of(cfg)
    work = work_dir(cfg, dataset, teacher)
    done = finished_artifact(work, "student", dataset)
    if done is not None:
        return done

    d = cfg.distill
    train_rows, _ = train_val_rows(work.store, dataset, STAGE)
    train_clips = clip_set(cfg, dataset, "train", d.cached_clips_per_video)
    teaches, check = teacher_check(teacher, dataset) if d.check_teacher else (True, "teacher not checked "
                                                                               "(distill.check_teacher false)")
    alpha, teacher_logits = d.alpha, None
    if teaches:
        log.info("%s: %s; %d fixed clips per train video (%d videos), the teacher's logits over them once", STAGE,
                 check, d.cached_clips_per_video, len(train_rows))
        teacher_logits = logits_of(cfg, artifact_model_spec(work.store, teacher), train_clips,
                                   work.child("teacher_logits.pt"))
    else:   # a teacher no better than answering the majority class would only teach its own noise
        alpha = 1.0
        log.warning("%s: %s: the student learns from the labels alone (distill.alpha 1.0 instead of %s)", STAGE,
                    check, d.alpha)

    arch = student_arch(cfg, len(dataset.classes))
    torch.manual_seed(cfg.run.seed)  # initial weights follow run.seed, which is part of the stage key
    start = put_weights(work, build_model(arch), "init.safetensors", arch)

    def train(name: str, with_teacher: bool):
        objective = Objective(loss="distillation", alpha=alpha, temperature=d.temperature,
                              label_smoothing=cfg.augment.label_smoothing) if with_teacher \
            else Objective(loss="cross_entropy", label_smoothing=cfg.augment.label_smoothing)
        job = TrainJob(
            stage=STAGE, store=work.store.spec, run_dir=work.uri, checkpoint_name=name,
            output=work.child(f"{name}.safetensors"), model=start,
            data=FixedClips(clips=train_clips, logits=teacher_logits if with_teacher else None), objective=objective,
            selection=selection(cfg, dataset, STAGE), augment=d.augment, hflip=cfg.augment.hflip, epochs=d.epochs,
            lr=d.lr, weight_decay=d.weight_decay, patience=d.patience, batch_size=cfg.clips.batch_size,
            seed=cfg.run.seed, placement=placement(cfg))
        return run_training(job, cfg.train, cfg.ray, logger)

    result = train(CHECKPOINT, teaches)
    if teaches and d.compare_labels_only:   # the stronger on val of the distilled student and one from labels alone
        alone = train("labels_only", False)
        check += (f"; on val the distilled student scored {result.best_score:.3f}, one from labels alone "
                  f"{alone.best_score:.3f}")
        if alone.best_score > result.best_score:
            teaches, result = False, alone
            check += ": the labels-only student is kept"
            log.warning("%s: the student from labels alone beats the distilled one on val: kept", STAGE)
    trained = start.model_copy(update={"weights": result.weights})
    student = load_trained(trained, work)
    scores = model_metrics(cfg, work, student, trained, dataset, result.model_dump())
    metrics = scores.metrics
    if "test_top1_clip" in metrics and "test_top1_clip" in teacher.metrics:
        # Positive: the student is that much worse than its teacher on the same test clips.
        metrics["test_top1_gap_to_teacher"] = teacher.metrics["test_top1_clip"] - metrics["test_top1_clip"]
    log.info("%s: done after %d epochs (best %d) on %s: %s", STAGE, result.epochs_run, result.best_epoch + 1,
             result.device, {k: round(v, 3) for k, v in metrics.items() if "top1" in k})
    clips = len(train_rows) * d.cached_clips_per_video
    notes = {"teacher": f"{teacher.uri} (sha256 {teacher.weights_sha256[:12]})", "teacher_check": check,
             "distillation": f"alpha {alpha}, temperature {d.temperature}, {clips} fixed clips" if teaches
             else f"labels only ({clips} fixed clips): see teacher_check",
             **training_notes(result)}
    return save_artifact(work, student, arch, scores, stage_config(cfg), "student", dataset, notes)


def teacher_check(teacher: ModelArtifact, dataset: DatasetArtifact) -> tuple[bool, str]:
    """(whether the teacher teaches, why): its val top-1 per video must be significantly above always answering the
    split's majority class (one-sided binomial test, p < 0.05; videos, not clips: a video's clips are not
    independent). With no val videos there is nothing to check it on, and it teaches."""
    videos = {label: counts.get("val", 0) for label, counts in dataset.class_counts.items()}
    n, top1 = sum(videos.values()), teacher.metrics.get("val_top1_video")
    if not n or top1 is None:
        return True, "teacher not checked: no val videos"
    label, rate = majority_rate(videos)
    correct = round(top1 * n)
    p = above_rate(correct, n, rate)
    verdict = (f"teacher val top-1 {format_top1(correct, n)} vs always answering {label!r} ({100 * rate:.1f}%): "
               f"p={p:.2g}")
    return p < ALPHA, verdict + (" (it teaches)" if p < ALPHA else " (not significantly better)")


# [Prefect] retries cover flaky I/O only; `run` above is the plain function tests call.
@task(name="distill", retries=len(IO_RETRY_DELAYS), retry_delay_seconds=IO_RETRY_DELAYS,
      retry_condition_fn=only_io_errors, **stage_cache(work_dir))
def distill_task(cfg: PipelineConfig, dataset: DatasetArtifact, teacher: ModelArtifact,
                 parent_run_id: str) -> ModelArtifact:
    with stage_run(STAGE, parent_run_id) as stage:  # [MLflow] nested run; per-epoch metrics go through `fit`
        student = run(cfg, dataset, teacher, logger=stage)
        log_model_stage(stage, Reads.of(cfg), student, work_dir(cfg, dataset, teacher).store)
    return sealed(work_dir(cfg, dataset, teacher), student)


if __name__ == "__main__":
    from tasks.dag import run_stage_standalone

    run_stage_standalone(STAGE)
