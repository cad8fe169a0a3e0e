"""Rotary embedding applied in place: each program rotates every head of one token with that token's angles.

Pairs are interleaved, (x[2i], x[2i+1]), so a token's row is loaded contiguously and split into its even and
odd halves in registers; cos and sin are read once per token and shared by all heads. As in the reference,
cos and sin are first rounded to x's dtype; the rotation itself is computed in fp32 and rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.gpu_worker.kernels.errors import KernelInputError
from services.gpu_worker.kernels.launch import FLOAT_DTYPES


@triton.jit
def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr,
    stride_xn, stride_xh, stride_xd,
    stride_cos_n, stride_cos_p,
    stride_sin_n, stride_sin_p,
    heads,
    PAIRS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head_idx = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, 2 * BLOCK_P)
    pair_idx = tl.arange(0, BLOCK_P)
    pair_ok = pair_idx < PAIRS
    mask = (head_idx[:, None] < heads) & (dims[None, :] < 2 * PAIRS)
    x_ptrs = x_ptr + token * stride_xn + head_idx[:, None] * stride_xh + dims[None, :] * stride_xd
    x = tl.load(x_ptrs, mask=mask, other=0.0)
    even, odd = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_P, 2)))

    element_ty = x_ptr.dtype.element_ty
    cos = tl.load(cos_ptr + token * stride_cos_n + pair_idx * stride_cos_p, mask=pair_ok, other=0.0)
    sin = tl.load(sin_ptr + token * stride_sin_n + pair_idx * stride_sin_p, mask=pair_ok, other=0.0)
    cos = cos.to(element_ty).to(tl.float32)[None, :]
    sin = sin.to(element_ty).to(tl.float32)[None, :]
    even = even.to(tl.float32)
    odd = odd.to(tl.float32)
    rotated = tl.join(even * cos - odd * sin, even * sin + odd * cos)
    tl.store(x_ptrs, tl.reshape(rotated, (BLOCK_H, 2 * BLOCK_P)).to(element_ty), mask=mask)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Same contract as ``reference.rope_``: rotates x [N, H, D] in place by cos, sin [N, D // 2]; returns x."""
    if x.dim() != 3 or x.shape[-1] % 2:
        raise KernelInputError(f"x must be [N, H, D] with even D, got shape {tuple(x.shape)}")
    tokens, heads, head_dim = x.shape
    if x.dtype not in FLOAT_DTYPES:
        raise KernelInputError(f"x dtype {x.dtype} is not one of fp32/fp16/bf16")
    for name, tensor in (("cos", cos), ("sin", sin)):
        if tensor.shape != (tokens, head_dim // 2):
            raise KernelInputError(f"{name} must be [{tokens}, {head_dim // 2}], got {tuple(tensor.shape)}")
        if tensor.dtype not in FLOAT_DTYPES:
            raise KernelInputError(f"{name} dtype {tensor.dtype} is not one of fp32/fp16/bf16")
        if tensor.device != x.device:
            raise KernelInputError(f"{name} is on {tensor.device} but x is on {x.device}")
    if x.numel() == 0:
        return x
    block_h = triton.next_power_of_2(heads)
    block_p = triton.next_power_of_2(head_dim // 2)
    _rope_kernel[(tokens,)](
        x, cos, sin,
        *x.stride(), *cos.stride(), *sin.stride(),
        heads,
        PAIRS=head_dim // 2, BLOCK_H=block_h, BLOCK_P=block_p, num_warps=min(max(block_h * block_p // 256, 1), 8),
    )
    return x
