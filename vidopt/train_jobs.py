"""Training and inference as records of URIs, so any process on any node can run them: the teacher, distillation, the
pruning fine-tunes and QAT are TrainJobs; teacher logits and evaluation are LogitsJobs. Everything a job reads comes
from the artifact store by content hash, and what it writes goes back there. workers/train.py runs them, in this
process or as Ray Train workers; `run_train_job` is what each worker runs (one rank of `world`).
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn

from vidopt.augment import apply_augmentation
from vidopt.config import ClipConfig
from vidopt.data import normalise_clips
from vidopt.distillation import distillation_loss
from vidopt.models import arch_from_dict, build_model
from vidopt.shards import ShardedBatches, fixed_clip_fetch, localise_rows, video_clip_fetch
from vidopt.store import ArtifactStore, FileRef, StoreSpec
from vidopt.training import (CheckpointIO, EpochLogger, FileCheckpoint, FitSpec, Precision, bf16_training,
                             conv_layout, fit)

log = logging.getLogger("vidopt.train")


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Record):
    arch: dict                           # TeacherArch / StudentArch record: rebuilds the module anywhere
    weights: FileRef | None = None       # safetensors; None: fresh weights from the job's seed
    qat: bool = False                    # train a fake-quantized copy (vidopt/qat.py); the plain weights come back
    keep_zeros: bool = False             # weights that are zero stay zero (L1-unstructured pruning's masks)


class VideoClips(Record):
    """A new random clip of every video each epoch, decoded from the videos themselves (the teacher)."""
    kind: Literal["videos"] = "videos"
    manifest: FileRef                    # the dataset's manifest (JSONL rows with uri, sha256, split, label, ...)
    split: str = "train"
    classes: list[str]
    clips: ClipConfig
    source_endpoint_url: str | None = None  # how this node reaches the rows' s3:// URIs (MinIO); None: boto3's config
    source_region: str | None = None


class FixedClips(Record):
    """Decoded clips fixed once (uint8 [N, T, H, W, C] with labels and video ids), and the logits to match."""
    kind: Literal["clips"] = "clips"
    clips: FileRef
    logits: FileRef | None = None        # [N, classes]: what a distillation objective matches


class Objective(Record):
    loss: Literal["cross_entropy", "distillation"]
    alpha: float = 1.0                   # distillation: weight of CE(labels); 1 - alpha weighs T^2 * KL
    temperature: float = 1.0
    label_smoothing: float = 0.0         # of the cross-entropy with the labels


class Selection(Record):
    """What picks the best epoch (and stops early): top-1, or the distillation loss, on fixed held-out clips."""
    score: Literal["top1", "distillation_loss"]
    clips: FileRef
    logits: FileRef | None = None        # the distillation loss's targets
    name: str                            # logged as <stage>.<name>, e.g. val_top1


class Placement(Record):
    """Where a job's tensors go; from the train config section."""
    device: Literal["auto", "cpu", "gpu"] = "auto"
    gpu_precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    cpu_precision: Literal["fp32", "bf16", "auto"] = "fp32"   # teacher.precision; students stay fp32
    threads: int | None = None           # torch threads of a CPU worker; None: torch's default
    loader_workers: int = 0              # processes decoding videos (VideoClips)
    prefetch_batches: int = 4


class TrainJob(Record):
    stage: str                           # progress lines and metric names: "train_teacher", "prune.round2", "qat"
    store: StoreSpec
    run_dir: str                         # store URI of this job's folder: checkpoints (Ray Train's run folder)
    checkpoint_name: str = "last"        # <run_dir>/<name>.pt in this process; Ray Train's run name otherwise
    output: str                          # store URI of the best weights (safetensors); <output>.json the result
    model: ModelSpec
    data: VideoClips | FixedClips = Field(discriminator="kind")
    objective: Objective
    selection: Selection
    augment: bool = False                # colour / brightness / shift per clip (vidopt/augment.py)
    hflip: bool = False                  # ... and mirror half of them
    epochs: int
    lr: float
    backbone_lr_scale: float = 1.0       # every layer but the classifier (`fc.`) at this share of lr
    weight_decay: float
    patience: int
    maximize: bool = True                # False: the selection score is a loss
    batch_size: int                      # the global batch: split over the workers
    seed: int
    placement: Placement = Placement()


class TrainResult(Record):
    weights: FileRef
    best_score: float | None
    best_epoch: int
    epochs_run: int
    resumed_from: int
    history: list[dict]
    device: str                          # what trained, e.g. "cuda:0 (NVIDIA H100 80GB HBM3)" or "cpu"
    note: str = ""                       # why not what was asked (a GPU node without CUDA)
    precision: str
    world_size: int


class LogitsJob(Record):
    """A model's logits over a stored clip set (teacher logits for distillation; evaluation)."""
    store: StoreSpec
    model: ModelSpec
    clips: FileRef
    output: str                          # store URI of the logits tensor [N, classes] float32
    batch_size: int
    placement: Placement = Placement()


