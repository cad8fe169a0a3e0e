"""One slot's KV rows from every layer, gathered into one contiguous transfer buffer (an export).

The per-layer pools are separate tensors, so the kernel reads their base addresses from a small pointer
table and a single launch covers every (layer, K|V) segment: grid axis 1 is the segment, axis 0 a block
of token rows inside it, each row copied as one contiguous run so the accesses vectorise. The buffer
layout is the reference's, [layer][k|v][n_tokens][H][D]. The way back needs no kernel: an import copies
each layer's K and V rows on their own, so a batch can start on layer 0 while later layers still copy.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from services.gpu_worker.kernels.errors import KernelInputError
from services.gpu_worker.kernels.selection import interpreter_enabled

ELEMENTS_PER_PROGRAM = 4096
POOL_ALIGNMENT_BYTES = 16


@triton.jit
def _copy_slot_kernel(
    pool_table_ptr, buf_ptr, slot_offset, stride_token, n_tokens,
    ROW_ELEMS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    segment = tl.program_id(1)
    pool_ptr = tl.load(pool_table_ptr + segment).to(tl.pointer_type(buf_ptr.dtype.element_ty))
    pool_ptr = tl.multiple_of(pool_ptr, 16)  # checked on the host; lets the pool side vectorise
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_C)
    mask = (tokens[:, None] < n_tokens) & (cols[None, :] < ROW_ELEMS)
    pool_ptrs = pool_ptr + slot_offset + tokens[:, None] * stride_token + cols[None, :]
    segment_start = segment.to(tl.int64) * n_tokens * ROW_ELEMS
    buf_ptrs = buf_ptr + segment_start + tokens[:, None] * ROW_ELEMS + cols[None, :]
    tl.store(buf_ptrs, tl.load(pool_ptrs, mask=mask), mask=mask)


def pack_kv(k_pools: Sequence[torch.Tensor], v_pools: Sequence[torch.Tensor], slot: int, n_tokens: int,
            out: torch.Tensor) -> torch.Tensor:
    """Same contract as ``reference.pack_kv``: rows [0, n_tokens) of ``slot`` from every layer into ``out``."""
    if len(k_pools) != len(v_pools):
        raise KernelInputError(f"{len(k_pools)} K pools but {len(v_pools)} V pools")
    pools = [pool for pair in zip(k_pools, v_pools, strict=True) for pool in pair]
    if not pools:
        return out
    first = pools[0]
    _check_pools(pools, out)
    if interpreter_enabled() and first.is_cuda:
        raise KernelInputError("the Triton interpreter runs on the host and cannot follow device pool addresses")
    pool_slots, capacity, heads, head_dim = first.shape
    if not 0 <= slot < pool_slots:
        raise KernelInputError(f"slot {slot} is outside [0, {pool_slots})")
    if not 0 <= n_tokens <= capacity:
        raise KernelInputError(f"n_tokens {n_tokens} is outside [0, {capacity}]")
    row_elems = heads * head_dim
    segment_elems = n_tokens * row_elems
    if out.numel() < segment_elems * len(pools):
        raise KernelInputError(f"buffer holds {out.numel()} elements, {segment_elems * len(pools)} needed")
    if segment_elems == 0:
        return out
    table = _pool_table(first.device, tuple(pool.data_ptr() for pool in pools))
    block_c = triton.next_power_of_2(row_elems)
    block_t = max(1, ELEMENTS_PER_PROGRAM // block_c)
    grid = (triton.cdiv(n_tokens, block_t), len(pools))
    _copy_slot_kernel[grid](
        table, out, slot * first.stride(0), first.stride(1), n_tokens,
        ROW_ELEMS=row_elems, BLOCK_T=block_t, BLOCK_C=block_c,
        num_warps=1 if interpreter_enabled() else 8,
    )
    return out


def _check_pools(pools: Sequence[torch.Tensor], buf: torch.Tensor) -> None:
    """Every pool must share one layout whose token rows are contiguous, so one stride pair addresses all."""
    first = pools[0]
    if first.dim() != 4:
        raise KernelInputError(f"pools must be [S, C, H, D], got shape {tuple(first.shape)}")
    head_dim = first.shape[3]
    if first.stride(3) != 1 or first.stride(2) != head_dim:
        raise KernelInputError(f"pool token rows must be contiguous [H, D], got strides {first.stride()}")
    for index, pool in enumerate(pools):
        if pool.data_ptr() % POOL_ALIGNMENT_BYTES:
            raise KernelInputError(f"pool {index} starts at an address not aligned to {POOL_ALIGNMENT_BYTES} bytes")
        if pool.shape != first.shape or pool.stride() != first.stride():
            raise KernelInputError(
                f"pool {index} has shape {tuple(pool.shape)} strides {pool.stride()}, "
                f"pool 0 has {tuple(first.shape)} {first.stride()}"
            )
        if pool.dtype != buf.dtype or pool.device != buf.device:
            raise KernelInputError(
                f"pool {index} is {pool.dtype} on {pool.device}, buffer is {buf.dtype} on {buf.device}"
            )
    if not buf.is_contiguous() or buf.dim() != 1:
        raise KernelInputError(f"buffer must be flat and contiguous, got shape {tuple(buf.shape)}")


@functools.lru_cache(maxsize=16)
def _pool_table(device: torch.device, addresses: tuple[int, ...]) -> torch.Tensor:
    """Base addresses of the pools on ``device``; cached because a worker's pools are allocated once."""
    return torch.tensor(addresses, dtype=torch.int64).to(device)
