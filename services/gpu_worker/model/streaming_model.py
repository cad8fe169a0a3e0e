"""The reference streaming video model: a causal chunked DiT with per-session slots, implementing the interface.

Per chunk and batch: every session draws its noise from its own generator, four flow-matching steps run as one
batched DiT forward each (attending to each session's own cache), one more forward of the clean chunk at t=0
writes its K/V into the cache (as Self-Forcing does), and the decoder turns the latents into uint8 frames.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from services.gpu_worker.model.config import ModelConfig
from services.gpu_worker.model.decoder import LatentDecoder
from services.gpu_worker.model.dit import CausalDiT, ChunkBatch
from services.gpu_worker.model.errors import DuplicateSession, UnknownSession
from services.gpu_worker.model.interface import ChunkOutput, SessionHandle, SlotsExhausted
from services.gpu_worker.model.kv_cache import CachePools
from services.gpu_worker.model.prior import ColourFieldPrior
from services.gpu_worker.model.rope import Rope3D
from services.gpu_worker.model.sampler import FlowSchedule
from services.gpu_worker.model.session_state import SessionState
from services.gpu_worker.model.text_encoder import TextEncoder
from services.gpu_worker.model.tokenizer import padding_mask, tokenize
from services.gpu_worker.model.weights import init_seeded_

_MAX_SEED = 2**63


@dataclass(slots=True)
class _Session:
    """Host-side bookkeeping of a resident session; its cache tensors live in the pools at ``slot``."""

    session_id: str
    slot: int
    seed: int
    generator: torch.Generator
    chunk_index: int
    prompt_tokens: torch.Tensor
    prompt_waves: torch.Tensor
    decoder_latent: torch.Tensor


class ModelWeights(nn.Module):
    """All networks of the model, so one seeded init and one dtype cast cover every parameter."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.text_encoder = TextEncoder(config)
        self.dit = CausalDiT(config)
        self.prior = ColourFieldPrior(config)
        self.decoder = LatentDecoder(config)


