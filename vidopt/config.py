"""PipelineConfig: the one typed config of a vidopt run, loaded from a YAML profile plus `key.sub=value` overrides.

It is the Prefect flow's parameter, so the Prefect UI renders it as a form. Every section forbids unknown keys: a typo
fails before any work starts, with a message that names the key.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from vidopt.errors import VidoptError
from vidopt.sample_data import SampleSpec

PROFILE_DIR = Path(__file__).resolve().parent.parent / "flows" / "configs"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # Fields that change how a stage runs, never what it produces: left out of section_hash, so tuning them for a
    # machine reuses every finished stage instead of redoing it.
    runtime_only: ClassVar[frozenset[str]] = frozenset()


class DataConfig(Section):
    # Where the data lives and how ingestion checks it: the dataset's content hash already stands for what it found.
    runtime_only = frozenset({"source", "manifest", "sample_if_missing", "s3_endpoint_url", "s3_region",
                              "min_frames", "decoder_checks", "probe_workers", "sample"})
    source: str | None = None            # local folder or s3://bucket/prefix; layout <label>/<file> or a manifest.
    #                                      None: the project's own bucket, <run.project_dir>/bucket
    manifest: str | None = None          # CSV/JSONL (path,label) relative to `source`; None: use <label>/<file>
    sample_if_missing: bool = False      # the project's own bucket, when missing, is filled with the sample dataset
    #                                      (never a folder the user named: a mistyped path is an error)
    s3_endpoint_url: str | None = None   # e.g. MinIO; None: the usual AWS way (AWS_ENDPOINT_URL, profiles, ...)
    s3_region: str | None = None
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)  # train / val / test, by content hash
    stratify: bool = True                # every class cut at the fractions (vidopt/data.py assign_splits); False:
    #                                      each video by its own hash, which never moves a video when others arrive
    min_split_videos: int = Field(1, ge=0)  # stratified: at least this many of each class in val and in test
    folds: int = Field(0, ge=0)          # k >= 2: also k-fold cross-validation of the teacher and the student
    #                                      (tasks/crossval.py): every video tested once, k times the training
    min_frames: int = Field(16, ge=2)    # shorter videos are quarantined (a still image is never a video); longer
    #                                      ones shorter than a clip are padded with their last frame
    decoder_checks: int = Field(24, ge=1)  # frames compared per file before decord is trusted with it
    probe_workers: int = Field(2, ge=1)  # processes probing files (and writing sample data) in parallel: one per core
    sample: SampleSpec = Field(default_factory=SampleSpec)  # what `sample_if_missing` and `vidopt data sample` write

    @field_validator("split_fractions")
    @classmethod
    def _fractions_sum_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 for f in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"must be three non-negative fractions summing to 1, got {list(v)}")
        return v


class ClipConfig(Section):
    runtime_only = frozenset({"loader_workers", "memory_cache_mb"})  # the same clips, decoded in other processes
    frames: int = Field(16, ge=1)        # T: frames per clip
    stride: int = Field(1, ge=1)         # frame step inside a clip (when `seconds` is None)
    seconds: float | None = Field(None, gt=0)  # a clip spans this many seconds of every video, whatever its frame
    #                                      rate (the step follows each video's fps); None: `stride` frames
    height: int = Field(112, ge=1)
    width: int = Field(112, ge=1)
    resize: Literal["crop", "squash"] = "crop"  # crop: scale keeping the aspect ratio, then the centre (a random
    #                                      window while training); squash: scale each side to fit
    eval_clips_per_video: int = Field(3, ge=1)  # at most this many uniformly spaced windows per video at evaluation,
    #                                      their logits averaged; fewer where the video is too short for them to
    #                                      overlap by half a clip or less (vidopt/data.py eval_windows)
    batch_size: int = Field(8, ge=1)
    loader_workers: int = 2              # DataLoader processes decoding clips
    memory_cache_mb: int = Field(512, ge=0)  # training videos decoded once into memory when they fit in this (MB):
    #                                      decoding is about a quarter of a CPU teacher epoch; 512 holds the demo's


TeacherName = Literal["r3d_18", "mc3_18", "r2plus1d_18"]


class TeacherConfig(Section):
    arch: TeacherName = "r3d_18"
    width: float = Field(0.25, gt=0)     # channel multiplier; 1.0 = torchvision's published architecture
    frame_differences: bool = False      # 6-channel input like the student's (vidopt/models.py); False keeps the stem
    #                                      torchvision checkpoints and `init` weights fit
    augment: bool = False                # the student's clip augmentation (vidopt/augment.py) in teacher training too
    init: str | None = None              # state_dict to start from: a path or s3:// URI (.pt or .safetensors), or
    #   torchvision:<weights name> (e.g. torchvision:R2Plus1D_18_Weights.KINETICS400_V1; teacher.width 1.0), fetched
    #   into torch hub's cache where the machine reaches download.pytorch.org
    backbone_lr_scale: float = Field(1.0, gt=0, le=1)  # the share of `lr` every layer but the classifier trains at:
    #                                      0.1 fine-tunes published weights (teacher.init) without washing them out
    epochs: int = Field(12, ge=0)        # 0: no training (the initial or `init` weights as they are)
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)  # AdamW peak of the one-cycle schedule (vidopt/training.py):
    #                                      at 3e-3 an r3d_18 trained from scratch never leaves chance
    weight_decay: float = Field(1e-4, ge=0, allow_inf_nan=False)
    patience: int = Field(4, ge=1)       # early stopping: epochs without a better val top-1
    precision: Literal["fp32", "bf16", "auto"] = "fp32"  # of the training steps; bf16: mixed precision, float32
    #   weights (vidopt/training.py Bf16Forward); auto: bf16 where the CPU has AMX. fp32 by default: bf16 is faster
    #   on AMX but its test top-1 varies more from seed to seed. The students always train in float32


class AugmentConfig(Section):
    """How every training stage augments its clips, when the stage augments at all (teacher.augment, distill.augment)
    and how its labels are weighed: chosen per dataset, since only some transforms keep a dataset's labels."""
    hflip: bool = False                  # mirror half the clips: only where a mirror image keeps the label (not
    #                                      for the sample data, whose classes are directions: left vs right)
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # of the cross-entropy with the labels; 0.1 is the usual
    #                                      choice for a few hundred real clips, where labels are noisy


