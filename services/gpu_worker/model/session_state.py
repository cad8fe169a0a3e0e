"""A session's state as the named tensors ``export_state`` returns and ``import_state`` accepts, with validation.

Names and layouts (L layers, R valid cache rows, T text tokens, H heads, D head dim):
``kv`` [L, 2, R, H, D] model dtype (``kernels.pack_kv`` layout, R = rows valid after ``chunk_index`` chunks);
``cross_kv`` [L, 2, T, H, D] model dtype (the prompt's cross-attention K/V);
``cache_latents`` [R / chunk_tokens, C, F, h, w] model dtype (the clean latents of the cached chunks, same layout);
``vae_cache.NNN`` the VAE decoder's causal feature cache, one tensor per causal conv, absent before the first
chunk; ``chunk_index`` [] int64 (next chunk); ``rng_state`` uint8 (``torch.Generator.get_state()``, CPU);
``seed`` [] int64.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from services.gpu_worker.model.config import ModelConfig
from services.gpu_worker.model.errors import StateMismatch
from services.gpu_worker.model.kv_cache import CacheLayout

STATE_NAMES = ("kv", "cross_kv", "cache_latents", "chunk_index", "rng_state", "seed")
VAE_CACHE_PREFIX = "vae_cache."


def vae_cache_name(index: int) -> str:
    return f"{VAE_CACHE_PREFIX}{index:03d}"


@dataclass(frozen=True, slots=True)
class SessionState:
    """Validated, device-agnostic view of one exported session."""

    kv: torch.Tensor
    cross_kv: torch.Tensor
    cache_latents: torch.Tensor
    vae_cache: list[torch.Tensor] | None
    chunk_index: int
    rng_state: torch.Tensor
    seed: int

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {
            "kv": self.kv,
            "cross_kv": self.cross_kv,
            "cache_latents": self.cache_latents,
            "chunk_index": torch.tensor(self.chunk_index, dtype=torch.int64),
            "rng_state": self.rng_state,
            "seed": torch.tensor(self.seed, dtype=torch.int64),
        }
        for index, entry in enumerate(self.vae_cache or ()):
            tensors[vae_cache_name(index)] = entry
        return tensors

    @classmethod
    def from_tensors(cls, config: ModelConfig, vae_cache_shapes: Sequence[tuple[int, ...]],
                     tensors: Mapping[str, torch.Tensor]) -> SessionState:
        """Check every name, shape and dtype against ``config``; raises ``StateMismatch`` naming the first misfit."""
        missing = [name for name in STATE_NAMES if name not in tensors]
        if missing:
            raise StateMismatch(f"state is missing {missing}")
        chunk_index = _scalar(tensors, "chunk_index")
        if chunk_index < 0:
            raise StateMismatch(f"chunk_index={chunk_index} must be >= 0")
        d = config.dit
        rows = CacheLayout(config).valid_rows(chunk_index)
        expected: dict[str, tuple[int, ...]] = {
            "kv": (d.num_layers, 2, rows, d.num_heads, d.head_dim),
            "cross_kv": (d.num_layers, 2, d.text_len, d.num_heads, d.head_dim),
            "cache_latents": (rows // config.chunk_tokens, d.in_dim, config.stream.frames_per_chunk,
                              config.stream.latent_height, config.stream.latent_width),
        }
        vae_names = sorted(name for name in tensors if name.startswith(VAE_CACHE_PREFIX))
        wanted_vae = [vae_cache_name(i) for i in range(len(vae_cache_shapes))] if chunk_index > 0 else []
        if vae_names != wanted_vae:
            raise StateMismatch(f"state at chunk {chunk_index} has {len(vae_names)} VAE cache tensors; config "
                                f"{config.name!r} needs {len(wanted_vae)}")
        expected.update({vae_cache_name(i): shape for i, shape in enumerate(vae_cache_shapes) if wanted_vae})
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise StateMismatch(f"{name} has shape {tuple(tensors[name].shape)}, config {config.name!r} "
                                    f"needs {shape}")
        if tensors["rng_state"].dtype != torch.uint8:
            raise StateMismatch("rng_state must be uint8")
        return cls(
            kv=tensors["kv"],
            cross_kv=tensors["cross_kv"],
            cache_latents=tensors["cache_latents"],
            vae_cache=[tensors[name] for name in wanted_vae] if wanted_vae else None,
            chunk_index=chunk_index,
            rng_state=tensors["rng_state"].cpu(),
            seed=_scalar(tensors, "seed"),
        )


def _scalar(tensors: Mapping[str, torch.Tensor], name: str) -> int:
    value = tensors[name]
    if value.numel() != 1 or value.dtype != torch.int64:
        raise StateMismatch(f"{name} must be a one-element int64 tensor, got {value.dtype} {tuple(value.shape)}")
    return int(value.item())
