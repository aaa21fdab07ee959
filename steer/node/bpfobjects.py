"""steer's pinned BPF objects on this node: what is attached where, which slot each pod
has, and the map entries that carry each pod's policy.

Programs and maps are pinned under /sys/fs/bpf/steer/, and cgroup attachments are legacy
(not bpf_link) attachments, which outlive the process. So an agent that restarts, even
after kill -9, finds everything in place: it re-adopts the pins by path and never
recompiles unless the sources or build options changed. Adding a pod is a map update
plus an attach. Every kernel call goes through `NodeKernel`.
"""

from __future__ import annotations

import ctypes as ct
import json
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, NamedTuple

from steer.atomicfile import write_json_atomic
from steer.constants import BPF_MAX_PODS, BPF_MAX_SEGMENTS, BPF_PIN_DIR, BPF_STATE_FILE
from steer.model.service import Frontend
from steer.model.servicepolicy import ServicePortKey
from steer.node.bpfbuild import BpfError, build_hash
from steer.node.bpfmaps import (
    CFG_SKMSG,
    COUNTER_NAMES,
    ENVOY_PROGRAMS,
    FILLABLE_MAPS,
    MAPS,
    OBSERVE_PROGRAMS,
    POD_PROGRAMS,
    Cfg,
    CountersVal,
    FlowKey,
    OrigDst,
    PodVal,
    PolicyKey,
    PolicyVal,
    SegmentVal,
    SvcKey,
    SvcVal,
    ip_be,
    ip_from_be,
)
from steer.node.kernel import NodeKernel
from steer.render.bpf import PodPolicy, PrefixPolicy

log = logging.getLogger("steer.bpf")


class _FrontendEntry(NamedTuple):
    """A frontend as steer_svc holds it (network order): slot 0's Envoy port, slots 1..n."""

    envoy_port_be: int
    backends: tuple[tuple[int, int], ...]


@dataclass
class Attachment:
    cgroup: str
    program: str

    def key(self) -> tuple[str, str]:
        return (self.cgroup, self.program)