class DistillConfig(Section):
    # Student architecture: per-frame 2D encoder widths (3x3 convs but the stem, stride as listed), temporal Conv1d
    # widths. A 5x5 stem at stride 4: the stem, which int8 barely speeds up at the 16 channels pruning leaves it, works
    # on a quarter of the pixels, and the compute sits in the 32-80 wide convs where onnxruntime's int8 is 2.5-3x fp32
    # (`vidopt bench int8-widths`; docs/design.md, "The student").
    conv_widths: list[int] = Field(default_factory=lambda: [32, 64, 64, 128])
    conv_strides: list[int] = Field(default_factory=lambda: [4, 1, 2, 2])
    stem_kernel: int = Field(5, ge=1)    # the first conv's (vidopt/models.py StudentArch): odd, or its stride
    temporal_widths: list[int] = Field(default_factory=lambda: [128])
    pool_grid: int = Field(4, ge=1)      # encoder output pooled to a grid x grid map: keeps coarse position for motion
    #                                      (the demo's 64x64 frames leave exactly 4x4: no pooling at all)
    frame_differences: bool = True       # the encoder also sees each frame's difference to the next (vidopt/models.py):
    #                                      motion becomes explicit, and the student leaves chance ~5x sooner
    epochs: int = Field(20, ge=1)
    lr: float = Field(2e-3, gt=0, allow_inf_nan=False)  # AdamW peak of the one-cycle schedule: at this rate the
    #                                      augmented student learns the demo even from the labels alone
    weight_decay: float = Field(1e-4, ge=0, allow_inf_nan=False)
    alpha: float = Field(0.5, ge=0, le=1)  # weight of CE(labels); (1 - alpha) weighs T^2 * KL to the teacher
    check_teacher: bool = True           # distil only from a teacher significantly better than the majority class
    #                                      on val (tasks/distill.py teacher_check); else labels alone. False: always
    compare_labels_only: bool = False    # also train a student from the labels alone and keep the better on val:
    #                                      for a weak but not useless teacher (real footage); doubles distill's time
    temperature: float = Field(4.0, gt=0)
    cached_clips_per_video: int = Field(4, ge=1)  # fixed training clips per video whose teacher logits are cached
    augment: bool = True                 # colour / brightness / shift per clip (vidopt/augment.py) in every student
    #                                      stage: without it the student memorises the training videos
    patience: int = Field(6, ge=1)       # early stopping, here and in prune's fine-tune: epochs without a better
    #                                      val top-1 (distill) or a lower val distillation loss (prune)

    def architecture(self) -> dict[str, Any]:
        """The StudentArch fields this section sets (the clips set frames and size, the dataset the classes)."""
        return self.model_dump(include={"conv_widths", "conv_strides", "stem_kernel", "temporal_widths", "pool_grid",
                                        "frame_differences"})

    @model_validator(mode="after")
    def _one_stride_per_conv(self) -> "DistillConfig":
        if len(self.conv_widths) != len(self.conv_strides):
            raise ValueError(f"conv_widths ({len(self.conv_widths)} convs) and conv_strides "
                             f"({len(self.conv_strides)}) must have one entry per conv")
        return self


