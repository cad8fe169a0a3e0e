"""The contract between the worker and a streaming video model: ``WanStreamingModel`` implements it for every Wan2.1
causal checkpoint (Self-Forcing, CausVid, LongLive), and a model of another family could without the worker
changing.

Invariants every implementation keeps:

* ``generate`` runs one batched forward for all handles it is given and is deterministic per session: a session's
  frames depend only on its seed, its prompt history and its chunk index, never on which other sessions shared the
  batch (bit-equal, or equal within ``ModelConfig.batch_tolerance`` where batched BLAS reorders sums).
* ``export_state`` / ``import_state`` round-trip everything the next chunk depends on (rolling KV cache and the
  latents behind it, prompt cross-attention cache, the VAE decoder's causal cache, frame cursor, RNG), so a
  session continues identically on another worker or after an offload. Exported tensors are named, contiguous,
  and may live on any device; import copies them in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from services.common.errors import Unavailable
from services.gpu_worker.copies import CopyTicket


@dataclass(frozen=True, slots=True)
class SessionHandle:
    """A session's residency in one model instance: the KV-pool slot it owns on this device."""

    session_id: str
    slot: int


@dataclass(frozen=True, slots=True)
class ChunkOutput:
    """One generated chunk: RGB frames [T, H, W, 3] uint8 on the CPU, and where they sit in the stream."""

    session_id: str
    chunk_index: int
    first_frame: int
    frames: torch.Tensor


@runtime_checkable
class StreamingVideoModel(Protocol):
    """A causal chunked video generator with per-session state held in device slots."""

    @property
    def max_sessions(self) -> int:
        """How many sessions' state fits on the device at once (KV-pool slots)."""
        ...

    def new_session(self, session_id: str, prompt: str, seed: int) -> SessionHandle:
        """Take a free slot and build the session's initial state (empty cache, prompt cache, seeded RNG)."""
        ...

    def set_prompt(self, handle: SessionHandle, prompt: str) -> None:
        """Switch the prompt from the next chunk on; the KV cache of frames already made is kept."""
        ...

    def generate(self, handles: Sequence[SessionHandle]) -> list[ChunkOutput]:
        """Produce the next chunk of every given session in one batched forward, in the order given."""
        ...

    def export_state(self, handle: SessionHandle) -> dict[str, torch.Tensor]:
        """The session's full state as named tensors; the slot stays owned until ``release``."""
        ...

    def import_state(self, session_id: str, tensors: Mapping[str, torch.Tensor]) -> SessionHandle:
        """Take a free slot and rebuild a session exported by ``export_state`` (from any worker or device). May
        return while the copies still run: the model orders its own reads after them, and ``tensors`` must stay
        unchanged until ``import_landed`` says they landed."""
        ...

    def import_landed(self, handle: SessionHandle) -> CopyTicket:
        """When the copies of the ``import_state`` that made ``handle`` have landed (asked once: a second call,
        or one for a session never imported, gets a completed ticket)."""
        ...

    def kv_rows_written(self, first_chunk: int, last_chunk: int) -> list[int]:
        """Cache rows (token rows of the exported ``kv`` tensor) that chunks first..last (inclusive) overwrite.

        Exported ``kv`` is laid out [layers, 2 (k|v), rows, heads, head_dim] as ``kernels.pack_kv`` makes it, so
        a live migration can send the bulk once and then only these rows at the chunk boundary (pre-copy).
        """
        ...

    def release(self, handle: SessionHandle) -> None:
        """Free the session's slot; its state is gone from this device. Called on the event loop between batches,
        so it must be bookkeeping only (no device work, no waiting)."""
        ...


class SlotsExhausted(Unavailable):
    """No free KV-pool slot: the caller must offload a session or place this one elsewhere (recoverable)."""
