"""steer's command line: demo | lab | control | agent | envoy | render | status."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steer.constants import (
    AGENT_STATUS_FILE,
    ANNOTATION_DATAPLANE,
    CONTROL_SERVICE,
    CONTROL_STATUS_FILE,
    ENVOY_ADMIN_SOCKET,
    ENVOY_LOG_FILE,
    LAB_GATEWAY_IP,
    LAB_NODE_NAME,
    LAB_STATE_FILE,
    NODE_NETNS,
    OBSERVE_SOCKET,
    POLICY_DIR,
    SYSTEM_NAMESPACE,
    WEBHOOK_PORT,
    XDS_NODE_TLS_DIR,
    XDS_PORT,
    XDS_SOCKET,
)
from steer.logformat import JsonFormatter

if TYPE_CHECKING:
    from steer.source.local import LocalInputs


def _print_json(document: object) -> None:
    print(json.dumps(document, indent=2, sort_keys=False))


def cmd_lab(args: argparse.Namespace) -> int:
    from steer.lab.services import default_lab_services
    from steer.lab.spec import (
        LabConfig,
        LabError,
        LabPodSpec,
        default_lab_specs,
        lab_config_from_yaml,
    )
    from steer.lab.updown import lab_down, lab_status, lab_up

    if args.action == "down":
        from steer.node.bpfobjects import BpfObjects
        from steer.node.kernel import HostKernel

        lab_down(args.lab_state)
        # The lab's agent pinned its BPF objects node-wide (so that a restart adopts them);
        # with the lab gone nothing uses them.
        BpfObjects.unload_all(HostKernel())
        return 0
    if args.action == "up":
        try:
            config = (
                lab_config_from_yaml(args.config.read_text(), str(args.config))
                if args.config
                else LabConfig(default_lab_specs(), default_lab_services())
            )
        except (OSError, LabError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        specs = config.pods + [
            LabPodSpec(name=f"pod-{i}", labels={"app": "filler"})
            for i in range(max(0, args.pods - len(config.pods)))
        ]
        try:
            state = lab_up(specs, args.lab_state, config.services)
        except LabError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    else:
        found = lab_status(args.lab_state)
        if found is None:
            print("no lab is up; fix: steer lab up", file=sys.stderr)
            return 1
        state = found
    if args.json:
        _print_json(state.to_json())
    else:
        print(f"node netns {state.node_netns}")
        for pod in state.pods:
            print(f"  {pod.namespace}/{pod.name:<12} {pod.ip:<14} {pod.netns:<28} {pod.veth}")
        for service in state.services:
            ports = ", ".join(f"{p.port}->{p.target}" for p in service.ports)
            address = service.cluster_ip or "None (headless)"
            print(f"  service {service.key:<20} {address:<14} {ports}")
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    if args.kube:
        return _run_kube_control(args)
    from steer.control.plane import LocalControlPlane
    from steer.source.local import LocalInputs

    plane = LocalControlPlane(LocalInputs(args.policies, args.lab_state), node_id=args.node_id)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(plane.run(args.socket))
    return 0


def _stop_on_sigterm() -> threading.Event:
    """An event SIGTERM sets; the loops look at it at least once a second and stop cleanly.
    In a container the agent and `steer envoy` run as PID 1, which the kernel gives no
    default action for SIGTERM: without a handler every pod delete or rollout waited out
    the grace period and ended in SIGKILL, Envoy undrained. (Raising from the handler is
    not enough: an exception raised while a weakref callback or __del__ runs is printed
    and dropped, and the process carried on.)"""
    import signal

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    return stop


def cmd_agent(args: argparse.Namespace) -> int:
    from steer.node.agent import LocalAgent
    from steer.node.datapath import NodeDatapath
    from steer.source.local import LocalInputs

    stop = _stop_on_sigterm()
    if args.kube:
        # API calls must leave from the agent's own namespace; only the datapath's kernel
        # calls go into --netns (see KubeAgent.datapath_netns).
        return _run_kube_agent(args, stop)
    if args.netns and (problem := _enter_node_netns(args.netns)):
        print(f"error: {problem}", file=sys.stderr)
        return 1
    inputs = LocalInputs(args.policies, args.lab_state)
    if args.dry_run:
        return _agent_dry_run(inputs, args.envoy_ip or LAB_GATEWAY_IP)
    agent = LocalAgent(
        inputs,
        datapath=NodeDatapath(envoy_ip=args.envoy_ip or LAB_GATEWAY_IP, observe_flows=True),
    )
    if args.once:
        report = agent.sync()
        for message in report.errors:
            print(f"error: {message}", file=sys.stderr)
        return 1 if report.errors else 0
    with contextlib.suppress(KeyboardInterrupt):
        agent.run(stop)
    return 0


def _agent_dry_run(inputs: LocalInputs, envoy_ip: str) -> int:
    """Print every kernel call one sync would make, changing nothing: the agent's own
    decisions against a recording kernel that starts from the node's current rules."""
    import tempfile

    from steer.node import iptables
    from steer.node.datapath import NodeDatapath
    from steer.node.fakekernel import RecordingKernel
    from steer.render.iptables import KernelState

    policies, pods = inputs.load()
    for error in policies.errors:
        print(f"error: {error}", file=sys.stderr)
    try:
        current = iptables.read_state()
    except Exception:  # no iptables access: plan against an empty node
        current = KernelState()
    kernel = RecordingKernel(
        chains={table: set(chains) for table, chains in current.chains.items()},
        jumps=set(current.jumps),
    )
    with tempfile.TemporaryDirectory() as scratch:
        datapath = NodeDatapath(
            envoy_ip=envoy_ip, kernel=kernel, bpf_state_file=Path(scratch) / "bpf-state.json"
        )
        report = datapath.sync(policies.policies, pods, inputs.node_cgroup())
    sys.stdout.write("".join(f"{call}\n" for call in kernel.calls))
    for message in report.errors:
        print(f"error: {message}", file=sys.stderr)
    return 1 if policies.errors or report.errors else 0


