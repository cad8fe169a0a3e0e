"""3D rotary positions (frame, row, col) for chunk tokens, split over the head dim the way Wan2.1 splits it
(frames get d - 4 * (d // 6) of a head's d dims, rows and cols 2 * (d // 6) each, theta 10000).

Frames use their absolute index in the stream, so keys cached with their rotation stay valid while the ring
window slides (as Self-Forcing caches post-RoPE keys).
"""

from __future__ import annotations

import torch

from services.gpu_worker.model.config import PATCH_SIZE, ModelConfig

_THETA = 10_000.0


def _axis_freqs(axis_dim: int) -> torch.Tensor:
    return 1.0 / _THETA ** (torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)


class Rope3D:
    """Per-token cos/sin tables [N, head_dim // 2] for ``kernels.rope_`` (interleaved pairs)."""

    def __init__(self, config: ModelConfig, device: torch.device) -> None:
        head_dim = config.dit.head_dim
        spatial_dim = 2 * (head_dim // 6)
        self._frame_freqs = _axis_freqs(head_dim - 2 * spatial_dim)
        rows = config.stream.latent_height // PATCH_SIZE[1]
        cols = config.stream.latent_width // PATCH_SIZE[2]
        row_angles = torch.arange(rows, dtype=torch.float64)[:, None] * _axis_freqs(spatial_dim)
        col_angles = torch.arange(cols, dtype=torch.float64)[:, None] * _axis_freqs(spatial_dim)
        self._spatial = torch.cat(  # [rows * cols, spatial pairs * 2], token order row-major like the patch grid
            [row_angles[:, None, :].expand(rows, cols, -1), col_angles[None, :, :].expand(rows, cols, -1)], dim=-1
        ).reshape(rows * cols, -1)
        self._frames_per_chunk = config.stream.frames_per_chunk
        self._device = device

    def tables(self, chunk_indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B * chunk_tokens, head_dim // 2] float32 for sessions at the given chunk indices.

        Angles are formed in float64 so positions deep into a long stream keep full precision.
        """
        per_frame = self._spatial.shape[0]
        frames = torch.tensor(
            [chunk * self._frames_per_chunk + f for chunk in chunk_indices for f in range(self._frames_per_chunk)],
            dtype=torch.float64,
        )
        frame_angles = (frames[:, None] * self._frame_freqs).repeat_interleave(per_frame, dim=0)
        spatial = self._spatial.repeat(len(frames), 1)
        angles = torch.cat([frame_angles, spatial], dim=-1)
        return (
            torch.cos(angles).to(device=self._device, dtype=torch.float32),
            torch.sin(angles).to(device=self._device, dtype=torch.float32),
        )
