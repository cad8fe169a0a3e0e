"""The causal chunked video DiT (Wan2.1 block structure) running one chunk for a batch of sessions.

Each block: adaLN-modulated self-attention with 3D RoPE over the session's cached K/V plus the chunk itself,
cross-attention to the prompt's cached K/V, adaLN-modulated FFN. Per-session quantities (cache length, positions,
prompt) are rows of the batch and every op is row-wise or per session, so a session's math never mixes with
another's; the timestep is shared by the whole batched step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from services.gpu_worker import kernels
from services.gpu_worker.model.config import PATCH_HW, ModelConfig
from services.gpu_worker.model.kv_cache import CachePools
from services.gpu_worker.model.layers import AffineLayerNorm, FeedForward, RMSNorm, masked_attention

_TIME_FREQ_DIM = 256


@dataclass(frozen=True, slots=True)
class ChunkBatch:
    """What one batched forward needs besides the latents: built once per ``generate`` and reused by every step."""

    slots: torch.Tensor
    """[B] int64 pool slot of each session."""
    cache_lens: torch.Tensor
    """[B] int64 valid cache rows each session's queries may read."""
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor
    cross_k: list[torch.Tensor]
    """Per layer [B, text_len, heads, head_dim], gathered from the slots once."""
    cross_v: list[torch.Tensor]
    cross_mask: torch.Tensor
    write_slots: torch.Tensor
    write_rows: torch.Tensor


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int = _TIME_FREQ_DIM) -> torch.Tensor:
    """[B] timesteps in [0, 1000] -> [B, dim] float32 (cos | sin), as Wan embeds them."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float64) / half).to(timesteps.device)
    angles = timesteps.to(torch.float64)[:, None] * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).float()


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim)
        self.norm_k = RMSNorm(dim)

    def forward(self, x: torch.Tensor, batch: ChunkBatch, k_pool: torch.Tensor, v_pool: torch.Tensor,
                write_cache: bool) -> torch.Tensor:
        b, length, dim = x.shape
        q = self.norm_q(self.q(x)).view(b * length, self.heads, -1)
        kernels.rope_(q, batch.rope_cos, batch.rope_sin)
        k, v = self._chunk_kv(x, batch)
        out = kernels.varlen_attention(
            q.view(b, length, self.heads, -1), k.view(b, length, self.heads, -1), v.view(b, length, self.heads, -1),
            k_pool, v_pool, batch.slots, batch.cache_lens,
        )
        if write_cache:  # after attention: the pass that writes sees the same cache as the denoising passes
            self._store(k, v, batch, k_pool, v_pool)
        projected: torch.Tensor = self.o(out.reshape(b, length, dim))
        return projected

    def store_only(self, x: torch.Tensor, batch: ChunkBatch, k_pool: torch.Tensor, v_pool: torch.Tensor) -> None:
        """Write the chunk's K/V without attending: all the last layer has to do in the cache-writing pass."""
        k, v = self._chunk_kv(x, batch)
        self._store(k, v, batch, k_pool, v_pool)

    def _chunk_kv(self, x: torch.Tensor, batch: ChunkBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values [B * L, heads, head_dim] of the chunk's tokens."""
        tokens = x.shape[0] * x.shape[1]
        k = self.norm_k(self.k(x)).view(tokens, self.heads, -1)
        kernels.rope_(k, batch.rope_cos, batch.rope_sin)
        return k, self.v(x).view(tokens, self.heads, -1)

    @staticmethod
    def _store(k: torch.Tensor, v: torch.Tensor, batch: ChunkBatch, k_pool: torch.Tensor,
               v_pool: torch.Tensor) -> None:
        k_pool.index_put_((batch.write_slots, batch.write_rows), k)
        v_pool.index_put_((batch.write_slots, batch.write_rows), v)


class _CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim)
        self.norm_k = RMSNorm(dim)

    def prompt_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context [B, T, dim] -> the K, V [B, T, heads, head_dim] a session caches for its prompt."""
        b, length, _ = context.shape
        k = self.norm_k(self.k(context)).view(b, length, self.heads, -1)
        return k, self.v(context).view(b, length, self.heads, -1)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        q = self.norm_q(self.q(x)).view(b, length, self.heads, -1)
        projected: torch.Tensor = self.o(masked_attention(q, k, v, key_mask).reshape(b, length, dim))
        return projected


class _Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.modulation = nn.Parameter(torch.empty(1, 6, config.dim))
        self.self_attn = _SelfAttention(config.dim, config.heads)
        self.norm_cross = AffineLayerNorm(config.dim)
        self.cross_attn = _CrossAttention(config.dim, config.heads)
        self.ffn = FeedForward(config.dim, config.ffn_dim)

    def forward(self, x: torch.Tensor, time_mod: torch.Tensor, batch: ChunkBatch, layer: int, pools: CachePools,
                write_cache: bool) -> torch.Tensor:
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation + time_mod).unbind(dim=1)
        attn_in = kernels.norm_modulate(x, shift_sa, scale_sa)
        attended = self.self_attn(attn_in, batch, pools.k_pools[layer], pools.v_pools[layer], write_cache)
        x = x + attended * gate_sa[:, None]
        x = x + self.cross_attn(self.norm_cross(x), batch.cross_k[layer], batch.cross_v[layer], batch.cross_mask)
        out: torch.Tensor = x + self.ffn(kernels.norm_modulate(x, shift_ff, scale_ff)) * gate_ff[:, None]
        return out

    def store_only(self, x: torch.Tensor, time_mod: torch.Tensor, batch: ChunkBatch, layer: int,
                   pools: CachePools) -> None:
        shift_sa, scale_sa = (self.modulation[:, :2] + time_mod[:, :2]).unbind(dim=1)
        attn_in = kernels.norm_modulate(x, shift_sa, scale_sa)
        self.self_attn.store_only(attn_in, batch, pools.k_pools[layer], pools.v_pools[layer])


class CausalDiT(nn.Module):
    """Patchify, embed the timestep, run the blocks over cache + chunk, project back to latent patches."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = nn.Linear(config.patch_dim, config.dim)
        self.text_proj_in = nn.Linear(config.text_dim, config.dim)
        self.text_proj_out = nn.Linear(config.dim, config.dim)
        self.time_in = nn.Linear(_TIME_FREQ_DIM, config.dim)
        self.time_out = nn.Linear(config.dim, config.dim)
        self.time_mod = nn.Linear(config.dim, 6 * config.dim)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.layers))
        self.head_modulation = nn.Parameter(torch.empty(1, 2, config.dim))
        self.head = nn.Linear(config.dim, config.patch_dim)

    def embed_prompt(self, text: torch.Tensor) -> torch.Tensor:
        """Text-encoder output [B, T, text_dim] -> DiT context [B, T, dim] (Wan's text_embedding)."""
        context: torch.Tensor = self.text_proj_out(F.gelu(self.text_proj_in(text), approximate="tanh"))
        return context

    def prompt_kv(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the cross-attention K, V of a prompt context: computed once per prompt, then cached."""
        return [self._block(layer).cross_attn.prompt_kv(context) for layer in range(self.config.layers)]

    def forward(self, latents: torch.Tensor, timestep: float, batch: ChunkBatch, pools: CachePools,
                write_cache: bool = False) -> torch.Tensor | None:
        """latents [B, C, F, h, w] all at ``timestep`` (0..1000) -> predicted latents of the same shape.

        The timestep embedding is computed for one row and broadcast: every session in a batched step shares
        it, and a one-row matmul gives the same bits whatever the batch size (a B-row one would not).
        With ``write_cache`` the chunk's K/V are stored into every layer's pool and nothing is predicted: the
        last layer stops after its K/V, the head is skipped and None is returned.
        """
        x = self.patch_embed(self._patchify(latents))
        timesteps = torch.tensor([timestep], device=latents.device)
        time = self.time_out(F.silu(self.time_in(sinusoidal_embedding(timesteps).to(x.dtype))))
        time_mod = self.time_mod(F.silu(time)).unflatten(1, (6, -1)).expand(latents.shape[0], -1, -1)
        time = time.expand(latents.shape[0], -1)
        if write_cache:
            last = self.config.layers - 1
            for layer in range(last):
                x = self._block(layer)(x, time_mod, batch, layer, pools, True)
            self._block(last).store_only(x, time_mod, batch, last, pools)
            return None
        for layer in range(self.config.layers):
            x = self._block(layer)(x, time_mod, batch, layer, pools, False)
        shift, scale = (self.head_modulation + time[:, None]).unbind(dim=1)
        return self._unpatchify(self.head(kernels.norm_modulate(x, shift, scale)), latents.shape)

    def _block(self, layer: int) -> _Block:
        return cast(_Block, self.blocks[layer])

    @staticmethod
    def _patchify(latents: torch.Tensor) -> torch.Tensor:
        """[B, C, F, h, w] -> [B, F * (h/2) * (w/2), C * 2 * 2], tokens frame-major then row-major."""
        b, c, f, h, w = latents.shape
        p = PATCH_HW
        x = latents.reshape(b, c, f, h // p, p, w // p, p).permute(0, 2, 3, 5, 1, 4, 6)
        return x.reshape(b, f * (h // p) * (w // p), c * p * p)

    @staticmethod
    def _unpatchify(tokens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        b, c, f, h, w = shape
        p = PATCH_HW
        x = tokens.reshape(b, f, h // p, w // p, c, p, p).permute(0, 4, 1, 2, 5, 3, 6)
        return x.reshape(b, c, f, h, w)
