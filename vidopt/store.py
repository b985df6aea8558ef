"""The artifact store: every stage reads and writes URIs under one root (a local folder or s3://bucket/prefix).

Workers read through a node-local cache keyed by content hash and publish atomically; job records carry only a
StoreSpec, URIs and hashes, never a path of another machine or a credential.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Iterator
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vidopt.storage import (HASH_CHUNK, StorageError, TransientStorageError, atomic_dir, atomic_path,
                            atomic_write_text, is_hidden, is_s3, s3_client, s3_errors, safe_relative_key, sha256_file,
                            split_s3)

MARKER = "_COMPLETE.json"  # written last into a published folder: {"digest", "files": {rel: {"sha256", "size"}}}
SHA256_HEX = r"^[0-9a-f]{64}$"
NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}  # S3 error codes of a missing object or bucket
# Files are re-hashed whenever a hash is known, local ones included: sha256 runs at ~1.2 GB/s (0.08 s for 100 MB on
# the 2-core dev box), small beside any stage, so there is no switch to turn verification off.


class StoreError(StorageError):
    """An artifact URI that cannot be read or written; the message names the URI and what is wrong."""


class TransientStoreError(StoreError, TransientStorageError):
    """A store operation that failed in a way worth retrying (endpoint unreachable, throttled)."""


class NoSuchObject(StoreError):
    """The bucket answered, but nothing (or no published folder) is at the URI; has() turns this into False."""


class StoreSpec(BaseModel):
    """Where the store is; travels inside job records, so it never holds credentials (each node has its own)."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    root: str                          # absolute local folder, or s3://bucket/prefix (a trailing '/' is dropped)
    endpoint_url: str | None = None    # MinIO / moto; None: boto3's usual config (AWS_ENDPOINT_URL, profiles)
    region: str | None = None

    @field_validator("root")
    @classmethod
    def _valid_root(cls, root: str) -> str:
        if not is_s3(root):
            if not os.path.isabs(root):
                raise ValueError(f"{root}: a local store root must be absolute (store_for resolves relative ones)")
            return os.path.normpath(root)
        bucket, _, prefix = root[len("s3://"):].rstrip("/").partition("/")
        try:
            return f"s3://{safe_relative_key(bucket)}" + (f"/{safe_relative_key(prefix)}" if prefix else "")
        except StorageError as err:
            raise ValueError(f"{root}: expected s3://bucket[/prefix] ({err})") from err

    @field_validator("endpoint_url")
    @classmethod
    def _no_credentials(cls, url: str | None) -> str | None:
        if url and (urlsplit(url).username or urlsplit(url).password):
            raise ValueError("endpoint_url must not carry user:password@ (records are shared): use AWS_* or a profile")
        return url


