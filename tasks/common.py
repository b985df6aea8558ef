"""What the model-training stages (train_teacher, distill, and later prune / quantize) share: the stage's model
directory and its skip-if-done check, the final metrics measured the same way for every model, reloading an upstream
model artifact, and the MLflow logging of a finished model stage. Not runnable alone; see tasks/train_teacher.py.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from vidopt.artifacts import DatasetArtifact, ModelArtifact
from vidopt.augment import augment_clips
from vidopt.checkpoint import ARCH, METRICS, WEIGHTS, load_model_dir, save_model_dir
from vidopt.config import PipelineConfig, flatten
from vidopt.data import make_loader
from vidopt.distillation import ClipSet, decode_clip_set
from vidopt.metrics import count_macs, count_params
from vidopt.models import StudentArch, TeacherArch
from vidopt.stages import split_rows
from vidopt.storage import sha256_file
from vidopt.training import evaluate

log = logging.getLogger("vidopt.tasks")

MODEL_DIR, CHECKPOINT = "model", "last.pt"   # inside a stage dir: the finished model, the training checkpoint
NOTES = "notes.json"                         # in the model dir: the artifact's notes, so a skipped re-run returns them
EVAL_SPLITS = ("val", "test")


def finished_artifact(work: Path, kind: str, dataset: DatasetArtifact, stage: str) -> ModelArtifact | None:
    """The artifact of an earlier run with the same inputs, or None. The model dir is renamed into place whole, so a
    metrics.json in it means the stage finished."""
    model_dir = work / MODEL_DIR
    if not (model_dir / METRICS).exists():
        return None
    log.info("%s: %s already holds a finished model for these inputs; not training again", stage, model_dir)
    return ModelArtifact(uri=str(model_dir), kind=kind, arch=json.loads((model_dir / ARCH).read_text()),
                         weights_sha256=sha256_file(model_dir / WEIGHTS),
                         metrics=json.loads((model_dir / METRICS).read_text()), data_version=dataset.data_version,
                         notes=json.loads((model_dir / NOTES).read_text()) if (model_dir / NOTES).exists() else {})


def train_val_rows(dataset: DatasetArtifact, stage: str) -> tuple[list[dict], list[dict]]:
    train, val = split_rows(dataset, "train"), split_rows(dataset, "val")
    if not train:
        raise ValueError(f"{stage}: dataset {dataset.uri} has no train videos; add videos or change "
                         "data.split_fractions")
    return train, val


def score_fn_with_fallback(stage: str, has_val: bool, val_score: Callable[[nn.Module], float],
                           train_score: Callable[[nn.Module], float]) -> Callable[[nn.Module], float]:
    """Early stopping and best-epoch choice need a score; with no val videos (tiny datasets) the same score on the
    training clips stands in."""
    if has_val:
        return val_score
    log.warning("%s: the val split is empty; choosing the best epoch on the training clips instead (it will overfit)",
                stage)
    return train_score


def model_metrics(model: nn.Module, cfg: PipelineConfig, dataset: DatasetArtifact, fit_result: dict) -> dict:
    """Top-1 per clip and per video on val and test (clips.eval_clips_per_video uniformly spaced clips per video),
    MACs and parameters of one [3, T, H, W] clip, the safetensors weights' size, epochs run and best epoch."""
    metrics: dict[str, float] = {}
    for split in EVAL_SPLITS:
        rows = split_rows(dataset, split)
        if not rows:
            log.warning("metrics: the %s split is empty; no %s top-1 recorded", split, split)
            continue
        scores = evaluate(model, make_loader(rows, dataset.classes, cfg.clips, train=False, seed=cfg.run.seed))
        metrics.update({f"{split}_{name}": value for name, value in scores.items()})  # val_top1_clip, ...
    clip = cfg.clips
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metrics.update(
        macs=count_macs(model, (3, clip.frames, clip.height, clip.width)),
        params=count_params(model),
        size_bytes=len(safetensors_bytes(state)),  # exactly the weights.safetensors file about to be written
        epochs_run=fit_result["epochs_run"],
        best_epoch=fit_result["best_epoch"],
    )
    return metrics


def save_artifact(work: Path, model: nn.Module, arch: TeacherArch | StudentArch, metrics: dict,
                  cfg: PipelineConfig, kind: str, dataset: DatasetArtifact,
                  notes: dict[str, str] | None = None) -> ModelArtifact:
    model_dir, notes = work / MODEL_DIR, notes or {}
    (work / NOTES).write_text(json.dumps(notes, indent=2, sort_keys=True))
    sha = save_model_dir(model_dir, model, arch, metrics, cfg.model_dump(mode="json"), {NOTES: work / NOTES})
    return ModelArtifact(uri=str(model_dir), kind=kind, arch=arch.model_dump(mode="json"), weights_sha256=sha,
                         metrics=metrics, data_version=dataset.data_version, notes=notes)


def clip_set_path(cfg: PipelineConfig, dataset: DatasetArtifact, split: str, per_video: int) -> Path:
    """Where cached_clip_set keeps one split's clips: named by data content and clip settings."""
    name = f"{dataset.manifest_sha256[:16]}-{cfg.section_hash('clips')}-{split}-{per_video}.pt"
    return Path(cfg.run.project_dir).resolve() / "cache" / "clip_sets" / name


def cached_clip_set(cfg: PipelineConfig, dataset: DatasetArtifact, rows: list[dict], split: str,
                    per_video: int) -> ClipSet:
    """Decoded clips of one split, cached in <project>/cache/clip_sets, so the teacher's validation, prune, quantize
    and export decode each split once."""
    return decode_clip_set(rows, dataset.classes, cfg.clips, per_video, clip_set_path(cfg, dataset, split, per_video))


class EpochBatches:
    """The fixed clips in a new order each epoch (seed + epoch), so a resumed run sees the order it would have seen;
    with `augment`, each clip also gets a fresh label-preserving transform (vidopt/augment.py) drawn from the same
    seed. Yields (x [B, C, T, H, W], labels, teacher logits)."""

    def __init__(self, clip_set: ClipSet, batch_size: int, seed: int, augment: bool = False):
        self.clip_set, self.batch_size, self.seed, self.augment, self.epoch = clip_set, batch_size, seed, augment, 0

    def __iter__(self):
        batches = self.clip_set.batches(self.batch_size, shuffle=True, seed=self.seed + self.epoch)
        if not self.augment:
            return batches
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return ((augment_clips(x, generator), *rest) for x, *rest in batches)

    def __len__(self) -> int:
        return -(-len(self.clip_set.labels) // self.batch_size)

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def load_artifact_model(artifact: ModelArtifact) -> nn.Module:
    """The module of an upstream stage's model directory, in eval mode (rebuilt from arch.json, no pickle)."""
    model, _ = load_model_dir(artifact.uri)
    return model


def log_model_stage(stage, cfg: PipelineConfig, sections: list[str], artifact: ModelArtifact) -> None:
    """[MLflow] the config sections the stage read as params, final metrics, the model directory as artifacts."""
    import mlflow

    params = flatten({s: getattr(cfg, s).model_dump(mode="json") for s in sections})
    mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in params.items()})
    stage.set_tags({"data_version": artifact.data_version, "weights_sha256": artifact.weights_sha256})
    for name, value in artifact.metrics.items():
        stage.log(name, value)
    for path in sorted(Path(artifact.uri).iterdir()):
        stage.log_artifact(path, "model")
    stage.log_dict(artifact.model_dump(), "artifact.json")
