"""The reusable host buffer pool."""

from __future__ import annotations

import pytest
import torch

from services.gpu_worker.state.host_pool import HostBufferPool, size_class_bytes


def test_small_requests_round_to_powers_of_two_and_large_ones_to_2_mib_steps() -> None:
    assert size_class_bytes(1) == 4096
    assert size_class_bytes(5000) == 8192
    assert size_class_bytes(2 << 20) == 2 << 20
    assert size_class_bytes((2 << 20) + 1) == 4 << 20
    assert size_class_bytes((7 << 20) - 5) == 8 << 20


def test_a_released_buffer_is_handed_out_again_even_for_another_dtype() -> None:
    pool = HostBufferPool(max_cached_bytes=1 << 24, pin_memory=False)
    first = pool.acquire(torch.float32, 1000)
    pointer = first.data_ptr()
    pool.release(first)
    assert pool.cached_bytes == 4096
    second = pool.acquire(torch.bfloat16, 2000)
    assert second.data_ptr() == pointer and second.dtype == torch.bfloat16 and second.numel() == 2000
    assert pool.cached_bytes == 0 and pool.lent_bytes == 4096


def test_buffers_past_the_cache_limit_are_dropped_on_release() -> None:
    pool = HostBufferPool(max_cached_bytes=4096, pin_memory=False)
    kept, dropped = pool.acquire(torch.uint8, 4096), pool.acquire(torch.uint8, 4096)
    pool.release(kept)
    pool.release(dropped)
    assert pool.cached_bytes == 4096
    assert pool.trim() == 4096 and pool.cached_bytes == 0


def test_releasing_a_tensor_the_pool_did_not_lend_is_refused() -> None:
    pool = HostBufferPool(max_cached_bytes=1 << 20, pin_memory=False)
    with pytest.raises(ValueError, match="not acquired"):
        pool.release(torch.empty(10))
    lent = pool.acquire(torch.uint8, 10)
    pool.release(lent)
    with pytest.raises(ValueError, match="already released"):
        pool.release(lent)


def test_the_pool_pins_only_when_cuda_is_present() -> None:
    assert HostBufferPool(max_cached_bytes=0).pinned == torch.cuda.is_available()