def _enter_node_netns(netns: str) -> str | None:
    """Move into the node's network namespace; None, or what went wrong and its fix."""
    from steer.node.netns import enter_netns, netns_path

    try:
        path = netns_path(netns)
    except ValueError as exc:
        return f"--netns: {exc}; fix: pass a namespace name, or --netns '' for the current one"
    if not path.exists():
        return (
            f"no lab node namespace {netns} ({path} does not exist); "
            "fix: steer lab up, or pass --netns ''"
        )
    try:
        enter_netns(netns)
    except OSError as exc:
        return f"cannot enter network namespace {netns}: {exc}; fix: run as root"
    return None


def _kube_client(kubeconfig: str | None) -> object:
    """In-cluster credentials unless a kubeconfig is given."""
    from kubernetes import client, config

    kube_config: Any = config  # the kubernetes client is untyped
    if kubeconfig:
        return kube_config.new_client_from_config(config_file=kubeconfig)
    kube_config.load_incluster_config()
    return client.ApiClient()


def _run_kube_agent(args: argparse.Namespace, stop: threading.Event) -> int:
    from steer.node.cgroups import cgroup2_root
    from steer.node.datapath import NodeDatapath
    from steer.node.kubeagent import KubeAgent

    if not args.node_name or not args.envoy_ip:
        print(
            "--kube needs --node-name and --envoy-ip (the downward API's spec.nodeName and "
            "status.hostIP: pods reach the node's Envoy on the node's address)",
            file=sys.stderr,
        )
        return 2
    api = _kube_client(args.kubeconfig)
    root = Path(args.cgroup_root) if args.cgroup_root else cgroup2_root()
    agent = KubeAgent(
        api,
        args.node_name,
        root,
        NodeDatapath(envoy_ip=args.envoy_ip, observe_flows=True),
        envoy_cgroup=args.envoy_cgroup or _own_pod_cgroup(api, root),
        envoy_admin=args.envoy_admin,
        datapath_netns=args.netns,
    )
    with contextlib.suppress(KeyboardInterrupt):
        agent.run(stop)
    return 0


def _run_kube_control(args: argparse.Namespace) -> int:
    from steer.control.kubeplane import KubeControlPlane
    from steer.control.webhook import build_app, kube_namespace_labels, serve_webhook

    api = _kube_client(args.kubeconfig)
    leader = _leader_elector(args, api)
    if isinstance(leader, str):
        print(f"error: {leader}", file=sys.stderr)
        return 2
    plane = KubeControlPlane(api, leader=leader)
    webhook = None
    if args.webhook_cert and args.webhook_key:

        async def webhook() -> None:
            app = build_app(kube_namespace_labels(api))
            await serve_webhook(
                app, "0.0.0.0", args.webhook_port, Path(args.webhook_cert), Path(args.webhook_key)
            )
    elif args.webhook_cert or args.webhook_key:
        print("--webhook-cert and --webhook-key go together", file=sys.stderr)
        return 2
    tls_files = _tls_files(
        args,
        ("--xds-cert", "xds_cert"),
        ("--xds-key", "xds_key"),
        ("--xds-client-ca", "xds_client_ca"),
    )
    if isinstance(tls_files, str):
        print(f"error: {tls_files}", file=sys.stderr)
        return 2
    xds_tls = None
    if tls_files:
        from steer.control.xds import XdsServerTls

        xds_tls = XdsServerTls(*tls_files)
    socket = args.socket if args.socket != XDS_SOCKET else None

    async def serve() -> None:
        # SIGTERM (the pod is deleted, drained or rolled) ends the plane cleanly, so a
        # leader releases its Lease and another replica writes status at once, not only
        # once the Lease expires.
        import signal

        task = asyncio.current_task()
        if task is not None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        await plane.run(args.xds_port, socket, webhook, xds_tls=xds_tls)

    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        asyncio.run(serve())
    return 0


LEASE_FLAGS = (
    ("--identity", "identity"),
    ("--lease-name", "lease_name"),
    ("--lease-namespace", "lease_namespace"),
    ("--lease-duration", "lease_duration"),
    ("--renew-deadline", "renew_deadline"),
    ("--retry-period", "retry_period"),
)


