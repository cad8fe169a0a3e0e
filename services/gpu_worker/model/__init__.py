"""The streaming video model: the interface the worker codes against and the seeded reference DiT behind it."""

from services.gpu_worker.model.config import CONFIGS, ModelConfig, get_config
from services.gpu_worker.model.errors import (
    DuplicateSession,
    InvalidModelConfig,
    StateMismatch,
    UnknownModelConfig,
    UnknownSession,
)
from services.gpu_worker.model.interface import ChunkOutput, SessionHandle, SlotsExhausted, StreamingVideoModel
from services.gpu_worker.model.loader import load_model
from services.gpu_worker.model.streaming_model import ReferenceStreamingModel

__all__ = [
    "CONFIGS",
    "ChunkOutput",
    "DuplicateSession",
    "InvalidModelConfig",
    "ModelConfig",
    "ReferenceStreamingModel",
    "SessionHandle",
    "SlotsExhausted",
    "StateMismatch",
    "StreamingVideoModel",
    "UnknownModelConfig",
    "UnknownSession",
    "get_config",
    "load_model",
]
