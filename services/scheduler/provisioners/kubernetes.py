"""The Kubernetes provisioner: scales the worker StatefulSet through its scale subresource.

A worker is a pod and its id the pod name, ``<statefulset>-<ordinal>``. A StatefulSet only ever removes its
highest ordinals, while the control loop drains whichever worker is cheapest to empty; so a removed worker is
*released*, and the replica count drops past every released ordinal at the top. A released pod below the top
keeps running (empty, and no longer scheduled) until the ordinals above it are released too, and a later
scale-out takes released ordinals back first: the cheapest GPU to add is one that is already running.

The ``kubernetes`` package is imported only when a real client is built, so the scheduler runs without it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Protocol

from services.scheduler.provisioners import ProvisionerError

log = logging.getLogger("turboserve.scheduler.provisioner")


class ScaleApi(Protocol):
    """The two calls of ``kubernetes.client.AppsV1Api`` this provisioner uses."""

    def read_namespaced_stateful_set_scale(self, name: str, namespace: str) -> Any: ...

    def patch_namespaced_stateful_set_scale(self, name: str, namespace: str, body: Any) -> Any: ...


def connect_apps_api() -> ScaleApi:
    """An AppsV1Api from the in-cluster service account, or the local kubeconfig outside a cluster."""
    from kubernetes import client, config  # lazy: only this provisioner needs the package
    from kubernetes.config.config_exception import ConfigException

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    api: ScaleApi = client.AppsV1Api()
    return api


class KubernetesProvisioner:
    """Replica count of one StatefulSet; the API calls block, so they run in a thread."""

    def __init__(self, api: ScaleApi, *, namespace: str, statefulset: str) -> None:
        self._api = api
        self._namespace = namespace
        self._statefulset = statefulset
        self._released: set[int] = set()
        self._lock = asyncio.Lock()

    def _worker_id(self, ordinal: int) -> str:
        return f"{self._statefulset}-{ordinal}"

    def _ordinal(self, worker_id: str) -> int:
        prefix = f"{self._statefulset}-"
        suffix = worker_id.removeprefix(prefix)
        if suffix == worker_id or not suffix.isdigit():
            raise ProvisionerError(f"worker {worker_id!r} is not a pod of StatefulSet {self._statefulset!r}")
        return int(suffix)

    async def _replicas(self) -> int:
        try:
            scale = await asyncio.to_thread(
                self._api.read_namespaced_stateful_set_scale, self._statefulset, self._namespace
            )
        except Exception as exc:  # the client raises ApiException or urllib3 errors; both mean "not now"
            raise ProvisionerError(f"reading the scale of {self._namespace}/{self._statefulset}: {exc}") from exc
        return int(scale.spec.replicas or 0)

    async def _patch(self, replicas: int, reason: str) -> None:
        body = {"spec": {"replicas": replicas}}
        try:
            await asyncio.to_thread(
                self._api.patch_namespaced_stateful_set_scale, self._statefulset, self._namespace, body
            )
        except Exception as exc:
            raise ProvisionerError(f"scaling {self._namespace}/{self._statefulset} to {replicas}: {exc}") from exc
        log.info("event=statefulset_scaled name=%s replicas=%d reason=%r", self._statefulset, replicas, reason)

    async def scale_out(self, count: int, reason: str) -> Sequence[str]:
        async with self._lock:
            replicas = await self._replicas()
            self._released = {o for o in self._released if o < replicas}
            reused = sorted(self._released)[:count]
            self._released -= set(reused)
            added = list(range(replicas, replicas + count - len(reused)))
            if added:
                await self._patch(replicas + len(added), reason)
            return [self._worker_id(o) for o in reused + added]

    async def remove(self, worker_id: str, reason: str) -> None:
        ordinal = self._ordinal(worker_id)
        async with self._lock:
            replicas = await self._replicas()
            if ordinal >= replicas:
                return  # already gone
            self._released.add(ordinal)
            target = replicas
            while target > 0 and target - 1 in self._released:
                target -= 1
            self._released = {o for o in self._released if o < target}
            if target < replicas:
                await self._patch(target, reason)
            else:
                log.info("event=worker_released worker=%s replicas=%d reason=%r: a StatefulSet removes its "
                         "highest ordinals; this pod stops once those above it are released", worker_id,
                         replicas, reason)

    async def close(self) -> None:
        """The pods are the cluster's; nothing to release here."""
