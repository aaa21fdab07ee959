"""A pod's steer_pods entry is keyed by its cgroup's id; it must go with the pod even when
the kubelet removed the cgroup first (the id can no longer be read from the path)."""

from __future__ import annotations

import ctypes as ct
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

from steer.node.bpfobjects import BpfObjects
from steer.node.fakekernel import RecordingKernel
from steer.render.bpf import PodPolicy

POD_CGROUP = "/sys/fs/cgroup/kubepods/besteffort/pod-1234"


@dataclass
class RemovableCgroups(RecordingKernel):
    """cgroup_id() of a removed directory is 0, as on the host."""

    gone: set[str] = field(default_factory=set)

    def cgroup_id(self, path: str) -> int:
        return 0 if path in self.gone else super().cgroup_id(path)


def _objects(tmp_path: Path) -> tuple[RemovableCgroups, BpfObjects]:
    kernel = RemovableCgroups()
    return kernel, BpfObjects.load(kernel, state_file=tmp_path / "bpf-state.json")


def _pod_ids(kernel: RecordingKernel) -> set[bytes]:
    return set(kernel.maps.get("steer_pods", {}))


def test_a_pod_whose_cgroup_is_already_gone_leaves_no_entry(tmp_path: Path) -> None:
    kernel, objects = _objects(tmp_path)
    policy = PodPolicy("default/web", IPv4Address("10.244.0.5"), ())
    objects.set_pod(POD_CGROUP, objects.slot_for("default/web"), policy)
    assert _pod_ids(kernel) == {bytes(ct.c_uint64(RecordingKernel().cgroup_id(POD_CGROUP)))}
    kernel.gone.add(POD_CGROUP)
    objects.remove_pod(POD_CGROUP, objects.slots["default/web"], "10.244.0.5")
    assert _pod_ids(kernel) == set()


def test_the_ids_survive_an_agent_restart(tmp_path: Path) -> None:
    """The agent may restart between the pod's cgroup going and its removal."""
    kernel, objects = _objects(tmp_path)
    policy = PodPolicy("default/web", IPv4Address("10.244.0.5"), ())
    objects.set_pod(POD_CGROUP, objects.slot_for("default/web"), policy)
    kernel.gone.add(POD_CGROUP)
    restarted = BpfObjects.load(kernel, state_file=tmp_path / "bpf-state.json")
    assert restarted.adopted
    restarted.remove_pod(POD_CGROUP, restarted.slots["default/web"], "10.244.0.5")
    assert _pod_ids(kernel) == set()
