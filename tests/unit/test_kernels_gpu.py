"""On a real GPU: the compiled kernels agree with the torch reference in bf16, and varlen attention is faster.

Skipped on hosts without CUDA and inside the interpreter subprocess (its kernels would run on the host).
"""

from __future__ import annotations

import pytest
import torch

from services.gpu_worker import kernels
from services.gpu_worker.kernels import reference
from services.gpu_worker.kernels.selection import interpreter_enabled

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(interpreter_enabled(), reason="TRITON_INTERPRET=1 would run the kernels on the host"),
]

BF16_ATOL = 3e-2
BF16_RTOL = 3e-2


@pytest.fixture(autouse=True)
def auto_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURBOSERVE_KERNELS", "auto")


def _attention_inputs(batch: int, chunk_len: int, heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
                      cache_lens: list[int]) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, chunk_len, heads, head_dim, device="cuda", dtype=dtype, generator=generator)
               for _ in range(3))
    k_pool, v_pool = (torch.randn(batch + 1, capacity, heads, head_dim, device="cuda", dtype=dtype,
                                  generator=generator) for _ in range(2))
    slots = torch.arange(batch, 0, -1, device="cuda")
    return q, k, v, k_pool, v_pool, slots, torch.tensor(cache_lens, device="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_on_the_gpu_matches_the_reference_for_a_mixed_batch(dtype: torch.dtype) -> None:
    inputs = _attention_inputs(4, 300, 4, 128, 700, dtype, [0, 700, 333, 64])
    actual = kernels.varlen_attention(*inputs)
    expected = reference.varlen_attention(*(t.float() if t.is_floating_point() else t for t in inputs))
    tolerance = (BF16_ATOL, BF16_RTOL) if dtype == torch.bfloat16 else (2e-4, 2e-4)
    torch.testing.assert_close(actual.float(), expected, atol=tolerance[0], rtol=tolerance[1])


def test_norm_modulate_on_the_gpu_matches_the_reference_with_fp32_modulation() -> None:
    x = torch.randn(3, 257, 1536, device="cuda", dtype=torch.bfloat16)
    shift, scale = torch.randn(3, 1536, device="cuda"), torch.randn(3, 1536, device="cuda")
    actual = kernels.norm_modulate(x, shift, scale)
    expected = reference.norm_modulate(x, shift, scale)
    assert actual.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(actual, expected, atol=BF16_ATOL, rtol=BF16_RTOL)


def test_rope_on_the_gpu_matches_the_reference_in_bf16() -> None:
    x = torch.randn(513, 12, 128, device="cuda", dtype=torch.bfloat16)
    angles = torch.rand(513, 64, device="cuda") * 6.3
    expected = reference.rope_(x.clone(), angles.cos(), angles.sin())
    kernels.rope_(x, angles.cos(), angles.sin())
    torch.testing.assert_close(x, expected, atol=BF16_ATOL, rtol=BF16_RTOL)


def test_pack_on_the_gpu_is_exact_in_bf16() -> None:
    k_pools = [torch.randn(3, 500, 12, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    v_pools = [torch.randn(3, 500, 12, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    size = 8 * 321 * 12 * 128
    packed = kernels.pack_kv(k_pools, v_pools, 2, 321, torch.empty(size, device="cuda", dtype=torch.bfloat16))
    assert torch.equal(packed, reference.pack_kv(k_pools, v_pools, 2, 321, torch.empty_like(packed)))


def test_varlen_attention_beats_the_padded_reference_at_wan_shapes_with_mixed_cache_lengths() -> None:
    from triton.testing import do_bench

    from services.gpu_worker.model.config import get_config

    config = get_config("longlive")
    chunk = config.chunk_tokens
    cache_lens = [chunk, 2 * chunk, 3 * chunk, config.cache_capacity_tokens]
    inputs = _attention_inputs(4, chunk, config.dit.num_heads, config.dit.head_dim, config.cache_capacity_tokens,
                               torch.bfloat16, cache_lens)
    kernel_ms = do_bench(lambda: kernels.varlen_attention(*inputs))
    reference_ms = do_bench(lambda: reference.varlen_attention(*inputs))
    assert kernel_ms < reference_ms, f"kernel {kernel_ms:.2f} ms vs padded reference {reference_ms:.2f} ms"