class PruneConfig(Section):
    method: Literal["structured", "l1_unstructured"] = "structured"
    target_macs_ratio: float = Field(0.40, gt=0, le=1)  # structured: keep this fraction of the student's MACs.
    #   Default student at 0.40: [16, 32, 32, 80] / [80], 0.30 of the MACs (the next multiples of 16 overshoot):
    #   about 3x faster than the unpruned student in fp32 at batch 1, without losing test top-1 on the demo
    channel_multiple: int = Field(16, ge=1)  # kept widths are multiples of this, and narrower convs stay whole:
    #   onnxruntime's CPU kernels work on 16-channel blocks (fp32 NCHWc on AVX-512; the fast int8 conv needs >= 16
    #   output channels). A multiple of 8 saves no time and slows int8; 32 rounds widths up into a slower int8 model
    sparsity: float = Field(0.5, ge=0, lt=1)           # l1_unstructured: fraction of weights set to zero
    finetune_epochs: int = Field(8, ge=0)              # distillation fine-tuning after pruning (after the last step)
    steps: int = Field(1, ge=1)                        # structured: prune in this many rounds, each removing the
    #   same share of every conv's channels that are to go (tasks/prune.py step_plans), each but the last followed by
    #   step_epochs of fine-tuning (iterative pruning: every round removes channels from a model that still works, so
    #   the importance scores still mean something)
    step_epochs: int = Field(2, ge=0)
    distill_from: Literal["student", "teacher"] = "student"  # whose logits the fine-tuning matches: the unpruned
    #   student's (the function pruning must keep; on the demo a better one than the teacher's), or the teacher's
    alpha: float = Field(0.0, ge=0, le=1)  # weight of CE(labels) in the fine-tune loss (distill.alpha's role): 0 is
    #   pure distillation, copying the unpruned model's function; any share of labels loses more test top-1
    lr: float = Field(2e-3, gt=0, allow_inf_nan=False)  # one-cycle peak of every fine-tune, distill.lr's: at 1e-3
    #   the pruned student loses a point or more


class QuantizeConfig(Section):
    calibration_clips: int = Field(64, ge=1)  # training clips fed through the model to set activation ranges
    per_channel: bool = True                  # per-output-channel weight scales (needed for pruned, uneven layers)
    max_top1_drop: float = Field(0.01, ge=0)  # allowed test top-1 loss vs fp32; beyond it, quantization-aware training
    qat_epochs: int = Field(3, ge=1)
    qat_lr: float = Field(1e-4, gt=0, allow_inf_nan=False)
    threads: list[PositiveInt] = Field(default_factory=lambda: [1, 2], min_length=1)  # onnxruntime intra-op
    #                                      threads to measure latency with


Target = Literal["cpu", "gpu", "tpu", "fpga"]


class ExportConfig(Section):
    targets: list[Target] = Field(default_factory=lambda: ["cpu", "gpu", "tpu", "fpga"], min_length=1)
    cpu_threads: int = Field(1, ge=1)        # intra-op threads the CPU artifact is tuned and shipped with
    cpu_runtimes: list[Literal["onnxruntime", "openvino", "openvino-bf16"]] | None = Field(None, min_length=1)
    #   ^ the CPU runtimes the target times and ships the fastest of (vidopt/runtimes.py); None: every one this
    #     machine runs (OpenVINO's bf16 hint only where the CPU has AMX or AVX-512 BF16)
    tpu_bf16: bool = True                    # also export and verify a bf16 StableHLO variant
    fpga_fixed_width: int = Field(16, ge=8)  # total bits of each ap_fixed<W, I>; I comes from calibration ranges
    fpga_calibration_clips: int = Field(32, ge=1)