# --- devices ---------------------------------------------------------------------------------------------------------

def pick_device(request: str) -> tuple[torch.device, str]:
    """(device, note): CUDA where asked for (or "auto") and present; a worker asked for a GPU that has no CUDA (a
    node that declares a GPU it lacks, a CPU build of torch) trains on its CPU, and the note says so."""
    if request != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device()), ""
    if request == "gpu":
        note = ("a GPU was asked for, but CUDA is not available to this worker (torch.cuda.is_available() is False): "
                "it trains on its CPU")
        log.warning("train: %s", note)
        return torch.device("cpu"), note
    return torch.device("cpu"), ""


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu"


def pick_precision(placement: Placement, device: torch.device) -> Precision:
    """GPU: bf16 where the GPU has it, else fp16 with a gradient scaler (gpu_precision auto); CPU: cpu_precision."""
    if device.type != "cuda":
        return "bf16" if bf16_training(placement.cpu_precision) else "fp32"
    if placement.gpu_precision != "auto":
        return placement.gpu_precision
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


# --- the per-worker job ----------------------------------------------------------------------------------------------

def load_spec_model(spec: ModelSpec, store: ArtifactStore, seed: int) -> tuple[nn.Module, object]:
    arch = arch_from_dict(spec.arch)
    torch.manual_seed(seed)   # fresh weights follow the seed, which is part of every stage key
    model = build_model(arch)
    if spec.weights is not None:
        model.load_state_dict(load_file(str(store.get_file(spec.weights))))
    return model, arch


def run_train_job(job: TrainJob, checkpoint: CheckpointIO | None = None, rank: int = 0, world: int = 1,
                  logger: EpochLogger | None = None, on_driver: bool = False) -> TrainResult | None:
    """Train as rank `rank` of `world` (DDP when world > 1; the process group is the caller's). Rank 0 puts the best
    weights at job.output and the TrainResult beside them (<output>.json), and returns it; other ranks return None.
    on_driver: this process ingested the data, so the manifest's local paths are valid here."""
    store = ArtifactStore(job.store)
    device, note = pick_device(job.placement.device)
    if job.placement.threads:
        torch.set_num_threads(job.placement.threads)
    model, arch = load_spec_model(job.model, store, job.seed)
    if job.model.qat:
        from vidopt.qat import prepare_qat

        model = prepare_qat(model, arch)
    masked = _keep_zeros(model) if job.model.keep_zeros else []
    model.to(device)
    # channels-last before DDP wraps the model: DDP lays its gradient buckets out by the strides it sees, and grads
    # of another layout reached the all-reduce misplaced (two workers ended 0.008 away from one)
    conv_layout(model, channels_last=True)
    forward = None
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        from vidopt.sync_bn import convert_sync_batchnorm

        if not job.model.qat:   # QAT freezes BN statistics: nothing to synchronise
            convert_sync_batchnorm(model)
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    batches = _batches(job, store, rank, world, device, on_driver)
    precision = pick_precision(job.placement, device)
    loss_fn = _loss_fn(job)
    score_fn = _score_fn(job, store, device)
    spec = FitSpec(epochs=job.epochs, lr=job.lr, weight_decay=job.weight_decay, patience=job.patience,
                   stage=job.stage, channels_last=True, score_name=job.selection.name, maximize=job.maximize,
                   precision=precision,
                   head_lr_only=("fc.", job.backbone_lr_scale) if job.backbone_lr_scale != 1.0 else None)
    if checkpoint is None:
        checkpoint = FileCheckpoint(local_checkpoint_path(job, store))
    on_epoch_start = _qat_epoch_hook(model, batches) if job.model.qat else batches.start_epoch
    result = fit(model, loss_fn, batches, score_fn, spec, checkpoint, logger=logger, on_epoch_start=on_epoch_start,
                 device=device, forward=forward)
    if rank != 0:
        return None
    model.cpu()
    if world > 1 and not job.model.qat:
        from vidopt.sync_bn import revert_sync_batchnorm

        revert_sync_batchnorm(model)
    for module, name in masked:
        torch.nn.utils.prune.remove(module, name)   # weight_orig * mask -> a plain weight with the zeros in it
    if job.model.qat:
        from vidopt.qat import student_state_from_qat

        state = student_state_from_qat(model)
    else:
        state = model.state_dict()
    weights = store_weights(store, state, job.output)
    trained = TrainResult(weights=weights, best_score=result["best_score"], best_epoch=result["best_epoch"],
                          epochs_run=result["epochs_run"], resumed_from=result["resumed_from"],
                          history=result["history"], device=describe_device(device), note=note,
                          precision=precision, world_size=world)
    store.write_text(result_uri(job), trained.model_dump_json(indent=2))
    return trained


def result_uri(job: TrainJob) -> str:
    return f"{job.output}.json"


