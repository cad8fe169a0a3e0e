"""The Triton fused LayerNorm + modulation equals the torch reference in fp32 under the Triton interpreter.

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


def _triton_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    from services.gpu_worker.kernels import triton_norm

    return triton_norm.norm_modulate(x, shift, scale, eps)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 3),
    tokens=st.integers(0, 4),
    width=st.integers(1, 70),
    eps=st.sampled_from([1e-6, 1e-5, 1e-2]),
    modulation_from_one_tensor=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_the_kernel_matches_the_reference_over_random_shapes(
    batch: int, tokens: int, width: int, eps: float, modulation_from_one_tensor: bool, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, width, generator=generator) * 3 + 1
    if modulation_from_one_tensor:  # Wan slices shift/scale/gate out of one [B, 6, D] tensor: strided rows
        shift, scale = torch.randn(batch, 6, width, generator=generator).unbind(1)[:2]
    else:
        shift, scale = torch.randn(batch, width, generator=generator), torch.randn(batch, width, generator=generator)
    expected = reference.norm_modulate(x, shift, scale, eps)
    actual = _triton_norm_modulate(x, shift, scale, eps)
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-5)


def test_each_session_gets_its_own_modulation() -> None:
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(1))
    shift = torch.stack([torch.zeros(16), torch.full((16,), 5.0)])
    scale = torch.stack([torch.zeros(16), torch.ones(16)])
    out = _triton_norm_modulate(x, shift, scale, 1e-6)
    normed = torch.nn.functional.layer_norm(x, (16,), eps=1e-6)
    torch.testing.assert_close(out[0], normed[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], normed[1] * 2 + 5, atol=1e-5, rtol=1e-5)


def test_a_modulation_shaped_for_another_batch_is_rejected() -> None:
    x = torch.randn(2, 3, 8)
    with pytest.raises(KernelInputError, match="shift"):
        _triton_norm_modulate(x, torch.zeros(3, 8), torch.zeros(2, 8), 1e-6)
