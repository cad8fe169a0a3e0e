"""Wan2.1's DiT, run causally one chunk at a time for a batch of sessions over their own KV caches.

The module tree is the published checkpoint's key tree (``patch_embedding``, ``blocks.N.self_attn.q``,
``blocks.N.ffn.0``, ``head.head`` ...), so Self-Forcing, CausVid and LongLive weights load with ``strict=True``
and nothing renamed. A block is Wan's: adaLN-modulated self-attention with 3D RoPE (here over the session's cached
K/V plus the chunk itself, as Self-Forcing's causal model runs it), cross-attention to the zero-padded prompt
context without a mask, adaLN-modulated tanh-GELU FFN. Per-session quantities are rows of the batch and every op is
row-wise or per session, so a session's math never mixes with another's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from services.gpu_worker import kernels
from services.gpu_worker.model.config import PATCH_SIZE, DiTConfig
from services.gpu_worker.model.kv_cache import CachePools


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
    write_slots: torch.Tensor
    write_rows: torch.Tensor


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] timesteps in [0, 1000] -> [B, dim] float32 (cos | sin), formed in float64 as Wan forms it."""
    half = dim // 2
    freqs = torch.pow(10_000.0, -torch.arange(half, dtype=torch.float64) / half).to(timesteps.device)
    angles = torch.outer(timesteps.to(torch.float64), freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).float()


class WanRMSNorm(nn.Module):
    """RMSNorm over the full width, computed in float32 (Wan's query/key norm)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the model dtype, as Wan's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class WanSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, batch: ChunkBatch, k_pool: torch.Tensor, v_pool: torch.Tensor,
                write_cache: bool) -> torch.Tensor:
        b, length, dim = x.shape
        q = self.norm_q(self.q(x)).view(b * length, self.num_heads, -1)
        kernels.rope_(q, batch.rope_cos, batch.rope_sin)
        k, v = self._chunk_kv(x, batch)
        out = kernels.varlen_attention(
            q.view(b, length, self.num_heads, -1), k.view(b, length, self.num_heads, -1),
            v.view(b, length, self.num_heads, -1), k_pool, v_pool, batch.slots, batch.cache_lens,
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
        """Rotated keys and values [B * L, heads, head_dim] of the chunk's tokens (the cache keeps keys rotated)."""
        tokens = x.shape[0] * x.shape[1]
        k = self.norm_k(self.k(x)).view(tokens, self.num_heads, -1)
        kernels.rope_(k, batch.rope_cos, batch.rope_sin)
        return k, self.v(x).view(tokens, self.num_heads, -1)

    @staticmethod
    def _store(k: torch.Tensor, v: torch.Tensor, batch: ChunkBatch, k_pool: torch.Tensor,
               v_pool: torch.Tensor) -> None:
        k_pool.index_put_((batch.write_slots, batch.write_rows), k)
        v_pool.index_put_((batch.write_slots, batch.write_rows), v)


class WanCrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)

    def prompt_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context [B, T, dim] -> the K, V [B, T, heads, head_dim] a session caches for its prompt."""
        b, length, _ = context.shape
        k = self.norm_k(self.k(context)).view(b, length, self.num_heads, -1)
        return k, self.v(context).view(b, length, self.num_heads, -1)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        q = self.norm_q(self.q(x)).view(b, length, self.num_heads, -1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        projected: torch.Tensor = self.o(out.transpose(1, 2).reshape(b, length, dim))
        return projected


class WanAttentionBlock(nn.Module):
    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        dim = config.dim
        self.eps = config.eps
        self.self_attn = WanSelfAttention(dim, config.num_heads, config.eps)
        self.norm3 = WanLayerNorm(dim, eps=config.eps, elementwise_affine=True)
        self.cross_attn = WanCrossAttention(dim, config.num_heads, config.eps)
        self.ffn = nn.Sequential(nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(config.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, time_mod: torch.Tensor, batch: ChunkBatch, layer: int, pools: CachePools,
                write_cache: bool) -> torch.Tensor:
        pools.fences.before_layer(layer)  # a restore still streaming in: wait (on the GPU) for this layer's rows
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation + time_mod).unbind(dim=1)
        attn_in = kernels.norm_modulate(x, shift_sa, scale_sa, self.eps)  # norm1: LayerNorm without affine
        attended = self.self_attn(attn_in, batch, pools.k_pools[layer], pools.v_pools[layer], write_cache)
        x = x + attended * gate_sa[:, None]
        x = x + self.cross_attn(self.norm3(x), batch.cross_k[layer], batch.cross_v[layer])
        ffn_in = kernels.norm_modulate(x, shift_ff, scale_ff, self.eps)  # norm2: LayerNorm without affine
        out: torch.Tensor = x + self.ffn(ffn_in) * gate_ff[:, None]
        return out

    def store_only(self, x: torch.Tensor, time_mod: torch.Tensor, batch: ChunkBatch, layer: int,
                   pools: CachePools) -> None:
        pools.fences.before_layer(layer)
        shift_sa, scale_sa = (self.modulation[:, :2] + time_mod[:, :2]).unbind(dim=1)
        attn_in = kernels.norm_modulate(x, shift_sa, scale_sa, self.eps)
        self.self_attn.store_only(attn_in, batch, pools.k_pools[layer], pools.v_pools[layer])


class WanHead(nn.Module):
    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.eps = config.eps
        self.head = nn.Linear(config.dim, math.prod(PATCH_SIZE) * config.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, config.dim) / config.dim**0.5)

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation + time[:, None]).unbind(dim=1)
        out: torch.Tensor = self.head(kernels.norm_modulate(x, shift, scale, self.eps))
        return out


class WanCausalDiT(nn.Module):
    """Patchify, embed the timestep, run the blocks over cache + chunk, project back to latent patches."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanAttentionBlock(config) for _ in range(config.num_layers))
        self.head = WanHead(config)

    def prompt_kv(self, text: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Zero-padded encoder output [B, text_len, text_dim] -> per layer the cross-attention K, V a session
        caches for its prompt (computed once per prompt, not per chunk)."""
        context = self.text_embedding(text)
        return [self.block(layer).cross_attn.prompt_kv(context) for layer in range(self.config.num_layers)]

    def forward(self, latents: torch.Tensor, timestep: float, batch: ChunkBatch, pools: CachePools,
                write_cache: bool = False) -> torch.Tensor | None:
        """latents [B, C, F, h, w] all at ``timestep`` (0..1000) -> the predicted flow, same shape.

        The timestep embedding is computed for one row and broadcast: every session in a batched step shares
        it, and a one-row matmul gives the same bits whatever the batch size (a B-row one would not).
        With ``write_cache`` the chunk's K/V are stored into every layer's pool and nothing is predicted: the
        last layer stops after its K/V, the head is skipped and None is returned.
        """
        x = self._patchify(latents)
        timesteps = torch.tensor([timestep], device=latents.device)
        time = self.time_embedding(sinusoidal_embedding(timesteps, self.config.freq_dim).to(x.dtype))
        time_mod = self.time_projection(time).unflatten(1, (6, -1)).expand(latents.shape[0], -1, -1)
        if write_cache:
            last = self.config.num_layers - 1
            for layer in range(last):
                x = self.block(layer)(x, time_mod, batch, layer, pools, True)
            self.block(last).store_only(x, time_mod, batch, last, pools)
            return None
        for layer in range(self.config.num_layers):
            x = self.block(layer)(x, time_mod, batch, layer, pools, False)
        return self._unpatchify(self.head(x, time.expand(latents.shape[0], -1)), latents.shape)

    def block(self, layer: int) -> WanAttentionBlock:
        """Block ``layer``, typed (``blocks`` is a plain ModuleList)."""
        return cast(WanAttentionBlock, self.blocks[layer])

    def _patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, F, h, w] -> embedded tokens [B, F * (h/2) * (w/2), dim], frame-major then row-major.

        The 1x2x2 stride-2 conv is a matmul over (c, ph, pw) patches; done as one so it batches like the rest.
        """
        b, c, f, h, w = latents.shape
        _, ph, pw = PATCH_SIZE
        patches = latents.reshape(b, c, f, h // ph, ph, w // pw, pw).permute(0, 2, 3, 5, 1, 4, 6)
        weight = self.patch_embedding.weight.flatten(1)
        return F.linear(patches.reshape(b, f * (h // ph) * (w // pw), c * ph * pw), weight, self.patch_embedding.bias)

    def _unpatchify(self, tokens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Head output [B, tokens, pt * ph * pw * c] (channels fastest, as Wan lays it out) -> [B, C, F, h, w]."""
        b, c, f, h, w = shape
        _, ph, pw = PATCH_SIZE
        x = tokens.reshape(b, f, h // ph, w // pw, ph, pw, self.config.out_dim).permute(0, 6, 1, 2, 4, 3, 5)
        return x.reshape(b, c, f, h, w)