def local_checkpoint_path(job: TrainJob, store: ArtifactStore) -> Path:
    """The in-process checkpoint: in the run folder on a local store; in this node's cache on an S3 one."""
    if store.is_local:
        return store.local_path(job.run_dir) / f"{job.checkpoint_name}.pt"
    return store.cache_dir / "checkpoints" / job.run_dir.split("://", 1)[1] / f"{job.checkpoint_name}.pt"


def store_weights(store: ArtifactStore, state: dict, uri: str) -> FileRef:
    with tempfile.TemporaryDirectory(prefix="vidopt-weights-") as tmp:
        path = Path(tmp) / "weights.safetensors"
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path))
        return store.put_file(path, uri)


def _keep_zeros(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Masks that hold today's zeros at zero while fine-tuning (else the optimizer grows them back)."""
    from torch.nn.utils import prune

    masked = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    for module, name in masked:
        prune.custom_from_mask(module, name, mask=getattr(module, name) != 0)
    return masked


def _qat_epoch_hook(model: nn.Module, batches: ShardedBatches):
    from torch.ao.quantization import disable_observer

    def start(epoch: int) -> None:
        batches.start_epoch(epoch)
        if epoch >= 1:  # ranges settle in the first epoch; later epochs train weights against fixed scales
            model.apply(disable_observer)
    return start


def _batches(job: TrainJob, store: ArtifactStore, rank: int, world: int, device: torch.device,
             on_driver: bool) -> ShardedBatches:
    pin = device.type == "cuda"
    if isinstance(job.data, FixedClips):
        saved = torch.load(store.get_file(job.data.clips), map_location="cpu", weights_only=True)
        logits = torch.load(store.get_file(job.data.logits), map_location="cpu", weights_only=True) \
            if job.data.logits else None
        fetch = fixed_clip_fetch(saved, logits)
        n = len(saved["labels"])
        return ShardedBatches(n, job.batch_size, job.seed, rank, world, job.augment, fetch, pin, hflip=job.hflip)
    data = job.data
    rows = [json.loads(line) for line in store.get_file(data.manifest).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["split"] == data.split]
    if not on_driver:
        rows = localise_rows(rows, data.source_endpoint_url, data.source_region)
    holder: list[ShardedBatches] = []
    fetch = video_clip_fetch(rows, data.classes, data.clips, job.seed, job.placement.loader_workers,
                             job.placement.prefetch_batches, lambda: holder[0].epoch)
    holder.append(ShardedBatches(len(rows), job.batch_size, job.seed, rank, world, job.augment, fetch,
                                 pin=False, dataloader_order=True, hflip=job.hflip))   # the DataLoader pins
    return holder[0]


def _loss_fn(job: TrainJob):
    objective = job.objective

    def loss(model: nn.Module, batch: tuple) -> torch.Tensor:
        clips, labels, extra, share, params = batch
        x = normalise_clips(clips)                      # uint8 [b, T, H, W, C] -> float [b, C, T, H, W], on device
        if params is not None:
            x = apply_augmentation(x, params)
        logits = model(x)
        if objective.loss == "cross_entropy":
            value = nn.functional.cross_entropy(logits, labels, label_smoothing=objective.label_smoothing)
        else:
            value = distillation_loss(logits, extra, labels, objective.alpha, objective.temperature,
                                      objective.label_smoothing)
        return value * share
    return loss


def _score_fn(job: TrainJob, store: ArtifactStore, device: torch.device):
    selection, batch = job.selection, job.batch_size
    saved = torch.load(store.get_file(selection.clips), map_location="cpu", weights_only=True)
    targets = torch.load(store.get_file(selection.logits), map_location="cpu", weights_only=True) \
        if selection.logits else None

    def score(model: nn.Module) -> float:
        logits = clip_logits(model, saved["clips"], batch, device)
        if selection.score == "top1":
            return float((logits.argmax(1) == saved["labels"]).float().mean())
        return float(distillation_loss(logits, targets, saved["labels"], job.objective.alpha,
                                       job.objective.temperature))
    return score


@torch.no_grad()
def clip_logits(model: nn.Module, clips: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Float32 logits [N, classes] on the CPU of uint8 clips [N, T, H, W, C], in eval mode, `batch_size` at a time."""
    model.eval()
    out = []
    for i in range(0, len(clips), batch_size):
        x = clips[i:i + batch_size].to(device, non_blocking=True)
        out.append(model(normalise_clips(x)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def run_logits_job(job: LogitsJob) -> FileRef:
    store = ArtifactStore(job.store)
    device, _ = pick_device(job.placement.device)
    if job.placement.threads:
        torch.set_num_threads(job.placement.threads)
    model, _ = load_spec_model(job.model, store, seed=0)
    saved = torch.load(store.get_file(job.clips), map_location="cpu", weights_only=True)
    logits = clip_logits(model.to(device), saved["clips"], job.batch_size, device)
    with tempfile.TemporaryDirectory(prefix="vidopt-logits-") as tmp:
        path = Path(tmp) / "logits.pt"
        torch.save(logits, path)
        return store.put_file(path, job.output)
