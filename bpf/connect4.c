/* cgroup/connect4, cgroup/connect6 and cgroup/getpeername4/6, attached to each
 * eBPF-steered pod's cgroup.
 *
 * A connect to a Service's address (a ClusterIP, or the node's address at a NodePort) is
 * first balanced to one of its backends, chosen uniformly at random per connect; a Service
 * without backends refuses it. Then the flow's L4 verdict is decided once, for the
 * backend, exactly as for a connect dialled to that backend directly:
 *   deny  -> the connect fails with ECONNREFUSED, as a TCP reset would make it;
 *   allow -> the connect goes ahead untouched: no Envoy on the path;
 *   L7    -> the destination is rewritten to Envoy's outbound listener (a Service's flow:
 *            to the Service port's own listener, so Envoy knows the Service dialled) and
 *            the original destination is remembered under the socket's cookie.
 * An AF_INET6 socket dialling a v4-mapped address (::ffff:a.b.c.d) goes out as IPv4 and
 * gets exactly the IPv4 verdict. Native IPv6 TCP is refused: steer has no IPv6 policy
 * yet, and a path no policy covers must not be a way around policy.
 */
#include "steer/common.h"
#include "steer/service.h"

#define STEER_ECONNREFUSED 111

enum steer_connect {
	STEER_CONNECT_PASS,
	STEER_CONNECT_REFUSE,
	STEER_CONNECT_REDIRECT,
};

/* Walks every segment slot: unused slots hold lo > hi and never match. A loop bounded by
 * nsegments instead gets reshaped by clang into one the verifier cannot bound. */
static __always_inline __u8 steer_port_verdict(struct steer_policy_val *val, __u16 port)
{
	for (int i = 0; i < STEER_MAX_SEGMENTS; i++) {
		if (port >= val->seg[i].lo && port <= val->seg[i].hi)
			return val->seg[i].verdict;
	}
	return val->default_verdict;
}

/* The decision for a steered pod's connect to dst:port (IPv4, network order), with its
 * bookkeeping: counters, and the original destination of a flow that goes to Envoy. */
static __always_inline enum steer_connect steer_decide(struct bpf_sock_addr *ctx,
						       struct steer_pod *pod,
						       struct steer_cfg *cfg, __u32 dst,
						       __u16 port_be)
{
	__u16 port = bpf_ntohs(port_be);
	struct steer_counters *count = steer_count(pod->slot);
	/* Loopback and the pod's own address never leave the pod: no policy applies, as on
	 * the iptables datapath, which never sees such traffic. */
	if ((bpf_ntohl(dst) >> 24) == 127 || dst == pod->ip)
		return STEER_CONNECT_PASS;
	if (dst == cfg->envoy_ip && (steer_is_client_listener(port) || port == STEER_INBOUND_PORT)) {
		/* Dialling Envoy's listener directly would make Envoy proxy to itself, and a
		 * Service listener would take the pod for a client of that Service. */
		if (count)
			count->denied++;
		return STEER_CONNECT_REFUSE;
	}

	struct steer_policy_key key = {
		.prefixlen = 64,
		.slot = bpf_htonl(pod->slot),
		.addr = dst,
	};
	struct steer_policy_val *policy = steer_policy.lookup(&key);
	__u8 verdict = policy ? steer_port_verdict(policy, port) : STEER_VERDICT_ALLOW;

	if (verdict == STEER_VERDICT_DENY) {
		if (count)
			count->denied++;
		return STEER_CONNECT_REFUSE;
	}
	if (verdict != STEER_VERDICT_L7) {
		if (count)
			count->direct++;
		return STEER_CONNECT_PASS;
	}

	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct steer_origdst orig = {.ip = dst, .port_be = port_be, .slot = (__u16)pod->slot};
	int err = steer_cookie.update(&cookie, &orig);
	if (err) {
		/* Without the original destination Envoy could not route: let the flow go
		 * direct, count it, and let the agent report it. */
		if (count)
			count->map_full++;
		return STEER_CONNECT_PASS;
	}
	if (count)
		count->redirects++;
	return STEER_CONNECT_REDIRECT;
}

