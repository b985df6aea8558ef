"""URIs (a local path or s3://bucket/key), atomic writes, content hashes and the local download cache.

S3 goes through boto3 with its usual configuration (env vars, profiles, AWS_ENDPOINT_URL), so AWS, MinIO and moto all
work; an explicit endpoint/region from the config wins.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from vidopt.errors import VidoptError

HASH_CHUNK = 1 << 20  # bytes read at a time when hashing


class StorageError(VidoptError, RuntimeError):
    """A URI that cannot be read or a key that must not be written; the message names it."""


@dataclass(frozen=True)
class RemoteObject:
    key: str         # path relative to the source root, '/'-separated
    uri: str         # full URI to fetch it
    size: int
    etag: str        # S3 ETag, or mtime_ns for local files: changes when content may have changed


def is_hidden(key: str) -> bool:
    """.DS_Store, editor temp files and the like; '.' and '..' are not hidden but unsafe (see safe_relative_key)."""
    return any(p.startswith(".") and p not in (".", "..") for p in key.split("/"))


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket name")
    return bucket, prefix


class TransientStorageError(StorageError):
    """An S3 failure that may pass (endpoint unreachable, throttled, a 5xx): worth retrying, unlike a refusal."""


def s3_client(endpoint_url: str | None = None, region: str | None = None):
    import boto3  # lazy: only S3 sources need it
    from botocore.config import Config

    # botocore retries transient errors itself (standard mode: throttling, 5xx, dropped connections, with backoff);
    # short connect timeouts make an unreachable endpoint an error within seconds instead of minutes
    config = Config(connect_timeout=3, read_timeout=60, retries={"mode": "standard", "max_attempts": 3})
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


# S3 error codes that no retry changes, and what to check for each
S3_REFUSALS = {
    "NoSuchBucket": "no such bucket: create it, or fix the bucket name",
    "404": "not found (no such bucket, or no such object): create it, or fix the name",
    "403": "access denied (HTTP 403): check the credentials and their permissions on this bucket",
    "InvalidAccessKeyId": "the access key id is not known to this endpoint: check AWS_ACCESS_KEY_ID or the profile",
    "SignatureDoesNotMatch": "the secret key does not match the access key id: check AWS_SECRET_ACCESS_KEY",
    "AccessDenied": "access denied: the credentials lack permission on this bucket",
    "InvalidBucketName": "not a valid bucket name",
    "AllAccessDisabled": "access to this bucket is disabled",
    "ExpiredToken": "the temporary (STS) token has expired: refresh the credentials",
    "InvalidToken": "the temporary (STS) token is invalid: refresh the credentials",
}


@contextmanager
def s3_errors(uri: str, endpoint_url: str | None = None) -> Iterator[None]:
    """botocore errors as one-line StorageErrors naming the URI, the endpoint and what to check: refusals (no
    bucket, bad or missing credentials) as StorageError, failures worth retrying as TransientStorageError. Their
    messages hold no secrets."""
    from botocore.exceptions import (ClientError, ConnectTimeoutError, EndpointConnectionError,
                                     NoCredentialsError, PartialCredentialsError, ProfileNotFound, ReadTimeoutError)

    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    try:
        yield
    except ClientError as err:
        error = err.response.get("Error", {})
        code = str(error.get("Code"))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if code in S3_REFUSALS or code in ("403", "404") or 400 <= status < 500 and code not in ("SlowDown",
                                                                                                 "RequestTimeout"):
            what = S3_REFUSALS.get(code) or error.get("Message") or code
            raise StorageError(f"{uri}: S3 {code} at {endpoint}: {what}") from err
        raise TransientStorageError(f"{uri}: S3 {code} at {endpoint} (retrying may help): "
                                    f"{error.get('Message', err)}") from err
    except (NoCredentialsError, PartialCredentialsError) as err:
        raise StorageError(f"{uri}: no usable AWS credentials ({err}): set AWS_ACCESS_KEY_ID and "
                           "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE") from err
    except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError) as err:
        raise TransientStorageError(f"{uri}: cannot reach the S3 endpoint {endpoint} ({err}): check the URL "
                                    "(data.s3_endpoint_url, run.store_endpoint_url or AWS_ENDPOINT_URL) and that "
                                    "it is up") from err
    except ProfileNotFound as err:
        raise StorageError(f"{uri}: {err} (check AWS_PROFILE and ~/.aws/config)") from err


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temp path next to `dest`; on success it replaces `dest` in one rename, on failure it is removed. The
    temp file is fsynced before the rename and the folder after it, so a power loss leaves the old file or the new
    one, whole."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(tmp)
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make renames in `folder` durable; a no-op where folders cannot be opened or synced (Windows, some FUSE)."""
    try:
        _fsync(folder)
    except OSError:
        pass


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield an empty temp folder next to `dest`; on success it replaces `dest` (a folder) whole, on failure it is
    removed: a reader sees the old folder or the new one, never a half-written one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(dest: Path, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)


