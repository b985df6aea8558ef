"""Records that stages hand each other: URIs, content hashes and metrics — never live tensors or modules."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


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


class ModelArtifact(Artifact):
    kind: str                              # "teacher", "student", "pruned", "int8"
    arch: dict                             # TeacherArch / StudentArch record (per-layer widths): rebuilds the model
    weights_sha256: str                    # of weights.safetensors (or model.onnx for int8)
    metrics: dict[str, float]              # top-1 per clip / per video on val and test, MACs, params, size, ...
    data_version: str
    notes: dict[str, str] = {}             # what was done and why (e.g. "quantization: ptq" or "qat after ptq lost 3.1")


class ExportJob(BaseModel):
    """One hardware target's export + verification, as sent to a worker pool: URIs only, never live modules."""
    model_config = ConfigDict(extra="forbid")
    target: str                            # "cpu", "gpu", "tpu", "fpga"
    model_dir: str                         # fp32 model dir (arch.json + weights.safetensors) of the final student
    int8_dir: str | None = None            # quantize stage's dir (model_int8.onnx), for targets that ship int8
    eval_clips: str                        # torch file {"clips": uint8 [N, T, H, W, C], "labels": [N], "videos": [N]}
    out_dir: str                           # where the target writes its deployable artifact
    options: dict = {}                     # target-specific settings from the export config section


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
    latency_ms: float | None = None        # batch 1, p50, on that runtime
    seconds: float = 0.0                   # wall time of the job
    extra: dict = {}                       # per-target details (variants such as fp16 / bf16, build logs)


class ReportArtifact(Artifact):
    """The run report (vidopt/report.py): files in `uri`, and the best variant per target under the budgets."""
    html_uri: str                          # self-contained page, the Pareto plot embedded
    plot_uri: str                          # the Pareto plot as PNG
    rows_uri: str                          # JSON: every point, the best per target, budgets, profiles
    table_uri: str                         # the plain-text table `vidopt run` prints
    best: dict[str, dict] = {}             # target -> {variant: "gpu/ort_int8" or None, reason, top1, latency_ms, ...}
