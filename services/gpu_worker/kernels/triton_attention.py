"""Variable-length chunk attention as one Triton launch: every session and head reads its own pool slot in place.

Each program owns a block of one session's chunk queries for one head and streams keys in two parts, the
first ``cache_lens[b]`` rows of pool slot ``slots[b]`` and then the chunk's own keys, with an online softmax
(FlashAttention). No cache row is copied or padded, so a short cache costs only its own length and an empty
one (``cache_len == 0``) simply skips the first part. Semantics are those of ``reference.varlen_attention``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from services.gpu_worker.kernels.errors import KernelInputError
from services.gpu_worker.kernels.launch import FLOAT_DTYPES, dot_precision, host_checked_index
from services.gpu_worker.kernels.selection import interpreter_enabled

LOG2_E = 1.4426950408889634


@triton.jit
def _varlen_attention_kernel(
    q_ptr, k_chunk_ptr, v_chunk_ptr, k_pool_ptr, v_pool_ptr, slots_ptr, cache_lens_ptr, out_ptr,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kcb, stride_kcl, stride_kch, stride_kcd,
    stride_vcb, stride_vcl, stride_vch, stride_vcd,
    stride_kps, stride_kpc, stride_kph, stride_kpd,
    stride_vps, stride_vpc, stride_vph, stride_vpd,
    stride_ob, stride_ol, stride_oh, stride_od,
    chunk_len, heads, qk_scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    session_head = tl.program_id(1)
    session = (session_head // heads).to(tl.int64)
    head = (session_head % heads).to(tl.int64)
    slot = tl.load(slots_ptr + session).to(tl.int64)
    cache_len = tl.load(cache_lens_ptr + session).to(tl.int32)

    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    keys_in_block = tl.arange(0, BLOCK_N)
    row_ok = rows < chunk_len
    if HEAD_DIM == BLOCK_D:  # no padded lanes: a mask constant along D lets loads vectorise
        dim_ok = tl.full([BLOCK_D], True, tl.int1)
    else:
        dim_ok = dims < HEAD_DIM
    q_ptrs = q_ptr + session * stride_qb + head * stride_qh + rows[:, None] * stride_ql + dims[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for part in tl.static_range(2):
        if part == 0:  # the session's cached rows, read in place from its pool slot
            k_base = k_pool_ptr + slot * stride_kps + head * stride_kph
            v_base = v_pool_ptr + slot * stride_vps + head * stride_vph
            k_row_stride, k_dim_stride = stride_kpc, stride_kpd
            v_row_stride, v_dim_stride = stride_vpc, stride_vpd
            n_keys = cache_len
        else:  # the chunk's own keys: bidirectional within the chunk
            k_base = k_chunk_ptr + session * stride_kcb + head * stride_kch
            v_base = v_chunk_ptr + session * stride_vcb + head * stride_vch
            k_row_stride, k_dim_stride = stride_kcl, stride_kcd
            v_row_stride, v_dim_stride = stride_vcl, stride_vcd
            n_keys = chunk_len
        for start in range(0, n_keys, BLOCK_N):
            key_rows = start + keys_in_block
            key_ok = key_rows < n_keys
            kv_mask = key_ok[:, None] & dim_ok[None, :]
            k = tl.load(k_base + key_rows[:, None] * k_row_stride + dims[None, :] * k_dim_stride, mask=kv_mask,
                        other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
            scores = tl.where(key_ok[None, :], scores, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(scores, 1))
            correction = tl.exp2(row_max - new_max)
            probs = tl.exp2(scores - new_max[:, None])
            row_sum = row_sum * correction + tl.sum(probs, 1)
            v = tl.load(v_base + key_rows[:, None] * v_row_stride + dims[None, :] * v_dim_stride, mask=kv_mask,
                        other=0.0)
            acc = acc * correction[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=DOT_PRECISION)
            row_max = new_max

    out = acc / row_sum[:, None]
    out_ptrs = out_ptr + session * stride_ob + head * stride_oh + rows[:, None] * stride_ol + dims[None, :] * stride_od
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


@dataclass(frozen=True, slots=True)
class AttentionTiles:
    """Tile sizes and launch shape; chosen per dtype and head dim because shared memory bounds them."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def attention_tiles(head_dim: int, dtype: torch.dtype) -> AttentionTiles:
    """Tiles for a real GPU (FlashAttention-2 sizes for Hopper), or small ones for the host interpreter.

    Interpreted tiles are 16 so that the tiny test shapes still cross several key blocks and partial tails.
    """
    if interpreter_enabled():
        return AttentionTiles(block_m=16, block_n=16, num_warps=1, num_stages=1)
    if dtype == torch.float32 or head_dim > 128:
        return AttentionTiles(block_m=64, block_n=32, num_warps=4, num_stages=2)
    return AttentionTiles(block_m=128, block_n=64, num_warps=8, num_stages=3)


