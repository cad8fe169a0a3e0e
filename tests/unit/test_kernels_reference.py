"""The torch references, the ground truth of every kernel test, agree with independent formulations."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.gpu_worker.kernels import reference


def _attention_one_session_at_a_time(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor,
                                     v_pool: torch.Tensor, slots: list[int], cache_lens: list[int]) -> torch.Tensor:
    """Plain softmax attention per session and head over exactly its valid keys: no padding, no mask."""
    outputs = []
    for b, (slot, cache_len) in enumerate(zip(slots, cache_lens, strict=True)):
        keys = torch.cat([k_pool[slot, :cache_len], k[b]])  # [K, H, D]
        values = torch.cat([v_pool[slot, :cache_len], v[b]])
        scores = torch.einsum("lhd,khd->hlk", q[b], keys) / q.shape[-1] ** 0.5
        outputs.append(torch.einsum("hlk,khd->lhd", scores.softmax(-1), values))
    return torch.stack(outputs)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    chunk_len=st.integers(1, 6),
    capacity=st.integers(1, 9),
    data=st.data(),
)
def test_reference_attention_equals_per_session_softmax_over_the_valid_keys(
    batch: int, chunk_len: int, capacity: int, data: st.DataObject
) -> None:
    slots = data.draw(st.permutations(range(batch)))
    cache_lens = data.draw(st.lists(st.integers(0, capacity), min_size=batch, max_size=batch))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    q, k, v = (torch.randn(batch, chunk_len, 2, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    k_pool, v_pool = (torch.randn(batch, capacity, 2, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    expected = _attention_one_session_at_a_time(q, k, v, k_pool, v_pool, slots, cache_lens)
    actual = reference.varlen_attention(q, k, v, k_pool, v_pool, torch.tensor(slots), torch.tensor(cache_lens))
    torch.testing.assert_close(actual, expected)


def test_reference_rope_is_multiplication_by_a_unit_complex_number() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 8, generator=generator, dtype=torch.float64)
    angles = torch.rand(5, 4, generator=generator, dtype=torch.float64) * 6.3
    rotated = torch.view_as_complex(x.unflatten(-1, (-1, 2))) * torch.polar(torch.ones_like(angles), angles)[:, None]
    expected = torch.view_as_real(rotated).flatten(-2)
    torch.testing.assert_close(reference.rope_(x.clone(), angles.cos(), angles.sin()), expected)


def test_reference_pack_lays_out_layer_then_k_or_v_then_rows() -> None:
    k_pools = [torch.full((2, 3, 1, 2), 10.0 * layer + 1) for layer in range(2)]
    v_pools = [torch.full((2, 3, 1, 2), 10.0 * layer + 2) for layer in range(2)]
    packed = reference.pack_kv(k_pools, v_pools, 1, 2, torch.zeros(17))
    segments = packed[:16].view(2, 2, 4)  # [layer][k|v][n_tokens * H * D]
    assert segments[:, :, 0].tolist() == [[1.0, 2.0], [11.0, 12.0]]
    assert bool((segments == segments[..., :1]).all()) and packed[16] == 0
