"""Typed errors of the reference model: bad input from the caller, never internal failures."""

from __future__ import annotations


class UnknownModelConfig(LookupError):
    """``load_model`` or ``get_config`` was given a name that is not in the config registry."""


class InvalidModelConfig(ValueError):
    """A ``ModelConfig`` field is out of bounds; the message names the field and its value."""


class UnknownSession(LookupError):
    """A handle names a slot this model does not hold for that session (released, or from another model)."""


class DuplicateSession(ValueError):
    """A session id is already resident in this model, or appears twice in one ``generate`` batch."""


class StateMismatch(ValueError):
    """Imported tensors are missing a name or do not fit this model's config (shape, dtype or cache layout)."""