def _leader_elector(args: argparse.Namespace, api: object) -> Any:
    """The Lease elector `--leader-elect` asks for (None without it), or what is wrong
    with the flags and its fix."""
    import socket
    import uuid

    from steer.constants import LEADER_LEASE_NAME
    from steer.control.leader import KubeLeaseApi, LeaseElector, LeaseTimings

    if not args.leader_elect:
        stray = [flag for flag, dest in LEASE_FLAGS if getattr(args, dest) is not None]
        if stray:
            return f"{', '.join(stray)} only mean something with --leader-elect; fix: add it"
        return None
    given = {
        field: value
        for field in ("lease_duration", "renew_deadline", "retry_period")
        if (value := getattr(args, field)) is not None
    }
    timings = LeaseTimings(**given)
    if problems := timings.problems():
        return "; ".join(problems)
    # The pod name (downward API) is unique among replicas and stays the same across a
    # restart of the container, which then renews its own Lease at once. Outside a pod, a
    # random suffix keeps two processes on one host apart.
    identity = (
        args.identity
        or os.environ.get("POD_NAME")
        or f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
    )
    namespace = args.lease_namespace or os.environ.get("POD_NAMESPACE") or SYSTEM_NAMESPACE
    return LeaseElector(
        KubeLeaseApi(api, timings.renew_deadline),
        identity,
        args.lease_name or LEADER_LEASE_NAME,
        namespace,
        timings,
    )


def _tls_files(args: argparse.Namespace, *flags: tuple[str, str]) -> list[Path] | str:
    """The files named by a group of flags that go together: all of them (checked to be
    readable), none, or what is wrong and its fix."""
    given = [(flag, getattr(args, dest)) for flag, dest in flags]
    if not any(value for _, value in given):
        return []
    missing = [flag for flag, value in given if not value]
    if missing:
        together = ", ".join(flag for flag, _ in given)
        return f"{together} go together; fix: also pass {', '.join(missing)}"
    paths = []
    for flag, value in given:
        path = Path(value)
        try:
            path.read_bytes()
        except OSError as exc:
            return f"{flag} {value}: {exc.strerror or exc}; fix: point it at a readable PEM file"
        paths.append(path)
    return paths


def cmd_certs(args: argparse.Namespace) -> int:
    from steer.control.certs import (
        NODES_DIR,
        XDS_CERT_FILE,
        XDS_KEY_FILE,
        ca_bundle_b64,
        generate,
        issue_nodes,
    )

    nodes = args.node or []
    try:
        if args.existing_ca:
            if not nodes:
                print(
                    "--existing-ca issues node certificates; fix: pass --node NAME", file=sys.stderr
                )
                return 2
            issue_nodes(args.out, nodes, args.days, force=args.force)
        else:
            paths = generate(
                args.service,
                args.namespace,
                args.out,
                args.days,
                force=args.force,
                xds=True,
                nodes=nodes,
                keep_ca_key=args.keep_ca_key,
            )
    except FileExistsError as exc:
        print(f"{exc}; fix: pass --force to replace them", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for node in nodes:
        print(
            f"node {node}: copy {args.out / NODES_DIR / node}/ (tls.crt, tls.key, ca.crt) "
            f"to {XDS_NODE_TLS_DIR}/ on that node, key readable by root only"
        )
    if args.existing_ca:
        return 0
    out = args.out
    print(
        f"wrote {paths.ca}, {paths.cert}, {paths.key}, {out / XDS_CERT_FILE}, {out / XDS_KEY_FILE}"
    )
    print(
        f"create the Secret: kubectl -n {args.namespace} create secret tls "
        f"steer-webhook-tls --cert={paths.cert} --key={paths.key}"
    )
    print(
        f"and the xDS one: kubectl -n {args.namespace} create secret generic steer-xds-tls "
        f"--from-file=tls.crt={out / XDS_CERT_FILE} --from-file=tls.key={out / XDS_KEY_FILE} "
        f"--from-file=ca.crt={paths.ca}"
    )
    print(f"caBundle for the webhook configurations: {ca_bundle_b64(paths.ca)}")
    return 0


def _own_pod_cgroup(api: Any, root: Path) -> str:
    """The agent shares its pod with Envoy: the pod-level cgroup holds both containers.
    Found by the pod's UID like any pod's (the agent may run in a private cgroup namespace,
    where /proc/self/cgroup says only "/")."""
    from kubernetes import client

    from steer.node.cgroups import ResolveError, pod_cgroup

    name, namespace = os.environ.get("POD_NAME"), os.environ.get("POD_NAMESPACE")
    if not name or not namespace:
        return ""
    try:
        core: Any = client.CoreV1Api(api)
        own = core.read_namespaced_pod(name, namespace, _preload_content=False)
        found = pod_cgroup(json.loads(own.data), root)
    except (ResolveError, OSError, ValueError) as exc:
        print(
            f"warning: Envoy's cgroup not found ({exc}); eBPF pods stay on iptables",
            file=sys.stderr,
        )
        return ""
    return str(found or "")


def cmd_unload(args: argparse.Namespace) -> int:
    """eBPF by default: every program, pin and map, and no iptables rule. With --iptables,
    steer's chains and entry jumps in the node, and no BPF object."""
    if args.iptables:
        from steer.node.datapath import IptablesDatapath
        from steer.node.netns import enter_netns

        if args.netns:
            enter_netns(args.netns)
        IptablesDatapath().unload()
    else:
        from steer.node.bpfobjects import BpfObjects
        from steer.node.kernel import HostKernel

        BpfObjects.unload_all(HostKernel())
    return 0


def cmd_envoy(args: argparse.Namespace) -> int:
    from steer.node.envoy import supervise
    from steer.node.netns import enter_netns
    from steer.source.local import load_lab_node_cgroup

    # Envoy's cgroup is where the eBPF datapath answers SO_ORIGINAL_DST and sees Envoy's
    # sockets; join it before Envoy starts, so Envoy inherits it.
    cgroup = args.cgroup if args.cgroup is not None else load_lab_node_cgroup(args.lab_state)
    if cgroup:
        (Path(cgroup) / "cgroup.procs").write_text(str(os.getpid()))
    if args.netns:
        enter_netns(args.netns)
    xds: Path | tuple[str, int] = args.socket
    if args.xds_address:
        host, _, port = args.xds_address.rpartition(":")
        if not host or not port.isdigit():
            print(
                "--xds-address wants host:port, e.g. steer-control.steer-system.svc:15010",
                file=sys.stderr,
            )
            return 2
        xds = (host, int(port))
    tls_files = _tls_files(
        args,
        ("--xds-client-cert", "xds_client_cert"),
        ("--xds-client-key", "xds_client_key"),
        ("--xds-ca", "xds_ca"),
    )
    if isinstance(tls_files, str):
        print(f"error: {tls_files}", file=sys.stderr)
        return 2
    if tls_files and not args.xds_address:
        print(
            "error: --xds-client-cert and the like secure --xds-address (TCP); the Unix "
            "socket is guarded by its file mode; fix: drop them, or pass --xds-address",
            file=sys.stderr,
        )
        return 2
    from steer.render.bootstrap import XdsClientTls

    xds_tls = XdsClientTls(*tls_files) if tls_files else None
    stop = _stop_on_sigterm()
    with contextlib.suppress(KeyboardInterrupt):  # also between two runs of Envoy
        supervise(
            args.node_id,
            xds,
            args.ads,
            admin=args.admin_socket,
            xds_tls=xds_tls,
            stop=stop,
            log_path=None if str(args.log_path) == "-" else args.log_path,
            json_logs=args.log_format == "json",
            concurrency=args.concurrency,
        )
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    if args.what == "crd":
        from steer.render.crd import crd_yaml

        sys.stdout.write(crd_yaml())
        return 0
    from google.protobuf.json_format import MessageToDict

    from steer.model.enforce import resolve
    from steer.render.iptables import KernelState, render_ruleset, restore_text
    from steer.render.xds import render_resources
    from steer.source.local import LocalInputs

    loaded, pods = LocalInputs(args.policies, args.lab_state).load()
    for error in loaded.errors:
        print(f"error: {error}", file=sys.stderr)
    enforcement = resolve(loaded.policies, pods)
    if args.what == "iptables":
        sys.stdout.write(restore_text(render_ruleset(enforcement), KernelState()))
    else:
        _print_json(
            {
                type_url: {name: MessageToDict(msg) for name, msg in by_name.items()}
                for type_url, by_name in render_resources(enforcement).items()
            }
        )
    return 1 if loaded.errors else 0


def _pod_and_port(value: str) -> tuple[str, int]:
    key, _, port = value.rpartition(":")
    if not key or "/" not in key or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not NAMESPACE/POD:PORT; fix: e.g. default/web:8080"
        )
    return key, int(port)