class RayConfig(Section):
    # which cluster runs the work, not what it produces (a target no pool offers is skipped and never cached)
    runtime_only = frozenset({"address", "emulate", "num_cpus", "job_timeout_s", "retries", "local_nice"})
    address: str | None = None               # join this cluster ("auto", "ray://host:10001"); None: start a local Ray
    emulate: list[Literal["gpu", "tpu", "fpga"]] = Field(default_factory=lambda: ["gpu", "tpu", "fpga"])
    #                                          ^ accelerator resources a *local* node declares, so every pool exists
    num_cpus: int | None = None              # CPUs of the local node; None: all of this machine's
    job_timeout_s: float = Field(900, gt=0)  # a job (or an actor waiting for its resource) past this fails
    retries: int = Field(1, ge=0)            # fresh actors after a worker process dies mid-job
    local_nice: dict[Target, Annotated[int, Field(ge=0, le=19)]] = Field(
        default_factory=lambda: {"cpu": 5, "gpu": 5, "tpu": 5})
    #   ^ added to Ray's worker niceness on a *local* node, whose pools share its cores: the FPGA emulation (one
    #     single-threaded process, the longest job) keeps its priority and the other targets fill the cores around it.
    #     Unused with `address`.


class BudgetConfig(Section):
    """The user's budgets: the registry's promotion gates and the report's best variant per target both apply them."""
    max_top1_drop: float = Field(0.02, ge=0)            # test top-1 below the teacher's (0.02 = 2 points)
    min_top1: float | None = Field(None, ge=0, le=1)    # test top-1 a champion needs at least; None: no floor (it
    #                                                     must beat answering the majority class in any case)
    max_latency_ms: float | None = Field(None, gt=0)    # batch-1 latency on the target's own runtime; None: no limit
    max_artifact_mb: float | None = Field(None, gt=0)   # deployable artifact size; None: no limit
    min_argmax_agreement: float = Field(0.99, ge=0, le=1)  # int8 / fixed-point targets vs the PyTorch reference


class TargetProfile(Section):
    """What a target's estimates assume: editable, since prices and parts differ per user. Estimates, not measured."""
    device: str                          # the part a deployment would run on
    watts: float = Field(gt=0)           # board power while busy
    usd_per_hour: float = Field(ge=0)    # on-demand price of one such device


class TargetProfiles(Section):
    # list prices and board power as published in 2026; edit for your own fleet (report.profiles.gpu.watts=60)
    cpu: TargetProfile = TargetProfile(device="2 vCPU x86 cloud VM (c7i.large class)", watts=25, usd_per_hour=0.089)
    gpu: TargetProfile = TargetProfile(device="NVIDIA L4 (g6.xlarge class)", watts=72, usd_per_hour=0.805)
    tpu: TargetProfile = TargetProfile(device="Cloud TPU v5e, 1 chip", watts=120, usd_per_hour=1.20)
    fpga: TargetProfile = TargetProfile(device="AMD Alveo U250 (f1-class instance)", watts=75, usd_per_hour=1.65)


class ReportConfig(Section):
    profiles: TargetProfiles = Field(default_factory=TargetProfiles)


class ServeConfig(Section):
    deployment: str = "vidopt"                    # deployment names: <deployment>-scheduled, <deployment>-on-new-data
    cron: str | None = "0 3 * * *"                # scheduled runs (daily 03:00); None: no schedule
    timezone: str = "UTC"
    event: str = "vidopt.data.arrived"            # what `vidopt listen` emits and the trigger expects
    debounce_s: float = Field(30.0, gt=0)         # a burst of events within this window starts one run


