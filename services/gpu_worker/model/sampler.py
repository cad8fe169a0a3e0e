"""The few-step flow-matching schedule as Self-Forcing and CausVid run it (listed timesteps, Wan's shift).

The training grid has 1000 points s = 1, 0.999, ..., 0.001, each at noise level sigma = shift * s / (1 + (shift - 1)
* s) and timestep 1000 * sigma. With ``warp_timesteps`` (Self-Forcing) a listed t in (0, 1000] picks the grid
point s = t / 1000; without (CausVid) the DiT is conditioned on t itself and its noise level is the grid's
nearest to t, as their wrappers look sigma up. Either way x_sigma = (1 - sigma) * x0 + sigma * noise, and the
DiT's flow prediction v gives x0 = x_sigma - sigma * v.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.gpu_worker.model.config import StreamConfig


@dataclass(frozen=True, slots=True)
class FlowSchedule:
    sigmas: tuple[float, ...]
    """Noise level of the input at each denoising step."""
    model_timesteps: tuple[float, ...]
    """The timestep the DiT is conditioned on at each step, on Wan's 0..1000 scale."""

    @classmethod
    def from_config(cls, stream: StreamConfig) -> FlowSchedule:
        shift = stream.timestep_shift
        grid = [shift * s / (1.0 + (shift - 1.0) * s) for s in (1.0 - i / 1000.0 for i in range(1000))]
        if stream.warp_timesteps:
            sigmas = tuple(grid[1000 - t] for t in stream.denoise_timesteps)
            return cls(sigmas, tuple(1000.0 * s for s in sigmas))
        sigmas = tuple(_nearest(grid, t / 1000.0) for t in stream.denoise_timesteps)
        return cls(sigmas, tuple(float(t) for t in stream.denoise_timesteps))

    @property
    def steps(self) -> int:
        return len(self.sigmas)


def _nearest(grid: list[float], value: float) -> float:
    return min(grid, key=lambda point: abs(point - value))
