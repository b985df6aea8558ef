"""Ingestion's building blocks: which label each object has, and what each file really is (probe + decoder check).

`inspect_file` runs in worker processes, so it lives here in the core (cheap to import: numpy and av, no Prefect).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from vidopt.errors import VidoptError
from vidopt.storage import RemoteObject, StorageError, read_text_uri, safe_relative_key, sha256_file

PROBE_FORMAT = 1  # bump when inspect_file's output changes, so cached probes are recomputed


class IngestError(VidoptError, RuntimeError):
    """Ingestion cannot produce a dataset (missing source, nothing usable); the message says what to do."""


class ManifestError(VidoptError, ValueError):
    """A source manifest that cannot be read; the message names the file and line."""


def labels_from_layout(objects: list[RemoteObject]) -> tuple[dict[str, str], list[dict]]:
    """`<label>/<file>` -> ({key: label}, quarantine rows for keys with no label folder)."""
    labels, rejected = {}, []
    for obj in objects:
        parts = obj.key.split("/")
        try:
            safe_relative_key(obj.key)
        except StorageError as err:
            rejected.append({"key": obj.key, "uri": obj.uri, "reason": str(err)})
            continue
        if len(parts) < 2:
            rejected.append({"key": obj.key, "uri": obj.uri, "reason": "no label: expected <label>/<file>"})
        else:
            labels[obj.key] = parts[0]
    return labels, rejected


def read_source_manifest(uri: str, endpoint_url: str | None = None, region: str | None = None) -> dict[str, str]:
    """A CSV (header `path,label`) or JSONL ({"path", "label"}) manifest -> {normalised key: label}."""
    text = read_text_uri(uri, endpoint_url, region)
    if uri.endswith(".jsonl"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ManifestError(f"{uri}:{n}: not JSON ({err.msg})") from None
    elif uri.endswith(".csv"):
        rows = list(enumerate(csv.DictReader(io.StringIO(text)), 2))
    else:
        raise ManifestError(f"{uri}: manifest must end in .csv or .jsonl")
    labels = {}
    for n, row in rows:
        path, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not path or not label:
            raise ManifestError(f"{uri}:{n}: needs non-empty 'path' and 'label'")
        try:
            labels[str(safe_relative_key(path))] = label
        except StorageError as err:
            raise ManifestError(f"{uri}:{n}: {err}") from None
    return labels


def manifest_uri(source: str, manifest: str) -> str:
    safe_relative_key(manifest)
    return f"{source.rstrip('/')}/{manifest}" if source.startswith("s3://") else str(Path(source) / manifest)


def inspect_file(path: str, decoder_checks: int) -> dict:
    """Probe one file. -> {"ok": True, <probe fields>, decoder, decoder_reason} or {"ok": False, "reason": ...}."""
    from vidopt.video import DecodeError, inspect_video

    if Path(path).stat().st_size == 0:
        return {"ok": False, "reason": "zero-byte file"}
    try:
        probe, decoder, why = inspect_video(path, max_checks=decoder_checks, seed=0)
    except DecodeError as err:
        return {"ok": False, "reason": str(err)}
    fields = probe.to_dict()
    fields.pop("keyframes", None)  # only the decoder check needs them
    return {"ok": True, **fields, "decoder": decoder, "decoder_reason": why}


def probe_cache_path(cache_dir: Path, content_hash: str, decoder_checks: int) -> Path:
    return cache_dir / f"{content_hash}-{decoder_checks}-v{PROBE_FORMAT}.json"


def file_identity(path: Path) -> tuple[str, int]:
    return sha256_file(path), path.stat().st_size
