"""One node's datapaths: iptables for every pod, plus eBPF for the pods it can steer.

Per pod, the choice is the annotation `steer.dev/dataplane` against what the node can do
(steer.node.features). The iptables rules always run: they enforce ingress for flows from
pods on iptables and from off the node, and they let eBPF pods' flows through untouched,
since connect4 decided those already. A pod changing datapath keeps its established
connections: conntrack keeps iptables flows' NAT and marks, and sockets already in the
sockhash keep their sk_msg program. A policy change still revokes the connections a pod
opened under eBPF after it moved to iptables (until the agent restarts).

Every kernel call goes through a `NodeKernel` (steer.node.kernel): the host's, or a
recording fake that makes these decisions testable, and showable, without root.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path

from pyroute2.netlink.exceptions import NetlinkError

from steer.constants import (
    BPF_STATE_FILE,
    LAB_GATEWAY_IP,
    VERDICT_ALLOW,
    VERDICT_L7,
)
from steer.model.enforce import Enforcement, Resolver, Touched, decide_flow, resolve, touched
from steer.model.pod import Dataplane, Pod
from steer.model.policy import HTTPPolicy
from steer.model.service import Frontend
from steer.model.servicepolicy import (
    FrontendKey,
    ServicePortKey,
    envoy_frontends,
    expected_verdict,
    service_listeners,
)
from steer.node.bpfbuild import BpfError
from steer.node.bpfobjects import BpfObjects
from steer.node.conntrack import Flow
from steer.node.features import Features, choose, probe
from steer.node.iptables import IptablesError
from steer.node.kernel import HostKernel, NodeKernel
from steer.render.bpf import (
    BpfPolicyCache,
    PodPolicy,
    TooComplexForBpf,
    flow_verdict,
    render_pod_policy,
)
from steer.render.iptables import (
    KernelState,
    Ruleset,
    RulesetCache,
    ServiceSteering,
    chains_to_write,
    cleanup_text,
    render_ipv6_ruleset,
    render_ruleset,
    restore_text,
)

log = logging.getLogger("steer.datapath")

# How often the agents read steer's chains back to find what other tools did to them:
# changes no longer read them (see apply_ruleset). Chain names and entry jumps (a deleted
# jump or chain, a table flushed by hand) every DRIFT_CHECK_S; every rule of every chain,
# which costs more at 1k pods, every CONTENT_CHECK_S. kube-proxy checks its canary chains
# every few seconds, Calico's Felix re-reads its chains every 90 s; a missing jump is a
# bypass, so these err short.
DRIFT_CHECK_S = 5.0
CONTENT_CHECK_S = 30.0


@dataclass
class SyncReport:
    applied: bool
    rules: int
    revoked: int
    apply_ms: float
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # pod key -> (datapath, why)
    dataplanes: dict[str, tuple[str, str]] = field(default_factory=dict)
    # Service frontends the datapath could not hold ("namespace/name address:port"): their
    # connects go to kube-proxy.
    service_fallbacks: list[str] = field(default_factory=list)
    # The Envoy listener of each Service port that has one (steer.model.servicepolicy), by
    # "namespace/name:port name".
    service_listeners: dict[str, int] = field(default_factory=dict)
    # Where the sync's time went, by phase (load, resolve, render, ebpf, iptables, revoke,
    # status), in ms: for `steer status` and the churn benchmark.
    phases_ms: dict[str, float] = field(default_factory=dict)
    # The client end ("ip:port") of each flow revoked, for `steer observe`.
    revoked_flows: list[str] = field(default_factory=list)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            spent = (time.perf_counter() - started) * 1000
            self.phases_ms[name] = self.phases_ms.get(name, 0.0) + spent


def _revoke(report: SyncReport, what: str, action: Callable[[], list[str]]) -> None:
    """Run one revocation pass and count what it revoked; netlink trouble is reported,
    never fatal: the new rules are in force either way, and unrevoked flows end on their
    own."""
    try:
        sources = action()
    except (OSError, NetlinkError, subprocess.SubprocessError) as exc:
        report.errors.append(f"{what} failed: {exc}")
        log.error("rules applied, but %s failed: %s", what, exc)
        return
    report.revoked += len(sources)
    report.revoked_flows += sources


def apply_ruleset(
    kernel: NodeKernel, ruleset: Ruleset, previous: Ruleset | None = None, *, ipv6: bool = False
) -> None:
    """Make steer's chains hold `ruleset`; on any error the kernel keeps the old rules.

    With `previous` (what this process applied last), only the chains that changed are
    written, and nothing is read, before or after: iptables-legacy-restore commits each
    table whole and atomically under the xtables lock, so its exit status is the commit's,
    and reading steer's chains and jumps cost a third of a change at 1k pods. What another
    tool does to them in between is found by `IptablesDatapath.drifted()`, which the
    agents run every DRIFT_CHECK_S; a restore that fails because of it (a chain it relies
    on is gone) is retried at once as a full rewrite. Without `previous`, every chain is
    written and read back.
    """
    if previous is not None:
        try:
            assumed = KernelState.left_by(previous)
            kernel.iptables_restore(restore_text(ruleset, assumed, previous), ipv6=ipv6)
            return
        except IptablesError as exc:
            log.warning(
                "writing the changed %s chains failed (%s); writing all of them again",
                "ip6tables" if ipv6 else "iptables",
                exc,
            )
    before = kernel.iptables_state(ipv6=ipv6)
    writes = chains_to_write(ruleset, before)
    kernel.iptables_restore(restore_text(ruleset, before), ipv6=ipv6)
    kernel.iptables_verify(ruleset, writes, ipv6=ipv6)


def changed_by_others(kernel: NodeKernel, applied: Ruleset, *, ipv6: bool = False) -> bool:
    """The kernel no longer has exactly the chains of `applied`, or misses one of its entry
    jumps (a flush by another tool, a chain deleted by hand), or another tool put a rule
    ahead of one (kube-proxy prepends its jumps when it starts after steer)."""
    state = kernel.iptables_state(ipv6=ipv6)
    return not (
        all(
            state.chains.get(table, frozenset()) == frozenset(chains)
            for table, chains in applied.chains.items()
        )
        and set(applied.jumps) <= state.jumps
        and not set(applied.jumps) & state.misplaced
    )


def revoke_conntrack(
    kernel: NodeKernel, decide: Callable[[Flow], int], scope: Touched | None = None
) -> list[Flow]:
    """Delete the entries of every flow whose verdict `decide` now reaches differently.

    The flow's next packet then has no conntrack entry, is picked up as new and walks the
    new policy: a denied flow gets a reset, an allowed one carries on. Flows whose verdict
    stands are left alone, so a policy change disturbs exactly the flows it affects; with
    a `scope`, only the flows of the addresses it names are read at all, so the work is
    that of the change, not of the conntrack table.
    """
    if scope is None:
        candidates = kernel.conntrack_flows()
    elif not scope:
        return []
    else:
        candidates = kernel.conntrack_flows(sources=scope.sources, destinations=scope.destinations)
    changed = [flow for flow in candidates if decide(flow) != flow.verdict]
    return kernel.conntrack_delete(changed) if changed else []


@dataclass(frozen=True)
class ServiceView:
    """The node's Service frontends as the iptables datapath uses them: which it must
    know, which go to Envoy before kube-proxy, and how a live flow to one is judged."""

    frontends: Mapping[FrontendKey, Frontend] = field(default_factory=dict)
    via_envoy: frozenset[FrontendKey] = frozenset()
    pod_cidrs: tuple[IPv4Network, ...] = ()
    # The Envoy listener of each Service port that has one (steer.model.servicepolicy).
    envoy_ports: Mapping[ServicePortKey, int] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        enforcement: Enforcement,
        frontends: Sequence[Frontend],
        learnable: Sequence[Frontend] = (),
        pod_cidrs: Sequence[IPv4Network] = (),
        envoy_ports: Mapping[ServicePortKey, int] | None = None,
    ) -> ServiceView:
        """`learnable`: the frontends whose backend the getsockopt hook can name to Envoy
        (in steer_svc, the hook on Envoy's cgroup): only those of them whose backends can
        need Envoy go to it before kube-proxy."""
        return cls(
            {(f.ip, f.port): f for f in frontends},
            envoy_frontends(enforcement, learnable),
            tuple(sorted(set(pod_cidrs))),
            envoy_ports or {},
        )

    @property
    def steering(self) -> ServiceSteering:
        ordered = tuple(sorted(self.frontends, key=_frontend_order))
        # The renderer sends only via-Envoy frontends to their listener.
        by_frontend = {
            key: self.envoy_ports[(f.service, f.port_name)]
            for key, f in self.frontends.items()
            if (f.service, f.port_name) in self.envoy_ports
        }
        ports = tuple((key, by_frontend[key]) for key in ordered if key in by_frontend)
        return ServiceSteering(ordered, self.via_envoy, self.pod_cidrs, ports)

    def judge(self, enforcement: Enforcement) -> Callable[[Flow], int]:
        if not self.frontends:
            return lambda f: decide_flow(enforcement, f.src, f.dst, f.dport).verdict
        return lambda f: expected_verdict(
            enforcement, self.frontends, self.via_envoy, (f.src, f.dst, f.dport), reached=f.reached
        )


def _frontend_order(key: FrontendKey) -> tuple[int, int]:
    return (int(key[0]), key[1])


@dataclass
class IptablesDatapath:
    """Owns steer's iptables state in the node's network namespace."""

    kernel: NodeKernel = field(default_factory=HostKernel)
    applied_digest: str | None = None
    applied: Ruleset | None = None
    applied_ipv6: Ruleset | None = None
    enforcement: Enforcement | None = None
    services: ServiceView | None = None
    # Times another tool's change to steer's chains was found and written over.
    repairs: int = 0
    _chains: RulesetCache = field(default_factory=RulesetCache)
    _resolver: Resolver = field(default_factory=Resolver)
    # By ipv6: the rules applied and the tables' fingerprint when a read last found them
    # in place. While both stay, so do steer's chains, and the drift check need not read.
    _found_in_place: dict[bool, tuple[Ruleset, bytes]] = field(default_factory=dict)

    def sync(
        self,
        policies: Sequence[HTTPPolicy],
        pods: Sequence[Pod],
        services: Sequence[Frontend] = (),
    ) -> SyncReport:
        """Everything on iptables: for tests and nodes without eBPF (so no Service flow
        goes to Envoy before kube-proxy: there is no getsockopt hook to name its backend)."""
        enforcement = self._resolver.resolve(policies, pods)
        report = SyncReport(False, 0, 0, 0.0, warnings=list(enforcement.warnings))
        self.apply(enforcement, frozenset(), report, ServiceView.of(enforcement, services))
        return report

    def apply(
        self,
        enforcement: Enforcement,
        ebpf: frozenset[str],
        report: SyncReport,
        services: ServiceView | None = None,
    ) -> bool:
        """True if the rules for `enforcement` are in force (applied now, or already)."""
        services = services or ServiceView()
        with report.phase("iptables"):
            self._apply_ipv6(enforcement, report)
        with report.phase("render"):
            ruleset = render_ruleset(enforcement, ebpf, self._chains, services.steering)
        report.rules = len(ruleset.rules)
        if ruleset == self.applied:
            return True
        started = time.perf_counter()
        try:
            with report.phase("iptables"):
                apply_ruleset(self.kernel, ruleset, self.applied)
        except IptablesError as exc:
            report.errors.append(str(exc))
            log.error("rules not applied, previous rules stay in force: %s", exc)
            return False
        report.apply_ms = (time.perf_counter() - started) * 1000
        report.applied = True
        self.applied_digest = ruleset.digest(self.applied)
        self.applied = ruleset
        scope = touched(self.enforcement, enforcement)
        if services != self.services:
            # Which flows a Service change affects is not worth working out: read them all.
            scope = None
        self.enforcement, self.services = enforcement, services
        with report.phase("revoke"):
            _revoke(
                report,
                "revoking iptables flows",
                lambda: [
                    f"{flow.src}:{flow.sport}"
                    for flow in revoke_conntrack(self.kernel, services.judge(enforcement), scope)
                ],
            )
        return True

    def drifted(self, *, every_rule: bool = False) -> bool:
        """Read steer's chain names and entry jumps back (`every_rule`: also every rule):
        True if another tool changed them since they were applied. The applied rules are
        then forgotten, so that the next sync writes all of them and reads them back."""
        found = []
        if self.applied is not None and self._differs(self.applied, every_rule, ipv6=False):
            self.applied = self.applied_digest = None
            found.append("iptables")
        if self.applied_ipv6 is not None and self._differs(
            self.applied_ipv6, every_rule, ipv6=True
        ):
            self.applied_ipv6 = None
            found.append("ip6tables")
        if found:
            self.repairs += 1
            log.warning(
                "steer's %s chains were changed by another tool; writing them again",
                " and ".join(found),
            )
        return bool(found)

    def _differs(self, applied: Ruleset, every_rule: bool, *, ipv6: bool) -> bool:
        # Taken before the read: a change in between shows in the next fingerprint.
        fingerprint = self.kernel.iptables_fingerprint(ipv6=ipv6)
        in_place = self._found_in_place.pop(ipv6, None)
        if not every_rule and fingerprint is not None and in_place == (applied, fingerprint):
            self._found_in_place[ipv6] = (applied, fingerprint)
            return False
        if changed_by_others(self.kernel, applied, ipv6=ipv6):
            return True
        if every_rule:
            try:
                self.kernel.iptables_verify(applied, applied.chains, ipv6=ipv6)
            except IptablesError:
                return True
        if fingerprint is not None:
            self._found_in_place[ipv6] = (applied, fingerprint)
        return False

    def _apply_ipv6(self, enforcement: Enforcement, report: SyncReport) -> None:
        """IPv6 first: a new pod's IPv6 TCP is refused before its IPv4 steering exists."""
        ruleset = render_ipv6_ruleset(enforcement)
        if ruleset == self.applied_ipv6:
            return
        try:
            apply_ruleset(self.kernel, ruleset, self.applied_ipv6, ipv6=True)
        except IptablesError as exc:
            report.errors.append(str(exc))
            log.error("IPv6 rules not applied, previous rules stay in force: %s", exc)
            return
        self.applied_ipv6 = ruleset

    def plan(self, policies: Sequence[HTTPPolicy], pods: Sequence[Pod]) -> Ruleset:
        return render_ruleset(resolve(policies, pods))

    def unload(self) -> None:
        """Remove steer's jumps and chains; other parties' rules stay exactly as they were."""
        for ipv6 in (False, True):
            current = self.kernel.iptables_state(ipv6=ipv6)
            self.kernel.iptables_restore(cleanup_text(current), ipv6=ipv6)
        self.applied_digest = None
        self.applied_ipv6 = None
        self.applied = None


@dataclass
class EbpfDatapath:
    """The eBPF side: which pods it steers, with which slot and policy."""

    bpf: BpfObjects
    envoy_ip: str
    installed: dict[str, tuple[str, int, PodPolicy]] = field(default_factory=dict)
    # The resolution of the last revocation pass, to tell what the next change touched.
    enforcement: Enforcement | None = None
    # Pods that left eBPF for iptables: connections they opened under eBPF live on (L7
    # ones through Envoy by connect4's rewrite, L4 ones without a verdict mark), and only
    # this side can revoke them.
    former: set[str] = field(default_factory=set)
    map_full_seen: dict[str, int] = field(default_factory=dict)
    # Pods on iptables whose flows the observe program records: key -> cgroup.
    observed: dict[str, str] = field(default_factory=dict)

    def counters(self) -> dict[str, dict[str, int]]:
        """Per-pod counters; a map that filled up since the last look is logged, since
        steering then silently degrades for new connections."""
        out = {key: self.bpf.counters(slot) for key, (_, slot, _) in self.installed.items()}
        for key, count in out.items():
            if count["map_full"] > self.map_full_seen.get(key, 0):
                log.warning(
                    "pod %s: %d BPF map updates failed (map full): new connections may go "
                    "unsteered or unaccelerated; raise the STEER_MAX_* sizes in "
                    "bpf/include/steer/config.h",
                    key,
                    count["map_full"] - self.map_full_seen.get(key, 0),
                )
                self.map_full_seen[key] = count["map_full"]
        return out

    def sync(
        self,
        enforcement: Enforcement,
        wanted: dict[str, PodPolicy],
        envoy_cgroup: str,
        observe: Mapping[str, str] | None = None,
    ) -> None:
        """`observe`: pods on iptables (key -> cgroup) whose flows are to be recorded."""
        bpf = self.bpf
        if envoy_cgroup:
            bpf.attach_envoy(envoy_cgroup)
        pods = {p.pod.key: p for p in enforcement.pods}
        observe = observe or {}
        # Off a pod before its eBPF programs go on: both would record its flows.
        for key, cgroup in list(self.observed.items()):
            if observe.get(key) != cgroup:
                bpf.unobserve_pod(cgroup)
                del self.observed[key]
        for key in [k for k in self.installed if k not in wanted]:
            cgroup, slot, policy = self.installed.pop(key)
            bpf.remove_pod(cgroup, slot, str(policy.ip))
            bpf.release_slot(key)
            self.former.add(key)
        self.former = {k for k in self.former if k in pods and k not in wanted}
        for key, policy in wanted.items():
            cgroup = pods[key].pod.cgroup
            was = self.installed.get(key, ("", 0, None))
            if was[0::2] == (cgroup, policy):
                continue
            slot = bpf.slot_for(key)
            bpf.set_pod(cgroup, slot, policy)
            if was[0] and was[0] != cgroup:
                # The pod's cgroup changed (a pod recreated under the same name has a
                # new UID, and so a new cgroup): the old one keeps no entry and no program.
                bpf.forget_cgroup(was[0])
            self.installed[key] = (cgroup, slot, policy)
        for key, cgroup in observe.items():
            if key not in self.observed:
                bpf.observe_pod(cgroup)
                self.observed[key] = cgroup

    def revoke(self, enforcement: Enforcement) -> list[str]:
        """Abort the connections eBPF pods (and pods that were on eBPF) opened under eBPF
        whose verdict the new policy changes; their client ends ("ip:port")."""
        bpf = self.bpf
        scope = touched(self.enforcement, enforcement)
        self.enforcement = enforcement
        if scope is not None and not scope:
            return []
        by_ip = {
            p.ip: p
            for p in enforcement.pods
            if p.pod.key in self.installed or p.pod.key in self.former
        }
        revoked: list[str] = []
        for client_ip, client_port, envoy_port, orig_ip, orig_port in bpf.steered_flows():
            if scope is not None and not (
                client_ip in scope.sources or orig_ip in scope.destinations
            ):
                continue
            pod = by_ip.get(client_ip)
            if pod is not None and flow_verdict(enforcement, pod, orig_ip, orig_port) != VERDICT_L7:
                bpf.kernel.destroy_socket(
                    pod.pod.netns,
                    (str(client_ip), client_port),
                    (self.envoy_ip, envoy_port),
                )
                revoked.append(f"{client_ip}:{client_port}")
        # Direct flows of eBPF pods carry no verdict mark: read those of the touched
        # addresses (or, with no scope, of every eBPF pod).
        direct = bpf.kernel.conntrack_flows(
            marked=False,
            sources=by_ip.keys() & scope.sources if scope is not None else by_ip.keys(),
            destinations=scope.destinations if scope is not None else (),
        )
        for flow in direct:
            pod = by_ip.get(flow.src)
            if (
                pod is not None
                and flow_verdict(enforcement, pod, flow.dst, flow.dport) != VERDICT_ALLOW
            ):
                bpf.kernel.destroy_socket(
                    pod.pod.netns, (str(flow.src), flow.sport), (str(flow.dst), flow.dport)
                )
                revoked.append(f"{flow.src}:{flow.sport}")
        return revoked


@dataclass
class NodeDatapath:
    envoy_ip: str = LAB_GATEWAY_IP
    kernel: NodeKernel = field(default_factory=HostKernel)
    features: Features = field(default_factory=probe)
    bpf_state_file: Path = BPF_STATE_FILE
    iptables: IptablesDatapath = field(init=False)
    ebpf: EbpfDatapath | None = None
    _resolver: Resolver | None = None
    _resolver_local: Callable[[Pod], bool] | None = None
    _maps: BpfPolicyCache = field(default_factory=BpfPolicyCache)
    _drift_checked_at: float = field(default_factory=time.monotonic)
    _content_checked_at: float = field(default_factory=time.monotonic)
    # Record the flows of pods on iptables with the observe program, where BPF works: the
    # agent's `steer observe` wants them; a datapath driven by a test need not load BPF.
    observe_flows: bool = False

    def __post_init__(self) -> None:
        self.iptables = IptablesDatapath(self.kernel)

    def drifted(self) -> bool:
        """True if steer's iptables chains must be written again because another tool
        changed them (the caller then syncs); reads them at most every DRIFT_CHECK_S, and
        every rule at most every CONTENT_CHECK_S. A failed read is logged and counts as no
        drift: the next check reads again."""
        now = time.monotonic()
        if now - self._drift_checked_at < DRIFT_CHECK_S:
            return False
        self._drift_checked_at = now
        every_rule = now - self._content_checked_at >= CONTENT_CHECK_S
        if every_rule:
            self._content_checked_at = now
        try:
            return self.iptables.drifted(every_rule=every_rule)
        except (IptablesError, OSError) as exc:
            log.warning("reading steer's iptables chains back failed: %s", exc)
            return False

    def _ebpf(self) -> EbpfDatapath | None:
        """Load (or adopt) the BPF objects on first need; a failure turns eBPF off."""
        if self.ebpf is None and self.features.ebpf:
            try:
                bpf = BpfObjects.load(self.kernel, state_file=self.bpf_state_file)
                bpf.configure(self.envoy_ip, self.kernel.netns_cookie(), self.features.skmsg)
            except (BpfError, OSError, subprocess.SubprocessError) as exc:
                log.error("eBPF datapath unavailable, every pod stays on iptables: %s", exc)
                self.features = self.features.without_ebpf(
                    f"loading the BPF programs failed: {exc}"
                )
                return None
            log.info(
                "eBPF datapath ready (%s pinned objects, sk_msg %s)",
                "adopted" if bpf.adopted else "compiled",
                "on" if self.features.skmsg else f"off: {self.features.skmsg_reason}",
            )
            self.ebpf = EbpfDatapath(bpf, self.envoy_ip)
        return self.ebpf

    def _choose(self, enforcement: Enforcement, report: SyncReport) -> dict[str, PodPolicy]:
        wanted: dict[str, PodPolicy] = {}
        for pod in enforcement.pods:
            dataplane, why = choose(pod.steering.dataplane, self.features, bool(pod.pod.cgroup))
            if dataplane is Dataplane.EBPF:
                try:
                    wanted[pod.pod.key] = render_pod_policy(enforcement, pod, cache=self._maps)
                except TooComplexForBpf as exc:
                    dataplane, why = Dataplane.IPTABLES, f"policy too complex for eBPF: {exc}"
            report.dataplanes[pod.pod.key] = (dataplane.value, why)
        self._maps.forget_unused()
        return wanted

    def sync(
        self,
        policies: Sequence[HTTPPolicy],
        pods: Sequence[Pod],
        envoy_cgroup: str = "",
        local: Callable[[Pod], bool] | None = None,
        *,
        services: Sequence[Frontend] = (),
        pod_cidrs: Sequence[IPv4Network] = (),
    ) -> SyncReport:
        """`local`: the pods on this node (default: all); the others are only peers. Pass
        the same `local` every time: the resolver's memory is kept per predicate.
        `services`: the frontends eBPF pods' connects are balanced over. `pod_cidrs`: where
        pod addresses come from (flows to them skip kube-proxy's rules)."""
        # `!=`, not `is not`: a bound method is a new object on every attribute access.
        if self._resolver is None or self._resolver_local != local:
            self._resolver, self._resolver_local = Resolver(local), local
        started = time.perf_counter()
        enforcement = self._resolver.resolve(policies, pods)
        report = SyncReport(False, 0, 0, 0.0, warnings=list(enforcement.warnings))
        report.phases_ms["resolve"] = (time.perf_counter() - started) * 1000
        with report.phase("render"):
            wanted = self._choose(enforcement, report)
        # Services need the programs even with every pod on iptables: the getsockopt hook
        # names the backend of a Service flow sent to Envoy before kube-proxy.
        observe = (
            {
                p.pod.key: p.pod.cgroup
                for p in enforcement.pods
                if p.pod.key not in wanted and p.pod.cgroup
            }
            if self.observe_flows and self.features.ebpf
            else {}
        )
        ebpf = self._ebpf() if wanted or services or observe else self.ebpf
        if wanted and ebpf is None:
            # Loading failed just now and turned eBPF off: every pod goes to iptables,
            # with the load error as the reason.
            report.dataplanes.clear()
            wanted = self._choose(enforcement, report)
        # The Services whose backends Envoy can learn from the getsockopt hook: those in
        # steer_svc, once the hook is on Envoy's cgroup. Only they may go to Envoy before
        # kube-proxy; Envoy would otherwise forward to the ClusterIP, past the backend's
        # rules.
        known: list[Frontend] = []
        envoy_ports = {
            key: listener.envoy_port
            for key, listener in service_listeners(enforcement, services).items()
        }
        report.service_listeners = {f"{s}:{name}": port for (s, name), port in envoy_ports.items()}
        if ebpf is not None:
            # eBPF first: a pod's verdicts are in its maps before iptables lets its new
            # flows through unexamined.
            try:
                with report.phase("ebpf"):
                    # Services before pods: a pod new to eBPF never dials a ClusterIP that
                    # connect4 does not know yet (it would reach kube-proxy unbalanced).
                    failed = ebpf.bpf.set_services(list(services), envoy_ports)
                    report.service_fallbacks = [f.label for f in failed]
                    ebpf.sync(enforcement, wanted, envoy_cgroup, observe)
                if envoy_cgroup:
                    known = [f for f in services if f not in failed]
            except (OSError, RuntimeError) as exc:
                report.errors.append(f"eBPF update failed: {exc}")
                log.error("eBPF update failed; those pods keep their previous state: %s", exc)
        # Both revocation passes (iptables flows after the rules are in force, then eBPF
        # flows) read one conntrack listing: each listing walks the kernel's whole table.
        view = ServiceView.of(enforcement, services, known, pod_cidrs, envoy_ports)
        with self.kernel.one_conntrack_listing():
            in_force = self.iptables.apply(enforcement, frozenset(wanted), report, view)
            # Even when the iptables rules stay as they were: an eBPF pod's verdicts live
            # in its maps. Only what the change touched is read.
            if ebpf is not None and in_force:
                with report.phase("revoke"):
                    _revoke(report, "revoking eBPF flows", lambda: ebpf.revoke(enforcement))
        return report

    def unload(self) -> None:
        self.iptables.unload()

    def ebpf_counters(self) -> dict[str, dict[str, int]]:
        if self.ebpf is None:
            return {}
        try:
            return self.ebpf.counters()
        except BpfError as exc:  # status is best effort; steering goes on regardless
            log.warning("reading eBPF counters failed: %s", exc)
            return {}

    def ebpf_map_fill(self) -> dict[str, tuple[int, int]]:
        """map name -> (entries, capacity); empty without BPF."""
        return self.ebpf.bpf.map_fill() if self.ebpf is not None else {}

    def close(self) -> None:
        """Let go of the BPF objects: the kernel frees them once unpinned and unheld."""
        if self.ebpf is not None:
            self.ebpf.bpf.close()
            self.ebpf = None