def _bench_scenarios() -> list[str]:
    from steer.bench import SCENARIOS

    return list(SCENARIOS)


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 1")
    return int(value)


def _pod_key(value: str) -> str:
    if value.count("/") != 1 or value.startswith("/") or value.endswith("/"):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not NAMESPACE/POD; fix: e.g. default/client"
        )
    return value


def _header(value: str) -> tuple[str, str]:
    name, sep, header_value = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{value!r} is not NAME=VALUE; fix: e.g. x-team=blue")
    return name, header_value


def cmd_explain(args: argparse.Namespace) -> int:
    from steer.model.explain import HTTPRequest, UnknownPod, explain_pods
    from steer.source.local import LocalInputs

    dataplanes: dict[str, str | None]
    if args.kubeconfig:
        from steer.source.kube import read_cluster_inputs

        cluster = read_cluster_inputs(_kube_client(args.kubeconfig))
        policies, errors, pods = cluster.policies, cluster.errors, cluster.pods
        # The datapath a pod asked for; which one it got is in its node agent's status.
        dataplanes = {p.key: p.annotations.get(ANNOTATION_DATAPLANE) for p in pods}
        where = "in the cluster; fix: `kubectl get pods -A` lists them"
    else:
        loaded, pods = LocalInputs(args.policies, args.lab_state).load()
        policies, errors = loaded.policies, loaded.errors
        agent = _read_status_document(STATUS_AGENT_FILE, "agent")[0] or {}
        dataplanes = {
            f"{p.get('namespace')}/{p.get('name')}": p.get("dataplane")
            for p in agent.get("pods", [])
        }
        where = "on the node; fix: `steer lab status` lists the pods"
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    dst_key, port = args.to
    request = HTTPRequest(args.method, args.path, args.host, tuple(args.header), args.service)
    try:
        result = explain_pods(
            policies,
            pods,
            args.source,
            args.to,
            request,
            dataplane=dataplanes.get(args.source),
        )
    except UnknownPod as exc:
        print(f"error: no pod {exc.args[0]} {where}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(
            f"{request.method} {request.path} from {args.source} to {dst_key}:{port}\n"
            f"  datapath  {result.dataplane or 'unknown (no agent status)'}\n"
            f"  L4        {result.l4}\n"
            f"  Envoy     {'yes' if result.via_envoy else 'no'}\n"
            f"  HTTP      {result.http or '-'}\n"
            f"  decided   {result.policy or '-'} / {result.rule or '-'}\n"
            f"  why       {result.reason}"
        )
    return 1 if errors else 0


