"""What the model stages (train_teacher, distill, prune, quantize) share: the config a training stage reads, its
finished-model check, the clip sets and logits they train and score on (in the artifact store), the final metrics
measured the same way for every model, and the MLflow logging of a finished model stage. Not runnable alone; see
tasks/train_teacher.py.
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from vidopt.artifacts import DatasetArtifact, ModelArtifact
from vidopt.checkpoint import ARCH, METRICS, WEIGHTS, save_model_dir
from vidopt.config import ClipConfig, RayConfig, TrainConfig, flatten
from vidopt.distillation import ClipSet, decode_clip_set
from vidopt.metrics import count_macs, count_params, per_video, top1, top1_per_video
from vidopt.models import StudentArch, TeacherArch
from vidopt.stages import StageReads, StageWork, open_store, split_rows
from vidopt.stats import confusion, pack_correct
from vidopt.storage import sha256_file
from vidopt.store import ArtifactStore, FileRef, StoreError
from vidopt.train_jobs import LogitsJob, ModelSpec, Placement, Selection, store_weights
from workers.train import run_logits

log = logging.getLogger("vidopt.tasks")

MODEL_DIR = "model"                          # inside a stage's place: the finished model
NOTES = "notes.json"                         # in the model dir: the artifact's notes, so a skipped re-run returns them
TEST_OUTCOME = "test_outcome.json"           # in the model dir: which test clips it got right, its confusion matrix
CLASSES = "classes.json"                     # in the model dir: the class names, in the order of its logits
EVAL_SPLITS = ("val", "test")


class TrainingReads(StageReads):
    """What every model stage reads besides its own section: the clips, and where training runs (runtime-only)."""
    clips: ClipConfig
    train: TrainConfig
    ray: RayConfig


def placement(reads: TrainingReads, cpu_precision: str = "fp32") -> Placement:
    t = reads.train
    return Placement(device=t.device, gpu_precision=t.gpu_precision, cpu_precision=cpu_precision,
                     loader_workers=reads.clips.loader_workers, prefetch_batches=t.prefetch_batches)


def finished_artifact(work: StageWork, kind: str, dataset: DatasetArtifact) -> ModelArtifact | None:
    """The artifact of an earlier run with the same inputs, or None: a model folder is published whole, so one in
    the store means the stage finished."""
    uri = work.child(MODEL_DIR)
    if not work.store.has(uri):
        return None
    try:
        model_dir = work.store.get_dir(uri)
    except StoreError as err:   # damaged since it was published: made again, never used or left for a person
        log.warning("%s: the finished model is damaged (%s); removing it and training again", work.stage, err)
        work.store.delete(uri)
        return None
    log.info("%s: %s already holds a finished model for these inputs; not training again", work.stage, uri)
    notes, outcome = model_dir / NOTES, model_dir / TEST_OUTCOME
    return ModelArtifact(uri=uri, kind=kind, arch=json.loads((model_dir / ARCH).read_text()),
                         weights_sha256=sha256_file(model_dir / WEIGHTS),
                         metrics=json.loads((model_dir / METRICS).read_text()), data_version=dataset.data_version,
                         notes=json.loads(notes.read_text()) if notes.exists() else {},
                         **(json.loads(outcome.read_text()) if outcome.exists() else {}))


def train_val_rows(store: ArtifactStore, dataset: DatasetArtifact, stage: str) -> tuple[list[dict], list[dict]]:
    train, val = split_rows(dataset, "train", store), split_rows(dataset, "val", store)
    if not train:
        raise ValueError(f"{stage}: dataset {dataset.uri} has no train videos; add videos or change "
                         "data.split_fractions")
    return train, val


# --- clip sets and logits in the store -------------------------------------------------------------------------------

CLIP_SETS = "cache/clip_sets"   # under the artifact root


def clip_set(reads: TrainingReads, dataset: DatasetArtifact, split: str, per_video: int) -> FileRef:
    """One split's clips (per_video uniformly spaced clips a video), decoded once and kept in the store, named by
    data content and clip settings: every stage and every node reads the same file. Decoding happens here, where
    ingestion left the videos."""
    return _clip_set(reads, dataset, split, per_video)


def eval_clip_set(reads: TrainingReads, dataset: DatasetArtifact, split: str) -> FileRef:
    """One split's clips as evaluation scores them: each video's windows (vidopt/data.py eval_windows)."""
    return _clip_set(reads, dataset, split, None)


def _clip_set(reads: TrainingReads, dataset: DatasetArtifact, split: str, per_video: int | None) -> FileRef:
    store = open_store(reads.run)
    name = f"{dataset.manifest_sha256[:16]}-{_clip_hash(reads.clips)}-{split}-{per_video or 'eval'}.pt"
    uri = store.uri(*CLIP_SETS.split("/"), name)
    if store.has(uri):
        return store.ref(uri)
    rows = split_rows(dataset, split, store)
    if not rows:
        raise ValueError(f"{split} split of dataset {dataset.data_version} is empty; add videos or change "
                         "data.split_fractions")
    with tempfile.TemporaryDirectory(prefix="vidopt-clips-") as tmp:
        path = Path(tmp) / "clips.pt"
        decode_clip_set(rows, dataset.classes, reads.clips, per_video, cache=path)
        return store.put_file(path, uri)


def _clip_hash(clips: ClipConfig) -> str:
    import hashlib

    payload = json.dumps(clips.model_dump(mode="json", exclude=set(clips.runtime_only)), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_clip_set(store: ArtifactStore, ref: FileRef) -> ClipSet:
    return ClipSet(**torch.load(store.get_file(ref), map_location="cpu", weights_only=True))


def selection(reads: TrainingReads, dataset: DatasetArtifact, stage: str, score: str = "top1",
              logits: tuple[FileRef | None, FileRef | None] = (None, None)) -> Selection:
    """The clips that pick the best epoch: the val split, or, with no val videos (tiny datasets), the training
    clips, which overfit. `logits`: (val, train) targets of a distillation-loss score."""
    store = open_store(reads.run)
    if split_rows(dataset, "val", store):
        clips = eval_clip_set(reads, dataset, "val")
        return Selection(score=score, clips=clips, logits=logits[0], name=f"val_{_score_name(score)}")
    log.warning("%s: the val split is empty; choosing the best epoch on the training clips instead (it will "
                "overfit)", stage)
    clips = eval_clip_set(reads, dataset, "train")
    return Selection(score=score, clips=clips, logits=logits[1], name=f"train_{_score_name(score)}")


def _score_name(score: str) -> str:
    return "top1" if score == "top1" else "kd_loss"


def logits_of(reads: TrainingReads, model: ModelSpec, clips: FileRef, output: str) -> FileRef:
    """`model`'s logits over a stored clip set, computed where training runs (the GPU pool on a cluster)."""
    job = LogitsJob(store=open_store(reads.run).spec, model=model, clips=clips, output=output,
                    batch_size=reads.clips.batch_size, placement=placement(reads))
    return run_logits(job, reads.train, reads.ray)


