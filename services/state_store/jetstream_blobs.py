"""Snapshot bytes as JetStream objects in the standard object store layout (ADR-20: chunks on ``$O.<bucket>.C.<nuid>``,
then one meta message on ``$O.<bucket>.M.<base64 name>``), so any object store client can still list and read them.

Why not nats-py's ``ObjectStore.put`` and ``get``: ``put`` waits for one acknowledgement per chunk and gives the
chunks a random nuid, so chunks of a writer killed before its meta can never be traced back to a session; ``get``
concatenates bytes chunk by chunk (quadratic on multi-GB states) and waits forever on chunks purged under it. Here
the nuid is ``<session>.<snapshot>``, chunks are published with a window of acknowledgements outstanding, and reads
land in one preallocated buffer with a per-chunk timeout.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError
from nats.js.kv import MSG_ROLLUP_SUBJECT
from nats.js.object_store import (
    OBJ_ALL_CHUNKS_PRE_TEMPLATE,
    OBJ_ALL_META_PRE_TEMPLATE,
    OBJ_CHUNKS_PRE_TEMPLATE,
    OBJ_DIGEST_TEMPLATE,
    OBJ_META_PRE_TEMPLATE,
    OBJ_STREAM_TEMPLATE,
)

from services.common.errors import Unavailable
from services.state_store.errors import SnapshotCorrupt, SnapshotGone
from services.state_store.protocol import Buffer, StagedBlob, byte_view

WINDOW_CHUNKS = 16
"""Chunks published ahead of their acknowledgements: enough to hide the round trip, bounded to cap memory."""
STALL_PROBE_S = 0.2
"""A reader waiting this long for a chunk asks the stream whether the object's chunks are still there."""


def nuid_of(session_id: str, snapshot_id: str) -> str:
    """Two subject tokens; ids never contain dots, so the pair parses back unambiguously."""
    return f"{session_id}.{snapshot_id}"


async def upload(
    js: JetStreamContext,
    bucket: str,
    name: str,
    nuid: str,
    buffers: Sequence[Buffer],
    *,
    chunk_bytes: int,
    ack_timeout_s: float,
) -> StagedBlob:
    """Publish the buffers back to back as chunks, then the meta; the object exists only once the meta is stored.

    The digest is computed on a thread first (hashlib lets go of the GIL), not on the event loop between
    publishes, where hashing a state of many MiB would stall every chunk the process sends meanwhile."""
    subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=nuid)
    raw = await asyncio.to_thread(_sha256, buffers)
    total, count = 0, 0
    acks: collections.deque[asyncio.Future[api.PubAck]] = collections.deque()
    try:
        for chunk in _chunks(buffers, chunk_bytes):
            if len(acks) >= WINDOW_CHUNKS:
                await asyncio.wait_for(acks.popleft(), ack_timeout_s)
            acks.append(await js.publish_async(subject, chunk))  # type: ignore[arg-type]  # any buffer works
            total += chunk.nbytes
            count += 1
        while acks:
            await asyncio.wait_for(acks.popleft(), ack_timeout_s)
    except TimeoutError:
        raise Unavailable(f"JetStream did not acknowledge a chunk of {name} within {ack_timeout_s} s") from None
    finally:
        for ack in acks:  # only left on failure; their chunks are swept with the rest of this nuid
            ack.cancel()
    info = api.ObjectInfo(
        name=name,
        bucket=bucket,
        nuid=nuid,
        size=total,
        chunks=count,
        digest=OBJ_DIGEST_TEMPLATE.format(digest=base64.urlsafe_b64encode(raw).decode()),
        mtime=datetime.now(UTC).isoformat(),
        options=api.ObjectMetaOptions(max_chunk_size=chunk_bytes),
    )
    await js.publish(
        meta_subject(bucket, name), json.dumps(info.as_dict()).encode(), headers={api.Header.ROLLUP: MSG_ROLLUP_SUBJECT}
    )
    return StagedBlob(total_bytes=total, digest=f"sha256:{raw.hex()}")


def _sha256(buffers: Sequence[Buffer]) -> bytes:
    digest = hashlib.sha256()
    for buffer in buffers:
        digest.update(buffer)
    return digest.digest()


