"""Reusable host buffers for offloaded state: pinned when CUDA is present, recycled by size class.

Reuse matters twice: pinning is slow (a page-locking syscall per allocation), and even unpinned, a fresh buffer
pays a page fault per 4 KiB on first write, which halves copy throughput. Buffers go back to a free list on
release and are kept up to ``max_cached_bytes``; past that they are dropped.
"""

from __future__ import annotations

import threading

import torch

MIB = 1 << 20
SMALL_CLASS_MIN_BYTES = 4096
LARGE_CLASS_STEP_BYTES = 2 * MIB


def size_class_bytes(nbytes: int) -> int:
    """Capacity a request of ``nbytes`` is rounded up to: powers of two below 2 MiB, multiples of 2 MiB above."""
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    if nbytes <= LARGE_CLASS_STEP_BYTES:
        return max(SMALL_CLASS_MIN_BYTES, 1 << max(0, nbytes - 1).bit_length())
    return -(-nbytes // LARGE_CLASS_STEP_BYTES) * LARGE_CLASS_STEP_BYTES


class HostBufferPool:
    """Hands out 1-D host tensors of any dtype backed by recycled byte buffers; thread-safe."""

    def __init__(self, *, max_cached_bytes: int, pin_memory: bool | None = None) -> None:
        if max_cached_bytes < 0:
            raise ValueError(f"max_cached_bytes must be >= 0, got {max_cached_bytes}")
        self._max_cached_bytes = max_cached_bytes
        self._pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._free: dict[int, list[torch.Tensor]] = {}
        self._lent: dict[int, torch.Tensor] = {}
        self._cached_bytes = 0
        self._lock = threading.Lock()

    @property
    def pinned(self) -> bool:
        return self._pin_memory

    @property
    def cached_bytes(self) -> int:
        """Bytes held in free lists, ready for reuse."""
        return self._cached_bytes

    @property
    def lent_bytes(self) -> int:
        """Capacity of the buffers currently handed out."""
        with self._lock:
            return sum(raw.numel() for raw in self._lent.values())

    def acquire(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """A 1-D ``dtype`` tensor of ``numel`` elements; its contents are whatever the last user left."""
        if numel < 0:
            raise ValueError(f"numel must be >= 0, got {numel}")
        capacity = size_class_bytes(numel * dtype.itemsize)
        with self._lock:
            free = self._free.get(capacity)
            if free:
                raw = free.pop()
                self._cached_bytes -= capacity
            else:
                raw = torch.empty(capacity, dtype=torch.uint8, pin_memory=self._pin_memory)
            self._lent[raw.data_ptr()] = raw
        return raw[: numel * dtype.itemsize].view(dtype)

    def release(self, tensor: torch.Tensor) -> None:
        """Return a tensor from ``acquire``; the caller must have no copy still reading or writing it."""
        with self._lock:
            raw = self._lent.pop(tensor.untyped_storage().data_ptr(), None)
            if raw is None:
                raise ValueError("tensor was not acquired from this pool (or was already released)")
            capacity = raw.numel()
            if self._cached_bytes + capacity <= self._max_cached_bytes:
                self._free.setdefault(capacity, []).append(raw)
                self._cached_bytes += capacity

    def trim(self) -> int:
        """Drop every cached free buffer (e.g. under host memory pressure); returns the bytes dropped."""
        with self._lock:
            dropped = self._cached_bytes
            self._free.clear()
            self._cached_bytes = 0
        return dropped