@dataclass
class Scores:
    """A model measured the same way at every rung: metrics, which test clips it got right (packed: the report
    compares the rungs on the same clips) and its test confusion matrix."""
    metrics: dict[str, float]
    test_correct: str = ""
    test_confusion: list[list[int]] = field(default_factory=list)


def test_scores(logits: np.ndarray, labels: np.ndarray, videos: np.ndarray, classes: int) -> dict:
    """The per-video outcome of test logits (a video's windows averaged): {test_correct, test_confusion} for a
    ModelArtifact."""
    video_logits, video_labels = per_video(logits, labels, videos)
    predicted = video_logits.argmax(1)
    return {"test_correct": pack_correct(predicted == video_labels),
            "test_confusion": confusion(video_labels, predicted, classes).tolist()}


def model_metrics(reads: TrainingReads, work: StageWork, model: nn.Module, spec: ModelSpec, dataset: DatasetArtifact,
                  fit_result: dict) -> Scores:
    """Top-1 per clip and per video on val and test (each video's eval windows),
    MACs and parameters of one [3, T, H, W] clip, the safetensors weights' size, epochs run and best epoch; and what
    it got right and wrong on the test clips."""
    metrics: dict[str, float] = {}
    store, outcome = work.store, {}
    for split in EVAL_SPLITS:
        if not split_rows(dataset, split, store):
            log.warning("metrics: the %s split is empty; no %s top-1 recorded", split, split)
            continue
        clips = eval_clip_set(reads, dataset, split)
        ref = logits_of(reads, spec, clips, work.child(f"eval/{spec.weights.sha256[:16]}-{split}_logits.pt"))
        logits = torch.load(store.get_file(ref), map_location="cpu", weights_only=True).numpy()
        saved = load_clip_set(store, clips)
        labels, videos = saved.labels.numpy(), saved.videos.numpy()
        metrics.update({f"{split}_top1_clip": top1(logits, labels),
                        f"{split}_top1_video": top1_per_video(logits, labels, videos)})
        if split == "test":
            outcome = test_scores(logits, labels, videos, len(dataset.classes))
    clip = reads.clips
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metrics.update(
        macs=count_macs(model, (3, clip.frames, clip.height, clip.width)),
        params=count_params(model),
        size_bytes=len(safetensors_bytes(state)),  # exactly the weights.safetensors file about to be written
        epochs_run=fit_result["epochs_run"],
        best_epoch=fit_result["best_epoch"],
    )
    return Scores(metrics, **outcome)