def varlen_attention(
    q: torch.Tensor,
    k_chunk: torch.Tensor,
    v_chunk: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slots: torch.Tensor,
    cache_lens: torch.Tensor,
) -> torch.Tensor:
    """Same contract as ``reference.varlen_attention``: q [B, L, H, D], pools [S, C, H, D] -> [B, L, H, D].

    ``slots`` and ``cache_lens`` may live on the host, where their values are range-checked before the copy
    to the device; tensors already on the device are trusted (checking them would cost a synchronisation).
    """
    _check_shapes(q, k_chunk, v_chunk, k_pool, v_pool)
    batch, chunk_len, heads, head_dim = q.shape
    pool_slots, capacity = k_pool.shape[:2]
    slots_dev = host_checked_index(slots, "slots", batch, 0, pool_slots - 1, q.device)
    cache_lens_dev = host_checked_index(cache_lens, "cache_lens", batch, 0, capacity, q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    tiles = attention_tiles(head_dim, q.dtype)
    grid = (triton.cdiv(chunk_len, tiles.block_m), batch * heads)
    _varlen_attention_kernel[grid](
        q, k_chunk, v_chunk, k_pool, v_pool, slots_dev, cache_lens_dev, out,
        *q.stride(), *k_chunk.stride(), *v_chunk.stride(), *k_pool.stride(), *v_pool.stride(), *out.stride(),
        chunk_len, heads, LOG2_E / math.sqrt(head_dim),
        HEAD_DIM=head_dim, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), DOT_PRECISION=dot_precision(q.dtype),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out


def _check_shapes(q: torch.Tensor, k_chunk: torch.Tensor, v_chunk: torch.Tensor, k_pool: torch.Tensor,
                  v_pool: torch.Tensor) -> None:
    if q.dim() != 4:
        raise KernelInputError(f"q must be [B, L, H, D], got shape {tuple(q.shape)}")
    for name, tensor in (("k_chunk", k_chunk), ("v_chunk", v_chunk)):
        if tensor.shape != q.shape:
            raise KernelInputError(f"{name} shape {tuple(tensor.shape)} differs from q shape {tuple(q.shape)}")
    if k_pool.dim() != 4 or k_pool.shape[2:] != q.shape[2:]:
        raise KernelInputError(f"k_pool must be [S, C, {q.shape[2]}, {q.shape[3]}], got {tuple(k_pool.shape)}")
    if v_pool.shape != k_pool.shape:
        raise KernelInputError(f"v_pool shape {tuple(v_pool.shape)} differs from k_pool {tuple(k_pool.shape)}")
    for name, tensor in (("q", q), ("k_chunk", k_chunk), ("v_chunk", v_chunk), ("k_pool", k_pool), ("v_pool", v_pool)):
        if tensor.dtype not in FLOAT_DTYPES or tensor.dtype != q.dtype:
            raise KernelInputError(f"{name} dtype {tensor.dtype} must equal q dtype {q.dtype} (one of fp32/fp16/bf16)")
        if tensor.device != q.device:
            raise KernelInputError(f"{name} is on {tensor.device} but q is on {q.device}")
