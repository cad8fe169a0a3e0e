"""Typed errors of the chunk-path kernels: both mean the caller passed something wrong, neither is transient."""

from __future__ import annotations


class KernelSelectionError(ValueError):
    """``TURBOSERVE_KERNELS`` names an unknown backend, or forces Triton where it cannot run."""


class KernelInputError(ValueError):
    """A Triton kernel was given tensors whose shapes, dtypes, devices or indices do not fit its contract."""