async def download(
    js: JetStreamContext, bucket: str, nuid: str, data: bytearray, *, chunk_timeout_s: float, what: str
) -> None:
    """Fill ``data`` with the object's chunks. A newer snapshot purges an older one's chunks, possibly under a
    reader: when a chunk is late, the stream is asked whether the object still has chunks, so a purge is reported
    within ``STALL_PROBE_S`` rather than after the whole ``chunk_timeout_s`` meant for a slow server."""
    stream = OBJ_STREAM_TEMPLATE.format(bucket=bucket)
    subject = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=nuid)
    sub = await js.subscribe(
        subject, stream=stream, ordered_consumer=True, pending_bytes_limit=WINDOW_CHUNKS * 16 * (1 << 20),
    )
    offset = 0
    try:
        while offset < len(data):
            msg = await _next_chunk(js, sub, stream, subject, chunk_timeout_s)
            if msg is None:
                raise SnapshotGone(
                    f"{what}: no chunk after {offset} of {len(data)} bytes; its chunks were purged (superseded)"
                )
            end = offset + len(msg.data)
            if end > len(data):
                raise SnapshotCorrupt(f"{what} has more than {len(data)} bytes")
            data[offset:end] = msg.data
            offset = end
    finally:
        await sub.unsubscribe()


async def _next_chunk(js: JetStreamContext, sub: JetStreamContext.PushSubscription, stream: str, subject: str,
                      timeout_s: float) -> Msg | None:
    """The next chunk, or None once the object has none left in the stream; raises ``Unavailable`` when chunks
    are stored but none came within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await sub.next_msg(timeout=min(STALL_PROBE_S, max(deadline - time.monotonic(), 0.001)))
        except nats.errors.TimeoutError:
            pass
        info = await js.stream_info(stream, subjects_filter=subject)
        if not (info.state.subjects or {}).get(subject):
            return None
        if time.monotonic() >= deadline:
            raise Unavailable(f"JetStream holds the chunks of {subject} but sent none within {timeout_s} s")


async def purge(js: JetStreamContext, bucket: str, name: str, nuid: str) -> None:
    """Remove an object without a tombstone (names are never reused). Chunks first: a crash in between leaves a
    meta without chunks, which readers report as gone and the next sweep purges again."""
    stream = OBJ_STREAM_TEMPLATE.format(bucket=bucket)
    await js.purge_stream(stream, subject=OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=nuid))
    await js.purge_stream(stream, subject=meta_subject(bucket, name))


async def chunk_nuids(js: JetStreamContext, bucket: str) -> set[str]:
    """The nuids that have chunks stored, with or without a meta."""
    info = await js.stream_info(
        OBJ_STREAM_TEMPLATE.format(bucket=bucket), subjects_filter=OBJ_ALL_CHUNKS_PRE_TEMPLATE.format(bucket=bucket)
    )
    prefix = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj="")
    return {subject[len(prefix) :] for subject in (info.state.subjects or {})}


async def object_infos(js: JetStreamContext, bucket: str) -> list[api.ObjectInfo]:
    """The meta of every object not deleted, by direct reads of the subjects the stream lists. Not through
    ``ObjectStore.list``: that opens a consumer per call, and a sweep every fraction of a second left consumers
    behind faster than the server reaps them, until it refused new ones, readers' included."""
    stream = OBJ_STREAM_TEMPLATE.format(bucket=bucket)
    info = await js.stream_info(stream, subjects_filter=OBJ_ALL_META_PRE_TEMPLATE.format(bucket=bucket))
    infos = []
    for subject in info.state.subjects or {}:
        try:
            msg = await js.get_last_msg(stream, subject)
        except NotFoundError:  # purged since the listing
            continue
        meta = api.ObjectInfo.from_response(json.loads(msg.data or b"{}"))
        if not meta.deleted:
            infos.append(meta)
    return infos


def meta_subject(bucket: str, name: str) -> str:
    return OBJ_META_PRE_TEMPLATE.format(bucket=bucket, obj=base64.urlsafe_b64encode(name.encode()).decode())


def _chunks(buffers: Sequence[Buffer], chunk_bytes: int) -> Iterator[memoryview]:
    """Slices of at most ``chunk_bytes`` of each buffer, without copying; readers only concatenate chunks."""
    for buf in buffers:
        view = byte_view(buf)
        for start in range(0, view.nbytes, chunk_bytes):
            yield view[start : start + chunk_bytes]
