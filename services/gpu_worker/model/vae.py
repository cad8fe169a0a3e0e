"""Chunk-by-chunk decoding with ``diffusers``' ``AutoencoderKLWan``, each session carrying its own causal cache.

Wan's decoder is causal in time: every causal 3D conv keeps the last two frames of its input (the feature cache),
and decoding latent frames one at a time with that cache carried along is how the library decodes a whole video.
We drive the library's own decoder the same way, but keep one cache per session and carry it across chunks, so
a stream decodes exactly as the whole latent video would in one ``decode``. The cache is part of a session's
state: exported, offloaded, migrated and snapshotted like its KV cache, and much larger at full resolution.

Sessions at their first chunk have no cache yet and those past it have a full one (a chunk has at least two
latent frames), so a batch decodes as at most two groups, each one batched forward per latent frame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from services.gpu_worker.model.config import ModelConfig, VaeConfig

VaeCache = list[torch.Tensor]
"""One session's decoder feature cache: per causal conv, [channels, 2, height, width] (no batch dim)."""


def build_vae(config: VaeConfig) -> AutoencoderKLWan:
    return AutoencoderKLWan(
        base_dim=config.base_dim, z_dim=config.z_dim, dim_mult=list(config.dim_mult),
        num_res_blocks=config.num_res_blocks, temperal_downsample=list(config.temperal_downsample),
    )


class StreamingVaeDecoder:
    """Decodes [B, C, F, h, w] latent chunks to uint8 frames, one feature cache per session."""

    def __init__(self, vae: AutoencoderKLWan) -> None:
        self.vae = vae
        self._conv_count = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        """An upper bound on the entries the decoder uses (1x1 shortcut convs take none), as diffusers sizes it."""
        latent_mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32)
        latent_std = torch.tensor(vae.config.latents_std, dtype=torch.float32)
        param = next(vae.parameters())
        # Channels-last activations make the decoder's many RMS norms (over channels) contiguous reductions and
        # let oneDNN run the 3D convs: a batch of 8 decodes twice as fast on a CPU; on CUDA cuDNN picks its own.
        self._memory_format = torch.channels_last_3d if param.device.type == "cpu" else torch.contiguous_format
        for weight in vae.decoder.parameters():
            if weight.dim() == 5:
                weight.data = weight.data.contiguous(memory_format=self._memory_format)
        self._mean = latent_mean.view(1, -1, 1, 1, 1).to(param.device)
        self._std = latent_std.view(1, -1, 1, 1, 1).to(param.device)

    def decode(self, latents: torch.Tensor, caches: Sequence[VaeCache | None]) -> tuple[list[torch.Tensor],
                                                                                       list[VaeCache]]:
        """Per session, uint8 frames [T, H, W, 3] (T = 1 + 4 (F - 1) for a first chunk, else 4 F) and its new cache.

        ``caches[b]`` is None for a session's first chunk. Latents are the DiT's normalized ones; Wan's per-channel
        mean and std undo the normalization before the decoder, as the Wan pipelines do.
        """
        frames: list[torch.Tensor | None] = [None] * len(caches)
        new_caches: list[VaeCache | None] = [None] * len(caches)
        for fresh in (True, False):
            rows = [b for b, cache in enumerate(caches) if (cache is None) == fresh]
            if not rows:
                continue
            stacked = None if fresh else [
                torch.stack([caches[b][i] for b in rows]).contiguous(memory_format=self._memory_format)  # type: ignore[index]
                for i in range(len(caches[rows[0]]))  # type: ignore[arg-type]
            ]
            group_frames, group_cache = self._decode_group(latents[rows], stacked)
            for position, b in enumerate(rows):
                frames[b] = group_frames[position]
                new_caches[b] = [entry[position] for entry in group_cache]  # views: next chunk stacks them anyway
        return [f for f in frames if f is not None], [c for c in new_caches if c is not None]

    def _decode_group(self, latents: torch.Tensor, cache: list[torch.Tensor] | None) -> tuple[torch.Tensor,
                                                                                              list[torch.Tensor]]:
        used = len(cache) if cache is not None else 0
        feat_cache: list[torch.Tensor | str | None] = [*(cache or ()), *[None] * (self._conv_count - used)]
        z = latents.to(self._std.dtype) * self._std + self._mean
        x = self.vae.post_quant_conv(z.to(latents.dtype)).contiguous(memory_format=self._memory_format)
        outputs = []
        for frame in range(x.shape[2]):
            feat_idx = [0]
            outputs.append(self.vae.decoder(x[:, :, frame:frame + 1], feat_cache=feat_cache, feat_idx=feat_idx,
                                            first_chunk=cache is None and frame == 0))
            used = feat_idx[0]
        feat_cache = feat_cache[:used]
        video = torch.cat(outputs, dim=2).clamp(-1.0, 1.0)  # [B, 3, T, H, W] in [-1, 1]
        pixels = ((video.float() + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()
        if any(not isinstance(entry, torch.Tensor) for entry in feat_cache):
            raise RuntimeError("the VAE cache is not whole after a chunk; frames_per_chunk must be >= 2")
        return pixels, [entry for entry in feat_cache if isinstance(entry, torch.Tensor)]


def vae_cache_bytes(config: ModelConfig, element_bytes: int) -> int:
    """One session's decoder cache at ``element_bytes`` per value (2 for bf16)."""
    return sum(element_bytes * math.prod(shape) for shape in vae_cache_shapes(config))


def vae_cache_shapes(config: ModelConfig) -> list[tuple[int, ...]]:
    """Shapes of one session's cache entries, found by decoding two latent frames on the meta device."""
    with torch.device("meta"):
        decoder = StreamingVaeDecoder(build_vae(config.vae))
        latents = torch.zeros(1, config.vae.z_dim, 2, config.stream.latent_height, config.stream.latent_width)
        _, caches = decoder.decode(latents, [None])
    return [tuple(entry.shape) for entry in caches[0]]
