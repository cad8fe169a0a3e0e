"""Every Triton kernel compiles for Hopper (sm_90) on this CPU-only host, and its global accesses vectorise.

The interpreter proves the arithmetic but never runs Triton's compiler, so a kernel can pass it and still
fail to compile, or compile to scalar loads. Compiling ahead of time with the specialisations the JIT makes
for the wan-1.3b shapes (16-byte aligned pointers, strides divisible by 16, unit inner strides) catches both.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import pytest
import torch

from services.gpu_worker.kernels.selection import interpreter_enabled

pytestmark = pytest.mark.skipif(interpreter_enabled(), reason="kernels are interpreter functions in this process")

HOPPER = ("cuda", 90, 32)
VECTOR_ACCESS = re.compile(r"(ld|st)\.global(\.[a-z]+)*\.v[24]\.")
SCALAR_16BIT_ACCESS = re.compile(r"(ld|st)\.global(\.[a-z]+)*\.b16")


def _compile_for_hopper(kernel: object, arg_types: Mapping[str, str], constants: Mapping[str, object],
                        not_divisible: set[str], num_warps: int, num_stages: int) -> str:
    """PTX of ``kernel``; args not named in ``arg_types`` or ``constants`` are i32 strides divisible by 16."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    names = kernel.arg_names  # type: ignore[attr-defined]
    signature = {name: "constexpr" if name in constants else arg_types.get(name, "i32") for name in names}
    divisible = {(index,): [["tt.divisibility", 16]] for index, name in enumerate(names)
                 if signature[name] != "constexpr" and name not in not_divisible and signature[name][0] in "*i"}
    target = GPUTarget(*HOPPER)
    options = make_backend(target).parse_options({"num_warps": num_warps, "num_stages": num_stages,
                                                  "enable_fp_fusion": True})
    source = ASTSource(fn=kernel, signature=signature, constexprs=dict(constants), attrs=divisible)
    return triton.compile(source, target=target, options=options.__dict__).asm["ptx"]


def _unit_strides(*names: str) -> dict[str, object]:
    return {name: 1 for name in names}


def test_the_attention_kernel_compiles_to_tensor_core_code_with_vector_loads() -> None:
    from services.gpu_worker.kernels import triton_attention

    tensors = ("q_ptr", "k_chunk_ptr", "v_chunk_ptr", "k_pool_ptr", "v_pool_ptr", "out_ptr")
    arg_types = {name: "*bf16" for name in tensors} | {"slots_ptr": "*i64", "cache_lens_ptr": "*i64",
                                                       "qk_scale_log2": "fp32"}
    tiles = triton_attention.attention_tiles(128, torch.bfloat16)
    constants = {"HEAD_DIM": 128, "BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n, "BLOCK_D": 128,
                 "DOT_PRECISION": "tf32"} | _unit_strides(
        "stride_qd", "stride_kcd", "stride_vcd", "stride_kpd", "stride_vpd", "stride_od")
    ptx = _compile_for_hopper(triton_attention._varlen_attention_kernel, arg_types, constants,
                              {"chunk_len", "heads"}, tiles.num_warps, tiles.num_stages)
    assert "wgmma.mma_async" in ptx
    assert "cp.async" in ptx
    assert not SCALAR_16BIT_ACCESS.search(ptx)


def test_the_norm_kernel_compiles_with_vector_loads() -> None:
    from services.gpu_worker.kernels import triton_norm

    arg_types = {"x_ptr": "*bf16", "shift_ptr": "*fp32", "scale_ptr": "*fp32", "out_ptr": "*fp32", "eps": "fp32"}
    constants = {"BLOCK_D": 2048} | _unit_strides("stride_xd", "stride_shift_d", "stride_scale_d", "stride_od")
    ptx = _compile_for_hopper(triton_norm._norm_modulate_kernel, arg_types, constants, {"tokens_per_session"}, 8, 1)
    assert VECTOR_ACCESS.search(ptx) and not SCALAR_16BIT_ACCESS.search(ptx)


def test_the_rope_kernel_compiles_with_vector_loads() -> None:
    from services.gpu_worker.kernels import triton_rope

    arg_types = {"x_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32"}
    constants = {"PAIRS": 64, "BLOCK_H": 16, "BLOCK_P": 64} | _unit_strides("stride_xd", "stride_cos_p", "stride_sin_p")
    ptx = _compile_for_hopper(triton_rope._rope_kernel, arg_types, constants, {"heads"}, 4, 1)
    assert VECTOR_ACCESS.search(ptx) and not SCALAR_16BIT_ACCESS.search(ptx)


def test_the_pack_kernel_compiles_with_vector_loads() -> None:
    from services.gpu_worker.kernels import triton_pack

    arg_types = {"pool_table_ptr": "*i64", "buf_ptr": "*bf16", "slot_offset": "i64"}
    constants = {"ROW_ELEMS": 1536, "BLOCK_T": 2, "BLOCK_C": 2048}
    ptx = _compile_for_hopper(triton_pack._copy_slot_kernel, arg_types, constants, set(), 8, 1)
    assert VECTOR_ACCESS.search(ptx) and not SCALAR_16BIT_ACCESS.search(ptx)
