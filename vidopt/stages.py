"""Where a stage keeps its work: `<project>/stages/<stage>/<key>/`, the key hashing everything the result depends on
(input artifacts' content hashes and the config sections the stage reads). Same inputs -> same directory, so a
crashed stage finds its checkpoint there and resumes, and a finished one finds its model and is not redone."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from vidopt.artifacts import DatasetArtifact, ModelArtifact
from vidopt.config import PipelineConfig
from vidopt.storage import read_jsonl


def stage_key(cfg: PipelineConfig, sections: list[str], inputs: list[str]) -> str:
    payload = {"sections": {s: cfg.section_hash(s) for s in sections}, "inputs": inputs, "seed": cfg.run.seed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def stage_dir(cfg: PipelineConfig, stage: str, sections: list[str], inputs: list[str]) -> Path:
    path = Path(cfg.run.project_dir).resolve() / "stages" / stage / stage_key(cfg, sections, inputs)
    path.mkdir(parents=True, exist_ok=True)
    return path


def artifact_hash(artifact: DatasetArtifact | ModelArtifact) -> str:
    return artifact.manifest_sha256 if isinstance(artifact, DatasetArtifact) else artifact.weights_sha256


def split_rows(dataset: DatasetArtifact, split: str) -> list[dict]:
    return [r for r in read_jsonl(Path(dataset.manifest_uri)) if r["split"] == split]
