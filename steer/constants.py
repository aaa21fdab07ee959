"""Every port, mark, name and path that more than one module relies on.

Kept in one place so the datapath, the renderers, the lab and the docs can never
disagree about which bit of a conntrack mark means what.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

# --- Kubernetes surface -----------------------------------------------------------------
API_GROUP: Final = "steer.dev"
API_VERSION: Final = "v1alpha1"
API_GROUP_VERSION: Final = f"{API_GROUP}/{API_VERSION}"
POLICY_KIND: Final = "HTTPPolicy"

ANNOTATION_INJECT: Final = "steer.dev/inject"
ANNOTATION_DATAPLANE: Final = "steer.dev/dataplane"
ANNOTATION_EXCLUDE_OUTBOUND_PORTS: Final = "steer.dev/exclude-outbound-ports"
ANNOTATION_EXCLUDE_INBOUND_PORTS: Final = "steer.dev/exclude-inbound-ports"
ANNOTATION_EXCLUDE_OUTBOUND_CIDRS: Final = "steer.dev/exclude-outbound-cidrs"
# Namespace label that permits a pod's exclusion annotations to take effect; without it
# exclusions are ignored, because an exclusion is a way around policy.
LABEL_ALLOW_EXCLUSIONS: Final = "steer.dev/allow-exclusions"
# Namespace label that permits a pod's own `steer.dev/inject: disabled` (annotation or
# label) to take effect. A label of its own, not LABEL_ALLOW_EXCLUSIONS: an exclusion skips
# Envoy for named ports and keeps every L4 verdict, an opt-out drops all of the pod's
# policy, both directions; a namespace owner who allows the one has not agreed to the other.
LABEL_ALLOW_OPT_OUT: Final = "steer.dev/allow-opt-out"
# The HTTPPolicy status condition that lists the selected pods steer does not steer.
CONDITION_PODS_PROTECTED: Final = "PodsProtected"

# The NFLOG group steer's deny rules copy refused packets to, for `steer observe`: one
# reader per group and network namespace, so a number no common tool uses by default.
NFLOG_GROUP: Final = 3125
# The group the client's FIN and RST packets of flows steer let through are copied to:
# their events come at the close rather than when conntrack forgets the flow.
NFLOG_CLOSE_GROUP: Final = 3126
# Where the node manifest mounts the node's /proc/sys/net into the agent, writable: a
# container that is not privileged has /proc/sys read-only.
HOST_PROC_SYS_NET: Final = Path("/host/proc/sys/net")

# --- Envoy ports (Istio's habits) ---------------------------------------------------------
ENVOY_OUTBOUND_PORT: Final = 15001
ENVOY_INBOUND_PORT: Final = 15006
# One listener per Service port whose backends can need Envoy: a flow dialled to the
# Service is sent to its port, so Envoy knows which Service was dialled
# (steer.model.servicepolicy.service_listener_ports). Below the ephemeral range, so a
# listener never finds its port taken by an outgoing connection.
ENVOY_SERVICE_PORTS: Final = range(15100, 16000)
ENVOY_ADMIN_PORT: Final = 15000
XDS_PORT: Final = 15010
WEBHOOK_PORT: Final = 15017
METRICS_PORT: Final = 15020
# The control plane's metrics (Istio's istiod monitoring port): in the local node it shares
# the node's network namespace with the agent.
CONTROL_METRICS_PORT: Final = 15014
ENVOY_ADMIN_ADDRESS: Final = "127.0.0.1"

# --- xDS names ------------------------------------------------------------------------------
XDS_CLUSTER_NAME: Final = "steer-xds"
ORIGINAL_DST_CLUSTER: Final = "steer-original-dst"
OUTBOUND_LISTENER: Final = "steer-outbound"
INBOUND_LISTENER: Final = "steer-inbound"
ROUTE_PREFIX: Final = "steer-dst"
ENVOY_CLUSTER_ID: Final = "steer"
# HTTP filter names carry the direction and the action: per-route RBAC configs are keyed
# by filter name, so each of the four decisions gets its own filter.
RBAC_FILTERS: Final = (
    "steer.rbac.egress-deny",
    "steer.rbac.ingress-deny",
    "steer.rbac.egress-allow",
    "steer.rbac.ingress-allow",
)

# --- conntrack mark layout ------------------------------------------------------------------
# Bits 0-15 belong to others (kube-proxy uses 0x4000/0x8000, Istio 0x539). steer owns
# bits 16-29: a 2-bit verdict and a 12-bit policy id naming the policy that decided.
MARK_VERDICT_SHIFT: Final = 28
MARK_VERDICT_MASK: Final = 0x3 << MARK_VERDICT_SHIFT
MARK_ID_SHIFT: Final = 16
MARK_ID_MASK: Final = 0xFFF << MARK_ID_SHIFT
MARK_MASK: Final = MARK_VERDICT_MASK | MARK_ID_MASK
MARK_MAX_POLICY_ID: Final = 0xFFF
VERDICT_ALLOW: Final = 1
VERDICT_DENY: Final = 2
VERDICT_L7: Final = 3

# --- eBPF map sizes -----------------------------------------------------------------------
# Compiled into the programs as -D flags (steer.node.bpfmaps.BUILD_OPTIONS); the loader
# checks every pinned map against them, and the renderer sizes a pod's policy by them.
BPF_MAX_PODS: Final = 4096  # pods per node on eBPF; slot 0 means "not a pod"
BPF_MAX_PREFIXES: Final = 65536  # LPM entries: destination prefixes x source pods
BPF_MAX_SEGMENTS: Final = 16  # port segments per prefix; more falls back to iptables
BPF_MAX_PENDING: Final = 65536  # connects not yet established
BPF_MAX_FLOWS: Final = 262144  # steered connections alive
# Service frontends plus their backends (one entry each): 5,000 Services of 3 backends fit.
BPF_MAX_SERVICE_ENTRIES: Final = 65536

# What happens to a steered pod's IPv6, for `steer status` and the docs.
IPV6_POLICY: Final = (
    "IPv6 TCP of steered pods is refused (connect6 on eBPF, ip6tables on iptables): "
    "steer has no IPv6 policy yet, and a path no policy covers must not bypass policy"
)

# --- iptables -------------------------------------------------------------------------------
CHAIN_PREFIX: Final = "STEER"
COMMENT_PREFIX: Final = "steer/"

# --- local node (lab) -----------------------------------------------------------------------
NODE_NETNS: Final = "steer-node"
POD_NETNS_PREFIX: Final = "steer-pod-"
# Node-side veth names: prefix + 8 hex digits of a hash of namespace/name (IFNAMSIZ is 16).
POD_VETH_PREFIX: Final = "sp"
POD_IFNAME: Final = "eth0"
LAB_POD_CIDR: Final = "10.244.0.0/16"
LAB_GATEWAY_IP: Final = "10.244.0.1"
# Where `steer lab up` gives Services their ClusterIP (kubeadm's default service CIDR).
LAB_SERVICE_CIDR: Final = "10.96.0.0/16"
LAB_NODE_NAME: Final = "lab-node"
CGROUP_SUBTREE: Final = "steer"
CGROUP2_CANDIDATES: Final = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))

# --- files on the node -------------------------------------------------------------------
RUN_DIR: Final = Path("/run/steer")
LAB_STATE_FILE: Final = RUN_DIR / "lab.json"
XDS_SOCKET: Final = RUN_DIR / "xds.sock"
POLICY_DIR: Final = RUN_DIR / "policies"
LOG_DIR: Final = RUN_DIR / "logs"
AGENT_STATUS_FILE: Final = RUN_DIR / "agent-status.json"
CONTROL_STATUS_FILE: Final = RUN_DIR / "control-status.json"
ENVOY_BOOTSTRAP_FILE: Final = RUN_DIR / "envoy-bootstrap.json"
ENVOY_LOG_FILE: Final = RUN_DIR / "envoy.log"
# The eBPF datapath's build hash, attachments and pod slots, kept across agent restarts.
BPF_STATE_FILE: Final = RUN_DIR / "bpf-state.json"
BPFFS: Final = Path("/sys/fs/bpf")
BPF_PIN_DIR: Final = BPFFS / "steer"
# Envoy's admin (it can quit Envoy and rewrite its runtime) is a Unix socket that only its
# owner may open, never a TCP port any host-network process could reach. Local mode and a
# cluster use the same path: there the agent and Envoy containers share /run/steer.
ENVOY_ADMIN_SOCKET: Final = RUN_DIR / "envoy-admin.sock"
ENVOY_ADMIN_SOCKET_MODE: Final = 0o600
# Envoy streams every request's access log entry to the agent over gRPC ALS on this socket
# (no file I/O per request); `steer observe` reads the agent's ring of events from the
# other. Both owner-only: they show every pod's traffic.
ALS_SOCKET: Final = RUN_DIR / "als.sock"
OBSERVE_SOCKET: Final = RUN_DIR / "observe.sock"
ALS_CLUSTER: Final = "steer-als"
# The share of allowed requests Envoy logs to the agent, in percent: an Envoy runtime key,
# so an operator (or the benchmark) can sample or stop access logging without a config
# push. Responses from the status under the second key up are logged whatever the share.
ACCESS_LOG_RUNTIME_KEY: Final = "steer.access_log_percent"
ACCESS_LOG_ALWAYS_FROM_STATUS_KEY: Final = "steer.access_log_always_from_status"
# Events the agent keeps for `steer observe --last`: the oldest go first.
OBSERVE_RING_SIZE: Final = 10_000

# --- xDS over TCP: mutual TLS -------------------------------------------------------------
# A node's identity is this URI SAN in its client certificate, followed by the node name;
# the control plane serves a stream only the snapshot of the node its certificate names.
XDS_NODE_IDENTITY_PREFIX: Final = "spiffe://steer/node/"
# Where the control plane's pod mounts its xDS serving certificate (Secret steer-xds-tls),
# and where each node keeps its own client certificate (a host path, like kubelet's).
XDS_SERVER_TLS_DIR: Final = Path("/etc/steer/xds")
XDS_NODE_TLS_DIR: Final = Path("/etc/steer/xds-node")

# --- Kubernetes deployment --------------------------------------------------------------
SYSTEM_NAMESPACE: Final = "steer-system"
CONTROL_SERVICE: Final = "steer-control"
POLICY_PLURAL: Final = "httppolicies"
POLICY_SINGULAR: Final = "httppolicy"
POLICY_SHORT_NAMES: Final = ("hp",)
READINESS_GATE: Final = "steer.dev/steered"
WEBHOOK_MUTATE_PODS_PATH: Final = "/mutate-pods"
WEBHOOK_VALIDATE_POLICIES_PATH: Final = "/validate-httppolicies"
MUTATING_WEBHOOK_NAME: Final = "pods.steer.dev"
VALIDATING_WEBHOOK_NAME: Final = "httppolicies.steer.dev"
FIELD_MANAGER: Final = "steer"

# --- control-plane leader election (coordination.k8s.io/v1 Lease) ---------------------------
# Every replica serves xDS and the webhooks; only the Lease's holder writes policy status
# and Events. The timings are client-go's defaults: the holder renews every retry period,
# gives up leading if it could not renew for the renew deadline, and the others take over
# once the Lease has not changed for the lease duration (as each of them observes it).
LEADER_LEASE_NAME: Final = "steer-control"
LEADER_LEASE_DURATION_S: Final = 15
LEADER_RENEW_DEADLINE_S: Final = 10.0
LEADER_RETRY_PERIOD_S: Final = 2.0