# Where `steer observe` reads; module-level so tests can point it elsewhere.
OBSERVE_PATH = OBSERVE_SOCKET


def cmd_observe(args: argparse.Namespace) -> int:
    from steer.node.observe import matches, one_line, read_events

    filters = {
        "pod": args.pod,
        "namespace": args.namespace,
        "verdict": args.verdict,
        "dataplane": args.dataplane,
        "port": args.port,
        "status": args.status,
        "policy": args.policy,
        "layer": args.layer,
    }
    try:
        for event in read_events(args.last, follow=args.follow, path=OBSERVE_PATH):
            if not matches(event, filters):
                continue
            print(json.dumps(event) if args.json else one_line(event), flush=True)
    except OSError as exc:
        print(
            f"error: no agent answers on {OBSERVE_PATH} ({exc.strerror or exc}); fix: start "
            "the agent (`steer demo --keep`, or `steer agent`); in a cluster, run this in "
            "the node's steer agent container (kubectl exec)",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        pass
    return 0


# Where `steer status` reads; module-level so tests can point them at temporary files.
STATUS_AGENT_FILE = AGENT_STATUS_FILE
STATUS_CONTROL_FILE = CONTROL_STATUS_FILE
STATUS_XDS_SOCKET = XDS_SOCKET
AGENT_FIX = (
    "start the agent: on the local node `steer agent` (or the whole node: "
    "`steer demo --keep`); in a cluster, look at this node's steer-node pod: "
    "kubectl -n steer-system get pods -l app.kubernetes.io/component=node -o wide"
)
CONTROL_FIX = "start it: `steer control` (or the whole node: `steer demo --keep`)"


def cmd_status(args: argparse.Namespace) -> int:
    """Exit 1 when no agent runs (the agent is what enforces: without it no pod is steered,
    whatever the control plane does), else 0. A missing local control plane is shown with
    its fix but does not fail: Envoy keeps enforcing its last config, only changes wait."""
    agent, agent_problem = _agent_status(STATUS_AGENT_FILE)
    in_cluster = agent is not None and agent.get("mode") == "kubernetes"
    # In a cluster the control plane runs in its own pod and writes no file on the node.
    control, control_problem = (
        (None, None) if in_cluster else _control_status(STATUS_CONTROL_FILE, STATUS_XDS_SOCKET)
    )
    problems = [p for p in (agent_problem, control_problem) if p is not None]
    if args.json:
        _print_json({"agent": agent, "control": control, "problems": problems})
        return 1 if agent is None else 0
    if agent is None:
        print(agent_problem)
    else:
        _print_agent(agent)
    if control is not None:
        _print_control(control)
    elif in_cluster:
        print(
            "control plane: in its own pod (steer-control); its push state per node is in each "
            "policy's status: kubectl get httppolicies -A (Accepted, Programmed)"
        )
    else:
        print(control_problem)
    return 1 if agent is None else 0


def _read_status_document(path: Path, writer: str) -> tuple[dict[str, Any] | None, str]:
    """The status document at `path`, or None and what is wrong with it."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, f"no status file {path}"
    except PermissionError as exc:
        return None, f"cannot read {path}: {exc.strerror}; fix: run steer status as root"
    except OSError as exc:
        return None, (
            f"cannot read {path}: {exc.strerror or exc}; fix: remove it, the {writer} "
            "writes it again when it next changes"
        )
    try:
        document = json.loads(text)
    except ValueError as exc:
        document, problem = None, str(exc)
    else:
        problem = "not a JSON object"
    if not isinstance(document, dict):
        # The writers replace the file whole, so a torn write cannot cause this.
        return None, (
            f"{path} is not a status document ({problem}); fix: remove it, the {writer} "
            "writes it again when it next changes"
        )
    return document, ""


def _agent_status(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    document, problem = _read_status_document(path, "agent")
    if document is not None and not isinstance(document.get("pods"), list):
        document, problem = None, f"{path} has no list of pods; fix: remove it"
    if document is None:
        return None, f"agent: not running or unknown ({problem}); fix: {AGENT_FIX}"
    if _lock_is_free(document.get("lock")):
        return None, (
            f"agent: not running ({path} was left by an agent that has stopped; its last sync "
            f"was {_ago(document.get('loaded_at'))}); fix: {AGENT_FIX}"
        )
    return document, None


def _control_status(path: Path, socket_path: Path) -> tuple[dict[str, Any] | None, str | None]:
    document, problem = _read_status_document(path, "control plane")
    if document is None:
        return None, f"control plane: not running or unknown ({problem}); fix: {CONTROL_FIX}"
    if _socket_listens(socket_path) is False:
        return None, (
            f"control plane: not running ({path} was left by a control plane that has "
            f"stopped: nothing listens on {socket_path}); fix: {CONTROL_FIX}"
        )
    return document, None


def _lock_is_free(lock: object) -> bool:
    """True if nobody holds the agent's lock: the agent that wrote the file is gone (the
    kernel drops a lock with its process, kill -9 included). False where that cannot be
    told (an agent too old to name a lock, a lock file this user cannot open)."""
    import fcntl

    if not isinstance(lock, str) or not lock:
        return False
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        # Shared and non-blocking: held for microseconds, it never stalls the agent.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: the agent holds it
        return False
    finally:
        os.close(fd)  # also releases the shared lock if it was taken
    return True


def _socket_listens(path: Path) -> bool | None:
    """Whether something accepts connections on the Unix socket; None if it cannot be told
    (this user may not connect)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        except OSError:
            return None
    return True


