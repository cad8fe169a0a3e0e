"""The Kubernetes provisioner: scales the worker StatefulSet.

A worker is a pod and its id the pod name, ``<statefulset>-<ordinal>``. A StatefulSet only ever removes its
highest ordinals, while the control loop drains whichever worker is cheapest to empty; so a removed worker is
*parked*, and the replica count drops past every parked ordinal at the top. A parked pod below the top keeps
running (empty, and out of the pool) until the ordinals above it are parked too, and a later scale-out takes
parked pods back first: the cheapest GPU to add is one that is already running.

The parked ordinals live on the StatefulSet itself, in an annotation written by the same patch as the replica
count (fenced by the object's resourceVersion), so this provisioner holds no state: a restarted scheduler, or one
that takes over, reads what its predecessor parked and keeps those pods out of the pool.

The ``kubernetes`` package is imported only when a real client is built, so the scheduler runs without it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from services.scheduler.provisioners import ProvisionerError

log = logging.getLogger("turboserve.scheduler.provisioner")

PARKED_ANNOTATION = "turboserve.io/parked-ordinals"
REQUEST_TIMEOUT_S = (5.0, 10.0)
"""Connect and read deadlines of each API call: a control decision waits on them, and never without bound."""


class StatefulSetApi(Protocol):
    """The two calls of ``kubernetes.client.AppsV1Api`` this provisioner uses."""

    def read_namespaced_stateful_set(self, name: str, namespace: str, **options: Any) -> Any: ...

    def patch_namespaced_stateful_set(self, name: str, namespace: str, body: Any, **options: Any) -> Any: ...


def connect_apps_api() -> StatefulSetApi:
    """An AppsV1Api from the in-cluster service account, or the local kubeconfig outside a cluster."""
    from kubernetes import client, config  # lazy: only this provisioner needs the package
    from kubernetes.config.config_exception import ConfigException

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    api: StatefulSetApi = client.AppsV1Api()
    return api


@dataclass(frozen=True, slots=True)
class _Scale:
    """What this provisioner reads of the StatefulSet: its replicas, the ordinals parked below them, and the
    version a patch is fenced on."""

    replicas: int
    parked: frozenset[int]
    version: str | None


def _parse_parked(text: str) -> frozenset[int]:
    try:
        return frozenset(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise ProvisionerError(f"annotation {PARKED_ANNOTATION}={text!r} is not a list of ordinals") from exc


class KubernetesProvisioner:
    """Replica count and parked ordinals of one StatefulSet; the API calls block, so they run in a thread."""

    def __init__(self, api: StatefulSetApi, *, namespace: str, statefulset: str) -> None:
        self._api = api
        self._namespace = namespace
        self._statefulset = statefulset
        self._lock = asyncio.Lock()

    def _worker_id(self, ordinal: int) -> str:
        return f"{self._statefulset}-{ordinal}"

    def _ordinal(self, worker_id: str) -> int:
        prefix = f"{self._statefulset}-"
        suffix = worker_id.removeprefix(prefix)
        if suffix == worker_id or not suffix.isdigit():
            raise ProvisionerError(f"worker {worker_id!r} is not a pod of StatefulSet {self._statefulset!r}")
        return int(suffix)

    async def _read(self) -> _Scale:
        try:
            stateful_set = await asyncio.to_thread(
                self._api.read_namespaced_stateful_set, self._statefulset, self._namespace,
                _request_timeout=REQUEST_TIMEOUT_S,
            )
        except Exception as exc:  # the client raises ApiException or urllib3 errors; both mean "not now"
            raise ProvisionerError(f"reading {self._namespace}/{self._statefulset}: {exc}") from exc
        replicas = int(stateful_set.spec.replicas or 0)
        annotations = stateful_set.metadata.annotations or {}
        parked = _parse_parked(annotations.get(PARKED_ANNOTATION, ""))
        return _Scale(replicas, frozenset(o for o in parked if o < replicas), stateful_set.metadata.resource_version)

    async def _write(self, was: _Scale, replicas: int, parked: frozenset[int], reason: str) -> None:
        """One patch for both, so the count and the parked ordinals never disagree; a conflict (the object changed
        since it was read) fails the call, and the loop retries on a fresh read."""
        metadata: dict[str, Any] = {"annotations": {PARKED_ANNOTATION: ",".join(map(str, sorted(parked)))}}
        if was.version is not None:
            metadata["resourceVersion"] = was.version
        body: dict[str, Any] = {"metadata": metadata}
        if replicas != was.replicas:
            body["spec"] = {"replicas": replicas}
        try:
            await asyncio.to_thread(
                self._api.patch_namespaced_stateful_set, self._statefulset, self._namespace, body,
                _request_timeout=REQUEST_TIMEOUT_S,
            )
        except Exception as exc:
            raise ProvisionerError(f"scaling {self._namespace}/{self._statefulset} to {replicas} "
                                   f"(parked {sorted(parked)}): {exc}") from exc
        log.info("event=statefulset_scaled name=%s replicas=%d parked=%s reason=%r", self._statefulset, replicas,
                 ",".join(map(str, sorted(parked))), reason)

    async def scale_out(self, count: int, reason: str) -> Sequence[str]:
        async with self._lock:
            scale = await self._read()
            reused = sorted(scale.parked)[:count]
            added = list(range(scale.replicas, scale.replicas + count - len(reused)))
            await self._write(scale, scale.replicas + len(added), scale.parked - set(reused), reason)
            return [self._worker_id(o) for o in reused + added]

    async def remove(self, worker_id: str, reason: str) -> None:
        ordinal = self._ordinal(worker_id)
        async with self._lock:
            scale = await self._read()
            if ordinal >= scale.replicas or ordinal in scale.parked:
                return  # already gone, or parked
            parked = scale.parked | {ordinal}
            target = scale.replicas
            while target > 0 and target - 1 in parked:
                target -= 1
            await self._write(scale, target, frozenset(o for o in parked if o < target), reason)
            if ordinal < target:
                log.info("event=worker_parked worker=%s replicas=%d reason=%r: a StatefulSet removes its highest "
                         "ordinals; this pod stops once those above it are parked", worker_id, target, reason)

    async def parked(self) -> frozenset[str]:
        async with self._lock:
            return frozenset(self._worker_id(o) for o in (await self._read()).parked)

    async def close(self) -> None:
        """The pods are the cluster's; nothing to release here."""
