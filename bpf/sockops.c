/* sockops, attached to steered pods' cgroups and to Envoy's cgroup.
 *
 * On an established steered connection it (1) moves the original destination from the
 * socket cookie to the key Envoy's side can compute, and (2) puts both local sockets of
 * each leg (pod <-> Envoy, Envoy <-> pod) into steer_sockhash, so sk_msg can hand data
 * straight to the peer socket.
 */
#include "steer/common.h"

static __always_inline void steer_sock_key(struct bpf_sock_ops *skops, struct steer_sock_key *key)
{
	key->local_ip = skops->local_ip4;
	key->remote_ip = skops->remote_ip4;
	key->local_port = skops->local_port;
	key->remote_port = STEER_REMOTE_PORT(skops->remote_port);
}

static __always_inline void steer_add_sock(struct bpf_sock_ops *skops, struct steer_cfg *cfg,
					   __u32 slot)
{
	if (!(cfg->flags & STEER_CFG_SKMSG))
		return;
	struct steer_sock_key key = {};
	steer_sock_key(skops, &key);
	int err = steer_sockhash.sock_hash_update(skops, &key, BPF_ANY);
	if (err) {
		struct steer_counters *count = steer_count(slot);
		if (count)
			count->map_full++;
	}
}

/* The client's socket as Envoy's accepted socket will see it. */
static __always_inline void steer_flow_key_of(struct bpf_sock_ops *skops, struct steer_cfg *cfg,
					      struct steer_flow_key *key)
{
	key->netns_cookie = cfg->node_netns_cookie;
	key->client_ip = skops->local_ip4;
	key->envoy_ip = skops->remote_ip4;
	key->client_port = (__u16)skops->local_port;
	key->envoy_port = STEER_REMOTE_PORT(skops->remote_port);
}

/* The client's leg, seen from the pod: remember where it was going, for Envoy. */
static __always_inline void steer_client_established(struct bpf_sock_ops *skops,
						     struct steer_cfg *cfg)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct steer_origdst *orig = steer_cookie.lookup(&cookie);
	if (!orig)
		return; /* a connection connect4 did not rewrite */
	struct steer_flow_key key = {};
	steer_flow_key_of(skops, cfg, &key);
	struct steer_origdst value = *orig;
	steer_cookie.delete(&cookie);
	int err = steer_origdst.update(&key, &value);
	if (err) {
		struct steer_counters *count = steer_count(value.slot);
		if (count)
			count->map_full++;
		return;
	}
	/* Drop the entry when the connection closes, rather than waiting for LRU. */
	bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
	steer_add_sock(skops, cfg, value.slot);
}

/* A pod's flow that connect4 recorded closed: its record goes to the ring buffer, with
 * the bytes each way and the state it closed from. */
static __always_inline void steer_flow_closed(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct steer_flow *flow = steer_flows.lookup(&cookie);
	if (!flow)
		return;
	struct steer_flow_end end = {
		.at_ns = bpf_ktime_get_ns(),
		.bytes_sent = skops->bytes_acked,
		.bytes_received = skops->bytes_received,
		.src_ip = skops->local_ip4,
		.src_port = (__u16)skops->local_port,
		.kind = STEER_FLOW_CLOSED,
		.end_state = (__u8)skops->args[0],
	};
	/* Gone from steer_flows before its record is out: the agent, which reads the records
	 * and the flows still open in turn, never tells of a flow as open after its close. */
	struct steer_flow closed = *flow;
	steer_flows.delete(&cookie);
	steer_emit_flow(&closed, cookie, &end);
}

static __always_inline void steer_closed(struct bpf_sock_ops *skops, struct steer_cfg *cfg)
{
	struct steer_flow_key key = {};
	steer_flow_key_of(skops, cfg, &key);
	steer_origdst.delete(&key);
	/* A closed socket has no peer to name: its dialled address goes now, rather than
	 * when the LRU map is full and evicts the oldest entry (which may be a live one). */
	__u64 cookie = bpf_get_socket_cookie(skops);
	steer_dialled.delete(&cookie);
	steer_flow_closed(skops);
}

/* An AF_INET6 socket connected to a v4-mapped address runs IPv4 underneath: its ip4
 * fields hold the addresses on the wire, which is all this program looks at. */
static __always_inline int steer_is_ipv4(struct bpf_sock_ops *skops)
{
	if (skops->family == AF_INET)
		return 1;
	return skops->family == AF_INET6 && skops->remote_ip6[0] == 0 &&
	       skops->remote_ip6[1] == 0 && skops->remote_ip6[2] == bpf_htonl(0x0000ffff);
}