/* The deepest cgroup level at which a pod's cgroup can be found (the root is level 0).
 * Real pods sit at level 3 to 5 (kubepods/<qos>/pod<uid>, systemd's slices), a node nested
 * in a container adds 2 or 3; the agent keeps a pod any deeper on iptables
 * (steer/node/cgroups.py, MAX_POD_CGROUP_LEVEL, which must equal this). */
#define STEER_MAX_CGROUP_LEVEL 32

/* The steered pod the calling task belongs to: the first of its cgroup's ancestors (itself
 * included) that is in steer_pods. The agent registers the pod-level cgroup, but a pod's
 * processes live in its containers' cgroups below it (pod<uid>/<container id>, crun's
 * <scope>/container, and `kubectl exec` joins the container's), which get new ids at
 * every container restart; the pod's own cgroup lives as long as the pod. Pods never
 * nest, so at most one ancestor matches, and walking from the top finds it. */
static __always_inline struct steer_pod *steer_pod_of_caller(void)
{
	for (int level = 1; level <= STEER_MAX_CGROUP_LEVEL; level++) {
		__u64 cgroup = bpf_get_current_ancestor_cgroup_id(level);
		if (!cgroup)
			return 0; /* past the task's own cgroup: not in a steered pod */
		struct steer_pod *pod = steer_pods.lookup(&cgroup);
		if (pod)
			return pod;
	}
	return 0;
}

/* The flow's record for `steer observe`: sent now if the connect is refused, else kept
 * under the socket's cookie until sockops sees it close. A full ring buffer is counted. */
static __always_inline void steer_record(struct bpf_sock_addr *ctx, struct steer_pod *pod,
					 struct steer_addr *dialled, __u32 dst, __u16 dst_port_be,
					 __u8 verdict)
{
	struct steer_flow flow = {
		.start_ns = bpf_ktime_get_ns(),
		.tgid = (__u32)(bpf_get_current_pid_tgid() >> 32),
		.slot = pod->slot,
		.dialled_ip = dialled->ip,
		.dst_ip = dst,
		.dialled_port_be = dialled->port_be,
		.dst_port_be = dst_port_be,
		.verdict = verdict,
	};
	bpf_get_current_comm(&flow.comm, sizeof(flow.comm));
	__u64 cookie = bpf_get_socket_cookie(ctx);
	if (verdict != STEER_VERDICT_DENY && verdict != STEER_VERDICT_NO_BACKEND) {
		steer_flows.update(&cookie, &flow);
		return;
	}
	struct steer_flow_end end = {
		.at_ns = flow.start_ns,
		.src_ip = pod->ip,
		.kind = STEER_FLOW_REFUSED,
	};
	steer_emit_flow(&flow, cookie, &end);
}

/* A steered pod's connect to *ip:*port_be (IPv4, network order): balanced if it is a
 * Service's, then decided; on return *ip:*port_be is where the socket is to connect. The
 * address dialled is remembered for getpeername when it differs. */
static __always_inline enum steer_connect steer_connect_ip4(struct bpf_sock_addr *ctx,
							    struct steer_pod *pod,
							    struct steer_cfg *cfg, __u32 *ip,
							    __u16 *port_be)
{
	struct steer_addr dialled = {.ip = *ip, .port_be = *port_be};
	__u16 envoy_port_be = 0;
	enum steer_lb lb = steer_balance(ip, port_be, &envoy_port_be);
	struct steer_counters *count = steer_count(pod->slot);
	if (lb == STEER_LB_EMPTY) {
		if (count)
			count->svc_empty++;
		steer_record(ctx, pod, &dialled, *ip, *port_be, STEER_VERDICT_NO_BACKEND);
		return STEER_CONNECT_REFUSE;
	}
	enum steer_connect outcome = steer_decide(ctx, pod, cfg, *ip, *port_be);
	/* Loopback and the pod's own address are not flows steer decides. */
	if ((bpf_ntohl(*ip) >> 24) != 127 && *ip != pod->ip)
		steer_record(ctx, pod, &dialled, *ip, *port_be,
			     outcome == STEER_CONNECT_REFUSE    ? STEER_VERDICT_DENY
			     : outcome == STEER_CONNECT_REDIRECT ? STEER_VERDICT_L7
								 : STEER_VERDICT_ALLOW);
	if (outcome == STEER_CONNECT_REFUSE)
		return outcome;
	if (lb == STEER_LB_BACKEND && count)
		count->svc_balanced++;
	if (outcome == STEER_CONNECT_REDIRECT) {
		*ip = cfg->envoy_ip;
		*port_be = envoy_port_be ? envoy_port_be : bpf_htons(STEER_OUTBOUND_PORT);
	}
	if (lb == STEER_LB_BACKEND || outcome == STEER_CONNECT_REDIRECT) {
		__u64 cookie = bpf_get_socket_cookie(ctx);
		/* An LRU map evicts instead of failing; getpeername then shows the real peer. */
		steer_dialled.update(&cookie, &dialled);
	}
	return outcome;
}

