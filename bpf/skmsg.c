/* sk_msg, attached to steer_sockhash: every message a socket in the hash sends is handed
 * to the ingress queue of its peer socket, skipping TCP/IP and the veth between them.
 * If the peer is not in the hash (yet, or any more), the message takes the normal path:
 * a failed redirect must never drop data.
 */
#include "steer/common.h"

int steer_skmsg(struct sk_msg_md *msg)
{
	struct steer_sock_key peer = {
		.local_ip = msg->remote_ip4,
		.remote_ip = msg->local_ip4,
		.local_port = STEER_REMOTE_PORT(msg->remote_port),
		.remote_port = msg->local_port,
	};
	__u64 size = msg->size;
	int verdict = steer_sockhash.msg_redirect_hash(msg, &peer, BPF_F_INGRESS);
	if (verdict == SK_PASS) {
		struct steer_cfg *cfg = steer_config();
		__u32 pod_ip = 0;
		if (cfg)
			pod_ip = msg->local_ip4 == cfg->envoy_ip ? msg->remote_ip4 : msg->local_ip4;
		struct steer_counters *count = steer_count(steer_slot_of_ip(pod_ip));
		if (count) {
			count->msgs++;
			count->bytes += size;
		}
	}
	return SK_PASS;
}
