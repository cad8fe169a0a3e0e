"""The Triton varlen attention kernel equals the torch reference in fp32 under the Triton interpreter.

Runs in-process only when TRITON_INTERPRET=1 was set before triton was imported; in a plain test run
``test_kernels_interpreted.py`` starts a subprocess that does exactly that.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.gpu_worker.kernels import reference
from services.gpu_worker.kernels.errors import KernelInputError
from services.gpu_worker.kernels.selection import interpreter_enabled

pytestmark = pytest.mark.skipif(
    not interpreter_enabled(), reason="needs TRITON_INTERPRET=1 from process start; test_kernels_interpreted runs it"
)

ATOL = 2e-5
RTOL = 1e-4


def _triton_varlen_attention(*args: torch.Tensor) -> torch.Tensor:
    from services.gpu_worker.kernels import triton_attention

    return triton_attention.varlen_attention(*args)


def _random_case(
    generator: torch.Generator, batch: int, chunk_len: int, heads: int, head_dim: int, pool_slots: int,
    capacity: int, *, fused_qkv: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v for a chunk (strided views of one fused projection when ``fused_qkv``) and the two pools."""
    if fused_qkv:
        qkv = torch.randn(batch, chunk_len, 3, heads, head_dim, generator=generator)
        q, k, v = qkv.unbind(2)
    else:
        q, k, v = (torch.randn(batch, chunk_len, heads, head_dim, generator=generator) for _ in range(3))
    k_pool = torch.randn(pool_slots, capacity, heads, head_dim, generator=generator)
    v_pool = torch.randn(pool_slots, capacity, heads, head_dim, generator=generator)
    return q, k, v, k_pool, v_pool


@st.composite
def attention_cases(draw: st.DrawFn) -> dict[str, object]:
    batch = draw(st.integers(1, 3))
    capacity = draw(st.integers(1, 40))
    pool_slots = draw(st.integers(batch, batch + 2))
    full_or_empty_or_any = st.one_of(st.just(0), st.just(capacity), st.integers(0, capacity))
    return {
        "batch": batch,
        "chunk_len": draw(st.integers(1, 20)),
        "heads": draw(st.integers(1, 2)),
        "head_dim": draw(st.integers(1, 24)),
        "pool_slots": pool_slots,
        "capacity": capacity,
        "slots": draw(st.permutations(range(pool_slots)))[:batch],
        "cache_lens": draw(st.lists(full_or_empty_or_any, min_size=batch, max_size=batch)),
        "fused_qkv": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=attention_cases())
def test_the_kernel_matches_the_reference_over_random_batches_of_cache_lengths(case: dict) -> None:
    generator = torch.Generator().manual_seed(case["seed"])
    q, k, v, k_pool, v_pool = _random_case(
        generator, case["batch"], case["chunk_len"], case["heads"], case["head_dim"], case["pool_slots"],
        case["capacity"], fused_qkv=case["fused_qkv"],
    )
    slots = torch.tensor(case["slots"], dtype=torch.int32)
    cache_lens = torch.tensor(case["cache_lens"], dtype=torch.int64)
    expected = reference.varlen_attention(q, k, v, k_pool, v_pool, slots, cache_lens)
    actual = _triton_varlen_attention(q, k, v, k_pool, v_pool, slots, cache_lens)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


def test_a_single_session_with_an_empty_window_attends_only_to_its_chunk() -> None:
    generator = torch.Generator().manual_seed(1)
    q, k, v, k_pool, v_pool = _random_case(generator, 1, 17, 2, 16, 1, 8)
    actual = _triton_varlen_attention(q, k, v, k_pool, v_pool, torch.tensor([0]), torch.tensor([0]))
    chunk_only = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    ).transpose(1, 2)
    torch.testing.assert_close(actual, chunk_only, atol=ATOL, rtol=RTOL)


def test_rows_past_each_cache_length_and_other_slots_are_never_read() -> None:
    generator = torch.Generator().manual_seed(2)
    q, k, v, k_pool, v_pool = _random_case(generator, 2, 9, 2, 8, 4, 33)
    slots, cache_lens = torch.tensor([3, 1]), torch.tensor([20, 33])
    expected = _triton_varlen_attention(q, k, v, k_pool, v_pool, slots, cache_lens)
    poisoned_k, poisoned_v = k_pool.clone(), v_pool.clone()
    for pool in (poisoned_k, poisoned_v):
        pool[3, 20:] = float("nan")
        pool[[0, 2]] = float("nan")
    actual = _triton_varlen_attention(q, k, v, poisoned_k, poisoned_v, slots, cache_lens)
    torch.testing.assert_close(actual, expected, atol=0.0, rtol=0.0)


def test_a_wrapped_ring_gives_the_same_output_as_the_unwrapped_cache() -> None:
    generator = torch.Generator().manual_seed(3)
    q, k, v, k_pool, v_pool = _random_case(generator, 2, 5, 1, 12, 2, 24)
    slots, full = torch.tensor([0, 1]), torch.tensor([24, 24])
    in_order = _triton_varlen_attention(q, k, v, k_pool, v_pool, slots, full)
    wrapped = _triton_varlen_attention(q, k, v, k_pool.roll(7, dims=1), v_pool.roll(7, dims=1), slots, full)
    torch.testing.assert_close(wrapped, in_order, atol=ATOL, rtol=RTOL)


def test_a_cache_length_beyond_the_slot_capacity_is_rejected() -> None:
    generator = torch.Generator().manual_seed(4)
    q, k, v, k_pool, v_pool = _random_case(generator, 1, 4, 1, 8, 2, 6)
    with pytest.raises(KernelInputError, match="cache_lens"):
        _triton_varlen_attention(q, k, v, k_pool, v_pool, torch.tensor([1]), torch.tensor([7]))


def test_a_slot_outside_the_pool_is_rejected() -> None:
    generator = torch.Generator().manual_seed(5)
    q, k, v, k_pool, v_pool = _random_case(generator, 1, 4, 1, 8, 2, 6)
    with pytest.raises(KernelInputError, match="slots"):
        _triton_varlen_attention(q, k, v, k_pool, v_pool, torch.tensor([2]), torch.tensor([3]))
