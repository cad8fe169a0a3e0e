"""LayerNorm fused with the per-session adaptive modulation: one read of x, one write of the output.

Statistics are taken in fp32, the normalised row is rounded to x's dtype as the reference's ``layer_norm``
output is, and the modulation ``* (1 + scale) + shift`` is applied in fp32 before a single final rounding.
The output dtype follows torch promotion of (x, shift, scale), so fp32 modulation of bf16 activations gives
fp32 exactly as the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.gpu_worker.kernels.errors import KernelInputError
from services.gpu_worker.kernels.launch import FLOAT_DTYPES


@triton.jit
def _norm_modulate_kernel(
    x_ptr, shift_ptr, scale_ptr, out_ptr,
    stride_xb, stride_xl, stride_xd,
    stride_shift_b, stride_shift_d,
    stride_scale_b, stride_scale_d,
    stride_ob, stride_ol, stride_od,
    tokens_per_session, width, eps,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    session = (row // tokens_per_session).to(tl.int64)
    token = (row % tokens_per_session).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < width

    x = tl.load(x_ptr + session * stride_xb + token * stride_xl + cols * stride_xd, mask=col_ok, other=0.0)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=0) / width
    centred = tl.where(col_ok, x - mean, 0.0)
    variance = tl.sum(centred * centred, axis=0) / width
    normed = (centred * tl.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)

    shift = tl.load(shift_ptr + session * stride_shift_b + cols * stride_shift_d, mask=col_ok, other=0.0)
    scale = tl.load(scale_ptr + session * stride_scale_b + cols * stride_scale_d, mask=col_ok, other=0.0)
    out = normed * (1.0 + scale.to(tl.float32)) + shift.to(tl.float32)
    out_ptrs = out_ptr + session * stride_ob + token * stride_ol + cols * stride_od
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=col_ok)


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Same contract as ``reference.norm_modulate``: x [B, L, D], shift and scale [B, D] -> [B, L, D]."""
    if x.dim() != 3:
        raise KernelInputError(f"x must be [B, L, D], got shape {tuple(x.shape)}")
    batch, tokens, width = x.shape
    for name, tensor in (("x", x), ("shift", shift), ("scale", scale)):
        if tensor.dtype not in FLOAT_DTYPES:
            raise KernelInputError(f"{name} dtype {tensor.dtype} is not one of fp32/fp16/bf16")
        if tensor.device != x.device:
            raise KernelInputError(f"{name} is on {tensor.device} but x is on {x.device}")
    for name, tensor in (("shift", shift), ("scale", scale)):
        if tensor.shape != (batch, width):
            raise KernelInputError(f"{name} must be [{batch}, {width}], got {tuple(tensor.shape)}")
    out_dtype = torch.promote_types(x.dtype, torch.promote_types(shift.dtype, scale.dtype))
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_d = triton.next_power_of_2(width)
    _norm_modulate_kernel[(batch * tokens,)](
        x, shift, scale, out,
        *x.stride(), *shift.stride(), *scale.stride(), *out.stride(),
        tokens, width, eps,
        BLOCK_D=block_d, num_warps=min(max(block_d // 256, 1), 8),
    )
    return out