def put_weights(work: StageWork, model: nn.Module, name: str, arch: TeacherArch | StudentArch) -> ModelSpec:
    """The module's weights in the stage's place in the store, as a job's model."""
    return ModelSpec(arch=arch.model_dump(mode="json"), weights=store_weights(work.store, model.state_dict(),
                                                                             work.child(name)))


def save_artifact(work: StageWork, model: nn.Module, arch: TeacherArch | StudentArch, scores: Scores,
                  config: dict, kind: str, dataset: DatasetArtifact, notes: dict[str, str] | None = None,
                  extra_files: dict[str, Path] | None = None) -> ModelArtifact:
    """Write the model folder here and publish it whole to the store."""
    model_dir, notes = work.local / MODEL_DIR, notes or {}
    (work.local / NOTES).write_text(json.dumps(notes, indent=2, sort_keys=True))
    outcome = {"test_correct": scores.test_correct, "test_confusion": scores.test_confusion}
    (work.local / TEST_OUTCOME).write_text(json.dumps(outcome))
    (work.local / CLASSES).write_text(json.dumps(dataset.classes))
    sha = save_model_dir(model_dir, model, arch, scores.metrics, config,
                         {NOTES: work.local / NOTES, TEST_OUTCOME: work.local / TEST_OUTCOME,
                          CLASSES: work.local / CLASSES, **(extra_files or {})})
    work.store.put_dir(model_dir, work.child(MODEL_DIR))
    return ModelArtifact(uri=work.child(MODEL_DIR), kind=kind, arch=arch.model_dump(mode="json"), weights_sha256=sha,
                         metrics=scores.metrics, data_version=dataset.data_version, notes=notes, **outcome)


def artifact_model_spec(store: ArtifactStore, artifact: ModelArtifact) -> ModelSpec:
    """An upstream model as a job's model: its arch record and its weights in the store."""
    uri = f"{artifact.uri}/{WEIGHTS}"
    # an int8 artifact is known by its int8 file's hash; its fp32 weights' is taken here
    return ModelSpec(arch=artifact.arch, weights=store.ref(uri) if artifact.kind == "int8"
                     else FileRef(uri=uri, sha256=artifact.weights_sha256))


def log_model_stage(stage, reads: StageReads, artifact: ModelArtifact, store: ArtifactStore) -> None:
    """[MLflow] the config sections the stage read as params, final metrics, the model directory as artifacts."""
    import mlflow

    sections = {name: getattr(reads, name).model_dump(mode="json") for name in type(reads).model_fields}
    params = flatten(sections)
    mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in params.items()})
    stage.set_tags({"data_version": artifact.data_version, "weights_sha256": artifact.weights_sha256})
    for key in ("trained_on", "teacher_check"):   # where it trained (and why not where asked); whether it was taught
        if key in artifact.notes:
            mlflow.log_param(key, artifact.notes[key][:6000])
    for name, value in artifact.metrics.items():
        stage.log(name, value)
    for path in sorted(store.get_dir(artifact.uri).iterdir()):
        stage.log_artifact(path, "model")
    stage.log_dict(artifact.model_dump(), "artifact.json")


def stage_config(reads: StageReads) -> dict:
    """The config a model folder records (config.json): the sections its stage read."""
    return {name: getattr(reads, name).model_dump(mode="json") for name in type(reads).model_fields}
