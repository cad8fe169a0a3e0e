"""A model-free StreamingVideoModel whose state has a chosen size: drives benchmarks and transport tests of the
state path without weights, and exercises exactly the Protocol the real model implements.

Each chunk overwrites ``rows_per_chunk`` KV rows of a rolling window behind ``sink_rows`` fixed rows, with values
drawn from the session's own generator, and advances the cursor; the frames it emits digest what it wrote and
the generator, so a continuation after a bad migration or restore shows up as different frames.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from services.gpu_worker.copies import CopyTicket
from services.gpu_worker.model.interface import ChunkOutput, SessionHandle, SlotsExhausted

FRAMES_PER_CHUNK = 12


@dataclass(frozen=True, slots=True)
class SyntheticShape:
    """KV geometry: [layers, 2, rows, heads, head_dim] of ``dtype``; the window is rows - sink_rows."""

    layers: int = 4
    heads: int = 4
    head_dim: int = 32
    rows: int = 64
    sink_rows: int = 4
    rows_per_chunk: int = 4
    prompt_tokens: int = 8
    dtype: torch.dtype = torch.bfloat16

    @classmethod
    def of_size(cls, state_bytes: int, **overrides: int) -> SyntheticShape:
        """A shape whose KV cache holds about ``state_bytes`` (the small tensors add a few hundred KB)."""
        base = cls(**overrides)  # type: ignore[arg-type]
        row_bytes = base.layers * 2 * base.heads * base.head_dim * base.dtype.itemsize
        rows = max(base.sink_rows + base.rows_per_chunk, state_bytes // row_bytes)
        return cls(**{**overrides, "rows": rows})  # type: ignore[arg-type]

    def rows_for_chunk(self, chunk: int) -> list[int]:
        window = self.rows - self.sink_rows
        return [self.sink_rows + (chunk * self.rows_per_chunk + i) % window for i in range(self.rows_per_chunk)]


@dataclass(slots=True)
class _Session:
    kv: torch.Tensor
    prompt_cache: torch.Tensor
    cursor: torch.Tensor  # [chunk_index, first_frame]
    generator: torch.Generator


class SyntheticStateModel:
    """Implements StreamingVideoModel over synthetic state on ``device``; not thread-safe, like a real model."""

    def __init__(
        self, shape: SyntheticShape, *, slots: int, device: torch.device, adopt_on_import: bool = False
    ) -> None:
        """``adopt_on_import`` keeps imported tensors instead of copying them: on a GPU that copy is a device
        copy at HBM speed (~1 ms per GB); on this CPU stand-in it would be the dominant cost and hide the
        transfer being measured. The caller must then not reuse the imported buffers.
        """
        self.shape = shape
        self.device = device
        self._slots = slots
        self._adopt_on_import = adopt_on_import
        self._sessions: dict[int, _Session] = {}
        self._spare_kv: dict[int, torch.Tensor] = {}  # a released slot's KV memory, reused like a KV pool

    @property
    def max_sessions(self) -> int:
        return self._slots

    def new_session(self, session_id: str, prompt: str, seed: int) -> SessionHandle:
        s = self.shape
        generator = torch.Generator(device="cpu").manual_seed(seed)
        kv = torch.empty((s.layers, 2, s.rows, s.heads, s.head_dim), dtype=s.dtype, device=self.device)
        row_pattern = torch.arange(s.rows, device=self.device).view(1, 1, -1, 1, 1)
        lane_pattern = torch.arange(s.heads * s.head_dim, device=self.device).view(s.heads, s.head_dim)
        kv.copy_(((row_pattern + lane_pattern) % 251).to(s.dtype))  # one broadcast copy: cheap even at 1 GB
        session = _Session(kv, self._prompt_cache(prompt), torch.zeros(2, dtype=torch.int64, device=self.device),
                           generator)
        return self._occupy(session_id, session)

    def set_prompt(self, handle: SessionHandle, prompt: str) -> None:
        self._sessions[handle.slot].prompt_cache = self._prompt_cache(prompt)

    def generate(self, handles: Sequence[SessionHandle]) -> list[ChunkOutput]:
        outputs = []
        for handle in handles:
            session = self._sessions[handle.slot]
            chunk, first_frame = (int(v) for v in session.cursor.tolist())
            rows = torch.tensor(self.shape.rows_for_chunk(chunk), device=self.device)
            fresh_shape = (*session.kv.shape[:2], len(rows), *session.kv.shape[3:])
            fresh = torch.randn(fresh_shape, generator=session.generator).to(session.kv)
            session.kv.index_copy_(2, rows, fresh)
            digest = session.kv.index_select(2, rows).float().sum() + session.prompt_cache.float().sum()
            pixel = int(digest.item() * 1000) % 256
            frames = torch.full((FRAMES_PER_CHUNK, 2, 2, 3), pixel, dtype=torch.uint8)
            session.cursor.copy_(torch.tensor([chunk + 1, first_frame + FRAMES_PER_CHUNK]))
            outputs.append(ChunkOutput(handle.session_id, chunk, first_frame, frames))
        return outputs

    def export_state(self, handle: SessionHandle) -> dict[str, torch.Tensor]:
        """Views of the live slot (no copy) plus the generator state."""
        session = self._sessions[handle.slot]
        return {
            "kv": session.kv,
            "prompt_cache": session.prompt_cache,
            "cursor": session.cursor,
            "rng": session.generator.get_state(),
        }

    def import_state(self, session_id: str, tensors: Mapping[str, torch.Tensor]) -> SessionHandle:
        slot = self._free_slot(session_id)
        kv = tensors["kv"]
        spare = self._spare_kv.get(slot)
        if self._adopt_on_import:
            kv = kv.to(self.device)
        elif spare is not None and spare.shape == kv.shape and spare.dtype == kv.dtype:
            kv = spare.copy_(kv)
        else:
            kv = kv.to(self.device, copy=True)
        generator = torch.Generator(device="cpu")
        generator.set_state(tensors["rng"].to("cpu", copy=True))
        prompt_cache = tensors["prompt_cache"].to(self.device, copy=True)
        return self._occupy(session_id, _Session(kv, prompt_cache, tensors["cursor"].to(self.device, copy=True),
                                                 generator))

    def import_landed(self, handle: SessionHandle) -> CopyTicket:
        return CopyTicket.completed()  # imports here copy before they return

    def kv_rows_written(self, first_chunk: int, last_chunk: int) -> list[int]:
        return [row for chunk in range(first_chunk, last_chunk + 1) for row in self.shape.rows_for_chunk(chunk)]

    def release(self, handle: SessionHandle) -> None:
        session = self._sessions.pop(handle.slot, None)
        if session is not None and not self._adopt_on_import:
            self._spare_kv[handle.slot] = session.kv

    def _free_slot(self, session_id: str) -> int:
        free = next((slot for slot in range(self._slots) if slot not in self._sessions), None)
        if free is None:
            raise SlotsExhausted(f"all {self._slots} slots are taken; cannot place session {session_id!r}")
        return free

    def _occupy(self, session_id: str, session: _Session) -> SessionHandle:
        slot = self._free_slot(session_id)
        self._sessions[slot] = session
        return SessionHandle(session_id, slot)

    def _prompt_cache(self, prompt: str) -> torch.Tensor:
        s = self.shape
        generator = torch.Generator(device="cpu").manual_seed(zlib.crc32(prompt.encode()))
        cache = torch.randn((s.layers, 2, s.prompt_tokens, s.heads, s.head_dim), generator=generator)
        return cache.to(device=self.device, dtype=s.dtype)
