"""The agent's writes to steer_svc: a change rewrites only what differs, in an order where
connect4 never reads a slot that was never written; a frontend that does not fit leaves
no entry at all (kube-proxy serves it) and is reported; an adopted map is read back."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from steer.model.service import Backend, Frontend
from steer.node.agent import map_full_problems
from steer.node.bpfbuild import BpfError
from steer.node.bpfmaps import SvcKey, SvcVal, ip_be
from steer.node.bpfobjects import BpfObjects
from steer.node.fakekernel import RecordingKernel

VIP = IPv4Address("10.96.0.10")


def frontend(*backends: str, ip: IPv4Address = VIP) -> Frontend:
    return Frontend(
        ip, 80, "default/web", "http", tuple(Backend(IPv4Address(b), 8080) for b in backends)
    )


@dataclass
class SmallMap(RecordingKernel):
    """A steer_svc that holds `room` entries, as a full map refuses more."""

    room: int = 1 << 20
    writes: list[tuple[str, int]] | None = None

    def bpf_update(self, map_name: str, key: Any, value: Any) -> None:
        if map_name == "steer_svc":
            held = self.maps.get(map_name, {})
            if bytes(key) not in held and len(held) >= self.room:
                raise BpfError("updating steer_svc (is it full?): No space left on device")
            if self.writes is not None:
                self.writes.append(("update", key.slot))
        super().bpf_update(map_name, key, value)

    def bpf_delete(self, map_name: str, key: Any) -> None:
        if map_name == "steer_svc" and self.writes is not None:
            self.writes.append(("delete", key.slot))
        super().bpf_delete(map_name, key)


def slots(kernel: RecordingKernel, ip: IPv4Address = VIP) -> list[int]:
    keys = [SvcKey.from_buffer_copy(k) for k in kernel.maps.get("steer_svc", {})]
    return sorted(k.slot for k in keys if k.ip == ip_be(ip) and k.port_be == socket.htons(80))


def test_growing_writes_slots_before_the_count_and_shrinking_the_count_first(
    tmp_path: Path,
) -> None:
    kernel = SmallMap(writes=[])
    bpf = BpfObjects.load(kernel, state_file=tmp_path / "state.json")
    bpf.set_services([frontend("10.244.0.3")])
    kernel.writes = []
    bpf.set_services([frontend("10.244.0.3", "10.244.0.4")])
    assert kernel.writes == [("update", 2), ("update", 0)]  # slot 1 unchanged
    kernel.writes = []
    bpf.set_services([frontend("10.244.0.4")])
    assert kernel.writes == [("update", 1), ("update", 0), ("delete", 2)]
    assert slots(kernel) == [0, 1]
    kernel.writes = []
    bpf.set_services([frontend("10.244.0.4")])
    assert kernel.writes == []  # nothing changed, nothing written


def test_a_frontend_that_does_not_fit_leaves_no_entry_and_is_reported(tmp_path: Path) -> None:
    kernel = SmallMap(room=3)
    bpf = BpfObjects.load(kernel, state_file=tmp_path / "state.json")
    small = frontend("10.244.0.3", ip=IPv4Address("10.96.0.9"))
    big = frontend("10.244.0.3", "10.244.0.4", "10.244.0.5")
    failed = bpf.set_services([small, big])
    assert failed == [big]
    assert slots(kernel) == []  # no half-written frontend for connect4 to find
    assert slots(kernel, IPv4Address("10.96.0.9")) == [0, 1]
    [problem] = map_full_problems([small, big], [f"{big.service} {big.ip}:{big.port}"])
    assert (problem.service, problem.problem.value) == ("default/web", "MapFull")
    assert "BPF_MAX_SERVICE_ENTRIES" in problem.message


def test_an_adopted_map_is_read_back_and_stray_slots_removed(tmp_path: Path) -> None:
    kernel = SmallMap()
    first = BpfObjects.load(kernel, state_file=tmp_path / "state.json")
    first.set_services([frontend("10.244.0.3", "10.244.0.4")])
    # A crash mid-shrink left a slot past the count.
    kernel.bpf_update("steer_svc", SvcKey(ip_be(VIP), socket.htons(80), 3), SvcVal())
    again = BpfObjects.load(kernel, state_file=tmp_path / "state.json")
    assert again.adopted
    kernel.writes = []
    again.set_services([frontend("10.244.0.3", "10.244.0.4")])
    assert kernel.writes == [("delete", 3)]
    assert slots(kernel) == [0, 1, 2]
