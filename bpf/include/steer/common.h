/* Helpers shared by the hooks. Port byte orders differ per context (measured on 6.x):
 *   bpf_sock_addr.user_port      big-endian, low 16 bits
 *   bpf_sock_ops.remote_port     big-endian, in the high 16 bits; local_port host order
 *   sk_msg_md.remote_port        big-endian, in the high 16 bits; local_port host order
 *   bpf_sock.dst_port            big-endian, low 16 bits; src_port host order
 */
#ifndef STEER_COMMON_H
#define STEER_COMMON_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <linux/socket.h>
#include <linux/net.h>

#include "steer/maps.h"

#define STEER_REMOTE_PORT(field) bpf_ntohs((__u16)((field) >> 16))

/* A port of Envoy's that connect4 sends steered pods' flows to: the shared outbound
 * listener, or a Service port's own (host order). */
static __always_inline int steer_is_client_listener(__u32 port)
{
	return port == STEER_OUTBOUND_PORT ||
	       (port >= STEER_SERVICE_PORT_MIN && port <= STEER_SERVICE_PORT_MAX);
}

static __always_inline struct steer_counters *steer_count(__u32 slot)
{
	__u32 index = slot < STEER_MAX_PODS ? slot : 0;
	return steer_counters.lookup(&index);
}

static __always_inline struct steer_cfg *steer_config(void)
{
	__u32 zero = 0;
	return steer_cfg.lookup(&zero);
}

/* A flow's record to steer_events; a full ring buffer is counted on the pod, never silent. */
static __always_inline void steer_emit_flow(struct steer_flow *flow, __u64 cookie,
					    struct steer_flow_end *end)
{
	struct steer_flow_event *event = steer_events.ringbuf_reserve(sizeof(*event));
	if (!event) {
		struct steer_counters *count = steer_count(flow->slot);
		if (count)
			count->events_lost++;
		return;
	}
	__builtin_memcpy(&event->flow, flow, sizeof(*flow));
	event->cookie = cookie;
	__builtin_memcpy(&event->end, end, sizeof(*end));
	steer_events.ringbuf_submit(event, 0);
}

static __always_inline __u32 steer_slot_of_ip(__u32 ip)
{
	__u32 *slot = steer_podips.lookup(&ip);
	return slot ? *slot : 0;
}

#endif
