"""Cross-validation stage: with `data.folds=k` (k >= 2), the teacher and the distilled student are trained k more
times, each time testing on one fold of the videos, so on a small dataset every video is tested once and the scores
rest on all of them instead of one test split of a few dozen.

    python -m tasks.crossval --profile tiny data.folds=3

Each fold is a dataset of its own (the same videos, other splits: vidopt/data.py assign_fold) that goes through the
teacher and distillation stages as they are, so every fold is cached and resumes like them. The shipped model is still
the one of the run's own split; these numbers say how far its scores can be trusted.
"""
from __future__ import annotations

import json
import logging
import statistics

import numpy as np
from prefect import task

from tasks import distill, train_teacher
from tasks.caching import sealed, stage_cache
from tasks.common import TrainingReads
from tasks.retry import IO_RETRY_DELAYS, only_io_errors
from vidopt.artifacts import CrossValArtifact, DatasetArtifact, FoldScores
from vidopt.config import AugmentConfig, DataConfig, DistillConfig, PipelineConfig, TeacherConfig
from vidopt.data import assign_fold, class_counts, data_version
from vidopt.stages import StageWork, artifact_hash, read_manifest, stage_work
from vidopt.stats import format_top1, mcnemar, unpack_correct, wilson_interval
from vidopt.storage import sha256_file, write_jsonl

log = logging.getLogger("vidopt.crossval")
STAGE, RESULT = "crossval", "crossval.json"
RUNGS = ("teacher", "student")


class Reads(TrainingReads):
    data: DataConfig           # folds and the val share
    teacher: TeacherConfig     # each fold trains a teacher and a student as the run's own stages do
    augment: AugmentConfig
    distill: DistillConfig


def work_dir(cfg: PipelineConfig | Reads, dataset: DatasetArtifact) -> StageWork:
    return stage_work(Reads.of(cfg), STAGE, [artifact_hash(dataset)])


def run(cfg: PipelineConfig | Reads, dataset: DatasetArtifact) -> CrossValArtifact | None:
    """k-fold scores of the teacher and the student, or None when data.folds < 2 (off)."""
    reads = Reads.of(cfg)
    k = reads.data.folds
    if k < 2:
        return None
    work = work_dir(reads, dataset)
    if work.store.has(work.child(RESULT)):
        log.info("crossval: %s already holds the %d-fold scores for these inputs", work.uri, k)
        return CrossValArtifact.model_validate_json(work.store.read_text(work.child(RESULT)))
    rows = read_manifest(work.store, dataset)
    smallest = min(class_counts(rows).values(), key=lambda c: c["total"])["total"]
    if smallest < k:
        raise ValueError(f"crossval: data.folds={k} but a class has only {smallest} videos; every fold needs one of "
                         "each class (lower data.folds)")
    folds = []
    for fold in range(k):
        fold_set = fold_dataset(work, dataset, rows, reads.data, fold)
        log.info("crossval: fold %d/%d: %s train / %s val / %s test videos", fold + 1, k,
                 *(sum(c[s] for c in fold_set.class_counts.values()) for s in ("train", "val", "test")))
        teacher = train_teacher.run(reads, fold_set)
        student = distill.run(reads, fold_set, teacher)
        scores = FoldScores(fold=fold, test_videos=len(unpack_correct(teacher.test_correct)),
                            top1={"teacher": teacher.metrics["test_top1_video"],
                                  "student": student.metrics["test_top1_video"]},
                            correct={"teacher": teacher.test_correct, "student": student.test_correct},
                            teacher_check=student.notes.get("teacher_check", ""))
        log.info("crossval: fold %d/%d: teacher %.1f%%, student %.1f%% on %d test videos", fold + 1, k,
                 100 * scores.top1["teacher"], 100 * scores.top1["student"], scores.test_videos)
        folds.append(scores)
    result = pooled_scores(work.uri, folds)
    work.store.write_text(work.child(RESULT), result.model_dump_json(indent=2))
    for rung in RUNGS:
        p = result.pooled[rung]
        log.info("crossval: %s %s over %d folds (per fold %.1f +- %.1f)", rung,
                 format_top1(round(p["top1"] * p["videos"]), int(p["videos"])), k, 100 * p["fold_mean"],
                 100 * p["fold_sd"])
    return result