int steer_connect4(struct bpf_sock_addr *ctx)
{
	if (ctx->user_family != AF_INET || ctx->type != SOCK_STREAM)
		return 1;
	struct steer_pod *pod = steer_pod_of_caller();
	if (!pod)
		return 1; /* not a steered pod: Envoy, the host, a pod on iptables */
	struct steer_cfg *cfg = steer_config();
	if (!cfg)
		return 1;
	__u32 ip = ctx->user_ip4;
	__u16 port_be = (__u16)ctx->user_port;
	if (steer_connect_ip4(ctx, pod, cfg, &ip, &port_be) == STEER_CONNECT_REFUSE) {
		bpf_set_retval(-STEER_ECONNREFUSED);
		return 0;
	}
	ctx->user_ip4 = ip;
	ctx->user_port = port_be;
	return 1;
}

int steer_connect6(struct bpf_sock_addr *ctx)
{
	if (ctx->user_family != AF_INET6 || ctx->type != SOCK_STREAM)
		return 1;
	struct steer_pod *pod = steer_pod_of_caller();
	if (!pod)
		return 1;
	struct steer_cfg *cfg = steer_config();
	if (!cfg)
		return 1;
	__u32 w0 = ctx->user_ip6[0], w1 = ctx->user_ip6[1], w2 = ctx->user_ip6[2];
	__u32 w3 = ctx->user_ip6[3];
	if (w0 == 0 && w1 == 0 && w2 == bpf_htonl(0x0000ffff)) {
		/* v4-mapped: the same flow as an AF_INET socket's, with the same verdict. */
		__u32 ip = w3;
		__u16 port_be = (__u16)ctx->user_port;
		if (steer_connect_ip4(ctx, pod, cfg, &ip, &port_be) == STEER_CONNECT_REFUSE) {
			bpf_set_retval(-STEER_ECONNREFUSED);
			return 0;
		}
		ctx->user_ip6[3] = ip;
		ctx->user_port = port_be;
		return 1;
	}
	/* :: and ::1 stay inside the pod, like 127.0.0.0/8. */
	if (w0 == 0 && w1 == 0 && w2 == 0 && (w3 == 0 || w3 == bpf_htonl(1)))
		return 1;
	struct steer_counters *count = steer_count(pod->slot);
	if (count)
		count->denied++;
	bpf_set_retval(-STEER_ECONNREFUSED);
	return 0;
}

/* getpeername on a socket connect4 sent elsewhere: the address the application dialled. */
int steer_getpeer4(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM)
		return 1;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct steer_addr *dialled = steer_dialled.lookup(&cookie);
	if (dialled) {
		ctx->user_ip4 = dialled->ip;
		ctx->user_port = dialled->port_be;
	}
	return 1;
}

int steer_getpeer6(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM)
		return 1;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct steer_addr *dialled = steer_dialled.lookup(&cookie);
	if (dialled) {
		/* Only v4-mapped sockets are ever rewritten: the ::ffff:0:0/96 prefix stays. */
		ctx->user_ip6[3] = dialled->ip;
		ctx->user_port = dialled->port_be;
	}
	return 1;
}
