"""Watch a bucket prefix (or a folder) for new video clips and hand them out in debounced batches, each object once.

Polling lists the source; with `listen.sqs_queue_url` the bucket's ObjectCreated notifications are read from SQS
instead. Everything that must survive a restart (watermark, recently seen objects, pending keys, batches not yet
confirmed sent) is one JSON state file, replaced atomically. No Prefect here: flows/listen.py emits the batches.

"Once" means once per (key, ETag): a key overwritten with new content is new data and is reported again (ingestion
hashes content, so a re-run on unchanged bytes costs nothing), the same content is never reported twice.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any, Callable
from urllib.parse import unquote_plus, urlsplit

from vidopt.config import PipelineConfig
from vidopt.errors import VidoptError
from vidopt.storage import (RemoteObject, StorageError, atomic_write_text, is_hidden, is_s3, s3_client,
                            safe_relative_key, split_s3)

log = logging.getLogger(__name__)

WINDOW_S = 900.0          # objects up to this much older than the newest one seen are still compared key by key:
#   S3's LastModified has 1-second resolution, and a multipart upload carries the time it *started*, so an object can
#   appear after newer ones. 15 min covers a ~100 GB upload at 1 Gbit/s. Only objects inside the window stay in state.
MAX_KEYS_PER_BATCH = 500  # Prefect refuses events over 1.5 MB; 500 keys of <= 1 KiB each stay well below that
SQS_VISIBILITY_S = 60     # a received message stays hidden this long; it is deleted once its keys are in the state file
SQS_MAX_RECEIVES = 10     # receive calls per step (10 messages each) before the step records what it has
BATCH_ID_NAMESPACE = uuid.UUID("6f1b2a1e-5d0c-4b8e-9a51-3c7d2f0e9b44")  # never change: it makes the event ids
STATE_VERSION = 1


class ListenError(VidoptError, RuntimeError):
    """A source or queue the listener cannot watch; the message names it and what to do."""


class EmitFailed(RuntimeError):
    """Raised by an emit callback when a batch may not have been delivered: it stays in the outbox and is sent again."""


@dataclass(frozen=True)
class Batch:
    id: str                           # uuid5 of the source and its (key, etag) pairs: the same when re-sent after a crash
    source: str
    objects: tuple[RemoteObject, ...]

    @property
    def keys(self) -> list[str]:
        return [o.key for o in self.objects]


@dataclass(frozen=True)
class Arrival:
    obj: RemoteObject
    t: float  # epoch seconds: S3 LastModified / notification eventTime; local files max(mtime, ctime)


@dataclass(frozen=True)
class Notification:
    """One ObjectCreated record of an S3 event notification, key decoded."""
    bucket: str
    key: str
    size: int
    etag: str
    t: float


def batch_id(source: str, objects: list[RemoteObject] | tuple[RemoteObject, ...]) -> str:
    pairs = sorted((o.key, o.etag) for o in objects)
    return str(uuid.uuid5(BATCH_ID_NAMESPACE, json.dumps([source, pairs])))


def state_path_for(cfg: PipelineConfig) -> Path:
    source = _canonical_source(cfg.data.source)
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    return Path(cfg.run.project_dir).resolve() / "listen" / f"state-{digest}.json"


def _canonical_source(source: str) -> str:
    return source.rstrip("/") if is_s3(source) else str(Path(source).resolve())


def _bucket_and_prefix(source: str) -> tuple[str, str]:
    bucket, prefix = split_s3(source)
    return bucket, prefix + "/" if prefix and not prefix.endswith("/") else prefix


def list_with_times(source: str, endpoint_url: str | None = None, region: str | None = None) -> list[Arrival]:
    """Every non-hidden object under a folder or s3:// prefix with the time it arrived (see Arrival.t)."""
    if is_s3(source):
        bucket, prefix = _bucket_and_prefix(source)
        out = []
        pages = s3_client(endpoint_url, region).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for o in page.get("Contents", []):
                rel = o["Key"][len(prefix):]
                if rel and not rel.endswith("/") and not is_hidden(rel):
                    obj = RemoteObject(rel, f"s3://{bucket}/{o['Key']}", o["Size"], o["ETag"].strip('"'))
                    out.append(Arrival(obj, o["LastModified"].timestamp()))
        return out
    root = Path(source).resolve()
    if not root.is_dir():
        raise StorageError(f"{source}: data source folder does not exist (create it, or point data.source elsewhere)")
    out = []
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        try:
            if is_hidden(rel) or not path.is_file():
                continue
            st = path.stat()
        except FileNotFoundError:  # removed while we listed
            continue
        # ctime too: `mv` and `cp -p` keep an old mtime, but moving a file in still sets its ctime.
        out.append(Arrival(RemoteObject(rel, str(path), st.st_size, str(st.st_mtime_ns)),
                           max(st.st_mtime_ns, st.st_ctime_ns) / 1e9))
    return out


