/* cgroup/getsockopt, attached to Envoy's cgroup: answers SO_ORIGINAL_DST for connections
 * connect4 rewrote. For connections iptables REDIRECTed the kernel answers from conntrack;
 * when that answer is a Service's address (a pod steered by iptables dialled a Service
 * whose backends have HTTP rules, and was sent to Envoy before kube-proxy could choose a
 * backend), the backend is chosen here, so Envoy enforces and forwards to that backend.
 */
#include "steer/common.h"
#include "steer/service.h"

#define STEER_SO_ORIGINAL_DST 80

int steer_sockopt(struct bpf_sockopt *ctx)
{
	if (ctx->level != SOL_IP || ctx->optname != STEER_SO_ORIGINAL_DST)
		return 1;
	struct bpf_sock *sk = ctx->sk;
	struct steer_cfg *cfg = steer_config();
	if (!sk || !cfg)
		return 1;
	struct steer_flow_key key = {
		.netns_cookie = bpf_get_netns_cookie(ctx),
		.client_ip = sk->dst_ip4,
		.envoy_ip = sk->src_ip4,
		.client_port = bpf_ntohs((__u16)sk->dst_port),
		.envoy_port = (__u16)sk->src_port,
	};
	struct steer_origdst *orig = steer_origdst.lookup(&key);
	struct sockaddr_in *sin = ctx->optval;
	if ((void *)(sin + 1) > ctx->optval_end)
		return 1; /* the caller's buffer is too small: keep the kernel's answer */
	if (!orig) {
		struct steer_counters *count = steer_count(0);
		if (ctx->retval == 0) {
			__u32 ip = sin->sin_addr.s_addr;
			__u16 port_be = sin->sin_port, envoy_port_be = 0;
			if (steer_balance(&ip, &port_be, &envoy_port_be) == STEER_LB_BACKEND) {
				sin->sin_addr.s_addr = ip;
				sin->sin_port = port_be;
				if (count)
					count->svc_balanced++;
				return 1;
			}
		}
		if (count)
			count->sockopt_miss++;
		return 1;
	}
	sin->sin_family = AF_INET;
	sin->sin_port = orig->port_be;
	sin->sin_addr.s_addr = orig->ip;
	/* Two separate stores: clang would merge them into one wide store, which the
	 * verifier rejects for these context fields. */
	volatile int *optlen = &ctx->optlen;
	volatile int *retval = &ctx->retval;
	*optlen = sizeof(*sin);
	*retval = 0;
	struct steer_counters *count = steer_count(orig->slot);
	if (count)
		count->sockopt_hits++;
	return 1;
}
