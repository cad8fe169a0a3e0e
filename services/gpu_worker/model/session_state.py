"""A session's state as the named tensors ``export_state`` returns and ``import_state`` accepts, with validation.

Names and layouts (L layers, R valid cache rows, T text tokens, H heads, D head dim, C latent channels):
``kv`` [L, 2, R, H, D] model dtype (``kernels.pack_kv`` layout, R = rows valid after ``chunk_index`` chunks);
``cross_kv`` [L, 2, T, H, D] model dtype; ``prompt_tokens`` [T] int64;
``prompt_waves`` [C, waves, 4] float32 (the prompt's prior parameters);
``decoder_latent`` [C, h, w] model dtype (last clean latent frame); ``chunk_index`` [] int64 (next chunk);
``rng_state`` uint8 (``torch.Generator.get_state()``, CPU); ``seed`` [] int64.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from services.gpu_worker.model.config import ModelConfig
from services.gpu_worker.model.errors import StateMismatch
from services.gpu_worker.model.kv_cache import CacheLayout
from services.gpu_worker.model.prior import PARAMS_PER_WAVE, WAVES_PER_CHANNEL

STATE_NAMES = (
    "kv", "cross_kv", "prompt_tokens", "prompt_waves", "decoder_latent", "chunk_index", "rng_state", "seed",
)


@dataclass(frozen=True, slots=True)
class SessionState:
    """Validated, device-agnostic view of one exported session."""

    kv: torch.Tensor
    cross_kv: torch.Tensor
    prompt_tokens: torch.Tensor
    prompt_waves: torch.Tensor
    decoder_latent: torch.Tensor
    chunk_index: int
    rng_state: torch.Tensor
    seed: int

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "kv": self.kv,
            "cross_kv": self.cross_kv,
            "prompt_tokens": self.prompt_tokens,
            "prompt_waves": self.prompt_waves,
            "decoder_latent": self.decoder_latent,
            "chunk_index": torch.tensor(self.chunk_index, dtype=torch.int64),
            "rng_state": self.rng_state,
            "seed": torch.tensor(self.seed, dtype=torch.int64),
        }

    @classmethod
    def from_tensors(cls, config: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> SessionState:
        """Check every name, shape and dtype against ``config``; raises ``StateMismatch`` naming the first misfit."""
        missing = [name for name in STATE_NAMES if name not in tensors]
        if missing:
            raise StateMismatch(f"state is missing {missing}")
        chunk_index = _scalar(tensors, "chunk_index")
        if chunk_index < 0:
            raise StateMismatch(f"chunk_index={chunk_index} must be >= 0")
        rows = CacheLayout(config).valid_rows(chunk_index)
        c = config
        expected = {
            "kv": (c.layers, 2, rows, c.heads, c.head_dim),
            "cross_kv": (c.layers, 2, c.text_len, c.heads, c.head_dim),
            "prompt_tokens": (c.text_len,),
            "prompt_waves": (c.latent_channels, WAVES_PER_CHANNEL, PARAMS_PER_WAVE),
            "decoder_latent": (c.latent_channels, c.latent_height, c.latent_width),
        }
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise StateMismatch(f"{name} has shape {tuple(tensors[name].shape)}, config {c.name!r} needs {shape}")
        if tensors["prompt_tokens"].dtype != torch.int64 or tensors["rng_state"].dtype != torch.uint8:
            raise StateMismatch("prompt_tokens must be int64 and rng_state uint8")
        return cls(
            kv=tensors["kv"],
            cross_kv=tensors["cross_kv"],
            prompt_tokens=tensors["prompt_tokens"].cpu(),
            prompt_waves=tensors["prompt_waves"],
            decoder_latent=tensors["decoder_latent"],
            chunk_index=chunk_index,
            rng_state=tensors["rng_state"].cpu(),
            seed=_scalar(tensors, "seed"),
        )


def _scalar(tensors: Mapping[str, torch.Tensor], name: str) -> int:
    value = tensors[name]
    if value.numel() != 1 or value.dtype != torch.int64:
        raise StateMismatch(f"{name} must be a one-element int64 tensor, got {value.dtype} {tuple(value.shape)}")
    return int(value.item())
