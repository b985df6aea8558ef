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
from prefect import task
from torch import nn

from tasks.caching import sealed, stage_cache
from tasks.common import (
    TrainingReads,
    finished_artifact,
    log_model_stage,
    model_metrics,
    placement,
    put_weights,
    save_artifact,
    selection,
    stage_config,
    train_val_rows,
)
from tasks.retry import IO_RETRY_DELAYS, only_io_errors
from vidopt.artifacts import DatasetArtifact, ModelArtifact
from vidopt.checkpoint import load_state_dict_uri
from vidopt.config import AugmentConfig, PipelineConfig, TeacherConfig
from vidopt.models import TeacherArch, build_model
from vidopt.stages import StageWork, artifact_hash, stage_work
from vidopt.storage import is_s3, sha256_file
from vidopt.store import FileRef
from vidopt.tracking import stage_run
from vidopt.train_jobs import Objective, TrainJob, VideoClips, load_spec_model
from workers.train import run_training

log = logging.getLogger("vidopt.train_teacher")
STAGE = "train_teacher"


class Reads(TrainingReads):
    teacher: TeacherConfig
    augment: AugmentConfig


def work_dir(cfg: PipelineConfig | Reads, dataset: DatasetArtifact) -> StageWork:
    reads = Reads.of(cfg)
    return stage_work(reads, STAGE, [artifact_hash(dataset), *_init_identity(reads.teacher.init)])


def run(cfg: PipelineConfig | Reads, dataset: DatasetArtifact, logger=None) -> ModelArtifact:
    cfg = Reads.of(cfg)
    work = work_dir(cfg, dataset)
    done = finished_artifact(work, "teacher", dataset)
    if done is not None:
        return done

    t = cfg.teacher
    arch = TeacherArch(arch=t.arch, width=t.width, frame_differences=t.frame_differences,
                       num_classes=len(dataset.classes))
    torch.manual_seed(cfg.run.seed)  # initial weights follow run.seed, which is part of the stage key
    model = build_model(arch)
    notes = {"init": load_init(model, t.init)} if t.init else {}
    start = put_weights(work, model, "init.safetensors", arch)

    train_rows, val_rows = train_val_rows(work.store, dataset, STAGE)
    job = TrainJob(
        stage=STAGE, store=work.store.spec, run_dir=work.uri, output=work.child("trained.safetensors"), model=start,
        data=VideoClips(manifest=FileRef(uri=dataset.manifest_uri, sha256=dataset.manifest_sha256),
                        classes=dataset.classes, clips=cfg.clips, source_endpoint_url=dataset.source_endpoint_url,
                        source_region=dataset.source_region),
        objective=Objective(loss="cross_entropy", label_smoothing=cfg.augment.label_smoothing),
        selection=selection(cfg, dataset, STAGE), augment=t.augment, hflip=cfg.augment.hflip,
        epochs=t.epochs, lr=t.lr, backbone_lr_scale=t.backbone_lr_scale, weight_decay=t.weight_decay,
        patience=t.patience,
        batch_size=cfg.clips.batch_size, seed=cfg.run.seed, placement=placement(cfg, cpu_precision=t.precision))
    log.info("%s: %s width %.3g, %d classes, %d train / %d val videos, work in %s", STAGE, t.arch, t.width,
             arch.num_classes, len(train_rows), len(val_rows), work.uri)
    result = run_training(job, cfg.train, cfg.ray, logger)
    trained = start.model_copy(update={"weights": result.weights})
    model = load_trained(trained, work)
    scores = model_metrics(cfg, work, model, trained, dataset, result.model_dump())
    log.info("%s: done after %d epochs (best %d) on %s: %s", STAGE, result.epochs_run, result.best_epoch + 1,
             result.device, {k: round(v, 3) for k, v in scores.metrics.items() if "top1" in k})
    return save_artifact(work, model, arch, scores, stage_config(cfg), "teacher", dataset,
                         {**notes, **training_notes(result)})


def load_trained(spec, work: StageWork) -> nn.Module:
    """The module a training job left in the store."""
    model, _ = load_spec_model(spec, work.store, seed=0)
    return model.eval()


def training_notes(result) -> dict[str, str]:
    return {"trained_on": f"{result.device}, {result.precision}, {result.world_size} worker(s)"
                          + (f"; {result.note}" if result.note else "")}


def load_init(model: nn.Module, uri: str) -> str:
    """Start from a state_dict: every key whose name and shape match is loaded, an RGB stem adapted to a stem that
    also reads frame differences; the classifier `fc` stays fresh when the class count differs. Any other tensor of
    another shape is an error (it would stay random unnoticed). Returns a one-line summary."""
    source = load_state_dict_uri(uri)
    source = {k.removeprefix("module."): v for k, v in source.items()}  # DataParallel / DDP checkpoints
    own = model.state_dict()
    adapted = [k for k, v in source.items() if k in own and _frame_difference_stem(v, own[k])]
    # an RGB stem for a stem that also reads frame differences ([O, 3, ...] -> [O, 6, ...]): its weights on the
    # frames, zeros on the differences, so the model starts as exactly the pretrained one and learns the rest
    source.update({k: torch.cat([source[k], torch.zeros_like(source[k])], dim=1) for k in adapted})
    matched = {k: v for k, v in source.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not matched:
        raise ValueError(f"{STAGE}: teacher.init {uri}: no parameter matches the {type(model).__name__} being trained "
                         f"(names or shapes differ: check teacher.arch and teacher.width); e.g. it has "
                         f"{sorted(source)[:3]}, the model expects {sorted(own)[:3]}")
    # the classifier is replaced where the classes differ; any other tensor of another shape would silently stay
    # random, so it is an error that says what to change
    mismatched = sorted(k for k in source if k in own and k not in matched and not k.startswith("fc."))
    if mismatched:
        first = mismatched[0]
        raise ValueError(f"{STAGE}: teacher.init {uri}: {len(mismatched)} tensors have other shapes than the "
                         f"{type(model).__name__} being trained (e.g. {first}: {tuple(source[first].shape)} vs "
                         f"{tuple(own[first].shape)}); check teacher.arch and teacher.width (1.0 for published "
                         "weights)")
    model.load_state_dict(matched, strict=False)
    fresh = sorted(k for k in own if k not in matched)
    summary = f"loaded {len(matched)}/{len(own)} tensors from {uri}; fresh: {_short(fresh)}"
    if adapted:
        summary += f"; RGB stem adapted to frame differences (zero weights on them): {', '.join(adapted)}"
    log.info("%s: teacher.init %s", STAGE, summary)
    if any(k.startswith("fc.") for k in fresh):
        log.info("%s: teacher.init: classifier replaced (the checkpoint has other classes)", STAGE)
    return summary


def _frame_difference_stem(checkpoint: torch.Tensor, own: torch.Tensor) -> bool:
    return (checkpoint.dim() >= 3 and own.dim() == checkpoint.dim() and own.shape[1] == 2 * checkpoint.shape[1]
            and own.shape[0] == checkpoint.shape[0] and own.shape[2:] == checkpoint.shape[2:])


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
        log_model_stage(stage, Reads.of(cfg), teacher, work_dir(cfg, dataset).store)
    return sealed(work_dir(cfg, dataset), teacher)


if __name__ == "__main__":
    from tasks.dag import run_stage_standalone

    run_stage_standalone(STAGE)