def _ago(when: object) -> str:
    import time

    if not isinstance(when, int | float) or isinstance(when, bool) or when <= 0:
        return "at an unknown time"
    seconds = max(0.0, time.time() - when)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def _print_agent(agent: dict[str, Any]) -> None:
    where = f"node {agent['node']} (kubernetes)" if agent.get("mode") == "kubernetes" else "local"
    line = f"agent: running, {where}, last sync {_ago(agent.get('loaded_at'))}"
    if waiting := agent.get("gates_waiting"):
        line += f", {waiting} readiness gate(s) waiting"
    print(line)
    print("pods:")
    for pod in agent["pods"]:
        name = f"{pod.get('namespace')}/{pod.get('name')}"
        print(f"  {name:<20} {pod.get('dataplane', '?'):<9} {pod.get('reason', '')}")
        if counts := pod.get("ebpf_counters"):
            print("      " + " ".join(f"{key}={value}" for key, value in counts.items()))
        if gate := pod.get("readiness_gate"):
            print(f"      readiness gate: {gate}")
    if ipv6 := agent.get("ipv6"):
        print(f"  ipv6: {ipv6}")
    _print_services(agent.get("services") or [])
    for error in (agent.get("last_sync") or {}).get("errors", []):
        print(f"  error: {error}")
    if loop_errors := agent.get("loop_errors"):
        print(f"  {loop_errors} failed sync(s) since the agent started; see its log")


def _print_services(services: list[dict[str, Any]]) -> None:
    if not services:
        return
    print("services:")
    for service in services:
        name = f"{service.get('namespace')}/{service.get('name')}"
        print(f"  {name:<20} {service.get('cluster_ip') or 'None (headless)'}")
        for frontend in service.get("frontends", []):
            backends = ", ".join(frontend.get("backends", [])) or "no backend: refused"
            listener = frontend.get("envoy_listener")
            print(
                f"      {frontend.get('address')} -> {backends} "
                f"(balanced by {frontend.get('balanced_by')}"
                + (f"; HTTP via Envoy :{listener}" if listener else "")
                + ")"
            )
        for problem in service.get("problems", []):
            print(f"      {problem.get('reason')}: {problem.get('message')}")


def _print_control(control: dict[str, Any]) -> None:
    print(
        f"control plane: node {control.get('node')} streams={control.get('streams')} "
        f"pushes={control.get('pushes')} acks={control.get('acks')} "
        f"nacks={control.get('nacks')}"
    )
    if nack := control.get("last_nack"):
        print(f"  last NACK: {nack.get('detail')}")
    for held in control.get("quarantined", []):
        print(f"  held back: {held['policy']}: Envoy refused it: {held['reason']}")
    for error in control.get("errors", []):
        print(f"  error: {error}")


def cmd_demo(args: argparse.Namespace) -> int:
    from steer.demo import run_demo

    result = run_demo(keep=args.keep, dataplane=args.dataplane, ads=args.ads)
    if args.json:
        _print_json(result.to_json())
    else:
        print(result.table())
    if args.keep:
        # stderr with --json, so stdout stays one JSON document.
        print(
            "the node keeps running (control plane, agent, Envoy, in the lab's namespaces); "
            "see it with `steer status`; stop it, BPF programs and maps included, with "
            "`steer lab down`",
            file=sys.stderr if args.json else sys.stdout,
        )
    return 0 if result.ok else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from steer.bench import SCENARIOS, BenchOptions, scenario
    from steer.bench.report import BENCH_DIR, write_report

    if args.scenario == "report":
        print(f"wrote {write_report()}")
        return 0

    def progress(step: str) -> None:
        print(f"\r{args.scenario}: {step:<50}", end="", file=sys.stderr, flush=True)

    options = BenchOptions(rounds=args.rounds, quick=args.quick, progress=progress)
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    out = BENCH_DIR if args.scenario == "all" else args.out
    for name in names:
        module = scenario(name)
        result = module.run(options)
        print(file=sys.stderr)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
            module.plot(result, out / f"{name}.png")
        if args.json:
            _print_json(result)
        else:
            print(module.table(result))
    if args.scenario == "all":
        print(f"wrote {write_report()}")
    return 0