class ListenConfig(Section):
    # Watches data.source (s3://bucket/prefix or a folder). With an SQS queue that receives the bucket's
    # ObjectCreated notifications it reads those; otherwise it polls the listing.
    sqs_queue_url: str | None = None
    poll_interval_s: float = Field(1.0, gt=0)     # listing interval in polling mode (S3: one LIST per second)
    quiet_s: float = Field(1.0, ge=0)             # a burst's first objects are emitted at once, the rest once no
    #                                               new object arrived for this long (batches a burst)
    max_wait_s: float = Field(4.0, gt=0)          # ... but never hold a new object back longer than this
    extensions: list[str] = Field(default_factory=lambda: [".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v"])


class TrackingConfig(Section):
    uri: str | None = None               # MLflow tracking URI; None: sqlite file in the project dir
    experiment: str = "vidopt"


class RunConfig(Section):
    # where things are kept, not what they are: a moved project or store reuses every finished stage
    runtime_only = frozenset({"project_dir", "name", "artifact_root", "store_endpoint_url", "store_region"})
    project_dir: str = ".vidopt"         # this machine's space: Prefect home, mlflow.db, caches, scratch
    name: str | None = None              # MLflow run name; None: MLflow picks one
    seed: int = 0
    artifact_root: str | None = None     # where every stage output, checkpoint, clip set, export package and report
    #                                      lives: a local folder, or s3://bucket/prefix that every Ray node reads and
    #                                      writes (AWS, MinIO). None: <project_dir>
    store_endpoint_url: str | None = None  # S3 endpoint of the artifact store (MinIO); None: boto3's usual config
    store_region: str | None = None


class TrainConfig(Section):
    """Where and how training runs: it decides speed, not the model (data-parallel steps match one worker's within
    float tolerance), so none of it is part of a stage's cache key."""
    runtime_only = frozenset({"workers", "device", "launcher", "cpus_per_worker", "gpu_precision", "max_failures",
                              "prefetch_batches"})
    workers: int = Field(1, ge=1)        # data-parallel workers (Ray Train TorchTrainer + DDP); global batch unchanged
    device: Literal["auto", "cpu", "gpu"] = "auto"  # auto: the GPU pool where the Ray cluster has GPUs, else CPUs.
    #                                      A worker without CUDA trains on its CPU and says so
    launcher: Literal["auto", "ray", "local"] = "auto"  # auto: in this process when there is nothing to spread (one
    #                                      worker, no ray.address, a local store, no GPU asked for); else Ray Train
    cpus_per_worker: int | None = None   # CPU workers' threads and Ray CPUs; None: the local node's cores / workers
    gpu_precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # mixed precision on GPUs; auto: bf16 where the
    #                                      GPU has it (Ampere and later), else fp16 with a gradient scaler
    max_failures: int = Field(2, ge=0)   # worker (or node) losses survived, each resuming from the last epoch
    prefetch_batches: int = Field(4, ge=1)  # batches decoded ahead per loader process, so the device never waits


