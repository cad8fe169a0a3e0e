"""Wan2.1's causal model serving many streams: per-session slots, one batched forward per chunk for all of them.

Per chunk and batch: every session draws its noise from its own generator; the few-step schedule runs as one
batched DiT forward per step (each session attending to its own cache), each flow prediction turned into the clean
latents (x0 = x_sigma - sigma * v) and re-noised to the next step's level; one more forward of the clean chunk at
t = 0 writes its K/V into the cache (Self-Forcing's context pass with ``context_noise`` 0); the VAE decodes the
chunk with each session's causal feature cache.

Where the config asks for it (LongLive), a prompt switch also re-caches: the chunks the KV cache holds are run again
through that context pass under the new prompt, oldest first, each attending to the ones recomputed before it, so
the next chunk sees its past as if told the new prompt (LongLive's KV re-cache; it recomputes its whole attention
window the same way).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKLWan

from services.common.errors import InvalidField
from services.gpu_worker.copies import CopyTicket, StreamCopier
from services.gpu_worker.model.config import ModelConfig
from services.gpu_worker.model.dit import ChunkBatch, WanCausalDiT
from services.gpu_worker.model.errors import DuplicateSession, UnknownSession
from services.gpu_worker.model.interface import ChunkOutput, SessionHandle, SlotsExhausted
from services.gpu_worker.model.kv_cache import CachePools
from services.gpu_worker.model.rope import Rope3D
from services.gpu_worker.model.sampler import FlowSchedule
from services.gpu_worker.model.session_state import SessionState
from services.gpu_worker.model.text_encoder import PromptEncoder
from services.gpu_worker.model.vae import StreamingVaeDecoder, VaeCache, vae_cache_bytes, vae_cache_shapes

_MAX_SEED = 2**63


@dataclass(slots=True)
class _Session:
    """Host-side bookkeeping of a resident session; its KV lives in the pools at ``slot``."""

    session_id: str
    slot: int
    seed: int
    generator: torch.Generator
    chunk_index: int
    vae_cache: VaeCache | None


@dataclass(frozen=True, slots=True)
class StateBytes:
    """One session's device state at a full attention window: what offload, migration and placement move."""

    kv: int
    """Self-attention KV at a full window plus the prompt's cross-attention KV."""
    vae: int
    """The VAE decoder's causal feature cache."""

    @property
    def total(self) -> int:
        return self.kv + self.vae