def parse_s3_notification(body: str) -> list[Notification]:
    """ObjectCreated records of one SQS message body, sent by S3 directly or wrapped by SNS; [] for s3:TestEvent,
    ObjectRemoved and anything else. Keys arrive URL-encoded ('+' for a space)."""
    msg = json.loads(body)
    if isinstance(msg, dict) and msg.get("Type") == "Notification" and isinstance(msg.get("Message"), str):
        msg = json.loads(msg["Message"])  # S3 -> SNS -> SQS without raw delivery
    if not isinstance(msg, dict) or msg.get("Event") == "s3:TestEvent":
        return []
    out = []
    for record in msg.get("Records") or []:
        if not str(record.get("eventName", "")).startswith("ObjectCreated:"):
            continue
        s3, when = record["s3"], record.get("eventTime")
        t = datetime.fromisoformat(when).timestamp() if when else time.time()
        out.append(Notification(s3["bucket"]["name"], unquote_plus(s3["object"]["key"]),
                                int(s3["object"].get("size", 0)), str(s3["object"].get("eTag", "")), t))
    return out


def _sqs_client(queue_url: str, region: str | None):
    """Region from an AWS queue URL; any other URL (moto, LocalStack, ElasticMQ) is also its endpoint unless
    AWS_ENDPOINT_URL says otherwise (boto3 reads it when endpoint_url is None)."""
    import boto3  # lazy: only SQS mode needs it

    aws = re.match(r"https://sqs\.([a-z0-9-]+)\.amazonaws\.com", queue_url)
    env_endpoint = os.environ.get("AWS_ENDPOINT_URL_SQS") or os.environ.get("AWS_ENDPOINT_URL")
    parts = urlsplit(queue_url)
    endpoint = None if aws or env_endpoint else f"{parts.scheme}://{parts.netloc}"
    return boto3.session.Session().client("sqs", region_name=aws.group(1) if aws else region, endpoint_url=endpoint)


