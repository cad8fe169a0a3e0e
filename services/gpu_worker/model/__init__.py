"""The streaming video model: the interface the worker codes against and the Wan2.1 causal model behind it."""

from services.gpu_worker.model.config import ModelConfig, config_names, get_config
from services.gpu_worker.model.errors import (
    CheckpointDtypeError,
    CheckpointError,
    CheckpointKeyMismatch,
    DuplicateSession,
    InvalidModelConfig,
    MissingCheckpointFile,
    StateMismatch,
    UnknownModelConfig,
    UnknownSession,
)
from services.gpu_worker.model.interface import ChunkOutput, SessionHandle, SlotsExhausted, StreamingVideoModel
from services.gpu_worker.model.loader import load_model
from services.gpu_worker.model.streaming_model import WanStreamingModel

__all__ = [
    "CheckpointDtypeError",
    "CheckpointError",
    "CheckpointKeyMismatch",
    "ChunkOutput",
    "DuplicateSession",
    "InvalidModelConfig",
    "MissingCheckpointFile",
    "ModelConfig",
    "SessionHandle",
    "SlotsExhausted",
    "StateMismatch",
    "StreamingVideoModel",
    "UnknownModelConfig",
    "UnknownSession",
    "WanStreamingModel",
    "config_names",
    "get_config",
    "load_model",
]
