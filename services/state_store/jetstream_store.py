"""Snapshots in NATS JetStream: bytes in an object store bucket (one object per snapshot, named
``<session>/<snapshot>``, see ``jetstream_blobs``), heads and closed marks in two key-value buckets beside it.

A commit is one KV write guarded by the head's last revision (compare-and-set), so even two service replicas
cannot interleave a session's commits; readers resolve the head first, so they see the old snapshot or the new one.
Removals (a superseded snapshot, an expired session, an orphan) are purges, which a second replica repeating them
leaves as they are.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Sequence
from datetime import datetime

import msgpack
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, ObjectInfo, ObjectStoreConfig
from nats.js.errors import BucketNotFoundError, KeyWrongLastSequenceError, NotFoundError, ObjectNotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from services.common.errors import Unavailable
from services.common.snapshots import MAX_HEAD_BYTES, SnapshotHead, StoreLocation, check_id, is_valid_id
from services.common.wire import decode, encode
from services.state_store.errors import (
    CommitConflict,
    SessionClosed,
    SnapshotCorrupt,
    SnapshotGone,
    SnapshotIncomplete,
)
from services.state_store.jetstream_blobs import chunk_nuids, download, nuid_of, object_infos, purge, upload
from services.state_store.protocol import BlobRef, Buffer, StagedBlob, check_fresh, split, supersedes

MAX_CHUNK_BYTES = 1 << 20


class JetStreamSnapshotStore:
    """A SnapshotStore on a JetStream object store bucket and two KV buckets named after it."""

    def __init__(
        self,
        js: JetStreamContext,
        bucket: str,
        objects: ObjectStore,
        heads: KeyValue,
        closed: KeyValue,
        *,
        chunk_bytes: int,
        timeout_s: float,
    ) -> None:
        self._js = js
        self._bucket = bucket
        self._objects = objects
        self._heads = heads
        self._closed = closed
        self._chunk_bytes = chunk_bytes
        self._timeout_s = timeout_s
        self._uploads: set[asyncio.Task[StagedBlob]] = set()
        self._headless_seen_at_s: dict[str, float] = {}

    @classmethod
    async def open(
        cls, nc: NatsClient, bucket: str, *, create: bool, timeout_s: float = 5.0, replicas: int = 1
    ) -> JetStreamSnapshotStore:
        """Open the buckets; with ``create`` (the service) make any that are missing, else a missing one means the
        state_store never ran: Unavailable. ``timeout_s`` bounds the wait for one chunk or one acknowledgement."""
        js = nc.jetstream()
        try:
            objects = await js.object_store(bucket)
            heads = await js.key_value(_heads_bucket(bucket))
            closed = await js.key_value(_closed_bucket(bucket))
        except BucketNotFoundError:
            if not create:
                raise Unavailable(f"snapshot bucket {bucket!r} does not exist: is the state_store running?") from None
            objects = await js.create_object_store(bucket, config=ObjectStoreConfig(
                bucket=bucket, description="TurboServe session snapshots", replicas=replicas))
            heads = await js.create_key_value(
                KeyValueConfig(bucket=_heads_bucket(bucket), history=1, replicas=replicas))
            closed = await js.create_key_value(
                KeyValueConfig(bucket=_closed_bucket(bucket), history=1, replicas=replicas))
        chunk_bytes = min(MAX_CHUNK_BYTES, nc.max_payload)
        return cls(js, bucket, objects, heads, closed, chunk_bytes=chunk_bytes, timeout_s=timeout_s)

    @property
    def location(self) -> StoreLocation:
        return StoreLocation(backend="jetstream", name=self._bucket)

    async def stage(self, session_id: str, snapshot_id: str, buffers: Sequence[Buffer]) -> StagedBlob:
        name, nuid = _name(session_id, snapshot_id), nuid_of(session_id, snapshot_id)
        # Shielded, so a cancelled caller leaves a whole object (an orphan the sweep removes after the staging
        # timeout) rather than an upload cut at an arbitrary chunk.
        staging = asyncio.create_task(
            upload(
                self._js,
                self._bucket,
                name,
                nuid,
                buffers,
                chunk_bytes=self._chunk_bytes,
                ack_timeout_s=self._timeout_s,
            )
        )
        self._uploads.add(staging)
        staging.add_done_callback(self._uploads.discard)
        return await asyncio.shield(staging)

    async def commit(self, head: SnapshotHead, *, staged_after_s: float = -math.inf) -> bool:
        if await _entry(self._closed, head.session_id) is not None:
            raise SessionClosed(f"session {head.session_id} is closed; snapshot {head.snapshot_id} refused")
        try:
            info = await self._objects.get_info(_name(head.session_id, head.snapshot_id))
        except ObjectNotFoundError:
            raise SnapshotIncomplete(f"snapshot {head.snapshot_id} of {head.session_id} was never staged") from None
        if info.size != head.total_bytes:
            raise SnapshotIncomplete(
                f"snapshot {head.snapshot_id} has {info.size} bytes, the head says {head.total_bytes}"
            )
        check_fresh(head, _written_at_s(info), staged_after_s)
        entry = await _entry(self._heads, head.session_id)
        current = _decode_head(entry.value) if entry is not None else None
        if not supersedes(current, head):
            return False
        try:
            if entry is None:
                await self._heads.create(head.session_id, encode(head))
            else:
                await self._heads.update(head.session_id, encode(head), last=entry.revision)
        except KeyWrongLastSequenceError:
            raise CommitConflict(f"session {head.session_id}: another commit won; retry") from None
        if current is not None:
            await self.discard(current.session_id, current.snapshot_id)
        return True

    async def head(self, session_id: str) -> SnapshotHead | None:
        entry = await _entry(self._heads, check_id("session_id", session_id))
        return _decode_head(entry.value) if entry is not None else None

    async def read(self, head: SnapshotHead) -> list[memoryview]:
        try:
            info = await self._objects.get_info(_name(head.session_id, head.snapshot_id))
        except ObjectNotFoundError:
            raise SnapshotGone(f"snapshot {head.snapshot_id} of {head.session_id} was superseded") from None
        what = f"snapshot {head.snapshot_id} of {head.session_id}"
        if info.size != head.total_bytes or not info.nuid:
            raise SnapshotCorrupt(
                f"{what} has {info.size} bytes (nuid {info.nuid!r}), the head says {head.total_bytes}"
            )
        data = bytearray(head.total_bytes)
        if data:
            await download(self._js, self._bucket, info.nuid, data, chunk_timeout_s=self._timeout_s, what=what)
        if f"sha256:{await asyncio.to_thread(_sha256_hex, data)}" != head.digest:
            raise SnapshotCorrupt(f"snapshot {head.snapshot_id} of {head.session_id} does not match its digest")
        return split(data, head.buffer_bytes)

    async def discard(self, session_id: str, snapshot_id: str) -> None:
        await purge(self._js, self._bucket, _name(session_id, snapshot_id), nuid_of(session_id, snapshot_id))

    async def delete(self, session_id: str) -> None:
        head = await self.head(session_id)
        if head is not None:
            await self.discard(session_id, head.snapshot_id)
        for kv_bucket in (_heads_bucket(self._bucket), _closed_bucket(self._bucket)):
            await self._js.purge_stream(_kv_stream(kv_bucket), subject=_kv_subject(kv_bucket, session_id))

    async def mark_closed(self, session_id: str, closed_at_s: float) -> None:
        await self._closed.put(check_id("session_id", session_id), msgpack.packb(float(closed_at_s)))

    async def closed_sessions(self) -> dict[str, float]:
        """Direct reads of the keys the stream lists, not a watcher: a watcher is a consumer (see ``object_infos``)."""
        kv_bucket = _closed_bucket(self._bucket)
        prefix = _kv_subject(kv_bucket, "")
        info = await self._js.stream_info(_kv_stream(kv_bucket), subjects_filter=f"{prefix}>")
        closed: dict[str, float] = {}
        for subject in info.state.subjects or {}:
            key = subject[len(prefix):]
            entry = await _entry(self._closed, key)
            if entry is not None and entry.value:
                closed[key] = float(msgpack.unpackb(entry.value))
        return closed

    async def blobs(self) -> list[BlobRef]:
        """Objects with a meta (aged by the writer's mtime) and chunks without one: a writer died mid-upload, or is
        uploading right now. Those are aged from when this store first saw them, which only delays their removal.
        Objects not named like ours (written by some other tool) are left alone."""
        infos = await object_infos(self._js, self._bucket)
        found, with_meta = [], set()
        for info in infos:
            session_id, _, snapshot_id = (info.name or "").partition("/")
            with_meta.add(info.nuid)
            written_at_s = _written_at_s(info)
            if is_valid_id(session_id) and is_valid_id(snapshot_id):
                found.append(BlobRef(session_id, snapshot_id, written_at_s))
        now_s = time.time()
        headless = await chunk_nuids(self._js, self._bucket) - with_meta
        self._headless_seen_at_s = {nuid: self._headless_seen_at_s.get(nuid, now_s) for nuid in headless}
        for nuid, seen_at_s in self._headless_seen_at_s.items():
            session_id, _, snapshot_id = nuid.partition(".")
            if is_valid_id(session_id) and is_valid_id(snapshot_id):
                found.append(BlobRef(session_id, snapshot_id, seen_at_s))
        return found


def _written_at_s(info: ObjectInfo) -> float:
    """When the writer finished staging (it stamps the meta's mtime); an object without one counts as new."""
    return datetime.fromisoformat(info.mtime).timestamp() if info.mtime else time.time()


def _heads_bucket(bucket: str) -> str:
    return f"{bucket}_heads"


def _closed_bucket(bucket: str) -> str:
    return f"{bucket}_closed"


def _kv_stream(kv_bucket: str) -> str:
    """The stream behind a key-value bucket (the standard KV layout, which nats-py keeps private)."""
    return f"KV_{kv_bucket}"


def _kv_subject(kv_bucket: str, key: str) -> str:
    return f"$KV.{kv_bucket}.{key}"


def _name(session_id: str, snapshot_id: str) -> str:
    return f"{check_id('session_id', session_id)}/{check_id('snapshot_id', snapshot_id)}"


async def _entry(kv: KeyValue, key: str) -> KeyValue.Entry | None:
    try:
        return await kv.get(key)
    except NotFoundError:
        return None


def _decode_head(value: bytes | None) -> SnapshotHead:
    head = decode(value or b"", max_bytes=MAX_HEAD_BYTES, expect=SnapshotHead)
    assert isinstance(head, SnapshotHead)
    return head


def _sha256_hex(data: bytearray) -> str:
    return hashlib.sha256(data).hexdigest()
