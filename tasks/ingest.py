"""Ingestion stage: a folder or s3:// prefix of labeled clips -> a verified manifest with splits, a data version and a
quarantine list.

    python -m tasks.ingest --profile tiny data.source=path/to/clips

Every file is downloaded to the cache (atomically; unchanged objects are not fetched again), hashed, fully decoded to
count frames, and checked against decord; what cannot be used is quarantined with its reason while the rest goes on.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from prefect import task

from tasks.retry import IO_RETRY_DELAYS, only_io_errors
from vidopt.artifacts import DatasetArtifact
from vidopt.config import PipelineConfig
from vidopt.data import SPLITS, assign_splits, class_counts, data_version
from vidopt.ingestion import (
    IngestError,
    ManifestError,
    file_identity,
    inspect_file,
    labels_from_layout,
    manifest_uri,
    probe_cache_path,
    read_source_manifest,
)
from vidopt.metrics import metric_names
from vidopt.processes import spawn_pool
from vidopt.stages import open_store
from vidopt.sample_data import generate_dataset
from vidopt.tracking import MLflowLogger, set_run_tags, stage_run
from vidopt.storage import (
    DownloadCache,
    RemoteObject,
    StorageError,
    list_objects,
    read_jsonl,
    sha256_file,
    write_jsonl,
)

log = logging.getLogger("vidopt.ingest")


def run(cfg: PipelineConfig) -> DatasetArtifact:
    data, project = cfg.data, Path(cfg.run.project_dir)
    _fill_with_samples_if_missing(cfg)
    try:
        objects = list_objects(data.source, data.s3_endpoint_url, data.s3_region)
    except StorageError as err:
        raise IngestError(f"ingest: {err}") from None
    labels, quarantine = _labels(cfg, objects)
    cache = DownloadCache(project / "cache" / "objects", data.source, data.s3_endpoint_url, data.s3_region)

    rows, started = [], time.monotonic()
    candidates = [o for o in objects if o.key in labels]
    log.info("ingest: %d objects under %s, %d labeled", len(objects), data.source, len(candidates))
    for obj, result in _inspect_all(cfg, cache, candidates, quarantine):
        base = {"key": obj.key, "uri": obj.uri, "label": labels[obj.key], **result}
        if not base.pop("ok"):
            quarantine.append(base)
        elif base["num_frames"] < data.min_frames:
            quarantine.append({**base, "reason": _too_short(base, data.min_frames)})
        else:
            rows.append(base)
    store = open_store(cfg.run)
    rows = _drop_duplicates(rows, quarantine, _previous_keys(store, data.source))
    assign_splits(rows, data.split_fractions, data.stratify, data.min_split_videos)
    for q in quarantine:
        log.warning("ingest: %s: %s (quarantined)", q["uri"], q["reason"])

    if not rows:
        raise IngestError(f"ingest: no usable videos in {data.source} ({len(quarantine)} quarantined: "
                          + "; ".join(f"{q['key']}: {q['reason']}" for q in quarantine[:5]) + ")")
    check_classes(rows, data.source, data.split_fractions, data.stratify)
    dataset = _write_dataset(cfg, rows, quarantine, cache.downloaded, time.monotonic() - started)
    store.write_text(_latest_uri(store, data.source), json.dumps({"source": data.source, "uri": dataset.uri,
                                                                 "manifest_sha256": dataset.manifest_sha256}))
    return dataset


def _too_short(probe: dict, min_frames: int) -> str:
    frames = probe["num_frames"]
    if frames <= 1 and probe.get("codec") in STILL_IMAGE_CODECS:
        return f"a still image ({probe['codec']}, {frames} frame), not a video"
    return f"too short: {frames} frames < {min_frames} needed (data.min_frames)"


STILL_IMAGE_CODECS = {"png", "mjpeg", "bmp", "gif", "webp", "tiff", "jpeg2000", "jpegls", "apng", "qoi"}


def check_classes(rows: list[dict], source: str, fractions, stratified: bool = True) -> None:
    """A classifier needs two classes, and every class in every split the fractions ask for: a class missing from
    test (or val) would be scored on nothing, or chosen on nothing, and the numbers would not say so."""
    counts = class_counts(rows)
    shown = ", ".join(f"{label!r}: " + "/".join(str(c[s]) for s in SPLITS) for label, c in counts.items())
    if len(counts) < 2:
        raise IngestError(f"ingest: {source} holds {len(counts)} class ({shown} train/val/test videos); a classifier "
                          "needs at least two: add a folder of videos per class (<label>/<video>)")
    wanted = [s for s, f in zip(SPLITS, fractions) if f > 0]
    short = {label: [s for s in wanted if c[s] == 0] for label, c in counts.items()}
    short = {label: splits for label, splits in short.items() if splits}
    if short:
        what = "; ".join(f"{label!r} has no {' or '.join(splits)} videos" for label, splits in short.items())
        hint = "" if stratified else ", or set data.stratify=true (every class cut at the fractions)"
        raise IngestError(f"ingest: {source}: {what} (train/val/test per class: {shown}); add videos of these "
                          f"classes, or change data.split_fractions{hint}")


def _latest_uri(store, source: str) -> str:
    """Where the newest dataset of `source` is named: the keys it holds keep their place when duplicates arrive."""
    return store.uri("datasets", "latest", hashlib.sha256(source.encode()).hexdigest()[:16] + ".json")


def _previous_keys(store, source: str) -> set[str]:
    """Keys of the newest dataset ingested from `source` (none when there is none, or it cannot be read)."""
    from vidopt.store import FileRef, StoreError

    try:
        latest = json.loads(store.read_text(_latest_uri(store, source)))
        path = store.get_file(FileRef(uri=f"{latest['uri']}/manifest.jsonl", sha256=latest["manifest_sha256"]))
        return {row["key"] for row in read_jsonl(path)}
    except (StoreError, ValueError, KeyError, TypeError) as err:
        if not isinstance(err, StoreError) or "no such object" not in str(err):
            log.warning("ingest: the previous dataset of %s cannot be read (%s); duplicates keep the first key", source,
                        err)
        return set()


def _fill_with_samples_if_missing(cfg: PipelineConfig) -> None:
    """Sample data goes only into the project's own bucket: a folder the user named that does not exist is a typo,
    and an error (list_objects raises it), never a place to write videos into."""
    source = cfg.data.source
    if cfg.data.sample_if_missing and cfg.is_project_bucket() and not Path(source).exists():
        spec = cfg.data.sample
        log.info("ingest: the project's bucket %s does not exist; writing the sample dataset there (%d classes x %d "
                 "videos)", source, len(spec.classes), spec.videos_per_class)
        generate_dataset(Path(source), spec, progress=_progress("sample data: wrote", "videos"),
                         workers=cfg.data.probe_workers)   # one process per core, as the probes


def _labels(cfg: PipelineConfig, objects: list[RemoteObject]) -> tuple[dict[str, str], list[dict]]:
    if cfg.data.manifest is None:
        return labels_from_layout(objects)
    uri = manifest_uri(cfg.data.source, cfg.data.manifest)
    try:
        listed = read_source_manifest(uri, cfg.data.s3_endpoint_url, cfg.data.s3_region)
    except (OSError, StorageError, ManifestError) as err:
        raise IngestError(f"ingest: cannot read manifest {uri}: {err}") from None
    present = {o.key for o in objects}
    missing = [{"key": k, "uri": k, "reason": "listed in the manifest but not found in the source"}
               for k in sorted(listed) if k not in present]
    return listed, missing


def _inspect_all(cfg: PipelineConfig, cache: DownloadCache, objects: list[RemoteObject], quarantine: list[dict]):
    """Yield (object, inspect result) for every object that could be fetched; probes are cached by content hash."""
    probe_dir = Path(cfg.run.project_dir) / "cache" / "probes"
    probe_dir.mkdir(parents=True, exist_ok=True)
    checks = cfg.data.decoder_checks
    pending, progress = [], _progress("ingest: probed", "new files")
    for obj in objects:
        try:
            path = cache.local_path(obj)
            sha, size = file_identity(path)
        except (OSError, StorageError) as err:
            quarantine.append({"key": obj.key, "uri": obj.uri, "reason": f"cannot fetch: {err}"})
            continue
        cached = probe_cache_path(probe_dir, sha, checks)
        probe = _cached_probe(cached)
        if probe is not None:
            yield obj, {**probe, "sha256": sha, "size": size, "path": str(path)}
        else:
            pending.append((obj, path, sha, size, cached))
    probes = _run_probes(pending, cfg.data.probe_workers, checks)
    for done, ((obj, path, sha, size, cached), result) in enumerate(probes, 1):
        if result.pop("cacheable", True):
            write_jsonl(cached, [result])
        progress(done, len(pending))
        yield obj, {**result, "sha256": sha, "size": size, "path": str(path)}


def _cached_probe(path: Path) -> dict | None:
    """A probe cached by an earlier ingest, or None: an unreadable one (emptied, garbage) is set aside with a
    warning and the file probed again."""
    if not path.exists():
        return None
    try:
        probe = read_jsonl(path)[0]
        if isinstance(probe, dict) and isinstance(probe.get("ok"), bool) and {"reason", "num_frames"} & set(probe):
            return probe
        problem = "not a probe record"
    except (ValueError, IndexError, OSError) as err:
        problem = f"{type(err).__name__}: {err}"
    log.warning("ingest: probe cache %s is unreadable (%s); probing the file again", path, problem)
    path.replace(path.with_suffix(".bad"))
    return None


def _run_probes(pending: list[tuple], workers: int, checks: int):
    """Yield (pending item, inspect result) in order. A file that crashes the decoder itself (a native abort kills the
    worker and breaks the pool) is found by re-running the affected files one per fresh process, and quarantined."""
    if not pending:
        return
    with spawn_pool(workers) as pool:
        futures = [pool.submit(inspect_file, str(item[1]), checks) for item in pending]
        for item, future in zip(pending, futures):
            try:
                yield item, future.result()
            except BrokenProcessPool:
                yield item, _probe_alone(str(item[1]), checks)


def _probe_alone(path: str, checks: int) -> dict:
    with spawn_pool(1) as pool:
        try:
            return pool.submit(inspect_file, path, checks).result()
        except BrokenProcessPool:
            # Not cached: a crash may come from this machine's state rather than the file.
            return {"ok": False, "reason": "the decoder crashed on this file", "cacheable": False}


def _drop_duplicates(rows: list[dict], quarantine: list[dict], previous: set[str]) -> list[dict]:
    """Same content twice would sit in one split under two keys (or two labels): keep one key. A key the previous
    dataset holds wins (a copy dropped into the bucket is the newcomer), then the first key in order."""
    first: dict[str, dict] = {}
    kept = []
    for row in sorted(rows, key=lambda r: (r["key"] not in previous, r["key"])):
        if row["sha256"] in first:
            quarantine.append({**row, "reason": f"duplicate content of {first[row['sha256']]['key']}"})
        else:
            first[row["sha256"]] = row
            kept.append(row)
    return kept


def _write_dataset(cfg: PipelineConfig, rows, quarantine, downloaded: int, seconds: float) -> DatasetArtifact:
    """The manifest and quarantine list, published to the artifact store as one folder."""
    version = data_version(rows)
    # Same data version from another source (or with other rejects) must not overwrite this one's lists.
    listing = json.dumps([sorted(r.items()) for r in rows + quarantine], sort_keys=True, default=str)
    store = open_store(cfg.run)
    uri = store.uri("datasets", f"{version}-{hashlib.sha256(listing.encode()).hexdigest()[:8]}")
    scratch = Path(cfg.run.project_dir).resolve() / "scratch" / "datasets" / uri.rsplit("/", 1)[1]
    out = store.local_path(uri) if store.is_local else scratch
    write_jsonl(out / "manifest.jsonl", rows)
    write_jsonl(out / "quarantine.jsonl", sorted(quarantine, key=lambda q: q["key"]))
    store.put_dir(out, uri)
    counts = class_counts(rows)
    log.info("ingest: %d videos, %d classes, %d quarantined, data version %s (%.1f s)",
             len(rows), len(counts), len(quarantine), version, seconds)
    return DatasetArtifact(
        uri=uri,
        manifest_uri=f"{uri}/manifest.jsonl",
        quarantine_uri=f"{uri}/quarantine.jsonl",
        manifest_sha256=sha256_file(out / "manifest.jsonl"),
        data_version=version,
        classes=sorted(counts),
        class_counts=counts,
        num_videos=len(rows),
        num_quarantined=len(quarantine),
        downloaded=downloaded,
        source_endpoint_url=cfg.data.s3_endpoint_url,
        source_region=cfg.data.s3_region,
    )


def _progress(what: str, unit: str):
    """Log about ten progress lines per stage, whatever its size."""
    def report(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            log.info("%s %d/%d %s", what, done, total, unit)
    return report


def log_dataset(stage: MLflowLogger, dataset: DatasetArtifact, parent_run_id: str, store) -> None:
    """[MLflow] data version as a tag on both runs; counts as metrics; manifest and quarantine list as artifacts."""
    stage.set_tags({"data_version": dataset.data_version})
    set_run_tags(parent_run_id, {"data_version": dataset.data_version})
    stage.log("videos", dataset.num_videos)
    stage.log("quarantined", dataset.num_quarantined)
    stage.log("downloaded", dataset.downloaded)
    names = metric_names(list(dataset.class_counts))   # labels may hold characters metric names may not
    for label, counts in dataset.class_counts.items():
        for split, n in counts.items():
            stage.log(f"count.{split}.{names[label]}", n)
    stage.log_dict(dataset.model_dump(), "dataset.json")
    folder = store.get_dir(dataset.uri)
    stage.log_artifact(folder / "manifest.jsonl", "dataset")
    stage.log_artifact(folder / "quarantine.jsonl", "dataset")


# [Prefect] retries cover flaky object-store reads; `run` above is the plain function tests call.
@task(name="ingest", retries=len(IO_RETRY_DELAYS), retry_delay_seconds=IO_RETRY_DELAYS,
      retry_condition_fn=only_io_errors)
def ingest_task(cfg: PipelineConfig, parent_run_id: str) -> DatasetArtifact:
    with stage_run("ingest", parent_run_id) as stage:
        dataset = run(cfg)
        log_dataset(stage, dataset, parent_run_id, open_store(cfg.run))
    return dataset


if __name__ == "__main__":
    from tasks.dag import run_stage_standalone

    run_stage_standalone("ingest")