class Listener:
    """New video objects under `source`, in debounced batches, each (key, etag) once, across restarts.

    A step finds arrivals (a listing, or SQS messages) and records them as pending in the state file. The first
    objects of a burst (none cut for `quiet_s` before them) are batched at once; later ones once no new object arrived
    for `quiet_s` (or `max_wait_s` after the first pending one). Batching moves the pending keys into the outbox as
    batches with deterministic ids. A batch leaves the outbox only after `ack` (run() acks when `emit`
    returns), so a crash between recording and sending re-sends the same batch with the same id.

    The first polling start records what is already there as seen and reports nothing of it.
    """

    def __init__(self, source: str, state_path: Path, *, extensions: list[str], quiet_s: float, max_wait_s: float,
                 poll_interval_s: float, sqs_queue_url: str | None = None, endpoint_url: str | None = None,
                 region: str | None = None, clock: Callable[[], float] = time.time):
        if sqs_queue_url and not is_s3(source):
            raise ListenError(f"listen: listen.sqs_queue_url is set but data.source={source} is not an s3:// URI "
                              "(S3 notifications exist only for buckets; unset the queue to poll the folder)")
        self.source = _canonical_source(source)
        self.state_path = Path(state_path)
        self.extensions = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
        self.quiet_s, self.max_wait_s, self.poll_interval_s = quiet_s, max_wait_s, poll_interval_s
        self.sqs_queue_url, self.endpoint_url, self.region = sqs_queue_url, endpoint_url, region
        self.clock = clock
        self._stop = threading.Event()
        self._lock_file = None
        self._sqs = None
        self._warned: set[str] = set()
        self.state: dict[str, Any] = {}

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def open(self) -> "Listener":
        """Take the state file's lock (one listener per source) and load the state."""
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.state_path.with_suffix(".lock")
        self._lock_file = open(lock_path, "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            self._lock_file = None
            raise ListenError(f"listen: another listener holds {lock_path} for {self.source}; stop it first "
                              "(two listeners on one source would report objects twice)") from None
        if self.state_path.exists():
            self.state = json.loads(self.state_path.read_text())
        else:
            self.state = {"version": STATE_VERSION, "source": self.source, "watermark": None, "recent": {},
                          "pending": {}, "pending_since": None, "last_arrival": None, "outbox": [], "fresh": True}
        return self

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None

    def __enter__(self) -> "Listener":
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one round -------------------------------------------------------------------------------------------------
    def step(self, wait_s: float = 0.0, flush: bool = False) -> list[Batch]:
        """Wait up to `wait_s` for arrivals, record them, batch what is due (`flush`: everything pending) and return
        the outbox: every batch not yet acked, oldest first (after a crash, those of the previous process too)."""
        if self._lock_file is None:
            raise ListenError("listen: Listener.step() before open() (use `with Listener(...) as listener:`)")
        polling = not self.sqs_queue_url
        arrivals, receipts = self._poll(wait_s) if polling else self._receive(wait_s)
        changed = self._record(arrivals, polling)
        changed |= self._batch_due(flush)
        if changed:
            self._save()
        if receipts:
            self._delete_messages(receipts)  # only now: the keys are durably in the state file
        return [self._batch(b) for b in self.state["outbox"]]

    def ack(self, batch: Batch) -> None:
        """`batch` was delivered: drop it from the outbox."""
        self.state["outbox"] = [b for b in self.state["outbox"] if b["id"] != batch.id]
        self._save()

    def next_wait(self) -> float:
        """Seconds until the next step is useful: the poll interval, or sooner when pending keys fall due."""
        if not self.state.get("pending"):
            return self.poll_interval_s
        due = min(self.state["last_arrival"] + self.quiet_s, self.state["pending_since"] + self.max_wait_s)
        return max(0.0, min(self.poll_interval_s, due - self.clock()))

    def run(self, emit: Callable[[Batch], None], stop: threading.Event | None = None, once: bool = False) -> int:
        """Step until `stop` is set (`once`: one step that flushes everything pending), calling `emit` for each batch
        and acking it when `emit` returns. `emit` raises EmitFailed to keep a batch for the next round. Returns the
        number of batches emitted. Errors of the first step (wrong bucket, missing folder) propagate; later ones are
        logged and retried, so a network blip does not end a long-running listener."""
        self._stop = stop or threading.Event()
        emitted, wait, first = 0, 0.0, True
        while not self._stop.is_set():
            try:
                batches = self.step(wait_s=wait, flush=once)
            except Exception as err:  # noqa: BLE001 -- a listener must outlive transient S3/SQS errors
                if first and isinstance(err, _io_errors()):
                    raise ListenError(f"listen: cannot watch {self.source}: {err}") from err
                if first:
                    raise
                log.warning("listen: %s: %s: %s (retrying in %g s)", self.source, type(err).__name__, err,
                            self.poll_interval_s)
                batches, wait = [], self.poll_interval_s
                continue
            first = False
            for batch in batches:
                try:
                    emit(batch)
                except EmitFailed as err:
                    log.warning("listen: batch %s (%d keys) not sent, kept for the next round: %s",
                                batch.id, len(batch.objects), err)
                    break
                self.ack(batch)
                emitted += 1
            if once:
                break
            wait = self.next_wait()
        return emitted

    # -- internals -------------------------------------------------------------------------------------------------
    def _wanted(self, key: str) -> bool:
        """A video (by extension, any case) with a safe, non-hidden key."""
        if not key or key.endswith("/") or is_hidden(key) or PurePosixPath(key).suffix.lower() not in self.extensions:
            return False
        try:
            safe_relative_key(key)
        except StorageError as err:
            if key not in self._warned:
                self._warned.add(key)
                log.warning("listen: %s: %s", self.source, err)
            return False
        return True

    def _poll(self, wait_s: float) -> tuple[list[Arrival], list[str]]:
        if wait_s > 0:
            self._stop.wait(wait_s)
        listed = list_with_times(self.source, self.endpoint_url, self.region)
        return [a for a in listed if self._wanted(a.obj.key)], []

    def _receive(self, wait_s: float) -> tuple[list[Arrival], list[str]]:
        if self._sqs is None:
            self._sqs = _sqs_client(self.sqs_queue_url, self.region)
        bucket, prefix = _bucket_and_prefix(self.source)
        if 0 < wait_s < 1:
            self._stop.wait(wait_s)  # SQS long polls in whole seconds
        arrivals, receipts = [], []
        for i in range(SQS_MAX_RECEIVES):
            resp = self._sqs.receive_message(QueueUrl=self.sqs_queue_url, MaxNumberOfMessages=10,
                                             WaitTimeSeconds=min(20, int(wait_s)) if i == 0 else 0,
                                             VisibilityTimeout=SQS_VISIBILITY_S)
            messages = resp.get("Messages", [])
            for m in messages:
                receipts.append(m["ReceiptHandle"])
                try:
                    records = parse_s3_notification(m["Body"])
                except (ValueError, KeyError, TypeError) as err:
                    log.warning("listen: SQS message %s is not an S3 notification (%s); deleted",
                                m.get("MessageId"), err)
                    continue
                for r in records:
                    rel = r.key[len(prefix):] if r.key.startswith(prefix) else ""
                    if r.bucket == bucket and self._wanted(rel):
                        obj = RemoteObject(rel, f"s3://{bucket}/{r.key}", r.size, r.etag)
                        arrivals.append(Arrival(obj, r.t))
            if len(messages) < 10:
                break
        return arrivals, receipts

    def _delete_messages(self, receipts: list[str]) -> None:
        for i in range(0, len(receipts), 10):
            entries = [{"Id": str(n), "ReceiptHandle": h} for n, h in enumerate(receipts[i:i + 10])]
            failed = self._sqs.delete_message_batch(QueueUrl=self.sqs_queue_url, Entries=entries).get("Failed", [])
            if failed:  # they come back after the visibility timeout and are recognised as seen
                log.warning("listen: %d SQS messages not deleted (%s); they will be skipped when redelivered",
                            len(failed), failed[0].get("Message", failed[0].get("Code")))

    def _record(self, arrivals: list[Arrival], polling: bool) -> bool:
        """Add unseen (key, etag) pairs to `recent` and, unless this is the first polling start, to `pending`.

        Polling: an object older than the window below the previous watermark was seen before (or pruned after being
        seen); everything else is compared by (key, etag), so objects in the same second as the watermark still count.
        SQS: notifications carry no such guarantee of order, so only (key, etag) decides.
        """
        st, now = self.state, self.clock()
        fresh = st.pop("fresh", False)
        baseline = polling and fresh
        old_watermark, recorded, new = st["watermark"], 0, 0
        for a in arrivals:
            key, etag = a.obj.key, a.obj.etag
            seen = st["recent"].get(key)
            if seen is not None and seen[0] == etag:
                continue
            if polling and old_watermark is not None and a.t < old_watermark - WINDOW_S:
                continue
            st["recent"][key] = [etag, a.t]
            recorded += 1
            if not baseline:
                st["pending"][key] = {"key": key, "uri": a.obj.uri, "size": a.obj.size, "etag": etag}
                new += 1
        pruned = 0
        if arrivals:
            st["watermark"] = max(a.t for a in arrivals) if old_watermark is None else \
                max(old_watermark, *(a.t for a in arrivals))
            floor = st["watermark"] - WINDOW_S
            kept = {k: v for k, v in st["recent"].items() if v[1] >= floor}
            pruned = len(st["recent"]) - len(kept)
            st["recent"] = kept
        if baseline:
            log.info("listen: %s: first start, %d videos already there are taken as seen (not reported)",
                     self.source, len(arrivals))
        if new:
            st["pending_since"] = st["pending_since"] or now
            st["last_arrival"] = now
            log.info("listen: %s: new videos: %d (pending: %d)", self.source, new, len(st["pending"]))
        return fresh or recorded > 0 or pruned > 0 or st["watermark"] != old_watermark

    def _batch_due(self, flush: bool) -> bool:
        st, now = self.state, self.clock()
        if not st["pending"]:
            return False
        quiet = now - st["last_arrival"] >= self.quiet_s
        overdue = now - st["pending_since"] >= self.max_wait_s
        # A burst's first objects go out at once (nothing was cut for quiet_s before they came): the run they start
        # should not wait for the burst to end; the rest of the burst is batched as below.
        last_cut = st.get("last_cut")
        leading = last_cut is None or st["pending_since"] - last_cut >= self.quiet_s
        if not (flush or quiet or overdue or leading):
            return False
        rows = sorted(st["pending"].values(), key=lambda r: r["key"])
        for i in range(0, len(rows), MAX_KEYS_PER_BATCH):
            chunk = rows[i:i + MAX_KEYS_PER_BATCH]
            objects = [RemoteObject(r["key"], r["uri"], r["size"], r["etag"]) for r in chunk]
            st["outbox"].append({"id": batch_id(self.source, objects), "objects": chunk})
        st["pending"], st["pending_since"], st["last_arrival"], st["last_cut"] = {}, None, None, now
        return True

    def _batch(self, row: dict[str, Any]) -> Batch:
        objects = tuple(RemoteObject(r["key"], r["uri"], r["size"], r["etag"]) for r in row["objects"])
        return Batch(row["id"], self.source, objects)

    def _save(self) -> None:
        atomic_write_text(self.state_path, json.dumps(self.state, sort_keys=True))


def _io_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError  # lazy, like boto3 in storage.py

    return StorageError, OSError, BotoCoreError, ClientError


def listener_from_config(cfg: PipelineConfig, clock: Callable[[], float] = time.time) -> Listener:
    """The listener `vidopt listen` runs: data.source watched as cfg.listen says, state in the project dir."""
    lc = cfg.listen
    return Listener(cfg.data.source, state_path_for(cfg), extensions=lc.extensions, quiet_s=lc.quiet_s,
                    max_wait_s=lc.max_wait_s, poll_interval_s=lc.poll_interval_s, sqs_queue_url=lc.sqs_queue_url,
                    endpoint_url=cfg.data.s3_endpoint_url, region=cfg.data.s3_region, clock=clock)
