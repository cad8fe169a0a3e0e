"""A private two-process torch.distributed group for one state transfer, and framed send/recv over it.

Why no ``init_process_group``: it installs one global default group per process, and a worker takes part in many
migrations over its life, with different peers, sometimes at once. Instead each transfer builds its own backend
object directly: ``ProcessGroupGloo`` (CPU tensors) or ``ProcessGroupNCCL`` (CUDA tensors) on a ``PrefixStore``
(namespaced by transfer id) over a ``TCPStore`` that the target hosts. Both constructors are public in torch 2.13
and need no default group; point-to-point ``send``/``recv`` on them return works we wait on with a timeout.

Ranks are fixed: the target (rank 0) hosts the store and learns its port first (``TransferListener``), the
worker's NATS code sends that port to the source, and the source (rank 1) ``connect``s. A frame is a msgpack
header (length-prefixed, size-limited, decoded before any tensor is allocated) followed by its tensors as bytes.
The header travels in one fixed-size block (plus an overflow message only when it is larger), because each
message the receiver waits for in turn costs a round trip: that is what a pause at a chunk boundary is made of.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import msgpack
import torch
import torch.distributed as dist

from services.gpu_worker.migration.errors import FrameTooLarge, TransferFailed
from services.gpu_worker.state.packing import DTYPES_BY_NAME, NAMES_BY_DTYPE

logger = logging.getLogger(__name__)
# torch.distributed's stubs do not re-export its stores and process-group classes: the type ignores below say so.

TARGET_RANK = 0
SOURCE_RANK = 1
MAX_HEADER_BYTES = 1 << 20
HEADER_BLOCK_BYTES = 16 << 10  # one fixed-size message holds a typical header: one exchange per control frame
LENGTH_BYTES = 8
MAX_FRAME_TENSORS = 64

Allocate = Callable[[torch.dtype, int], torch.Tensor]


class FrameLink(Protocol):
    """What a migration needs from a link; PeerLink is the real one, tests may pass an in-memory pair."""

    def send_frame(self, header: Mapping[str, Any], tensors: Sequence[torch.Tensor], *, timeout_s: float) -> None:
        ...

    def recv_frame(
        self, allocate: Allocate, *, timeout_s: float, max_payload_bytes: int
    ) -> tuple[dict[str, Any], list[torch.Tensor]]:
        ...

    def close(self) -> None:
        ...


def backend_for(device: torch.device) -> str:
    """gloo for CPU tensors, nccl for CUDA tensors: the backend must match where the buffers live."""
    return "nccl" if device.type == "cuda" else "gloo"


class PeerLink:
    """One end of a transfer's two-rank group; sends and receives whole frames, in order."""

    def __init__(self, group: dist.ProcessGroup, store: dist.Store,  # type: ignore[name-defined]
                 rank: int, device: torch.device) -> None:
        self._group = group
        self._store = store  # the group keeps using it; the target's copy also keeps the server alive
        self.rank = rank
        self.peer_rank = SOURCE_RANK if rank == TARGET_RANK else TARGET_RANK
        self.device = device
        self._closed = False

    def send_frame(self, header: Mapping[str, Any], tensors: Sequence[torch.Tensor], *, timeout_s: float) -> None:
        """Send the header, then every (contiguous) tensor; returns once the backend has taken them all."""
        if len(tensors) > MAX_FRAME_TENSORS:
            raise ValueError(f"a frame carries at most {MAX_FRAME_TENSORS} tensors, got {len(tensors)}")
        specs = [[NAMES_BY_DTYPE[t.dtype], t.numel()] for t in tensors]
        payload = msgpack.packb({"header": dict(header), "tensors": specs}, use_bin_type=True)
        if len(payload) > MAX_HEADER_BYTES:
            raise FrameTooLarge(f"frame header of {len(payload)} B passes the {MAX_HEADER_BYTES} B limit")
        framed = len(payload).to_bytes(LENGTH_BYTES, "little") + payload
        block = bytearray(max(HEADER_BLOCK_BYTES, len(framed)))
        block[: len(framed)] = framed
        encoded = torch.frombuffer(block, dtype=torch.uint8).to(self.device)
        parts = [encoded[:HEADER_BLOCK_BYTES]]
        if len(framed) > HEADER_BLOCK_BYTES:
            parts.append(encoded[HEADER_BLOCK_BYTES:])
        parts.extend(_as_bytes(t) for t in tensors)
        self._exchange(self._group.send, parts, timeout_s)

    def recv_frame(
        self, allocate: Allocate, *, timeout_s: float, max_payload_bytes: int
    ) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """Receive one frame; tensors come back 1-D in buffers from ``allocate(dtype, numel)``.

        ``max_payload_bytes`` bounds what a peer can make us allocate (e.g. the reservation's size).
        """
        block = torch.empty(HEADER_BLOCK_BYTES, dtype=torch.uint8, device=self.device)
        self._exchange(self._group.recv, [block], timeout_s)
        framed = block.cpu().numpy().tobytes()
        size = int.from_bytes(framed[:LENGTH_BYTES], "little")
        if not 0 < size <= MAX_HEADER_BYTES:
            raise FrameTooLarge(f"peer announced a {size} B frame header; the limit is {MAX_HEADER_BYTES} B")
        overflow_bytes = LENGTH_BYTES + size - HEADER_BLOCK_BYTES
        if overflow_bytes > 0:
            overflow = torch.empty(overflow_bytes, dtype=torch.uint8, device=self.device)
            self._exchange(self._group.recv, [overflow], timeout_s)
            framed += overflow.cpu().numpy().tobytes()
        header, specs = _decode_header(framed[LENGTH_BYTES : LENGTH_BYTES + size])
        payload_bytes = sum(numel * dtype.itemsize for dtype, numel in specs)
        if payload_bytes > max_payload_bytes:
            raise FrameTooLarge(f"peer announced {payload_bytes} B of tensors; at most {max_payload_bytes} B allowed")
        tensors = [allocate(dtype, numel) for dtype, numel in specs]
        self._exchange(self._group.recv, [_as_bytes(t) for t in tensors], timeout_s)
        return header, tensors

    def close(self) -> None:
        """Tear the group down; idempotent. Pending operations on the peer fail instead of hanging."""
        if self._closed:
            return
        self._closed = True
        try:
            self._group.shutdown()
        except RuntimeError as exc:  # already broken by the peer: nothing left to tear down
            logger.info("transfer group of rank %d was already broken at close: %s", self.rank, exc)

    def _exchange(self, operation: Callable[..., dist.Work], parts: Sequence[torch.Tensor], timeout_s: float) -> None:
        """Post every part at once (they pipeline), then wait for all within one shared deadline."""
        deadline = time.monotonic() + timeout_s
        try:
            works = [operation([part], self.peer_rank, 0) for part in parts]
            for work in works:
                work.wait(datetime.timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
        except RuntimeError as exc:
            raise TransferFailed(f"{operation.__name__} with rank {self.peer_rank} failed: {exc}") from exc


class TransferListener:
    """The target's side of the rendezvous: a TCPStore on ``host`` (port 0 picks a free one)."""

    def __init__(self, host: str, port: int = 0, *, timeout_s: float) -> None:
        self.host = host
        self._timeout = datetime.timedelta(seconds=timeout_s)
        try:
            self._store = dist.TCPStore(  # type: ignore[attr-defined]
                host, port, 2, is_master=True, wait_for_workers=False, timeout=self._timeout)
        except (RuntimeError, OSError) as exc:
            raise TransferFailed(f"cannot listen for a transfer on {host}:{port}: {exc}") from exc

    @property
    def port(self) -> int:
        """The port to send to the source."""
        return self._store.port

    def accept(self, transfer_id: str, device: torch.device) -> PeerLink:
        """Block until the source joins (or the timeout passes, as TransferFailed); one link per listener."""
        store = dist.PrefixStore(f"transfer/{transfer_id}", self._store)  # type: ignore[attr-defined]
        group = _make_group(store, TARGET_RANK, device, self.host, self._timeout)
        return PeerLink(group, self._store, TARGET_RANK, device)


def connect(host: str, port: int, *, transfer_id: str, device: torch.device, timeout_s: float) -> PeerLink:
    """The source's side: join the target's store at host:port and build the group."""
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        bind_host = _local_address_towards(host, port)
        store = dist.TCPStore(host, port, 2, is_master=False, timeout=timeout)  # type: ignore[attr-defined]
    except (RuntimeError, OSError) as exc:
        raise TransferFailed(f"cannot reach the transfer store at {host}:{port}: {exc}") from exc
    prefixed = dist.PrefixStore(f"transfer/{transfer_id}", store)  # type: ignore[attr-defined]
    group = _make_group(prefixed, SOURCE_RANK, device, bind_host, timeout)
    return PeerLink(group, store, SOURCE_RANK, device)


def _make_group(store: dist.Store, rank: int, device: torch.device, bind_host: str,  # type: ignore[name-defined]
                timeout: datetime.timedelta) -> dist.ProcessGroup:
    try:
        if backend_for(device) == "nccl":
            # A worker must survive a failed transfer: blocking wait makes ``work.wait(timeout)`` raise on the
            # calling thread, and error handling 2 aborts only the communicator instead of killing the process.
            os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
            nccl_options = dist.ProcessGroupNCCL.Options()
            nccl_options._timeout = timeout
            return dist.ProcessGroupNCCL(store, rank, 2, nccl_options)  # type: ignore[return-value]
        gloo_options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        gloo_options._timeout = timeout
        gloo_options._devices = [dist.ProcessGroupGloo.create_device(hostname=bind_host)]
        return dist.ProcessGroupGloo(store, rank, 2, gloo_options)  # type: ignore[return-value]
    except RuntimeError as exc:
        raise TransferFailed(f"rank {rank} could not form the transfer group: {exc}") from exc


def _local_address_towards(host: str, port: int) -> str:
    """The local interface address that routes to host:port (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))
        return str(probe.getsockname()[0])


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_contiguous():
        raise ValueError("frame tensors must be contiguous")
    return tensor.reshape(-1).view(torch.uint8)


def _decode_header(payload: bytes) -> tuple[dict[str, Any], list[tuple[torch.dtype, int]]]:
    try:
        decoded = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise TransferFailed(f"undecodable frame header: {exc}") from exc
    if not isinstance(decoded, dict) or not isinstance(decoded.get("header"), dict):
        raise TransferFailed(f"frame header is not a map with a 'header' map: {decoded!r:.200}")
    raw_specs = decoded.get("tensors")
    if not isinstance(raw_specs, list) or len(raw_specs) > MAX_FRAME_TENSORS:
        raise TransferFailed(f"frame tensor list malformed or longer than {MAX_FRAME_TENSORS}")
    specs = []
    for spec in raw_specs:
        if (not isinstance(spec, list) or len(spec) != 2 or spec[0] not in DTYPES_BY_NAME
                or not isinstance(spec[1], int) or spec[1] < 0):
            raise TransferFailed(f"bad tensor spec in frame header: {spec!r}")
        specs.append((DTYPES_BY_NAME[spec[0]], spec[1]))
    return decoded["header"], specs
