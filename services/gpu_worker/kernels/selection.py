"""Which implementation runs an op: Triton on CUDA tensors when it imports, the torch reference otherwise.

``TURBOSERVE_KERNELS`` is read on every call so a test or an operator can flip it without a restart:

* ``auto`` (default): Triton for CUDA tensors when ``triton`` imports, torch for everything else. A machine
  without a GPU therefore behaves exactly as before the kernels existed.
* ``torch``: always the reference.
* ``triton``: always Triton; CPU tensors are accepted only under ``TRITON_INTERPRET=1`` (the test path), and a
  missing ``triton`` is an error rather than a silent fallback.
"""

from __future__ import annotations

import enum
import functools
import importlib.util
import os

import torch

from services.gpu_worker.kernels.errors import KernelSelectionError

BACKEND_ENV = "TURBOSERVE_KERNELS"
INTERPRET_ENV = "TRITON_INTERPRET"


class KernelBackend(enum.StrEnum):
    """The values ``TURBOSERVE_KERNELS`` accepts."""

    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"


def requested_backend() -> KernelBackend:
    """The backend ``TURBOSERVE_KERNELS`` asks for; unset or empty means ``auto``."""
    raw = os.environ.get(BACKEND_ENV, "").strip().lower() or KernelBackend.AUTO.value
    try:
        return KernelBackend(raw)
    except ValueError:
        known = ", ".join(backend.value for backend in KernelBackend)
        raise KernelSelectionError(f"{BACKEND_ENV}={raw!r} is not one of: {known}") from None


@functools.cache
def triton_importable() -> bool:
    """Whether the ``triton`` package is installed; looked up once, without importing it."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels on the host (``TRITON_INTERPRET=1``), which makes CPU tensors valid inputs."""
    return os.environ.get(INTERPRET_ENV, "").strip().lower() in {"1", "true", "on", "yes"}


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether the op whose main operand is ``tensor`` should run as a Triton kernel.

    Raises ``KernelSelectionError`` when ``TURBOSERVE_KERNELS=triton`` cannot be honoured, so a forced
    choice never degrades silently to the reference.
    """
    backend = requested_backend()
    if backend is KernelBackend.TORCH:
        return False
    if backend is KernelBackend.AUTO:
        return tensor.is_cuda and triton_importable()
    if not triton_importable():
        raise KernelSelectionError(f"{BACKEND_ENV}=triton but the triton package is not installed")
    if not tensor.is_cuda and not interpreter_enabled():
        raise KernelSelectionError(
            f"{BACKEND_ENV}=triton on {tensor.device.type} tensors needs {INTERPRET_ENV}=1 before triton is imported"
        )
    return True