int steer_sockops(struct bpf_sock_ops *skops)
{
	if (!steer_is_ipv4(skops))
		return 1;
	struct steer_cfg *cfg = steer_config();
	if (!cfg)
		return 1;
	__u32 remote_port = STEER_REMOTE_PORT(skops->remote_port);

	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB: {
		/* A flow connect4 recorded: its close is to be seen from here on, one the peer
		 * refuses included (it never reaches ESTABLISHED), and the source port connect()
		 * just chose tells the agent which connection a flow that lives long is. */
		__u64 cookie = bpf_get_socket_cookie(skops);
		struct steer_flow *flow = steer_flows.lookup(&cookie);
		if (flow) {
			flow->local_ip = skops->local_ip4;
			flow->local_port = (__u16)skops->local_port;
			bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
		}
		break;
	}
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: {
		/* A flow to Envoy: its source port names its opener to Envoy's access log entries
		 * of the same connection. Flows past Envoy have no such entries: their close
		 * record alone says it all, at half the records a short connection costs the
		 * agent. */
		__u64 cookie = bpf_get_socket_cookie(skops);
		struct steer_flow *flow = steer_flows.lookup(&cookie);
		if (flow && flow->verdict == STEER_VERDICT_L7) {
			struct steer_flow_end opened = {
				.at_ns = bpf_ktime_get_ns(),
				.src_ip = skops->local_ip4,
				.src_port = (__u16)skops->local_port,
				.kind = STEER_FLOW_OPENED,
			};
			steer_emit_flow(flow, cookie, &opened);
		}
		if (skops->remote_ip4 == cfg->envoy_ip && steer_is_client_listener(remote_port)) {
			steer_client_established(skops, cfg);
		} else if (skops->local_ip4 == cfg->envoy_ip) {
			/* Envoy's upstream leg to a pod on this node. */
			__u32 slot = steer_slot_of_ip(skops->remote_ip4);
			if (slot)
				steer_add_sock(skops, cfg, slot);
		}
		break;
	}
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		if (skops->local_ip4 == cfg->envoy_ip && steer_is_client_listener(skops->local_port)) {
			/* Envoy's accepted side of a client leg from a steered pod. */
			__u32 slot = steer_slot_of_ip(skops->remote_ip4);
			if (slot)
				steer_add_sock(skops, cfg, slot);
		} else if (skops->remote_ip4 == cfg->envoy_ip) {
			/* A pod's accepted side of Envoy's upstream leg. */
			__u32 slot = steer_slot_of_ip(skops->local_ip4);
			if (slot)
				steer_add_sock(skops, cfg, slot);
		}
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE)
			steer_closed(skops, cfg);
		break;
	}
	return 1;
}

/* sockops on the cgroups of pods on the iptables datapath. Nothing is steered or decided
 * here (the pod's iptables rules do that); the flow is recorded for `steer observe`, since
 * only the socket's own hooks run in the context of the process that opened it. At
 * TCP_CONNECT_CB (inside connect(), the source port just chosen) the opener is known and
 * sent at once, for the HTTP events of the same connection; the record is sent again at
 * the close with the bytes each way. A connect iptables refuses closes from SYN_SENT. */
int steer_observe_ops(struct bpf_sock_ops *skops)
{
	if (!steer_is_ipv4(skops))
		return 1;
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB: {
		__u32 remote = skops->remote_ip4;
		/* Loopback and the pod's own address are not flows steer decides. */
		if ((bpf_ntohl(remote) >> 24) == 127 || remote == skops->local_ip4)
			return 1;
		struct steer_flow flow = {
			.start_ns = bpf_ktime_get_ns(),
			.tgid = (__u32)(bpf_get_current_pid_tgid() >> 32),
			.dialled_ip = remote,
			.dst_ip = remote,
			.dialled_port_be = (__u16)(skops->remote_port >> 16),
			.dst_port_be = (__u16)(skops->remote_port >> 16),
			.verdict = STEER_VERDICT_IPTABLES,
			.local_ip = skops->local_ip4,
			.local_port = (__u16)skops->local_port,
		};
		bpf_get_current_comm(&flow.comm, sizeof(flow.comm));
		__u64 cookie = bpf_get_socket_cookie(skops);
		steer_flows.update(&cookie, &flow);
		bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
		struct steer_flow_end opened = {
			.at_ns = flow.start_ns,
			.src_ip = skops->local_ip4,
			.src_port = (__u16)skops->local_port,
			.kind = STEER_FLOW_OPENED,
		};
		steer_emit_flow(&flow, cookie, &opened);
		break;
	}
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE)
			steer_flow_closed(skops);
		break;
	}
	return 1;
}
