"""The Triton KV pack kernel equals the torch reference bit for bit under the Triton interpreter.

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


def _pools(generator: torch.Generator, layers: int, shape: tuple[int, int, int, int],
           token_stride_padded: bool) -> list[torch.Tensor]:
    """Random per-layer pools; padded ones are views whose token stride exceeds H * D (rows still contiguous)."""
    if token_stride_padded:
        slots, capacity, heads, head_dim = shape
        return [torch.randn(slots, capacity, 2, heads, head_dim, generator=generator)[:, :, 0] for _ in range(layers)]
    return [torch.randn(*shape, generator=generator) for _ in range(layers)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.integers(1, 3),
    pool_slots=st.integers(1, 3),
    capacity=st.integers(1, 10),
    heads=st.integers(1, 3),
    head_dim=st.integers(1, 8),
    token_stride_padded=st.booleans(),
    spare_elements=st.integers(0, 7),
    data=st.data(),
)
def test_pack_matches_the_reference_and_writes_nothing_past_the_packed_rows(
    layers: int, pool_slots: int, capacity: int, heads: int, head_dim: int, token_stride_padded: bool,
    spare_elements: int, data: st.DataObject,
) -> None:
    from services.gpu_worker.kernels import triton_pack

    slot = data.draw(st.integers(0, pool_slots - 1))
    n_tokens = data.draw(st.one_of(st.just(0), st.just(capacity), st.integers(0, capacity)))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    shape = (pool_slots, capacity, heads, head_dim)
    k_pools = _pools(generator, layers, shape, token_stride_padded)
    v_pools = _pools(generator, layers, shape, token_stride_padded)
    size = 2 * layers * n_tokens * heads * head_dim + spare_elements
    expected = reference.pack_kv(k_pools, v_pools, slot, n_tokens, torch.full((size,), -1.0))
    packed = triton_pack.pack_kv(k_pools, v_pools, slot, n_tokens, torch.full((size,), -1.0))
    assert torch.equal(packed, expected)
    assert bool((packed[size - spare_elements :] == -1.0).all())


def test_a_token_count_beyond_the_capacity_is_rejected() -> None:
    from services.gpu_worker.kernels import triton_pack

    pools = [torch.zeros(2, 4, 1, 2)]
    with pytest.raises(KernelInputError, match="n_tokens"):
        triton_pack.pack_kv(pools, pools, 0, 5, torch.zeros(64))


def test_a_buffer_too_small_for_every_layer_is_rejected() -> None:
    from services.gpu_worker.kernels import triton_pack

    pools = [torch.zeros(2, 4, 1, 2), torch.zeros(2, 4, 1, 2)]
    with pytest.raises(KernelInputError, match="buffer holds 31"):
        triton_pack.pack_kv(pools, pools, 1, 4, torch.zeros(31))


def test_pools_whose_token_rows_are_not_contiguous_are_rejected() -> None:
    from services.gpu_worker.kernels import triton_pack

    pools = [torch.zeros(2, 4, 2, 3).transpose(2, 3)]
    with pytest.raises(KernelInputError, match="contiguous"):
        triton_pack.pack_kv(pools, pools, 0, 4, torch.zeros(48))
