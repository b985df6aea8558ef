"""Where a stage keeps its work, and what it may read.

A stage's outputs live at `<artifact root>/stages/<stage>/<key>/`, the key hashing exactly what the result depends on:
the config the stage reads (its `StageReads` record, runtime-only fields left out) and its inputs' content hashes.
Same inputs -> same place, so a crashed stage finds its checkpoint there and resumes, and a finished one is returned.
The stage sees the config only through its record: reading a section it did not declare fails at once, so a cache
key can never miss a field the stage depends on.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from vidopt.artifacts import DatasetArtifact, ModelArtifact
from vidopt.config import PipelineConfig, RunConfig, Section
from vidopt.store import ArtifactStore, StoreSpec


class StageReads(BaseModel):
    """The sections of PipelineConfig one stage reads; subclasses add theirs as fields of the same names."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    run: RunConfig   # the seed; where things live is runtime-only

    @classmethod
    def of(cls, cfg: PipelineConfig | StageReads) -> Any:
        """This record's sections taken from a whole config (or from a larger record)."""
        if isinstance(cfg, cls):
            return cfg
        return cls.model_validate({name: getattr(cfg, name) for name in cls.model_fields})

    def key(self, inputs: list[str]) -> str:
        reads = {name: _without_runtime(getattr(self, name)) for name in type(self).model_fields}
        payload = json.dumps({"reads": reads, "inputs": inputs}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _without_runtime(section: Section) -> dict:
    return section.model_dump(mode="json", exclude=set(section.runtime_only))


def store_spec(run: RunConfig) -> StoreSpec:
    """The artifact store of a run: run.artifact_root, or the project dir (absolute: records travel to other
    processes, which may start elsewhere)."""
    root = run.artifact_root or run.project_dir
    if "://" not in root:
        root = str(Path(root).resolve())
    return StoreSpec(root=root, endpoint_url=run.store_endpoint_url, region=run.store_region)


def open_store(run: RunConfig) -> ArtifactStore:
    """The run's store, caching what it fetches under this machine's project dir."""
    return ArtifactStore(store_spec(run), cache_dir=Path(run.project_dir).resolve() / "cache" / "store")


@dataclass(frozen=True)
class StageWork:
    """One stage's place: `uri` in the store (what it publishes) and `local`, this machine's folder for it (the same
    folder on a local store; scratch on an S3 one)."""
    store: ArtifactStore
    stage: str
    key: str
    uri: str
    local: Path

    def child(self, name: str) -> str:
        return f"{self.uri}/{name}"


def stage_work(reads: StageReads, stage: str, inputs: list[str]) -> StageWork:
    store = open_store(reads.run)
    key = reads.key(inputs)
    uri = store.uri("stages", stage, key)
    if store.is_local:
        local = store.local_path(uri)
    else:
        local = Path(reads.run.project_dir).resolve() / "scratch" / stage / key
    local.mkdir(parents=True, exist_ok=True)
    return StageWork(store, stage, key, uri, local)


INCARNATION = ".incarnation"


def stage_incarnation(work: StageWork) -> str:
    """A random id written once when the stage's place is first used and kept while it exists. Part of the Prefect
    cache key, so a cached result is only reused while what it points to is still in the store: deleting a stage's
    folder (or the whole store) makes the next run redo that stage instead of returning a record of missing files."""
    uri = work.child(INCARNATION)
    if work.store.has(uri):
        token = work.store.read_text(uri).strip()
        if token:
            return token
    token = uuid.uuid4().hex[:12]
    work.store.write_text(uri, token)
    return token


def forget_incarnation(work: StageWork) -> None:
    """The next use of the stage gets a new id: its content is not a result to reuse (an incomplete export)."""
    uri = work.child(INCARNATION)
    if work.store.has(uri):
        work.store.delete(uri)


OUTPUTS = "_OUTPUTS{}.json"   # in a stage's place, written last: what its result points to, with sizes and hashes


def seal_outputs(work: StageWork, record: Any, part: str = "") -> None:
    """Record every file and folder of the stage's place that `record` (its result) names, as it is now. Written
    last, in one atomic write: a result is only reused while what it names still matches (outputs_problem)."""
    dumped = record.model_dump(mode="json") if isinstance(record, BaseModel) else record
    prefix = work.uri + "/"
    uris = sorted({u for u in _strings(dumped) if u.startswith(prefix)})
    outputs = {uri[len(prefix):]: work.store.describe(uri) for uri in uris}
    work.store.write_text(work.child(OUTPUTS.format(part)), json.dumps(outputs, indent=1, sort_keys=True))


def outputs_problem(work: StageWork, part: str = "") -> str | None:
    """None when the stage's sealed outputs are all there and hash as sealed; else the first thing wrong, or
    'not sealed' for a stage that never finished."""
    from vidopt.store import NoSuchObject

    try:
        outputs = json.loads(work.store.read_text(work.child(OUTPUTS.format(part))))
    except NoSuchObject:
        return NOT_SEALED
    except ValueError as err:
        return f"{work.child(OUTPUTS.format(part))}: unreadable ({err})"
    if not isinstance(outputs, dict):
        return f"{work.child(OUTPUTS.format(part))}: unreadable (not a mapping)"
    for rel, expected in outputs.items():
        if problem := work.store.problem(work.child(rel), expected):
            return problem
    return None


NOT_SEALED = "not sealed"


def unseal(work: StageWork, part: str = "") -> None:
    """The stage's result is not to be reused: a fresh incarnation misses Prefect's cache, and a bad output named in
    the seal is removed so the stage makes it again."""
    from vidopt.store import StoreError

    uri = work.child(OUTPUTS.format(part))
    try:
        outputs = json.loads(work.store.read_text(uri))
    except (StoreError, ValueError):
        outputs = {}
    for rel, expected in (outputs.items() if isinstance(outputs, dict) else ()):
        if work.store.problem(work.child(rel), expected):
            work.store.delete(work.child(rel))
    if work.store.has(uri):
        work.store.delete(uri)
    forget_incarnation(work)


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def artifact_hash(artifact: DatasetArtifact | ModelArtifact) -> str:
    return artifact.manifest_sha256 if isinstance(artifact, DatasetArtifact) else artifact.weights_sha256


def read_manifest(store: ArtifactStore, dataset: DatasetArtifact) -> list[dict]:
    from vidopt.store import FileRef

    path = store.get_file(FileRef(uri=dataset.manifest_uri, sha256=dataset.manifest_sha256))
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def split_rows(dataset: DatasetArtifact, split: str, store: ArtifactStore | None = None) -> list[dict]:
    """The manifest rows of one split. Without a store the manifest URI must be a local path."""
    if store is None:
        from vidopt.storage import read_jsonl

        rows = read_jsonl(Path(dataset.manifest_uri))
    else:
        rows = read_manifest(store, dataset)
    return [r for r in rows if r["split"] == split]
