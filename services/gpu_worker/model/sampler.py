"""Few-step flow-matching schedule (Self-Forcing's 4 fixed timesteps with Wan's timestep shift)."""

from __future__ import annotations

from dataclasses import dataclass

from services.gpu_worker.model.config import ModelConfig


@dataclass(frozen=True, slots=True)
class FlowSchedule:
    """Noise levels sigma in (0, 1] per denoising step; x_sigma = (1 - sigma) * x0 + sigma * noise."""

    sigmas: tuple[float, ...]

    @classmethod
    def from_config(cls, config: ModelConfig) -> FlowSchedule:
        shift = config.timestep_shift
        fractions = [t / 1000.0 for t in config.denoise_timesteps]
        return cls(tuple(shift * s / (1.0 + (shift - 1.0) * s) for s in fractions))

    @property
    def steps(self) -> int:
        return len(self.sigmas)

    def model_timestep(self, step: int) -> float:
        """The timestep the DiT is conditioned on at ``step`` (the shifted sigma on Wan's 0..1000 scale)."""
        return self.sigmas[step] * 1000.0
