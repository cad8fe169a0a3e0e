"""Provisioners: how the control loop's AddGpus and RemoveGpu become workers started and stopped.

Three implementations of ``actuation.Provisioner``, chosen by TURBOSERVE_PROVISIONER: ``local`` (worker processes
on this host; the default under ``turboserve up``), ``kubernetes`` (the worker StatefulSet's replica count)
and ``external`` (publishes a ScaleDecision and lets another system act). None of them moves session state: the
control loop drains a worker before it asks for its removal.
"""

from __future__ import annotations

from services.common.errors import TurboServeError
from services.scheduler.actuation import Provisioner


class ProvisionerError(TurboServeError):
    """A provisioner could not do what was asked (unknown worker, the cluster refused); the loop retries later."""

    code = "provisioner_failed"


__all__ = ["Provisioner", "ProvisionerError"]
