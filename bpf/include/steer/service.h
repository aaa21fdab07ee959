/* Choosing a Service's backend, shared by connect4 (at a steered pod's connect) and
 * getsockopt (when Envoy asks where a flow iptables sent it before kube-proxy was going).
 */
#ifndef STEER_SERVICE_H
#define STEER_SERVICE_H

#include "steer/common.h"

/* Balances a flow to a Service frontend: *ip and *port_be become a backend's, chosen
 * uniformly at random (as kube-proxy's iptables mode does), and *envoy_port_be the
 * Service port's own Envoy listener (0: none, the shared one). */
enum steer_lb {
	STEER_LB_NONE,    /* not a Service's address */
	STEER_LB_BACKEND, /* sent to a backend */
	STEER_LB_EMPTY,   /* a Service without backends */
};

static __always_inline enum steer_lb steer_balance(__u32 *ip, __u16 *port_be,
						   __u16 *envoy_port_be)
{
	struct steer_svc_key key = {.ip = *ip, .port_be = *port_be, .slot = 0};
	struct steer_svc_val *frontend = steer_svc.lookup(&key);
	if (!frontend)
		return STEER_LB_NONE;
	__u16 count = frontend->count;
	*envoy_port_be = frontend->port_be;
	if (!count)
		return STEER_LB_EMPTY;
	key.slot = (__u16)(bpf_get_prandom_u32() % count) + 1;
	struct steer_svc_val *backend = steer_svc.lookup(&key);
	if (!backend) {
		/* The agent lowered the count and deleted slots after this connect read the
		 * count: slot 1 stays as long as the Service has a backend. */
		key.slot = 1;
		backend = steer_svc.lookup(&key);
		if (!backend)
			return STEER_LB_EMPTY;
	}
	*ip = backend->ip;
	*port_be = backend->port_be;
	return STEER_LB_BACKEND;
}

#endif
