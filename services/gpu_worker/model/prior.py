"""The analytic colour-field prior the DiT's prediction is a residual on, so random weights still give watchable video.

With trained weights the DiT alone would carry the content; with random weights its output is texture. The prior
is the exact flow-matching target for a "dataset" of one drifting interference pattern per prompt: a few plane
waves per latent channel whose directions, frequencies and speeds come from the prompt's pooled context, and
whose phase advances with the absolute frame index, so frames flow smoothly and change with the prompt.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from services.gpu_worker.model.config import ModelConfig

WAVES_PER_CHANNEL = 2
PARAMS_PER_WAVE = 4  # direction, spatial frequency, temporal speed, phase
_MAX_CYCLES_PER_IMAGE = 1.6
_MIN_CYCLES_PER_FRAME = 0.015
_MAX_CYCLES_PER_FRAME = 0.06


class ColourFieldPrior(nn.Module):
    """Prompt -> wave parameters once per prompt (cached per session); parameters + frame indices -> latent field."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wave_params = nn.Linear(config.dim, config.latent_channels * WAVES_PER_CHANNEL * PARAMS_PER_WAVE)

    def waves(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled prompt context [dim] -> float32 [C, waves, 4]: direction, cycles/image, cycles/frame, phase."""
        normed = F.layer_norm(pooled.float(), (pooled.shape[-1],))
        raw = self.wave_params(normed.to(self.wave_params.weight.dtype)[None]).float()
        raw = raw.view(self.config.latent_channels, WAVES_PER_CHANNEL, PARAMS_PER_WAVE)
        speed_range = _MAX_CYCLES_PER_FRAME - _MIN_CYCLES_PER_FRAME
        return torch.stack([
            raw[..., 0] * math.pi,
            _MAX_CYCLES_PER_IMAGE * torch.sigmoid(raw[..., 1]),
            _MIN_CYCLES_PER_FRAME + speed_range * torch.sigmoid(raw[..., 2]),
            raw[..., 3] * math.pi,
        ], dim=-1)

    def field(self, waves: torch.Tensor, frame_indices: torch.Tensor) -> torch.Tensor:
        """waves [B, C, waves, 4], frame_indices [B, F] int64 (absolute in the stream) -> float32 [B, C, F, h, w]."""
        c = self.config
        direction, cycles, speed, phase = waves.unbind(dim=-1)
        ys = torch.linspace(0.0, 1.0, c.latent_height, device=waves.device)
        xs = torch.linspace(0.0, 1.0, c.latent_width, device=waves.device)
        # [B, C, waves, 1, h, w]: position along each wave's direction, in cycles
        along = torch.cos(direction)[..., None, None] * xs + torch.sin(direction)[..., None, None] * ys[:, None]
        spatial = (cycles[..., None, None] * along).unsqueeze(3)
        # Frame angle modulo one period in float64, so phases stay exact however long the stream runs.
        frame_cycles = (frame_indices.to(torch.float64)[:, None, None, :] * speed.to(torch.float64)[..., None]) % 1.0
        temporal = frame_cycles.float()[..., None, None]
        waves_value = torch.sin(2 * math.pi * (spatial + temporal) + phase[..., None, None, None])
        field: torch.Tensor = waves_value.sum(dim=2) * (2.0 / WAVES_PER_CHANNEL) ** 0.5
        return field