class ReferenceStreamingModel:
    """Random-weight Wan2.1-shaped streaming DiT; see ``interface.StreamingVideoModel`` for the contract.

    Not an ``nn.Module`` on purpose: weights and cache pools live on one device chosen at construction, and a
    ``.to()`` that moved only the weights would split them.
    """

    def __init__(self, config: ModelConfig, device: torch.device, dtype: torch.dtype, max_sessions: int) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions={max_sessions} must be >= 1")
        self.config = config
        with torch.device(device):  # allocate on the target directly: a 1.3B model need not pass through host RAM
            weights = ModelWeights(config)
        init_seeded_(weights, config.weight_seed)
        self.weights = weights.to(dtype=dtype).eval().requires_grad_(False)
        self.device = device
        self.dtype = dtype
        self.pools = CachePools(config, max_sessions, device, dtype)
        self.schedule = FlowSchedule.from_config(config)
        self.rope = Rope3D(config, device)
        self._sessions: dict[int, _Session] = {}
        self._max_sessions = max_sessions

    @property
    def max_sessions(self) -> int:
        return self._max_sessions

    def new_session(self, session_id: str, prompt: str, seed: int) -> SessionHandle:
        if not 0 <= seed < _MAX_SEED:
            raise ValueError(f"seed={seed} must be in [0, 2**63)")
        slot = self._claim_slot(session_id)
        c = self.config
        tokens = tokenize(prompt, c.text_vocab, c.text_len)
        self._sessions[slot] = _Session(
            session_id=session_id, slot=slot, seed=seed,
            generator=torch.Generator(device="cpu").manual_seed(seed), chunk_index=0, prompt_tokens=tokens,
            prompt_waves=self._cache_prompt(slot, tokens),
            decoder_latent=torch.zeros(c.latent_channels, c.latent_height, c.latent_width, device=self.device,
                                       dtype=self.dtype),
        )
        return SessionHandle(session_id, slot)

    def set_prompt(self, handle: SessionHandle, prompt: str) -> None:
        session = self._session(handle)
        session.prompt_tokens = tokenize(prompt, self.config.text_vocab, self.config.text_len)
        session.prompt_waves = self._cache_prompt(session.slot, session.prompt_tokens)

    def generate(self, handles: Sequence[SessionHandle]) -> list[ChunkOutput]:
        sessions = [self._session(handle) for handle in handles]
        if len({s.slot for s in sessions}) != len(sessions):
            raise DuplicateSession(f"a session appears twice in one batch: {[h.session_id for h in handles]}")
        if not sessions:
            return []
        with torch.inference_mode():
            latents = self._denoise(sessions)
            previous = torch.stack([
                latents[b, :, 0] if s.chunk_index == 0 else s.decoder_latent for b, s in enumerate(sessions)
            ])
            frames = self.weights.decoder(latents, previous).cpu()
        outputs = []
        per_chunk = self.config.video_frames_per_chunk
        for b, session in enumerate(sessions):
            outputs.append(ChunkOutput(session.session_id, session.chunk_index, session.chunk_index * per_chunk,
                                       frames[b]))
            session.decoder_latent = latents[b, :, -1].clone()
            session.chunk_index += 1
        return outputs

    def export_state(self, handle: SessionHandle) -> dict[str, torch.Tensor]:
        session = self._session(handle)
        rows = self.pools.layout.valid_rows(session.chunk_index)
        return SessionState(
            kv=self.pools.export_kv(session.slot, rows),
            cross_kv=self.pools.export_cross(session.slot),
            prompt_tokens=session.prompt_tokens.clone(),
            prompt_waves=session.prompt_waves.clone(),
            decoder_latent=session.decoder_latent.clone(),
            chunk_index=session.chunk_index,
            rng_state=session.generator.get_state(),
            seed=session.seed,
        ).to_tensors()

    def import_state(self, session_id: str, tensors: Mapping[str, torch.Tensor]) -> SessionHandle:
        state = SessionState.from_tensors(self.config, tensors)
        slot = self._claim_slot(session_id)
        generator = torch.Generator(device="cpu")
        generator.set_state(state.rng_state)
        with torch.inference_mode():
            self.pools.import_kv(slot, state.kv)
            self.pools.import_cross(slot, state.cross_kv.to(self.device, self.dtype),
                                    padding_mask(state.prompt_tokens).to(self.device))
        self._sessions[slot] = _Session(
            session_id=session_id, slot=slot, seed=state.seed, generator=generator, chunk_index=state.chunk_index,
            prompt_tokens=state.prompt_tokens.clone(),
            prompt_waves=state.prompt_waves.to(self.device, torch.float32).clone(),
            decoder_latent=state.decoder_latent.to(self.device, self.dtype).clone(),
        )
        return SessionHandle(session_id, slot)

    def kv_rows_written(self, first_chunk: int, last_chunk: int) -> list[int]:
        return self.pools.layout.rows_written(first_chunk, last_chunk)

    def release(self, handle: SessionHandle) -> None:
        self._session(handle)
        del self._sessions[handle.slot]

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

    def _cache_prompt(self, slot: int, tokens: torch.Tensor) -> torch.Tensor:
        """Encode a prompt, store its per-layer cross-attention K/V in ``slot``; return its prior's wave parameters."""
        with torch.inference_mode():
            key_mask = padding_mask(tokens).to(self.device)[None]
            text = self.weights.text_encoder(tokens.to(self.device)[None], key_mask)
            context = self.weights.dit.embed_prompt(text)
            for layer, (k, v) in enumerate(self.weights.dit.prompt_kv(context)):
                self.pools.cross_k[layer][slot].copy_(k[0])
                self.pools.cross_v[layer][slot].copy_(v[0])
            self.pools.cross_mask[slot].copy_(key_mask[0])
            weights = key_mask[0, :, None].to(context.dtype)
            return self.weights.prior.waves((context[0] * weights).sum(dim=0) / weights.sum())

    def _chunk_batch(self, sessions: list[_Session]) -> ChunkBatch:
        slots = [s.slot for s in sessions]
        chunks = [s.chunk_index for s in sessions]
        slot_index = torch.tensor(slots, dtype=torch.long, device=self.device)
        cache_lens = torch.tensor([self.pools.layout.valid_rows(c) for c in chunks], dtype=torch.long,
                                  device=self.device)
        cos, sin = self.rope.tables(chunks)
        write_slots, write_rows = self.pools.write_index(slots, chunks)
        return ChunkBatch(
            slots=slot_index, cache_lens=cache_lens, rope_cos=cos, rope_sin=sin,
            cross_k=[k.index_select(0, slot_index) for k in self.pools.cross_k],
            cross_v=[v.index_select(0, slot_index) for v in self.pools.cross_v],
            cross_mask=self.pools.cross_mask.index_select(0, slot_index),
            write_slots=write_slots, write_rows=write_rows,
        )

    def _denoise(self, sessions: list[_Session]) -> torch.Tensor:
        """Run the few-step sampler for one chunk of every session and cache the clean chunk; returns x0 latents."""
        c = self.config
        batch = self._chunk_batch(sessions)
        steps = self.schedule.steps
        noise_shape = (steps, c.latent_channels, c.frames_per_chunk, c.latent_height, c.latent_width)
        noise = torch.stack([torch.randn(noise_shape, generator=s.generator) for s in sessions])
        noise = noise.to(device=self.device, dtype=self.dtype)
        frame_indices = torch.tensor(
            [[s.chunk_index * c.frames_per_chunk + f for f in range(c.frames_per_chunk)] for s in sessions],
            device=self.device,
        )
        prior = self.weights.prior.field(torch.stack([s.prompt_waves for s in sessions]), frame_indices).to(self.dtype)
        x = noise[:, 0]
        clean = x
        for step in range(steps):
            residual = self.weights.dit(x, self.schedule.model_timestep(step), batch, self.pools)
            clean = prior + c.prior_residual_scale * residual
            if step + 1 < steps:
                sigma = self.schedule.sigmas[step + 1]
                x = (1.0 - sigma) * clean + sigma * noise[:, step + 1]
        self.weights.dit(clean, 0.0, batch, self.pools, write_cache=True)
        return clean
