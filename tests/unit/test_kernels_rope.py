"""The Triton in-place rotary embedding equals the torch reference in fp32 under the Triton interpreter.

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


def _triton_rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    from services.gpu_worker.kernels import triton_rope

    return triton_rope.rope_(x, cos, sin)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tokens=st.integers(0, 12),
    heads=st.integers(1, 5),
    pairs=st.integers(1, 12),
    view_of_fused_qkv=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_the_kernel_matches_the_reference_in_place_over_random_shapes(
    tokens: int, heads: int, pairs: int, view_of_fused_qkv: bool, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    angles = torch.rand(tokens, pairs, generator=generator) * 6.3
    cos, sin = angles.cos(), angles.sin()
    fused = torch.randn(tokens, 3, heads, 2 * pairs, generator=generator)
    x = fused[:, 1] if view_of_fused_qkv else fused[:, 1].contiguous()
    untouched = fused[:, [0, 2]].clone()
    expected = reference.rope_(x.clone(), cos, sin)
    returned = _triton_rope_(x, cos, sin)
    assert returned is x
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(fused[:, [0, 2]], untouched)


def test_a_quarter_turn_maps_each_pair_to_its_perpendicular() -> None:
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    quarter = torch.full((1, 2), torch.pi / 2)
    _triton_rope_(x, quarter.cos(), quarter.sin())
    torch.testing.assert_close(x, torch.tensor([[[-2.0, 1.0, -4.0, 3.0]]]), atol=1e-6, rtol=0.0)


def test_an_odd_head_dim_is_rejected() -> None:
    with pytest.raises(KernelInputError, match="even D"):
        _triton_rope_(torch.zeros(2, 1, 5), torch.zeros(2, 2), torch.zeros(2, 2))
