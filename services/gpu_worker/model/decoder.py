"""A small causal conv decoder from clean latents to uint8 RGB frames: 8x spatial, 4x temporal upsampling.

Each latent frame is decoded spatially, then the 4 video frames it stands for are blended from the previous
decoded frame to this one, so motion is continuous across chunk boundaries. The previous chunk's last latent
frame is the decoder's only state (the role of Wan's causal VAE feature cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.gpu_worker.model.config import VIDEO_FRAMES_PER_LATENT, ModelConfig

_SKIP_GAIN = 1.5
"""Weight of the smooth 1x1 latent->RGB path against the conv stack, so colours follow the latent field."""


class LatentDecoder(nn.Module):
    """Convs at latent, 2x and 4x resolution, then a plain bilinear 2x of the RGB: no conv runs at full size."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c0, c1, c2 = config.decoder_channels
        self.conv_in = nn.Conv2d(config.latent_channels, c0, 3, padding=1)
        self.up1 = nn.Conv2d(c0, c1, 3, padding=1)
        self.up2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.to_rgb = nn.Conv2d(c2, 3, 3, padding=1)
        self.skip = nn.Conv2d(config.latent_channels, 3, 1)
        # Channels-last skips a layout reorder around every conv and makes the final uint8 HWC copy a plain one.
        for conv in (self.conv_in, self.up1, self.up2, self.to_rgb, self.skip):
            conv.weight = nn.Parameter(conv.weight.detach().contiguous(memory_format=torch.channels_last))

    def _decode_frames(self, latents: torch.Tensor) -> torch.Tensor:
        """[N, C, h, w] latent frames -> [N, 3, 4h, 4w] RGB logits, channels-last."""
        latents = latents.contiguous(memory_format=torch.channels_last)
        x = F.silu(self.conv_in(latents))
        for conv in (self.up1, self.up2):
            x = F.silu(conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)))
        skip = F.interpolate(self.skip(latents), scale_factor=4, mode="bilinear", align_corners=False)
        logits: torch.Tensor = self.to_rgb(x) + _SKIP_GAIN * skip
        return logits

    def forward(self, latents: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """latents [B, C, F, h, w], previous [B, C, h, w] (last latent frame before this chunk) ->
        uint8 frames [B, 4F, 8h, 8w, 3]."""
        b, c, f, h, w = latents.shape
        sequence = torch.cat([previous[:, :, None], latents], dim=2)  # [B, C, F + 1, h, w]
        rgb = self._decode_frames(sequence.transpose(1, 2).reshape(b * (f + 1), c, h, w))
        rgb = rgb.view(b, f + 1, 3, rgb.shape[-2], rgb.shape[-1])
        weights = torch.arange(1, VIDEO_FRAMES_PER_LATENT + 1, device=rgb.device, dtype=rgb.dtype)
        weights = (weights / VIDEO_FRAMES_PER_LATENT)[None, None, :, None, None, None]
        start, end = rgb[:, :-1, None], rgb[:, 1:, None]  # [B, F, 1, 3, H/2, W/2]
        levels = torch.sigmoid(start + (end - start) * weights).mul_(255.0).add_(0.5)  # +0.5: truncation rounds
        # Bilinear is linear, so scaling to [0.5, 255.5] before the final 2x is the same and touches 4x fewer values.
        levels = levels.flatten(0, 2).contiguous(memory_format=torch.channels_last)
        frames = F.interpolate(levels, scale_factor=2, mode="bilinear", align_corners=False)
        frames = frames.view(b, f * VIDEO_FRAMES_PER_LATENT, 3, frames.shape[-2], frames.shape[-1])
        return frames.permute(0, 1, 3, 4, 2).to(torch.uint8, memory_format=torch.contiguous_format)
