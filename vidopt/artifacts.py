"""Records that stages hand each other: URIs, content hashes and metrics — never live tensors or modules."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from vidopt.store import FileRef, StoreSpec


class Artifact(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    uri: str          # directory holding the stage's files


class DatasetArtifact(Artifact):
    manifest_uri: str                      # JSONL, one row per usable video (see tasks/ingest.py for the fields)
    quarantine_uri: str                    # JSONL, one row per rejected object, with its reason
    manifest_sha256: str
    data_version: str                      # hash of (content, label, split) of every usable video
    classes: list[str]
    class_counts: dict[str, dict[str, int]]  # {label: {train, val, test, total}}
    num_videos: int
    num_quarantined: int
    downloaded: int                        # objects fetched from the source this time (0 on an unchanged re-run)
    source_endpoint_url: str | None = None  # how other nodes reach the rows' s3:// URIs (data.s3_endpoint_url)
    source_region: str | None = None


class ModelArtifact(Artifact):
    kind: str                              # "teacher", "student", "pruned", "int8"
    arch: dict                             # TeacherArch / StudentArch record (per-layer widths): rebuilds the model
    weights_sha256: str                    # of weights.safetensors (or model.onnx for int8)
    metrics: dict[str, float]              # top-1 per clip / per video on val and test, MACs, params, size, ...
    data_version: str
    notes: dict[str, str] = {}             # what was done and why (e.g. "quantization: ptq" or "qat after ptq lost 3.1")
    test_correct: str = ""                 # which test clips it got right (vidopt/stats.py pack_correct)
    test_confusion: list[list[int]] = []   # test clips by [true class][predicted class]


class CpuOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    target: Literal["cpu"] = "cpu"
    threads: int = 1                       # intra-op threads shipped (export.cpu_threads)
    min_argmax_agreement: float = 0.0      # int8 forms and runtimes below it are not shipped (budgets.*)
    runtimes: list[str] | None = None      # the runtimes to choose among (vidopt/runtimes.py); None: all available
    precisions: list[Literal["int8", "fp32"]] = ["int8", "fp32"]   # which of the model's files compete


class GpuOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    target: Literal["gpu"] = "gpu"
    threads: int = 1                       # onnxruntime threads where a variant runs on the host CPU
    min_argmax_agreement: float = 0.0      # variants below it are not served (budgets.*)


class TpuOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    target: Literal["tpu"] = "tpu"
    bf16: bool = False                     # also export and verify a bf16 StableHLO program
    pjrt_device: str | None = None         # None: TPU where the exporting child counts chips, else CPU
    latency_iters: int = 6                 # timed batch-1 calls, each on its own clip (~0.5 s compile each on a
    #                                        CPU); no warm-up call: every call compiles afresh, and the batched calls
    #                                        before them warmed PJRT
    timeout_s: float = 1800                # per child process (export, verify)


class FpgaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    target: Literal["fpga"] = "fpga"
    fixed_width: int = 16                  # total bits of each ap_fixed<W, I>
    calibration_clips: int = 32            # first eval clips whose activations set each layer's integer bits
    margin_bits: int = 1                   # integer bits over the calibrated range: headroom for unseen clips
    max_eval_clips: int | None = None      # the C++ emulation is slow: a cap for big test splits; None: every clip


TargetOptions = Annotated[CpuOptions | GpuOptions | TpuOptions | FpgaOptions, Field(discriminator="target")]


def default_options(target: str) -> CpuOptions | GpuOptions | TpuOptions | FpgaOptions:
    return TypeAdapter(TargetOptions).validate_python({"target": target})


class ExportJob(BaseModel):
    """One hardware target's export + verification, as sent to a worker pool on any node: store URIs and content
    hashes only, never a path of the machine that sent it, never a live module."""
    model_config = ConfigDict(extra="forbid")
    target: str                            # "cpu", "gpu", "tpu", "fpga"
    store: StoreSpec                       # the artifact store every node reads and writes
    model: str                             # the quantize stage's model folder: fp32 weights, arch.json, the ONNX
    #                                        files and int8 forms
    eval_clips: FileRef                    # clip set {"clips": uint8 [N, T, H, W, C], "labels": [N], "videos": [N]}
    out: str                               # store URI the target's outputs are published under
    options: TargetOptions


class LocalExportJob(BaseModel):
    """An ExportJob on the node that runs it: its inputs fetched into this node's cache, its outputs in a local
    folder that is published to the store afterwards. What every back-end's run_target reads."""
    model_config = ConfigDict(extra="forbid")
    target: str
    model_dir: str                         # fp32 model dir (arch.json + weights.safetensors) of the final student
    int8_dir: str | None = None            # quantize stage's dir (model_int8.onnx), for targets that ship int8
    eval_clips: str                        # the clip set file
    out_dir: str                           # where the target writes its deployable artifact
    options: TargetOptions


class TargetResult(BaseModel):
    """What a target produced and how it was verified on its own runtime."""
    model_config = ConfigDict(extra="forbid")
    target: str
    status: str                            # "ok", "skipped" (no pool / runtime absent), "failed"
    reason: str = ""                       # why skipped or failed
    runtime: str = ""                      # what really ran, e.g. "onnxruntime 1.32.0 CPUExecutionProvider"
    artifact_uri: str = ""                 # the deployable file or archive
    artifact_bytes: int = 0
    parity: dict[str, float] = {}          # max_abs_diff (float targets) / argmax_agreement (int8, fixed point)
    top1: float | None = None              # on the eval clips (the test split)
    correct: str = ""                      # which eval clips it got right (vidopt/stats.py pack_correct): paired
    #                                        tests against the champion and the other rungs on the same clips
    eval_clips: str = ""                   # sha256 of the clip set it was scored on
    latency_ms: float | None = None        # batch 1, p50, on that runtime
    seconds: float = 0.0                   # wall time of the job
    extra: dict = {}                       # per-target details (variants such as fp16 / bf16, build logs)


class FoldScores(BaseModel):
    """One fold of cross-validation: its test videos and what each rung got right on them."""
    fold: int
    test_videos: int
    top1: dict[str, float]                 # rung ("teacher", "student") -> test top-1 per video
    correct: dict[str, str]                # rung -> packed per-video correctness (vidopt/stats.py)
    teacher_check: str = ""                # distillation's verdict on this fold's teacher


class CrossValArtifact(Artifact):
    """k-fold cross-validation of the teacher and the student (tasks/crossval.py): every video tested once."""
    folds: list[FoldScores]
    pooled: dict[str, dict[str, float]]    # rung -> {top1, low, high, videos, fold_mean, fold_sd}: over all folds
    student_vs_teacher: str                # McNemar on every video, pooled


class ReportArtifact(Artifact):
    """The run report (vidopt/report.py): files in `uri`, and the best variant per target under the budgets."""
    html_uri: str                          # self-contained page, the Pareto plot embedded
    plot_uri: str                          # the Pareto plot as PNG
    rows_uri: str                          # JSON: every point, the best per target, budgets, profiles
    table_uri: str                         # the plain-text table `vidopt run` prints
    best: dict[str, dict] = {}             # target -> {variant: "gpu/ort_int8" or None, reason, top1, latency_ms, ...}