class PipelineConfig(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    clips: ClipConfig = Field(default_factory=ClipConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    budgets: BudgetConfig = Field(default_factory=BudgetConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    listen: ListenConfig = Field(default_factory=ListenConfig)

    @model_validator(mode="after")
    def _source_defaults_to_the_project_bucket(self) -> "PipelineConfig":
        if self.data.source is None:
            self.data.source = str(Path(self.run.project_dir) / "bucket")
        return self

    @model_validator(mode="after")
    def _videos_hold_a_clip(self) -> "PipelineConfig":
        if self.data.min_frames < self.clips.frames:
            raise ValueError(f"data.min_frames ({self.data.min_frames}) must be at least clips.frames "
                             f"({self.clips.frames}): a shorter video cannot fill one clip with distinct frames")
        return self

    @model_validator(mode="after")
    def _no_credentials_in_urls(self) -> "PipelineConfig":
        """Credentials in a URL would be written wherever the config is (model folders, MLflow, Prefect parameters):
        they are refused here, and each service's own variables carry them instead."""
        for key, where in URL_FIELDS.items():
            section, name = key.split(".")
            url = getattr(getattr(self, section), name)
            if url and "://" in url and urlsplit(url).password is not None:
                raise ValueError(f"{key}: a URL must not carry user:password@ ({redact(url)}); {where}")
        return self

    def is_project_bucket(self) -> bool:
        """data.source is the project's own bucket (the only folder sample data is ever written into unasked)."""
        source = self.data.source or ""
        return "://" not in source and Path(source).resolve() == (Path(self.run.project_dir) / "bucket").resolve()

    @model_validator(mode="after")
    def _student_fits_the_clips(self) -> "PipelineConfig":
        """The distill stage builds its student only after ingestion and the teacher: a student that cannot read these
        clips (a map smaller than its pooling grid, a stem kernel that does not fit its stride) is refused here."""
        from vidopt.models import StudentArch  # imports this module (through vidopt.data): not at the top

        c = self.clips
        try:
            StudentArch(frames=c.frames, height=c.height, width=c.width, **self.distill.architecture()).pool_window()
            return self
        except ValidationError as err:   # the arch's own checks (the stem)
            reason = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
        except ValueError as err:        # the pooling grid against the map these clips leave
            reason = str(err)
        raise ValueError(f"distill: no student of this architecture reads clips of {c.height}x{c.width}: {reason}")

    def section_hash(self, name: str) -> str:
        """Content hash of one section without its runtime-only fields: part of every stage's cache key."""
        section = getattr(self, name)
        return _hash_json(section.model_dump(mode="json", exclude=set(section.runtime_only)))

    def config_hash(self) -> str:
        return _hash_json(self.model_dump(mode="json"))


# Every URL-valued field, and where its credentials belong instead.
URL_FIELDS = {
    "data.source": "S3 credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an AWS profile",
    "data.s3_endpoint_url": "S3 credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an AWS profile",
    "run.artifact_root": "S3 credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an AWS profile",
    "run.store_endpoint_url": "S3 credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an AWS profile",
    "tracking.uri": "MLflow reads MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)",
    "listen.sqs_queue_url": "SQS credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an AWS profile",
}


class ConfigError(VidoptError, ValueError):
    """A profile or override that does not fit PipelineConfig; the message names the key."""


def _hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def profile_path(profile: str) -> Path:
    path = Path(profile)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    path = PROFILE_DIR / f"{profile}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise ConfigError(f"config: unknown profile {profile!r}; known profiles: {known} (or pass a .yaml path)")
    return path


def load_config(profile: str = "demo", overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Profile YAML, then overrides like `clips.frames=8` (values parsed as YAML), validated as a whole."""
    path = profile_path(profile)
    raw = _parse_yaml(path.read_text(), str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {path}: the profile must be a mapping of sections (run:, data:, ...), "
                          f"not a {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"config: override {item!r} is not of the form key.sub=value")
        _set_path(raw, key.strip(), _parse_yaml(value, f"override {key.strip()}"))
    return validate_config(raw)


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config: {where}: invalid YAML{at}: {problem}") from None


def validate_config(raw: dict[str, Any]) -> PipelineConfig:
    """Validate `raw` laid over the defaults, so a partial section (one field of a target profile) keeps the rest."""
    defaults = PipelineConfig().model_dump(mode="json")
    defaults["data"]["source"] = None   # unset: the project's bucket, wherever `raw` puts the project
    try:
        return PipelineConfig.model_validate(_merged(defaults, raw))
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
            if key and e["type"] != "extra_forbidden" and not isinstance(e.get("input"), dict):
                msg = f"{msg}, got {redact(e['input'])!r}"   # the value as typed: what to change
            problems.append(f"config: {key}: {msg}" if key else f"config: {msg}")   # no key: a cross-section check
        raise ConfigError("\n".join(problems)) from None


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        both_dicts = isinstance(value, dict) and isinstance(base.get(key), dict)
        out[key] = _merged(base[key], value) if both_dicts else value
    return out


def _set_path(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set raw[a][b][c] for 'a.b.c', refusing keys PipelineConfig does not have (before any work starts)."""
    parts = dotted.split(".")
    model: type[BaseModel] | None = PipelineConfig
    for i, part in enumerate(parts):
        if model is None or part not in model.model_fields:
            raise ConfigError(f"config: {'.'.join(parts[: i + 1])}: unknown key")
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


SECRET_WORDS = ("secret", "password", "token", "credential", "access_key", "session_key")


def redact(obj: Any) -> Any:
    """Copy of a config dict with values under secret-looking keys (and credentials inside URIs) masked."""
    if isinstance(obj, dict):
        return {k: "***" if any(w in str(k).lower() for w in SECRET_WORDS) else redact(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str) and "://" in obj and "@" in obj.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = obj.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return obj


def flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