class WanStreamingModel:
    """See ``interface.StreamingVideoModel`` for the contract.

    Not an ``nn.Module`` on purpose: weights and cache pools live on one device chosen at construction, and a
    ``.to()`` that moved only the weights would split them.
    """

    def __init__(self, config: ModelConfig, dit: WanCausalDiT, vae: AutoencoderKLWan, text: PromptEncoder,
                 device: torch.device, dtype: torch.dtype, max_sessions: int) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions={max_sessions} must be >= 1")
        self.config = config
        self.dit = dit
        self.text = text
        self.vae = StreamingVaeDecoder(vae)
        self.device = device
        self.dtype = dtype
        self.pools = CachePools(config, max_sessions, device, dtype)
        self.schedule = FlowSchedule.from_config(config.stream)
        self.rope = Rope3D(config, device)
        self.vae_cache_shapes = vae_cache_shapes(config)
        self._sessions: dict[int, _Session] = {}
        self._max_sessions = max_sessions
        self._copier = StreamCopier(device)
        self._landed: dict[int, CopyTicket] = {}
        self.stage_mark: Callable[[str], None] = _no_mark
        """Called as each stage of a chunk ends (``dit_step_N``, ``cache_write``, ``vae_decode``): a benchmark sets
        a clock here to split the chunk's time; serving leaves it a no-op."""

    @property
    def max_sessions(self) -> int:
        return self._max_sessions

    def state_bytes(self) -> StateBytes:
        element = torch.finfo(self.dtype).bits // 8
        return StateBytes(kv=self.config.kv_bytes(element), vae=vae_cache_bytes(self.config, element))

    def new_session(self, session_id: str, prompt: str, seed: int) -> SessionHandle:
        if not 0 <= seed < _MAX_SEED:
            raise InvalidField(f"seed={seed} must be in [0, 2**63)")
        slot = self._claim_slot(session_id)
        self.pools.fences.before_all()  # the slot's last import may still be copying into it
        self._cache_prompt(slot, prompt)
        self._sessions[slot] = _Session(session_id=session_id, slot=slot, seed=seed,
                                        generator=torch.Generator(device="cpu").manual_seed(seed), chunk_index=0,
                                        vae_cache=None)
        return SessionHandle(session_id, slot)

    def set_prompt(self, handle: SessionHandle, prompt: str) -> None:
        session = self._session(handle)
        self.pools.fences.before_all()
        self._cache_prompt(session.slot, prompt)
        if self.config.stream.recache_on_prompt_switch and session.chunk_index > 0:
            with torch.inference_mode():
                self._recache(session)

    def generate(self, handles: Sequence[SessionHandle]) -> list[ChunkOutput]:
        sessions = [self._session(handle) for handle in handles]
        if len({s.slot for s in sessions}) != len(sessions):
            raise DuplicateSession(f"a session appears twice in one batch: {[h.session_id for h in handles]}")
        if not sessions:
            return []
        with torch.inference_mode():
            latents = self._denoise(sessions)
            frames, caches = self.vae.decode(latents, [s.vae_cache for s in sessions])
            self.stage_mark("vae_decode")
        outputs = []
        for session, session_frames, cache in zip(sessions, frames, caches, strict=True):
            outputs.append(ChunkOutput(session.session_id, session.chunk_index,
                                       self.config.first_video_frame(session.chunk_index), session_frames.cpu()))
            session.vae_cache = cache
            session.chunk_index += 1
        return outputs

    def export_state(self, handle: SessionHandle) -> dict[str, torch.Tensor]:
        session = self._session(handle)
        self.pools.fences.before_all()
        rows = self.pools.layout.valid_rows(session.chunk_index)
        segments = rows // self.config.chunk_tokens
        return SessionState(
            kv=self.pools.export_kv(session.slot, rows),
            cross_kv=self.pools.export_cross(session.slot),
            cache_latents=self.pools.latents[session.slot, :segments].clone(),
            vae_cache=[entry.clone() for entry in session.vae_cache] if session.vae_cache is not None else None,
            chunk_index=session.chunk_index,
            rng_state=session.generator.get_state(),
            seed=session.seed,
        ).to_tensors()

    def import_state(self, session_id: str, tensors: Mapping[str, torch.Tensor]) -> SessionHandle:
        """Returns once the copies are issued: the next batch waits for each layer's rows just before it reads
        them (``ImportFences``), so a restore from host memory hides under that batch's first DiT pass."""
        state = SessionState.from_tensors(self.config, self.vae_cache_shapes, tensors)
        slot = self._claim_slot(session_id)
        generator = torch.Generator(device="cpu")
        generator.set_state(state.rng_state)
        with torch.inference_mode():
            vae_cache = None if state.vae_cache is None else [
                torch.empty(entry.shape, device=self.device, dtype=self.dtype) for entry in state.vae_cache
            ]
            also = list(zip(vae_cache, state.vae_cache, strict=True)) if vae_cache and state.vae_cache else []
            self._landed[slot] = self.pools.import_slot(slot, state.kv, state.cross_kv, state.cache_latents, also,
                                                        self._copier)
        self._sessions[slot] = _Session(session_id=session_id, slot=slot, seed=state.seed, generator=generator,
                                        chunk_index=state.chunk_index, vae_cache=vae_cache)
        return SessionHandle(session_id, slot)

    def import_landed(self, handle: SessionHandle) -> CopyTicket:
        self._session(handle)
        return self._landed.pop(handle.slot, CopyTicket.completed())

    def kv_rows_written(self, first_chunk: int, last_chunk: int) -> list[int]:
        return self.pools.layout.rows_written(first_chunk, last_chunk)

    def release(self, handle: SessionHandle) -> None:
        self._session(handle)
        del self._sessions[handle.slot]
        self._landed.pop(handle.slot, None)

    def _claim_slot(self, session_id: str) -> int:
        if any(s.session_id == session_id for s in self._sessions.values()):
            raise DuplicateSession(f"session {session_id!r} is already resident in this model")
        for slot in range(self._max_sessions):
            if slot not in self._sessions:
                return slot
        raise SlotsExhausted(f"all {self._max_sessions} slots are taken; cannot admit session {session_id!r}")

    def _session(self, handle: SessionHandle) -> _Session:
        session = self._sessions.get(handle.slot)
        if session is None or session.session_id != handle.session_id:
            raise UnknownSession(f"no session {handle.session_id!r} in slot {handle.slot} of this model")
        return session

    def _cache_prompt(self, slot: int, prompt: str) -> None:
        """Store the prompt's per-layer cross-attention K/V in ``slot``: from the next chunk on, it conditions."""
        context = self.text.encode(prompt)
        with torch.inference_mode():
            for layer, (k, v) in enumerate(self.dit.prompt_kv(context[None])):
                self.pools.cross_k[layer][slot].copy_(k[0])
                self.pools.cross_v[layer][slot].copy_(v[0])

    def _chunk_batch(self, sessions: list[_Session]) -> ChunkBatch:
        slots = [s.slot for s in sessions]
        chunks = [s.chunk_index for s in sessions]
        write_slots, write_rows = self.pools.write_index(slots, chunks)
        return self._batch(slots, chunks, [self.pools.layout.valid_rows(c) for c in chunks], write_slots, write_rows)

    def _batch(self, slots: list[int], chunks: list[int], cache_lens: list[int], write_slots: torch.Tensor,
               write_rows: torch.Tensor) -> ChunkBatch:
        self.pools.fences.before_batch()  # the gather below reads every layer's prompt K/V
        slot_index = torch.tensor(slots, dtype=torch.long, device=self.device)
        cos, sin = self.rope.tables(chunks)
        return ChunkBatch(
            slots=slot_index, cache_lens=torch.tensor(cache_lens, dtype=torch.long, device=self.device),
            rope_cos=cos, rope_sin=sin,
            cross_k=[k.index_select(0, slot_index) for k in self.pools.cross_k],
            cross_v=[v.index_select(0, slot_index) for v in self.pools.cross_v],
            write_slots=write_slots, write_rows=write_rows,
        )

    def _denoise(self, sessions: list[_Session]) -> torch.Tensor:
        """Run the few-step sampler for one chunk of every session and cache the clean chunk; returns x0 latents."""
        s = self.config.stream
        batch = self._chunk_batch(sessions)
        steps = self.schedule.steps
        noise_shape = (steps, self.config.dit.in_dim, s.frames_per_chunk, s.latent_height, s.latent_width)
        noise = torch.stack([torch.randn(noise_shape, generator=session.generator) for session in sessions])
        noise = noise.to(device=self.device, dtype=self.dtype)
        x = noise[:, 0]
        clean = x
        for step in range(steps):
            flow = self.dit(x, self.schedule.model_timesteps[step], batch, self.pools)
            assert flow is not None
            sigma = self.schedule.sigmas[step]
            clean = (x.float() - sigma * flow.float()).to(self.dtype)
            if step + 1 < steps:
                next_sigma = self.schedule.sigmas[step + 1]
                x = (1.0 - next_sigma) * clean + next_sigma * noise[:, step + 1]
            self.stage_mark(f"dit_step_{step}")
        self.dit(clean, 0.0, batch, self.pools, write_cache=True)
        self.pools.fences.before_all()  # the latents and VAE cache of a restore land last
        self.pools.store_latents([session.slot for session in sessions], [session.chunk_index for session in sessions],
                                 clean)
        self.stage_mark("cache_write")
        return clean

    def _recache(self, session: _Session) -> None:
        """Recompute the K/V of every cached chunk under the slot's (new) prompt: oldest first, each written right
        after the ones before it (ring chunks unrolled into time order so a prefix of rows is exactly their past),
        then the ring's chunks moved back to the segments they belong to."""
        layout, tokens = self.pools.layout, self.config.chunk_tokens
        chunks = layout.cached_chunks(session.chunk_index)
        latents = [self.pools.latents[session.slot, layout.segment(chunk)].clone() for chunk in chunks]
        write_slots = torch.full((tokens,), session.slot, dtype=torch.long, device=self.device)
        for position, (chunk, clean) in enumerate(zip(chunks, latents, strict=True)):
            rows = position * tokens + torch.arange(tokens, device=self.device)
            batch = self._batch([session.slot], [chunk], [position * tokens], write_slots, rows)
            self.dit(clean[None], 0.0, batch, self.pools, write_cache=True)
        moves = [(position * tokens, layout.first_row(chunk)) for position, chunk in enumerate(chunks)
                 if position * tokens != layout.first_row(chunk)]
        if moves:
            self.pools.move_ring_rows(session.slot, moves)


def _no_mark(_: str) -> None:
    pass
