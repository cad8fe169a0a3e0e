"""The factory the worker calls: a model by config name, on a device, with identical weights in every process."""

from __future__ import annotations

import torch

from services.gpu_worker.model.config import get_config
from services.gpu_worker.model.streaming_model import ReferenceStreamingModel


def load_model(config_name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               max_sessions: int | None = None) -> ReferenceStreamingModel:
    """Build the reference model; ``max_sessions`` defaults to the config's slot count.

    Raises ``UnknownModelConfig`` for a name not in the registry.
    """
    config = get_config(config_name)
    slots = config.default_max_sessions if max_sessions is None else max_sessions
    return ReferenceStreamingModel(config, torch.device(device), dtype, slots)