def write_jsonl(dest: Path, rows: list[dict]) -> None:
    atomic_write_text(dest, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def safe_relative_key(key: str) -> PurePosixPath:
    # Checked on the raw string: PurePosixPath would silently normalise 'a/./b' and 'a//b' away.
    """A source key as a relative path that cannot escape the cache directory."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise StorageError(f"{key!r}: object key is absolute or malformed (rejected: it would escape the cache)")
    parts = key.split("/")
    if any(p in ("..", ".", "") for p in parts):
        raise StorageError(f"{key!r}: object key has a '..', '.' or empty part (rejected: it would escape the cache)")
    return PurePosixPath(*parts)


def list_objects(source: str, endpoint_url: str | None = None, region: str | None = None) -> list[RemoteObject]:
    """Every object under a folder or s3:// prefix, sorted by key; hidden files (.DS_Store, temp files) skipped."""
    if is_s3(source):
        return _list_s3(source, endpoint_url, region)
    root = Path(source).resolve()  # manifests hold absolute paths: later stages may run from another directory
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise StorageError(f"data.source {source} {what} (a folder or s3://bucket/prefix of <label>/<video> files; "
                           "`vidopt data sample --out DIR` writes the sample dataset)")
    objects = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not is_hidden(rel):
            st = path.stat()
            objects.append(RemoteObject(rel, str(path), st.st_size, str(st.st_mtime_ns)))
    return objects


def _list_s3(source: str, endpoint_url: str | None, region: str | None) -> list[RemoteObject]:
    bucket, prefix = split_s3(source)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    client = s3_client(endpoint_url, region)
    objects = []
    with s3_errors(source, endpoint_url):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix):]
                if rel and not rel.endswith("/") and not is_hidden(rel):
                    objects.append(RemoteObject(rel, f"s3://{bucket}/{obj['Key']}", obj["Size"],
                                                obj["ETag"].strip('"')))
    return sorted(objects, key=lambda o: o.key)


class DownloadCache:
    """Local copies of source objects under `root`, keyed by source and key.

    A sidecar `<file>.src.json` remembers the (size, etag) a copy was made from, so re-ingesting unchanged data
    downloads nothing. Local sources are used in place (no copy).
    """

    def __init__(self, root: Path, source: str, endpoint_url: str | None = None, region: str | None = None):
        self.source = source
        self.root = root / hashlib.sha256(source.encode()).hexdigest()[:12]
        self.endpoint_url, self.region = endpoint_url, region
        self.downloaded = 0  # objects fetched by this instance (0 on an unchanged re-run)
        self._client = None

    def local_path(self, obj: RemoteObject) -> Path:
        if not is_s3(self.source):
            return Path(obj.uri)
        dest = self.root / safe_relative_key(obj.key)
        stamp = dest.with_name(dest.name + ".src.json")
        want = {"size": obj.size, "etag": obj.etag}
        if dest.exists() and stamp.exists() and json.loads(stamp.read_text()) == want:
            return dest
        if self._client is None:
            self._client = s3_client(self.endpoint_url, self.region)
        bucket, key = split_s3(obj.uri)
        with atomic_path(dest) as tmp, s3_errors(obj.uri, self.endpoint_url):
            self._client.download_file(bucket, key, str(tmp))
        atomic_write_text(stamp, json.dumps(want))
        self.downloaded += 1
        return dest


def read_text_uri(uri: str, endpoint_url: str | None = None, region: str | None = None) -> str:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with s3_errors(uri, endpoint_url):
            return s3_client(endpoint_url, region).get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return Path(uri).read_text()
