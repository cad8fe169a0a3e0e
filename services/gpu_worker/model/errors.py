"""Typed errors of the model: bad input or a bad model directory, never internal failures.

All of them sit in the shared tree. A config that does not exist or does not parse, and a model directory that
cannot be served, are ``ConfigError``s: a service refuses to start on them with one line naming the file, the key
or the setting. Misuse at run time carries the protocol's codes (``unknown_session``, ``invalid_state``,
``invalid_field``), so a control endpoint answers it like any other refusal.
"""

from __future__ import annotations

from services.common.config import ConfigError
from services.common.errors import InvalidField, InvalidState, UnknownSession

__all__ = [
    "CheckpointDtypeError", "CheckpointError", "CheckpointKeyMismatch", "DuplicateSession", "InvalidModelConfig",
    "MissingCheckpointFile", "StateMismatch", "UnknownModelConfig", "UnknownSession",
]


class UnknownModelConfig(ConfigError, LookupError):
    """``get_config`` was given a name with no config file."""


class InvalidModelConfig(ConfigError):
    """A config file's field is out of bounds or unknown; the message names the field and its value."""


class DuplicateSession(InvalidState):
    """A session id is already resident in this model, or appears twice in one ``generate`` batch."""


class StateMismatch(InvalidField):
    """Imported tensors are missing a name or do not fit this model's config (shape, dtype or cache layout)."""


class CheckpointError(ConfigError):
    """A model directory cannot be served; subclasses say why, and every message names the file."""


class MissingCheckpointFile(CheckpointError):
    """A file the model needs is not in the model directory under any of its published names."""


class CheckpointKeyMismatch(CheckpointError):
    """A checkpoint's keys or shapes differ from the architecture's: the message names the first of each kind."""

    def __init__(self, path: str, missing: list[str], unexpected: list[str], wrong_shape: list[str]) -> None:
        self.missing, self.unexpected, self.wrong_shape = missing, unexpected, wrong_shape
        parts = [f"{len(keys)} {kind} (first: {keys[0]})" for kind, keys in
                 (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", wrong_shape)) if keys]
        super().__init__(f"{path}: keys do not match the architecture: " + "; ".join(parts))


class CheckpointDtypeError(CheckpointError):
    """A checkpoint tensor is not a float type the model can compute in."""
