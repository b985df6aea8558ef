"""Where a stage keeps its work: `<project>/stages/<stage>/<key>/`, the key hashing everything the result depends on
(input artifacts' content hashes and the config sections the stage reads). Same inputs -> same directory, so a
crashed stage finds its checkpoint there and resumes, and a finished one finds its model and is not redone."""
from __future__ import annotations

import hashlib
import json
import os
import uuid
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


def stage_incarnation(work: Path) -> str:
    """A random id written once when `work` is first used and kept while it exists. Part of the Prefect cache key, so
    a cached result is only ever reused while the directory it points into is still there: deleting a stage dir
    (or the whole project dir) makes the next run redo that stage instead of returning a record of missing files."""
    marker = work / ".incarnation"
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)  # exactly one writer wins a race
    except FileExistsError:
        return marker.read_text().strip() or _rewrite(marker)
    with os.fdopen(fd, "w") as out:
        token = uuid.uuid4().hex[:12]
        out.write(token)
    return token


def forget_incarnation(work: Path) -> None:
    """The next use of `work` gets a new id: its content is not a result to reuse (an incomplete export)."""
    (work / ".incarnation").unlink(missing_ok=True)


def _rewrite(marker: Path) -> str:
    """A marker left empty by a crash between create and write: replace it (atomically) with a fresh id."""
    token = uuid.uuid4().hex[:12]
    tmp = marker.with_suffix(f".{token}.part")
    tmp.write_text(token)
    os.replace(tmp, marker)
    return token


def artifact_hash(artifact: DatasetArtifact | ModelArtifact) -> str:
    return artifact.manifest_sha256 if isinstance(artifact, DatasetArtifact) else artifact.weights_sha256


def split_rows(dataset: DatasetArtifact, split: str) -> list[dict]:
    return [r for r in read_jsonl(Path(dataset.manifest_uri)) if r["split"] == split]
