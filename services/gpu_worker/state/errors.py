"""Errors of the worker's session-state layer: budget errors are recoverable, manifest errors mean a bad peer."""

from __future__ import annotations

from services.common.errors import TurboServeError, Unavailable


class StateError(TurboServeError):
    """Base of the session-state errors."""

    code = "state_error"


class ManifestError(StateError):
    """A manifest or its buffers do not describe the tensors given (corrupt peer data or a caller bug)."""

    code = "bad_manifest"


class DeviceBudgetExceeded(Unavailable):
    """Placing the session would pass the device byte budget; offload another session or place it elsewhere."""

    code = "device_budget_exceeded"


class HostBudgetExceeded(Unavailable):
    """The host byte budget is full and nothing can spill (no spill target, or the state alone is too big)."""

    code = "host_budget_exceeded"


class NoHostState(StateError):
    """This worker holds no offloaded state for the session (never offloaded here, restored, or discarded)."""

    code = "no_host_state"
