"""Chunk-path operations, dispatched to Triton kernels on CUDA or the torch reference elsewhere.

The model calls only the names exported here; ``TURBOSERVE_KERNELS`` = ``torch`` | ``triton`` | ``auto``
(default) forces the choice (see ``selection``). Triton modules are imported on first use, so a host
without triton never imports it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.gpu_worker.kernels import reference
from services.gpu_worker.kernels.selection import use_triton


def varlen_attention(
    q: torch.Tensor,
    k_chunk: torch.Tensor,
    v_chunk: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slots: torch.Tensor,
    cache_lens: torch.Tensor,
) -> torch.Tensor:
    """Attention of q [B, L, H, D] over cache rows [0, cache_lens[b]) of pool slot slots[b] plus the chunk."""
    if use_triton(q):
        from services.gpu_worker.kernels import triton_attention

        return triton_attention.varlen_attention(q, k_chunk, v_chunk, k_pool, v_pool, slots, cache_lens)
    return reference.varlen_attention(q, k_chunk, v_chunk, k_pool, v_pool, slots, cache_lens)


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift; x [B, L, D], shift and scale [B, D] (one modulation per session)."""
    if use_triton(x):
        from services.gpu_worker.kernels import triton_norm

        return triton_norm.norm_modulate(x, shift, scale, eps)
    return reference.norm_modulate(x, shift, scale, eps)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [N, H, D] in place by per-token angles: cos and sin are [N, D // 2]."""
    if use_triton(x):
        from services.gpu_worker.kernels import triton_rope

        return triton_rope.rope_(x, cos, sin)
    return reference.rope_(x, cos, sin)


def pack_kv(k_pools: Sequence[torch.Tensor], v_pools: Sequence[torch.Tensor], slot: int, n_tokens: int,
            out: torch.Tensor) -> torch.Tensor:
    """Gather rows [0, n_tokens) of one slot from every layer's K and V pool into the flat buffer ``out``."""
    if use_triton(out):
        from services.gpu_worker.kernels import triton_pack

        return triton_pack.pack_kv(k_pools, v_pools, slot, n_tokens, out)
    return reference.pack_kv(k_pools, v_pools, slot, n_tokens, out)


__all__ = ["norm_modulate", "pack_kv", "rope_", "varlen_attention"]