@dataclass
class BpfObjects:
    """Handles on the pinned programs and maps (through the kernel), what is attached where,
    and each pod's slot."""

    kernel: NodeKernel
    pin_dir: Path = BPF_PIN_DIR
    state_file: Path = BPF_STATE_FILE
    attachments: list[Attachment] = field(default_factory=list)
    # pod key -> slot in steer_counters and steer_policy; kept across restarts, so a pod
    # keeps its counters and an adopted policy map stays consistent.
    slots: dict[str, int] = field(default_factory=dict)
    adopted: bool = False
    # slot -> the policy entries this process wrote there, by map key: a change rewrites
    # only the entries that differ. A slot not here (first write after adopting the pins)
    # is read back from the kernel once.
    _written: dict[int, dict[tuple[int, int], PrefixPolicy]] = field(default_factory=dict)
    # cgroup path -> the id its steer_pods entry was written under. Removal must use it: by
    # the time a deleted pod reaches the agent, the kubelet may have removed its cgroup
    # (the systemd driver, pure cgroup v2), whose id can then no longer be read, and an
    # entry under an unknown id would stay in steer_pods for good (ids are never reused).
    cgroup_ids: dict[str, int] = field(default_factory=dict)
    # (address, port), both as the kernel stores them -> the backends written in slots
    # 1..n. None until the first write after a load: then what the map holds is read once.
    _services: dict[tuple[int, int], _FrontendEntry] | None = None

    # --- lifecycle ---------------------------------------------------------------------

    @classmethod
    def load(
        cls, kernel: NodeKernel, pin_dir: Path = BPF_PIN_DIR, state_file: Path = BPF_STATE_FILE
    ) -> BpfObjects:
        """Adopt the pinned objects if they come from this build, else compile anew."""
        objects = cls(kernel, pin_dir, state_file)
        state = objects._read_state()
        if state.get("build") == build_hash() and objects._adopt():
            objects.attachments = [Attachment(**a) for a in state.get("attachments", [])]
            objects.slots = {str(k): int(v) for k, v in state.get("slots", {}).items()}
            objects.cgroup_ids = {str(k): int(v) for k, v in state.get("cgroup_ids", {}).items()}
            objects.adopted = True
            log.debug("adopted pinned BPF objects (build %s)", state["build"])
            return objects
        if kernel.bpf_pins_present(pin_dir) or state:
            log.info("pinned BPF objects are stale or incomplete; reloading")
            cls.unload_all(kernel, pin_dir, state_file)
        kernel.bpf_build(pin_dir)
        if not kernel.bpf_open_pins(pin_dir):
            raise BpfError(f"the BPF build finished but its pins in {pin_dir} are missing")
        objects._write_state()
        return objects

    def _adopt(self) -> bool:
        try:
            return self.kernel.bpf_open_pins(self.pin_dir)
        except BpfError as exc:
            log.warning("not adopting the pinned BPF objects: %s", exc)
            return False

    def close(self) -> None:
        self.kernel.bpf_close()

    def _read_state(self) -> dict[str, Any]:
        try:
            state: dict[str, Any] = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return state

    def _write_state(self) -> None:
        document = {
            "build": build_hash(),
            "attachments": [a.__dict__ for a in self.attachments],
            "slots": self.slots,
            "cgroup_ids": self.cgroup_ids,
        }
        write_json_atomic(self.state_file, document)

    @classmethod
    def unload_all(
        cls, kernel: NodeKernel, pin_dir: Path = BPF_PIN_DIR, state_file: Path = BPF_STATE_FILE
    ) -> None:
        """Detach every recorded attachment and remove every pin. No iptables rule is
        touched. Works from the pins and the state file alone, after any crash."""
        objects = cls(kernel, pin_dir, state_file)
        state = objects._read_state()
        if kernel.bpf_pins_present(pin_dir) and objects._adopt():
            for attachment in [Attachment(**a) for a in state.get("attachments", [])]:
                objects._detach(attachment)
            objects.close()
        kernel.bpf_remove_pins(pin_dir)
        state_file.unlink(missing_ok=True)

    # --- attachments ---------------------------------------------------------------------

    def _attach(self, cgroup: str, program: str) -> None:
        attachment = Attachment(cgroup, program)
        if attachment.key() in {a.key() for a in self.attachments}:
            return
        self.kernel.bpf_attach(cgroup, program)
        self.attachments.append(attachment)
        self._write_state()

    def _detach(self, attachment: Attachment) -> None:
        self.kernel.bpf_detach(attachment.cgroup, attachment.program)
        self.attachments = [a for a in self.attachments if a.key() != attachment.key()]
        self._write_state()

    # --- node and pods -------------------------------------------------------------------

    def slot_for(self, pod_key: str) -> int:
        if pod_key not in self.slots:
            used = set(self.slots.values())
            free = next((s for s in range(1, BPF_MAX_PODS) if s not in used), None)
            if free is None:
                raise BpfError(f"all {BPF_MAX_PODS - 1} eBPF pod slots are in use")
            self.slots[pod_key] = free
            self._write_state()
        return self.slots[pod_key]

    def release_slot(self, pod_key: str) -> None:
        if self.slots.pop(pod_key, None) is not None:
            self._write_state()

    def configure(self, envoy_ip: str, netns_cookie: int, skmsg: bool) -> None:
        cfg = Cfg(ip_be(envoy_ip), CFG_SKMSG if skmsg else 0, netns_cookie)
        self.kernel.bpf_update("steer_cfg", ct.c_uint32(0), cfg)

    def set_skmsg(self, enabled: bool) -> None:
        """Turn sk_msg on or off for connections established from now on (sockets already
        in the sockhash keep their redirect until they close)."""
        cfg = Cfg()
        if not self.kernel.bpf_lookup("steer_cfg", ct.c_uint32(0), cfg):
            raise BpfError("reading steer_cfg: no entry")
        cfg.flags = (cfg.flags | CFG_SKMSG) if enabled else (cfg.flags & ~CFG_SKMSG)
        self.kernel.bpf_update("steer_cfg", ct.c_uint32(0), cfg)

    def attach_envoy(self, cgroup: str) -> None:
        for program in ENVOY_PROGRAMS:
            self._attach(cgroup, program)

    def set_pod(self, cgroup: str, slot: int, policy: PodPolicy) -> None:
        """Install or replace a pod's policy, then steer its cgroup. The policy goes in
        first, so no connect ever sees the pod without its verdicts."""
        kernel = self.kernel
        self._write_policy(slot, policy)
        kernel.bpf_update("steer_podips", ct.c_uint32(ip_be(policy.ip)), ct.c_uint32(slot))
        pod = PodVal(slot, ip_be(policy.ip))
        cgroup_id = kernel.cgroup_id(cgroup)
        kernel.bpf_update("steer_pods", ct.c_uint64(cgroup_id), pod)
        written = self.cgroup_ids.get(cgroup)
        if written != cgroup_id:
            if written is not None:  # the directory was removed and made again
                kernel.bpf_delete("steer_pods", ct.c_uint64(written))
            self.cgroup_ids[cgroup] = cgroup_id
            self._write_state()
        for program in POD_PROGRAMS:
            self._attach(cgroup, program)

    def observe_pod(self, cgroup: str) -> None:
        """Record the flows of a pod on iptables (who opened each, its bytes, its end)."""
        for program in OBSERVE_PROGRAMS:
            self._attach(cgroup, program)

    def unobserve_pod(self, cgroup: str) -> None:
        for attachment in [
            a for a in self.attachments if a.cgroup == cgroup and a.program in OBSERVE_PROGRAMS
        ]:
            self._detach(attachment)

    def remove_pod(self, cgroup: str, slot: int, ip: str) -> None:
        """Stop steering new connects; established ones keep their sockets and go on."""
        self.forget_cgroup(cgroup)
        self.kernel.bpf_delete("steer_podips", ct.c_uint32(ip_be(ip)))
        self._write_policy(slot, None)

    def forget_cgroup(self, cgroup: str) -> None:
        """Detach from a cgroup a pod has left, and drop its steer_pods entry."""
        for attachment in [a for a in self.attachments if a.cgroup == cgroup]:
            self._detach(attachment)
        cgroup_id = self.cgroup_ids.pop(cgroup, None)
        if cgroup_id is None:
            cgroup_id = self.kernel.cgroup_id(cgroup)
        else:
            self._write_state()
        self.kernel.bpf_delete("steer_pods", ct.c_uint64(cgroup_id))

    def _write_policy(self, slot: int, policy: PodPolicy | None) -> None:
        """Make the slot's entries in steer_policy those of `policy`, touching only the
        entries that differ from what is there: at 1k pods a change alters a handful of a
        pod's thousand entries, and each write is a syscall."""
        slot_be = int.from_bytes(slot.to_bytes(4, "big"), "little")
        wanted = {
            (32 + entry.prefix.prefixlen, ip_be(entry.prefix.network_address)): entry
            for entry in (policy.prefixes if policy else ())
        }
        written = self._written.pop(slot, None)
        if written is None:
            written = {}
            for stale in self.policy_keys(slot_be):
                if (stale.prefixlen, stale.addr) not in wanted:
                    self.kernel.bpf_delete("steer_policy", stale)
        else:
            for key in sorted(written.keys() - wanted.keys()):
                self.kernel.bpf_delete("steer_policy", PolicyKey(key[0], slot_be, key[1]))
        # Recorded only once every write went through: after a failure (a full map) the
        # next change reads the slot back and rewrites it whole.
        for key, entry in wanted.items():
            if (old := written.get(key)) is not entry and old != entry:
                self.kernel.bpf_update(
                    "steer_policy", PolicyKey(key[0], slot_be, key[1]), _policy_value(entry)
                )
        if policy is not None:
            self._written[slot] = wanted

    def policy_keys(self, slot_be: int) -> list[PolicyKey]:
        return [k for k in self.kernel.bpf_keys("steer_policy", PolicyKey) if k.slot == slot_be]

    # --- Services ------------------------------------------------------------------------

    def set_services(
        self, frontends: list[Frontend], envoy_ports: Mapping[ServicePortKey, int] | None = None
    ) -> list[Frontend]:
        """Make steer_svc balance exactly `frontends`, writing only the entries that
        differ. `envoy_ports`: the Envoy listener of each Service port that has one
        (steer.model.servicepolicy), where connect4 sends its flows that need Envoy.
        Returns the frontends that did not fit (a full map): they keep no entry at all, so
        their connects go on to kube-proxy as if steer knew no Services."""
        if self._services is None:
            self._services = self._read_services()
        envoy_ports = envoy_ports or {}
        written = self._services
        wanted = {
            (ip_be(f.ip), socket.htons(f.port)): (
                f,
                _FrontendEntry(
                    socket.htons(envoy_ports.get((f.service, f.port_name), 0)),
                    tuple((ip_be(b.ip), socket.htons(b.port)) for b in f.backends),
                ),
            )
            for f in frontends
        }
        for key in sorted(written.keys() - wanted.keys()):
            self._remove_frontend(key, written.pop(key).backends)
        failed = []
        for key, (frontend, entry) in wanted.items():
            old = written.get(key)
            if old == entry:
                continue
            try:
                self._write_frontend(key, entry, old.backends if old else ())
                written[key] = entry
            except BpfError as exc:
                log.error(
                    "service %s %s:%d does not fit in steer_svc (%s); kube-proxy serves it. "
                    "Fix: raise BPF_MAX_SERVICE_ENTRIES",
                    frontend.service,
                    frontend.ip,
                    frontend.port,
                    exc,
                )
                before = old.backends if old else ()
                self._remove_frontend(
                    key, entry.backends if len(entry.backends) > len(before) else before
                )
                written.pop(key, None)
                failed.append(frontend)
        return failed

    def _write_frontend(
        self, key: tuple[int, int], entry: _FrontendEntry, old: tuple[tuple[int, int], ...]
    ) -> None:
        """New slots before the count that reveals them; the count lowered before the slots
        it hides are deleted (connect4 reads the count, then a slot)."""
        backends = entry.backends
        for slot, backend in enumerate(backends, 1):
            if slot > len(old) or old[slot - 1] != backend:
                self.kernel.bpf_update("steer_svc", SvcKey(*key, slot), SvcVal(*backend, 0))
        self.kernel.bpf_update(
            "steer_svc", SvcKey(*key, 0), SvcVal(0, entry.envoy_port_be, len(backends))
        )
        for slot in range(len(backends) + 1, len(old) + 1):
            self.kernel.bpf_delete("steer_svc", SvcKey(*key, slot))

    def _remove_frontend(
        self, key: tuple[int, int], backends: tuple[tuple[int, int], ...] | None
    ) -> None:
        self.kernel.bpf_delete("steer_svc", SvcKey(*key, 0))
        for slot in range(1, len(backends or ()) + 1):
            self.kernel.bpf_delete("steer_svc", SvcKey(*key, slot))

    def _read_services(self) -> dict[tuple[int, int], _FrontendEntry]:
        """What steer_svc holds (after adopting the pins of an earlier agent): each
        frontend with the backends its count reveals; stray slots are deleted."""
        slots: dict[tuple[int, int], dict[int, tuple[int, int]]] = {}
        heads: dict[tuple[int, int], tuple[int, int]] = {}
        for key in self.kernel.bpf_keys("steer_svc", SvcKey):
            value = SvcVal()
            if not self.kernel.bpf_lookup("steer_svc", key, value):
                continue
            frontend = (key.ip, key.port_be)
            if key.slot == 0:
                heads[frontend] = (value.count, value.port_be)
            else:
                slots.setdefault(frontend, {})[key.slot] = (value.ip, value.port_be)
        found = {}
        for frontend, (count, envoy_port_be) in heads.items():
            have = slots.pop(frontend, {})
            if all(slot in have for slot in range(1, count + 1)):
                found[frontend] = _FrontendEntry(
                    envoy_port_be, tuple(have[slot] for slot in range(1, count + 1))
                )
            else:
                # Torn by a crash mid-write: rewritten in full by the next set_services.
                self.kernel.bpf_delete("steer_svc", SvcKey(*frontend, 0))
                for slot in have:
                    self.kernel.bpf_delete("steer_svc", SvcKey(*frontend, slot))
                continue
            for slot in have.keys() - set(range(1, count + 1)):
                self.kernel.bpf_delete("steer_svc", SvcKey(*frontend, slot))
        for frontend, have in slots.items():  # slots whose frontend is gone
            for slot in have:
                self.kernel.bpf_delete("steer_svc", SvcKey(*frontend, slot))
        return found

    # --- reading -------------------------------------------------------------------------

    def counters(self, slot: int) -> dict[str, int]:
        """Per-pod counters, summed over CPUs."""
        values = self.kernel.bpf_lookup_percpu("steer_counters", ct.c_uint32(slot), CountersVal)
        return {name: sum(getattr(v, name) for v in values) for name in COUNTER_NAMES}

    def map_fill(self) -> dict[str, tuple[int, int]]:
        """map name -> (entries, capacity), for the maps that can fill up; a map that
        cannot be read is left out."""
        fill = {}
        for name in FILLABLE_MAPS:
            entries = self.kernel.bpf_count(name)
            if entries is not None:
                fill[name] = (entries, MAPS[name].max_entries)
        return fill

    def steered_flows(self) -> list[tuple[IPv4Address, int, int, IPv4Address, int]]:
        """(client ip, client port, Envoy's port, original ip, original port) of live L7
        connections."""
        flows = []
        for key in self.kernel.bpf_keys("steer_origdst", FlowKey):
            value = OrigDst()
            if self.kernel.bpf_lookup("steer_origdst", key, value):
                flows.append(
                    (
                        ip_from_be(key.client_ip),
                        key.client_port,
                        key.envoy_port,
                        ip_from_be(value.ip),
                        socket.ntohs(value.port_be),
                    )
                )
        return flows


def _policy_value(entry: PrefixPolicy) -> PolicyVal:
    value = PolicyVal(entry.default, len(entry.segments))
    for i in range(BPF_MAX_SEGMENTS):
        # Unused slots get lo > hi: connect4 walks all of them and they never match.
        seg = entry.segments[i] if i < len(entry.segments) else None
        value.seg[i] = SegmentVal(seg.lo, seg.hi, seg.verdict) if seg else SegmentVal(1, 0, 0)
    return value