class FileRef(BaseModel):
    """One stored file: where it is and what it must hash to."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    uri: str
    sha256: str = Field(pattern=SHA256_HEX)  # also a cache folder name: the pattern keeps it from escaping


def node_cache_dir() -> Path:
    return Path(os.environ.get("VIDOPT_NODE_CACHE") or Path.home() / ".cache" / "vidopt" / "node")


def describe_folder(folder: Path) -> dict:
    """The marker of `folder`: every file but the marker and hidden (temp) ones, and the digest over
    sorted (relative path, sha256) pairs: names and contents, not mtimes."""
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    files = {rel: {"sha256": sha256_file(p), "size": p.stat().st_size} for rel, p in files.items()
             if rel != MARKER and not is_hidden(rel)}
    return {"digest": folder_digest(files), "files": files}


def folder_digest(files: dict[str, dict]) -> str:
    return hashlib.sha256("".join(f"{rel}\0{files[rel]['sha256']}\n" for rel in sorted(files)).encode()).hexdigest()


def hash_problem(path: Path, expected: str) -> str | None:
    """None if `path` holds content hashing to `expected`, else what is wrong (for an error message)."""
    if not path.is_file():
        return "missing"
    got = sha256_file(path)
    return None if got == expected else f"sha256 mismatch (expected {expected[:12]}.., got {got[:12]}..)"


def folder_problem(folder: Path, marker: dict) -> str | None:
    """None if `folder` holds every file of `marker` with its hash, else '<rel>: <what is wrong>'."""
    problems = (f"{rel}: {p}" for rel, m in marker["files"].items() if (p := hash_problem(folder / rel, m["sha256"])))
    return next(problems, None)


class ArtifactStore:
    """Files and published folders under spec.root, read through this node's cache (cache_dir)."""

    def __init__(self, spec: StoreSpec, cache_dir: Path | None = None):
        self.spec, self._cache_arg = spec, cache_dir
        self.cache_dir = Path(cache_dir) if cache_dir is not None else node_cache_dir()
        self._client = None

    def __reduce__(self):
        # Sent to another node (Ray), a store without an explicit cache_dir uses that node's cache; no client travels.
        return type(self), (self.spec, self._cache_arg)

    @property
    def is_local(self) -> bool:
        return not is_s3(self.spec.root)

    @property
    def client(self):
        if self._client is None:
            self._client = s3_client(self.spec.endpoint_url, self.spec.region)  # [boto3] one per store, made lazily
        return self._client

    # ---- URIs ---------------------------------------------------------------------------------------------------

    def uri(self, *parts: str) -> str:
        return f"{self.spec.root}/{self._safe(self.spec.root, '/'.join(parts))}" if parts else self.spec.root

    def local_path(self, uri: str) -> Path:
        """The path of `uri` in a local store. A local store also reaches absolute paths outside its root (a model
        folder or manifest a user points at on this machine); an S3 store takes none (another machine's paths)."""
        if not self.is_local:
            raise StoreError(f"{uri}: local_path needs a local store, this one is {self.spec.root}")
        if "://" not in uri and Path(uri).is_absolute() and not (uri + "/").startswith(self.spec.root + "/"):
            return Path(uri)
        return Path(self.spec.root, self._rel(uri))

    def _safe(self, uri: str, rel: str) -> str:
        try:
            return safe_relative_key(rel).as_posix()
        except StorageError as err:
            raise StoreError(f"{uri}: {err}") from err

    def _rel(self, uri: str) -> str:
        """The '/'-separated key of `uri` under the root ('' for the root itself)."""
        root, uri = self.spec.root, uri.rstrip("/")
        if uri != root and not uri.startswith(root + "/"):
            raise StoreError(f"{uri}: not under the store root {root} (records must carry URIs of this store)")
        return self._safe(uri, uri[len(root) + 1:]) if uri != root else ""

    def _obj(self, uri: str) -> dict[str, str]:
        """Bucket and Key arguments of `uri` (keys joined with '/', never a leading '/')."""
        bucket, prefix = split_s3(self.spec.root)
        return {"Bucket": bucket, "Key": "/".join(p for p in (prefix, self._rel(uri)) if p)}

    @contextmanager
    def _s3_errors(self, uri: str) -> Iterator[None]:
        """botocore / boto3 errors as a StoreError naming the URI (their messages hold no secrets)."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            with s3_errors(uri, self.spec.endpoint_url):
                try:
                    yield
                except ClientError as err:
                    if str(err.response.get("Error", {}).get("Code")) not in NOT_FOUND:
                        raise
                    bucket = split_s3(uri)[0]
                    if not self._bucket_exists(bucket):
                        raise StoreError(f"{uri}: no such bucket {bucket!r} (create it, or fix "
                                         "run.artifact_root)") from err
                    raise NoSuchObject(f"{uri}: no such object") from err
        except TransientStorageError as err:
            raise TransientStoreError(str(err)) from err.__cause__
        except StorageError as err:
            if isinstance(err, StoreError):
                raise
            raise StoreError(str(err)) from err.__cause__
        except (BotoCoreError, Boto3Error) as err:  # an upload that failed
            raise StoreError(f"{uri}: {err}") from err

    def _bucket_exists(self, bucket: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=bucket)
        except ClientError as err:
            return str(err.response.get("Error", {}).get("Code")) not in NOT_FOUND
        return True

    def _download(self, uri: str, dest: Path) -> None:
        with self._s3_errors(uri):
            self.client.download_file(Filename=str(dest), **self._obj(uri))  # [boto3] parallel ranged GETs

    # ---- files --------------------------------------------------------------------------------------------------

    def put_file(self, local: Path, uri: str) -> FileRef:
        sha = sha256_file(local)
        if self.is_local:
            dest = self.local_path(uri)
            if not (dest.exists() and dest.samefile(local)):
                with atomic_path(dest) as tmp:
                    shutil.copyfile(local, tmp)
        else:
            with self._s3_errors(uri):  # a PUT (or multipart upload) becomes visible whole, or not at all
                self.client.upload_file(Filename=str(local), ExtraArgs={"Metadata": {"sha256": sha}}, **self._obj(uri))
        return FileRef(uri=uri, sha256=sha)

    def get_file(self, ref: FileRef | str) -> Path:
        """A readable local path. With a FileRef the content is verified; on S3 a cached copy that no longer hashes
        right is fetched again (a bad object raises). A plain S3 uri costs one HEAD: it uses the sha256 put_file
        stored with the object, else caches by (ETag, size)."""
        uri, sha = (ref.uri, ref.sha256) if isinstance(ref, FileRef) else (ref, None)
        if self.is_local:
            path = self.local_path(uri)
            if not path.is_file():
                raise NoSuchObject(f"{uri}: no such object")
            if sha and (problem := hash_problem(path, sha)):
                raise StoreError(f"{uri}: {problem}")
            return path
        name = PurePosixPath(self._rel(uri)).name
        if sha is None:
            with self._s3_errors(uri):
                head = self.client.head_object(**self._obj(uri))
            sha = head.get("Metadata", {}).get("sha256", "")
            if not re.fullmatch(SHA256_HEX, sha):
                return self._get_by_etag(uri, name, head)
        dest = self.cache_dir / "files" / sha / name
        if hash_problem(dest, sha) is None:
            return dest
        with atomic_path(dest) as tmp:  # racing readers each rename their own verified copy: both end correct
            self._download(uri, tmp)
            if problem := hash_problem(tmp, sha):
                raise StoreError(f"{uri}: {problem}")
        return dest

    def _get_by_etag(self, uri: str, name: str, head: dict) -> Path:
        # One folder per object version: an entry never changes once written, so readers of an old one are safe.
        version = hashlib.sha256(f"{uri}\0{head['ETag']}\0{head['ContentLength']}".encode()).hexdigest()
        dest = self.cache_dir / "files" / "by-etag" / version / name
        if dest.is_file() and dest.stat().st_size == head["ContentLength"]:
            return dest
        with atomic_path(dest) as tmp, self._s3_errors(uri), open(tmp, "wb") as f:
            body = self.client.get_object(IfMatch=head["ETag"], **self._obj(uri))["Body"]  # that version, or fail
            shutil.copyfileobj(body, f, HASH_CHUNK)
        return dest

    def ref(self, uri: str) -> FileRef:
        """A FileRef of the file at `uri`, its hash taken from its content here."""
        return FileRef(uri=uri, sha256=sha256_file(self.get_file(uri)))

    def has(self, uri: str) -> bool:
        """A file exists at `uri`, or a folder there is completely published (a missing bucket raises)."""
        if self.is_local:
            return self.local_path(uri).is_file() or (self.local_path(uri) / MARKER).is_file()
        for candidate in (uri, f"{uri}/{MARKER}"):
            try:
                with self._s3_errors(candidate):
                    self.client.head_object(**self._obj(candidate))
                return True
            except NoSuchObject:
                pass
        return False

    def write_text(self, uri: str, text: str) -> None:
        if self.is_local:
            return atomic_write_text(self.local_path(uri), text)
        with self._s3_errors(uri):
            self.client.put_object(Body=text.encode(), **self._obj(uri))

    def read_text(self, uri: str) -> str:
        if self.is_local:
            if not self.local_path(uri).is_file():
                raise NoSuchObject(f"{uri}: no such object")
            return self.local_path(uri).read_text()
        with self._s3_errors(uri):
            return self.client.get_object(**self._obj(uri))["Body"].read().decode()

    # ---- folders ------------------------------------------------------------------------------------------------
    # Both backends write the marker, so has() and get_dir() mean the same everywhere: "put_dir finished", and a
    # folder a stage left half-written in place is never taken for a result.

    def put_dir(self, local: Path, uri: str) -> str:
        """Publish a finished folder; returns its digest. Unchanged files are not copied or uploaded again."""
        if not local.is_dir():
            raise StoreError(f"{uri}: cannot publish {local}: not a folder")
        marker, old = describe_folder(local), None
        text = json.dumps(marker, indent=1, sort_keys=True)
        try:
            old = self._marker(uri)
        except NoSuchObject:
            pass
        if old == marker:
            return marker["digest"]
        if self.is_local:
            dest = self.local_path(uri)
            if dest.exists() and dest.samefile(local):  # written in place: only the marker is new
                atomic_write_text(dest / MARKER, text)
            else:
                with atomic_dir(dest) as tmp:  # the folder and its marker appear in one rename
                    shutil.copytree(local, tmp, dirs_exist_ok=True)
                    (tmp / MARKER).write_text(text)
            return marker["digest"]
        if old is not None:  # unpublish first: the old marker must never vouch for new files
            stale = [rel for rel in old["files"] if rel not in marker["files"]]
            self._delete_keys([self._obj(f"{uri}/{MARKER}")["Key"]], uri)
            self._delete_keys([self._obj(f"{uri}/{rel}")["Key"] for rel in stale], uri)
        for rel, meta in marker["files"].items():
            if not old or old["files"].get(rel) != meta:
                self.put_file(local / rel, f"{uri}/{rel}")
        self.write_text(f"{uri}/{MARKER}", text)  # the commit: written last
        return marker["digest"]

    def _marker(self, uri: str) -> dict:
        """The parsed marker of the folder at `uri`, checked so that a tampered one cannot escape the cache."""
        try:
            text = self.read_text(f"{uri}/{MARKER}")  # on S3 one GET, also when the folder is cached
        except NoSuchObject as err:
            raise NoSuchObject(f"{uri}: not a published folder (no {MARKER}; was put_dir interrupted?)") from err
        try:
            marker = json.loads(text)
            digest = marker["digest"]
            consistent = re.fullmatch(SHA256_HEX, digest) and folder_digest(marker["files"]) == digest
        except (ValueError, KeyError, TypeError) as err:
            raise StoreError(f"{uri}: {MARKER} is unreadable ({err!r})") from err
        if not consistent:
            raise StoreError(f"{uri}: {MARKER} is inconsistent (its digest does not match its file list)")
        for rel in marker["files"]:
            self._safe(uri, rel)
        return marker

    def get_dir(self, uri: str) -> Path:
        """The published folder, verified against its marker; on S3 a copy in <cache>/dirs/<digest>/ that costs
        one GET of the marker once cached (a cached copy that no longer verifies is fetched again)."""
        marker = self._marker(uri)
        if self.is_local:
            if problem := folder_problem(self.local_path(uri), marker):
                raise StoreError(f"{uri}/{problem}")
            return self.local_path(uri)
        dest = self.cache_dir / "dirs" / marker["digest"]
        if dest.is_dir() and not folder_problem(dest, marker):
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
        try:
            for rel in marker["files"]:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                self._download(f"{uri}/{rel}", tmp / rel)
            if problem := folder_problem(tmp, marker):
                raise StoreError(f"{uri}/{problem}")
            if dest.exists() and folder_problem(dest, marker):
                shutil.rmtree(dest, ignore_errors=True)  # a damaged copy; a good one of another reader is kept
            try:
                tmp.rename(dest)
            except OSError:  # another reader on this node renamed its verified copy first: use that one
                if folder_problem(dest, marker):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    # ---- what is there, checked ---------------------------------------------------------------------------------

    def describe(self, uri: str) -> dict:
        """What `uri` holds now: {"digest"} of a published folder, or {"sha256", "size"} of a file."""
        try:
            return {"digest": self._marker(uri)["digest"]}
        except NoSuchObject:
            path = self.get_file(uri)
            return {"sha256": sha256_file(path), "size": path.stat().st_size}

    def problem(self, uri: str, expected: dict) -> str | None:
        """None when `uri` still holds what describe() said, else what is wrong ('<uri>/<file>: sha256 mismatch')."""
        try:
            if "digest" in expected:
                if self._marker(uri)["digest"] != expected["digest"]:
                    return f"{uri}: another folder was published there"
                self.get_dir(uri)   # every file against the marker
            else:
                self.get_file(FileRef(uri=uri, sha256=expected["sha256"]))
        except StoreError as err:
            return str(err)
        return None

    # ---- listing and deleting -----------------------------------------------------------------------------------

    def list(self, uri_prefix: str) -> list[str]:
        """URIs of the files under a folder prefix, sorted (markers included: they show which folders are whole)."""
        if self.is_local:
            root = self.local_path(uri_prefix)
            files = (p for p in root.rglob("*") if p.is_file() and not is_hidden(p.relative_to(root).as_posix()))
            return sorted(str(p) for p in files)
        obj = self._obj(uri_prefix)
        keys = (k for k in self._list_keys(uri_prefix) if not is_hidden(k[len(obj["Key"]):]))
        return sorted(f"s3://{obj['Bucket']}/{k}" for k in keys)

    def _list_keys(self, uri: str) -> list[str]:
        obj = self._obj(uri)
        with self._s3_errors(uri):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=obj["Bucket"], Prefix=f"{obj['Key']}/" if obj["Key"] else "")
            return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def delete(self, uri: str) -> None:
        """A file, or a folder with everything under it (its marker first, so it stops counting as published)."""
        if self.is_local:
            path = self.local_path(uri)
            (path / MARKER if path.is_dir() else path).unlink(missing_ok=True)
            return shutil.rmtree(path, ignore_errors=True)
        key, keys = self._obj(uri)["Key"], self._list_keys(uri)
        if f"{key}/{MARKER}" in keys:
            self._delete_keys([f"{key}/{MARKER}"], uri)
        self._delete_keys([k for k in keys if k != f"{key}/{MARKER}"] + ([key] if key else []), uri)

    def _delete_keys(self, keys: list[str], uri: str) -> None:
        with self._s3_errors(uri):
            for i in range(0, len(keys), 1000):  # S3's limit per DeleteObjects request
                self.client.delete_objects(Bucket=split_s3(self.spec.root)[0],
                                           Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})


def store_for(root: str, endpoint_url: str | None = None, region: str | None = None,
              cache_dir: Path | None = None) -> ArtifactStore:
    if not is_s3(root):
        root = str(Path(root).expanduser().resolve())
    return ArtifactStore(StoreSpec(root=root, endpoint_url=endpoint_url, region=region), cache_dir)