def fold_dataset(work: StageWork, dataset: DatasetArtifact, rows: list[dict], data: DataConfig,
                 fold: int) -> DatasetArtifact:
    """The dataset with fold `fold`'s splits, published beside the stage's result (same videos, same rows)."""
    fold_rows = assign_fold(rows, data.folds, fold, data.split_fractions, data.min_split_videos)
    uri = work.child(f"fold-{fold}-of-{data.folds}")
    out = work.local / uri.rsplit("/", 1)[1]
    write_jsonl(out / "manifest.jsonl", fold_rows)
    write_jsonl(out / "quarantine.jsonl", [])
    work.store.put_dir(out, uri)
    return dataset.model_copy(update={
        "uri": uri, "manifest_uri": f"{uri}/manifest.jsonl", "quarantine_uri": f"{uri}/quarantine.jsonl",
        "manifest_sha256": sha256_file(out / "manifest.jsonl"), "data_version": data_version(fold_rows),
        "class_counts": class_counts(fold_rows), "num_quarantined": 0, "downloaded": 0})


def pooled_scores(uri: str, folds: list[FoldScores]) -> CrossValArtifact:
    """Each rung's top-1 over every video (each tested once), its 95% interval, and the folds' mean and spread; the
    student against the teacher on all videos (McNemar)."""
    correct = {rung: np.concatenate([unpack_correct(f.correct[rung]) for f in folds]) for rung in RUNGS}
    pooled = {}
    for rung in RUNGS:
        c, per_fold = correct[rung], [f.top1[rung] for f in folds]
        low, high = wilson_interval(int(c.sum()), len(c))
        pooled[rung] = {"top1": float(c.mean()), "low": low, "high": high, "videos": float(len(c)),
                        "fold_mean": statistics.fmean(per_fold), "fold_sd": statistics.stdev(per_fold)}
    paired = mcnemar(correct["student"], correct["teacher"]).describe("student", "teacher")
    return CrossValArtifact(uri=uri, folds=folds, pooled=pooled, student_vs_teacher=paired)


def log_crossval(stage, result: CrossValArtifact) -> None:
    """[MLflow] pooled top-1 with its interval and each fold's top-1, per rung."""
    for rung, p in result.pooled.items():
        stage.log(f"cv.{rung}.test_top1", p["top1"])
        stage.log(f"cv.{rung}.test_top1_ci_low", p["low"])
        stage.log(f"cv.{rung}.test_top1_ci_high", p["high"])
        stage.log(f"cv.{rung}.fold_sd", p["fold_sd"])
        for f in result.folds:
            stage.log(f"cv.{rung}.fold_{f.fold}.test_top1", f.top1[rung])
    stage.set_tags({"cv.folds": str(len(result.folds)), "cv.student_vs_teacher": result.student_vs_teacher[:5000]})
    stage.log_dict(json.loads(result.model_dump_json()), "crossval.json")


# [Prefect] cached on its inputs like every stage; `run` is the plain function tests call.
@task(name="crossval", retries=len(IO_RETRY_DELAYS), retry_delay_seconds=IO_RETRY_DELAYS,
      retry_condition_fn=only_io_errors, **stage_cache(work_dir))
def crossval_task(cfg: PipelineConfig, dataset: DatasetArtifact, parent_run_id: str) -> CrossValArtifact | None:
    if cfg.data.folds < 2:
        return sealed(work_dir(cfg, dataset), None)   # nothing to do, and a cached nothing next time
    from vidopt.tracking import stage_run

    with stage_run(STAGE, parent_run_id) as stage:  # [MLflow] nested run; the folds' own stages log nothing
        result = run(cfg, dataset)
        log_crossval(stage, result)
    return sealed(work_dir(cfg, dataset), result)


if __name__ == "__main__":
    from tasks.dag import run_stage_standalone

    run_stage_standalone(STAGE)
