"""Torch reference implementations of the chunk-path operations: the CPU path and the ground truth for kernels.

Shapes (B sessions in a batch, L query tokens per session's chunk, H heads, D head dim, S pool slots,
C cache capacity in tokens per slot, N = B * L):

* ``varlen_attention``: each session's chunk queries attend to that session's cached keys (the first
  ``cache_lens[b]`` rows of pool slot ``slots[b]``: sink frames + rolling window, in ring order) plus the
  chunk's own keys. Everything in the cache is from earlier chunks and the chunk is bidirectional, so the
  block-causal rule between chunks holds by construction and no per-token mask is needed.
* ``norm_modulate``: Wan-style LayerNorm without affine, then adaptive modulation per session.
* ``rope_``: rotary embedding applied in place to interleaved pairs (x[2i], x[2i+1]).
* ``pack_kv``: a slot's per-layer K and V rows gathered into one contiguous buffer, laid out layer-major as
  [layer][k|v][n_tokens][H][D].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def varlen_attention(
    q: torch.Tensor,
    k_chunk: torch.Tensor,
    v_chunk: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slots: torch.Tensor,
    cache_lens: torch.Tensor,
) -> torch.Tensor:
    """Attention of q [B, L, H, D] over cache rows [0, cache_lens[b]) of pool slot slots[b] plus the chunk.

    k_pool, v_pool: [S, C, H, D]. slots, cache_lens: int tensors [B]. Returns [B, L, H, D].
    Padding to the longest cache plus a boolean mask is the reference; kernels must avoid the padding.
    """
    chunk_len = q.shape[1]
    lens = [int(n) for n in cache_lens.tolist()]
    max_cache = max(lens) if lens else 0
    slot_index = slots.to(torch.long)
    k_cache = k_pool[:, :max_cache].index_select(0, slot_index)  # gather only the rows any session can use
    v_cache = v_pool[:, :max_cache].index_select(0, slot_index)
    keys = torch.cat([k_cache, k_chunk], dim=1)  # [B, max_cache + L, H, D]
    values = torch.cat([v_cache, v_chunk], dim=1)
    positions = torch.arange(max_cache + chunk_len, device=q.device)
    cache_len_col = cache_lens.to(device=q.device, dtype=torch.long).unsqueeze(1)
    valid = (positions.unsqueeze(0) < cache_len_col) | (positions.unsqueeze(0) >= max_cache)  # [B, K]
    mask = valid[:, None, None, :]  # broadcast over heads and queries
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2).contiguous()


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift; x [B, L, D], shift and scale [B, D] (one modulation per session)."""
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    return normed * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [N, H, D] in place by per-token angles: cos and sin are [N, D // 2]."""
    pairs = x.unflatten(-1, (-1, 2))  # type: ignore[no-untyped-call]
    even, odd = pairs[..., 0].clone(), pairs[..., 1].clone()
    c, s = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    pairs[..., 0] = even * c - odd * s
    pairs[..., 1] = even * s + odd * c
    return x


def pack_kv(k_pools: Sequence[torch.Tensor], v_pools: Sequence[torch.Tensor], slot: int, n_tokens: int,
            out: torch.Tensor) -> torch.Tensor:
    """Gather rows [0, n_tokens) of one slot from every layer's K and V pool into the flat buffer ``out``."""
    views = []
    for k_pool, v_pool in zip(k_pools, v_pools, strict=True):
        views.append(k_pool[slot, :n_tokens].reshape(-1))
        views.append(v_pool[slot, :n_tokens].reshape(-1))
    torch.cat(views, out=out[: sum(v.numel() for v in views)])
    return out