def _add_inputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policies",
        type=Path,
        default=POLICY_DIR,
        help="directory of HTTPPolicy YAML files",
    )
    parser.add_argument("--lab-state", type=Path, default=LAB_STATE_FILE)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("steer")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steer", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=os.environ.get("STEER_LOG_FORMAT", "text"),
        help="log lines as text or as one JSON object each (Envoy's too, under steer "
        "envoy); default $STEER_LOG_FORMAT, else text",
    )
    parser.add_argument("--version", action="version", version=f"steer {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the local node end to end and check it")
    demo.add_argument("--json", action="store_true")
    demo.add_argument("--keep", action="store_true", help="leave the lab running")
    demo.add_argument("--dataplane", choices=["iptables", "ebpf", "both"], default="both")
    demo.add_argument("--ads", choices=["delta", "sotw"], default="delta")
    demo.set_defaults(func=cmd_demo)

    lab = sub.add_parser("lab", help="the local node: namespaces, veths, cgroups")
    lab.add_argument("action", choices=["up", "down", "status"])
    lab.add_argument("--json", action="store_true")
    lab.add_argument("--pods", type=int, default=3, help="with up: total number of pods")
    lab.add_argument("--config", type=Path, help="with up: lab file (pods, namespace labels)")
    lab.add_argument("--lab-state", type=Path, default=LAB_STATE_FILE)
    lab.set_defaults(func=cmd_lab)

    control = sub.add_parser("control", help="the control plane: xDS server")
    _add_inputs(control)
    control.add_argument("--socket", type=Path, default=XDS_SOCKET)
    control.add_argument("--node-id", default=LAB_NODE_NAME)
    control.add_argument("--kube", action="store_true", help="watch a Kubernetes API server")
    control.add_argument("--kubeconfig", help="with --kube: a kubeconfig (default: in-cluster)")
    control.add_argument("--xds-port", type=int, default=XDS_PORT, help="with --kube: ADS port")
    control.add_argument("--webhook-port", type=int, default=WEBHOOK_PORT)
    control.add_argument("--webhook-cert", help="TLS certificate of the admission webhooks")
    control.add_argument("--webhook-key", help="its key")
    control.add_argument(
        "--xds-cert", help="with --kube: the xDS server's TLS certificate (enables mutual TLS)"
    )
    control.add_argument("--xds-key", help="its key")
    control.add_argument(
        "--xds-client-ca", help="CA whose node client certificates the xDS server accepts"
    )
    control.add_argument(
        "--leader-elect",
        action="store_true",
        help="with --kube: only the holder of a Lease writes policy status and Events",
    )
    control.add_argument("--identity", help="this replica's name in the Lease (default: $POD_NAME)")
    control.add_argument("--lease-name", help="the Lease (default steer-control)")
    control.add_argument(
        "--lease-namespace", help="its namespace (default: $POD_NAMESPACE, else steer-system)"
    )
    control.add_argument("--lease-duration", type=int, help="seconds (default 15)")
    control.add_argument("--renew-deadline", type=float, help="seconds (default 10)")
    control.add_argument("--retry-period", type=float, help="seconds (default 2)")

    certs = sub.add_parser("certs", help="a CA and a serving certificate for the webhooks")
    certs.add_argument("--service", default=CONTROL_SERVICE)
    certs.add_argument("--namespace", default=SYSTEM_NAMESPACE)
    certs.add_argument("--out", type=Path, required=True, help="directory to write into")
    certs.add_argument("--days", type=int, default=365)
    certs.add_argument("--force", action="store_true", help="replace existing files")
    certs.add_argument(
        "--node",
        action="append",
        metavar="NAME",
        help="also issue node NAME's xDS client certificate (repeatable)",
    )
    certs.add_argument(
        "--keep-ca-key", action="store_true", help="also write ca.key, to issue more later"
    )
    certs.add_argument(
        "--existing-ca",
        action="store_true",
        help="only issue the --node certificates, from ca.crt and ca.key in --out",
    )
    certs.set_defaults(func=cmd_certs)
    control.set_defaults(func=cmd_control)

    agent = sub.add_parser(
        "agent", help="the node agent: both datapaths, eBPF and iptables (chosen per pod)"
    )
    _add_inputs(agent)
    agent.add_argument("--netns", default=NODE_NETNS, help="node namespace ('' for current)")
    agent.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    agent.add_argument("--once", action="store_true", help="sync once and exit")
    agent.add_argument("--kube", action="store_true", help="watch a Kubernetes API server")
    agent.add_argument("--kubeconfig", help="with --kube: a kubeconfig (default: in-cluster)")
    agent.add_argument("--node-name", help="with --kube: this node's name")
    agent.add_argument(
        "--envoy-ip", default=LAB_GATEWAY_IP, help="the address pods reach the node's Envoy on"
    )
    agent.add_argument(
        "--envoy-admin",
        default=str(ENVOY_ADMIN_SOCKET),
        help="Envoy's admin: a Unix socket path, or host:port",
    )
    agent.add_argument("--envoy-cgroup", help="Envoy's cgroup (default: the agent's own pod)")
    agent.add_argument("--cgroup-root", help="the cgroup v2 mount (default: detected)")
    agent.set_defaults(func=cmd_agent)

    dataplane = sub.add_parser("dataplane", help="datapath maintenance")
    dataplane.add_argument("action", choices=["unload"])
    dataplane.add_argument(
        "--iptables", action="store_true", help="unload the iptables rules instead of eBPF"
    )
    dataplane.add_argument("--netns", default=NODE_NETNS)
    dataplane.set_defaults(func=cmd_unload)

    envoy = sub.add_parser("envoy", help="run and supervise the node's Envoy")
    envoy.add_argument("--netns", default=NODE_NETNS)
    envoy.add_argument("--socket", type=Path, default=XDS_SOCKET)
    envoy.add_argument("--node-id", default=LAB_NODE_NAME)
    envoy.add_argument("--ads", choices=["delta", "sotw"], default="delta")
    envoy.add_argument("--cgroup", help="cgroup v2 path to run in (default: the lab node's)")
    envoy.add_argument("--xds-address", help="host:port of the control plane (a cluster)")
    envoy.add_argument(
        "--xds-client-cert", help="with --xds-address: this node's client certificate (mTLS)"
    )
    envoy.add_argument("--xds-client-key", help="its key")
    envoy.add_argument("--xds-ca", help="CA that signed the control plane's certificate")
    envoy.add_argument(
        "--admin-socket",
        type=Path,
        default=ENVOY_ADMIN_SOCKET,
        help="Envoy's admin Unix socket (mode 0600)",
    )
    envoy.add_argument("--lab-state", type=Path, default=LAB_STATE_FILE)
    envoy.add_argument(
        "--log-path",
        type=Path,
        default=ENVOY_LOG_FILE,
        help="Envoy's own log; - for stderr (a container's log)",
    )
    envoy.add_argument(
        "--concurrency",
        type=_positive_int,
        help="Envoy's worker threads (default: half the CPUs it may run on, at least 1)",
    )
    envoy.set_defaults(func=cmd_envoy)

    render = sub.add_parser("render", help="print what would be programmed")
    render.add_argument("what", choices=["iptables", "xds", "crd"])
    _add_inputs(render)
    render.set_defaults(func=cmd_render)

    bench = sub.add_parser("bench", help="measure (figures, not pass/fail)")
    bench.add_argument(
        "scenario",
        choices=[*_bench_scenarios(), "all", "report"],
        help="one scenario; all (and docs/benchmarks.md); report (the doc from saved results)",
    )
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    bench.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    bench.add_argument("--out", type=Path, help="write SCENARIO.json and SCENARIO.png here")
    bench.set_defaults(func=cmd_bench)

    explain_cmd = sub.add_parser(
        "explain",
        help="what happens to one request from a pod to a pod, and which rule decides it",
    )
    explain_cmd.add_argument("--from", dest="source", required=True, type=_pod_key)
    explain_cmd.add_argument("--to", required=True, type=_pod_and_port, metavar="NS/POD:PORT")
    explain_cmd.add_argument("--method", default="GET")
    explain_cmd.add_argument("--path", default="/")
    explain_cmd.add_argument("--host", default="", help="the Host header (default: none)")
    explain_cmd.add_argument(
        "--header", action="append", default=[], type=_header, metavar="NAME=VALUE"
    )
    explain_cmd.add_argument(
        "--service", help="NS/NAME: the request was dialled through this Service"
    )
    explain_cmd.add_argument("--json", action="store_true")
    explain_cmd.add_argument(
        "--kubeconfig",
        help="explain from a cluster's policies and pods (its API, read once) instead of "
        "the local node's",
    )
    _add_inputs(explain_cmd)
    explain_cmd.set_defaults(func=cmd_explain)

    observe = sub.add_parser(
        "observe", help="recent requests through Envoy, with their verdicts and rules"
    )
    observe.add_argument("--last", type=int, default=20, metavar="N", help="default 20")
    observe.add_argument("--follow", action="store_true", help="then print new events")
    observe.add_argument("--json", action="store_true", help="one JSON object per line")
    observe.add_argument("--pod", help="NAME or NS/NAME: the client pod")
    observe.add_argument("--namespace")
    observe.add_argument("--verdict", choices=["allowed", "denied", "audit"])
    observe.add_argument("--dataplane", choices=["ebpf", "iptables"])
    observe.add_argument("--layer", choices=["l4", "http"])
    observe.add_argument("--port", type=int, help="the destination port")
    observe.add_argument("--status", type=int, help="the HTTP status")
    observe.add_argument("--policy", help="NS/NAME of the deciding policy")
    observe.set_defaults(func=cmd_observe)

    status = sub.add_parser("status", help="per-pod datapath and control-plane push state")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    return parser


# Everything but rendering and reading status creates namespaces or touches the kernel.
NEEDS_ROOT = frozenset({"demo", "lab", "control", "agent", "dataplane", "envoy", "bench"})


def configure_logging(log_format: str, *, verbose: bool = False) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if log_format == "json"
        else logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
    )
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # In a cluster the control plane only talks to the API server and Envoys: no root.
    cluster_control = args.command == "control" and args.kube
    if args.command in NEEDS_ROOT and not cluster_control and os.geteuid() != 0:
        print(
            f"steer {args.command} needs root (namespaces, iptables, /run/steer); "
            "fix: run it as root",
            file=sys.stderr,
        )
        return 2
    configure_logging(args.log_format, verbose=args.verbose)
    # watchfiles logs every batch of changes at INFO; steer logs what it did about them.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
