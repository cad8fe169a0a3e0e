"""Launch-side helpers shared by the Triton wrappers: dtype rules and index tensors checked where it is cheap."""

from __future__ import annotations

import torch

from services.gpu_worker.kernels.errors import KernelInputError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 inputs stay IEEE so results match the torch reference, not TF32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def host_checked_index(index: torch.Tensor, name: str, length: int, low: int, high: int,
                       device: torch.device) -> torch.Tensor:
    """``index`` on ``device``, after checking its shape and, if it is on the host, that low <= values <= high.

    Values of a tensor already on a GPU are not read back: that would stall the stream on every call.
    """
    if index.dtype not in INDEX_DTYPES:
        raise KernelInputError(f"{name} must be int32 or int64, got {index.dtype}")
    if index.shape != (length,):
        raise KernelInputError(f"{name} must have shape ({length},), got {tuple(index.shape)}")
    if index.device.type == "cpu" and length:
        out_of_range = (index < low) | (index > high)
        if bool(out_of_range.any()):
            raise KernelInputError(f"{name} values {index[out_of_range].tolist()} are outside [{low}, {high}]")
    return index.to(device, non_blocking=True)
