"""Seeded random weights: every process (and every device) builds bit-identical parameters from the config seed.

Each parameter draws from its own CPU generator seeded by (config seed, crc32 of its name), so the values do not
depend on creation order or device, and sessions can migrate between workers that built the model separately.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn


def _draw(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def init_seeded_(module: nn.Module, seed: int) -> None:
    """Fill every parameter in place by its name: biases 0, ``norm_weight`` 1, embedding ``table`` N(0, 1),
    adaLN ``modulation`` N(0, 1/dim) (as Wan initialises it), every other matrix N(0, 1/fan_in)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias":
                value = torch.zeros(param.shape)
            elif leaf == "norm_weight":
                value = torch.ones(param.shape)
            elif leaf == "table":
                value = _draw(name, param.shape, seed)
            elif leaf == "modulation":
                value = _draw(name, param.shape, seed) / param.shape[-1] ** 0.5
            elif param.dim() >= 2:
                fan_in = param[0].numel()
                value = _draw(name, param.shape, seed) / fan_in**0.5
            else:
                raise ValueError(f"no seeded init rule for parameter {name!r} of shape {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))
