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
