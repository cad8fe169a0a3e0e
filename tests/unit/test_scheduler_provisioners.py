"""The three provisioners against fakes: a StatefulSet scale API, a process spawner, a publisher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.control import ScaleDecision
from services.common.service import SUPERVISOR_PID_ENV
from services.launcher import Child
from services.scheduler.control_settings import ControlSettings
from services.scheduler.provisioners import ProvisionerError
from services.scheduler.provisioners.external import ExternalProvisioner
from services.scheduler.provisioners.kubernetes import PARKED_ANNOTATION, KubernetesProvisioner
from services.scheduler.provisioners.local import LocalProcessProvisioner
from tests.scheduler_fakes import FakeStatefulSetApi


async def test_kubernetes_scale_out_adds_the_next_ordinals_and_names_their_pods() -> None:
    api = FakeStatefulSetApi(2)
    provisioner = KubernetesProvisioner(api, namespace="ts", statefulset="turboserve-worker")
    assert await provisioner.scale_out(2, "load") == ["turboserve-worker-2", "turboserve-worker-3"]
    assert api.patches == [4]


async def test_kubernetes_scale_in_shrinks_only_past_released_top_ordinals_and_reuses_parked_pods_first() -> None:
    api = FakeStatefulSetApi(3)
    provisioner = KubernetesProvisioner(api, namespace="ts", statefulset="turboserve-worker")
    await provisioner.remove("turboserve-worker-1", "drained")
    assert api.replicas == 3  # ordinal 2 still serves: a StatefulSet cannot drop ordinal 1 alone
    await provisioner.remove("turboserve-worker-2", "drained")
    assert api.patches == [1]  # both released: down past them
    await provisioner.remove("turboserve-worker-0", "drained")
    await provisioner.scale_out(1, "load")
    assert api.replicas == 1 and api.patches == [1, 0, 1]


async def test_kubernetes_parked_pod_is_taken_back_before_a_new_ordinal_is_added() -> None:
    api = FakeStatefulSetApi(3)
    provisioner = KubernetesProvisioner(api, namespace="ts", statefulset="turboserve-worker")
    await provisioner.remove("turboserve-worker-0", "drained")
    assert await provisioner.scale_out(2, "load") == ["turboserve-worker-0", "turboserve-worker-3"]
    assert api.patches == [4]


async def test_kubernetes_parked_pods_live_on_the_statefulset_so_a_new_provisioner_knows_them() -> None:
    api = FakeStatefulSetApi(4)
    crashed = KubernetesProvisioner(api, namespace="ts", statefulset="turboserve-worker")
    await crashed.remove("turboserve-worker-1", "drained")
    await crashed.remove("turboserve-worker-2", "drained")
    assert await crashed.parked() == {"turboserve-worker-1", "turboserve-worker-2"} and api.patches == []
    successor = KubernetesProvisioner(api, namespace="ts", statefulset="turboserve-worker")
    assert await successor.parked() == {"turboserve-worker-1", "turboserve-worker-2"}
    await successor.remove("turboserve-worker-3", "drained")
    assert api.patches == [1] and await successor.parked() == frozenset()  # down past all three
    assert await successor.scale_out(1, "load") == ["turboserve-worker-1"]


async def test_kubernetes_a_patch_on_a_stale_read_fails_typed_and_changes_nothing() -> None:
    api = FakeStatefulSetApi(3)
    provisioner = KubernetesProvisioner(api, namespace="ts", statefulset="turboserve-worker")
    read = api.read_namespaced_stateful_set

    def read_then_someone_writes(name: str, namespace: str, **options: object) -> object:
        seen = read(name, namespace, **options)
        api.version += 1  # another writer got in between
        return seen

    api.read_namespaced_stateful_set = read_then_someone_writes  # type: ignore[method-assign]
    with pytest.raises(ProvisionerError, match="Conflict"):
        await provisioner.remove("turboserve-worker-0", "drained")
    api.read_namespaced_stateful_set = read  # type: ignore[method-assign]
    assert api.replicas == 3 and await provisioner.parked() == frozenset()


async def test_kubernetes_refuses_an_annotation_that_is_not_ordinals() -> None:
    api = FakeStatefulSetApi(3)
    api.annotations[PARKED_ANNOTATION] = "1,two"
    with pytest.raises(ProvisionerError, match="not a list of ordinals"):
        await KubernetesProvisioner(api, namespace="ts", statefulset="turboserve-worker").parked()


async def test_kubernetes_refuses_a_worker_that_is_not_a_pod_of_its_statefulset() -> None:
    provisioner = KubernetesProvisioner(FakeStatefulSetApi(1), namespace="ts", statefulset="turboserve-worker")
    with pytest.raises(ProvisionerError, match="not a pod"):
        await provisioner.remove("worker-1", "drained")


async def test_external_publishes_each_decision_and_knows_no_ids_in_advance() -> None:
    published: list[ScaleDecision] = []

    async def publish(decision: ScaleDecision) -> None:
        published.append(decision)

    provisioner = ExternalProvisioner(publish)
    assert await provisioner.scale_out(2, "load rose") == ()
    await provisioner.remove("w3", "drained")
    assert published == [ScaleDecision("scale_out", 2, reason="load rose"), ScaleDecision("remove", 1, "w3", "drained")]
    assert await provisioner.parked() == frozenset()  # a worker it keeps running is back when it beats


async def test_local_starts_workers_under_their_own_ids_and_stops_them_with_sigterm(tmp_path: Path) -> None:
    spawned: dict[str, dict[str, str]] = {}

    def spawn(name: str, command: str, env: dict[str, str], log_dir: Path, *, die_with_parent: bool) -> Child:
        assert command == "worker" and die_with_parent  # no supervisor: a worker dies with its scheduler
        spawned[name] = env
        process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        return Child(name, process, log_dir / f"{name}.log")

    provisioner = LocalProcessProvisioner({"A": "1"}, tmp_path, spawn_worker=spawn)
    ids = await provisioner.scale_out(2, "initial")
    assert ids == ["worker-1", "worker-2"]
    assert spawned["worker-2"]["TURBOSERVE_WORKER_ID"] == "worker-2"
    await provisioner.remove("worker-1", "drained")
    assert provisioner.worker_ids == ("worker-2",) and await provisioner.parked() == frozenset()
    with pytest.raises(ProvisionerError, match="not started by this provisioner"):
        await provisioner.remove("worker-7", "drained")
    await provisioner.close()
    assert provisioner.worker_ids == ()


async def test_under_a_supervisor_a_restarted_scheduler_adopts_the_workers_still_running_and_can_stop_them(
    tmp_path: Path,
) -> None:
    def spawn(name: str, command: str, env: dict[str, str], log_dir: Path, *, die_with_parent: bool) -> Child:
        assert not die_with_parent  # the supervisor, not the scheduler, bounds a worker's life
        process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        return Child(name, process, log_dir / f"{name}.log")

    supervised = {SUPERVISOR_PID_ENV: str(os.getpid())}
    crashed = LocalProcessProvisioner(supervised, tmp_path, spawn_worker=spawn)
    await crashed.scale_out(2, "initial")
    first = crashed._children["worker-1"].process  # the scheduler dies here without closing its provisioner
    restarted = LocalProcessProvisioner(supervised, tmp_path, spawn_worker=spawn)
    assert restarted.worker_ids == ("worker-1", "worker-2")
    assert await restarted.scale_out(1, "load rose") == ["worker-3"]  # numbering goes on past the adopted
    await restarted.remove("worker-1", "drained")
    assert first.wait(timeout=10) == -signal.SIGTERM
    assert not (tmp_path / "worker-1.pid").exists()
    await restarted.close()
    assert restarted.worker_ids == () and not list(tmp_path.glob("*.pid"))
    assert LocalProcessProvisioner(supervised, tmp_path, spawn_worker=spawn).worker_ids == ()


def test_provisioner_settings_refuse_an_unknown_kind_and_bounds_that_cross() -> None:
    with pytest.raises(ValueError, match="TURBOSERVE_PROVISIONER"):
        ControlSettings(provisioner="swarm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="TURBOSERVE_MAX_GPUS=1 is below TURBOSERVE_MIN_GPUS=2"):
        ControlSettings(min_gpus=2, max_gpus=1)
