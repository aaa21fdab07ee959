/* Every map of steer's datapath, declared once. Names share the prefix "steer_" and stay
 * under 15 characters (the kernel cuts object names at 15).
 *
 * The Python side mirrors each key and value struct with ctypes (steer/node/bpfmaps.py);
 * the loader checks the sizes agree with what bcc compiled, so the two cannot drift.
 * IPv4 addresses are in network byte order; ports in host byte order unless named _be.
 */
#ifndef STEER_MAPS_H
#define STEER_MAPS_H

#include "steer/config.h"

/* Verdicts, as in the iptables datapath's conntrack mark. */
#define STEER_VERDICT_ALLOW 1 /* connect directly, no Envoy */
#define STEER_VERDICT_DENY 2  /* refuse the connect */
#define STEER_VERDICT_L7 3    /* rewrite to Envoy's outbound listener */

/* steer_cfg[0]: node-wide settings, written by the agent. */
struct steer_cfg {
	__u32 envoy_ip;          /* the address pods reach Envoy on */
	__u32 flags;             /* STEER_CFG_* */
	__u64 node_netns_cookie; /* netns of Envoy's sockets: part of every orig-dst key */
};
#define STEER_CFG_SKMSG 0x1      /* sockops adds steered sockets to steer_sockhash */
BPF_ARRAY(steer_cfg, struct steer_cfg, 1);

/* steer_pods: cgroup id -> the pod whose cgroup it is. Only pods on the eBPF datapath
 * are here; connect4 ignores every other cgroup (Envoy's, the host's). */
struct steer_pod {
	__u32 slot;  /* index into steer_counters and the key space of steer_policy */
	__u32 ip;
};
BPF_HASH(steer_pods, __u64, struct steer_pod, STEER_MAX_PODS);

/* steer_podips: pod IP -> slot, for sockets that only know addresses (sk_msg,
 * getsockopt on Envoy's side, sockops of upstream legs). */
BPF_HASH(steer_podips, __u32, __u32, STEER_MAX_PODS);

/* steer_policy: (source pod, destination prefix) -> the verdict per destination port.
 * The agent computes it from the same decision the iptables datapath encodes; every pod
 * has a 0.0.0.0/0 entry, so a lookup for a steered pod always finds one. */
struct steer_policy_key {
	__u32 prefixlen; /* 32 (slot) + destination prefix length */
	__u32 slot;      /* network byte order, so the trie compares it bit by bit */
	__u32 addr;
};
struct steer_segment {
	__u16 lo;
	__u16 hi;
	__u8 verdict;
	__u8 pad[3];
};
struct steer_policy_val {
	__u8 default_verdict; /* for ports in no segment */
	__u8 nsegments;       /* for readers; unused seg[] slots have lo > hi */
	__u8 pad[2];
	struct steer_segment seg[STEER_MAX_SEGMENTS];
};
BPF_LPM_TRIE(steer_policy, struct steer_policy_key, struct steer_policy_val,
	     STEER_MAX_PREFIXES);

/* Where a steered connection was going. */
struct steer_origdst {
	__u32 ip;
	__u16 port_be;
	__u16 slot;
};

/* steer_cookie: socket cookie -> original destination, from connect4 until the handshake
 * completes and sockops moves it to steer_origdst. LRU: a connect that never completes
 * must not leak an entry. */
BPF_TABLE("lru_hash", __u64, struct steer_origdst, steer_cookie, STEER_MAX_PENDING);

/* steer_origdst: the connection as Envoy's accepted socket sees it -> original
 * destination. The 4-tuple alone collides across network namespaces, so the key carries
 * the netns cookie of Envoy's side. */
struct steer_flow_key {
	__u64 netns_cookie;
	__u32 client_ip;
	__u32 envoy_ip;
	__u16 client_port;
	__u16 envoy_port;
	__u32 pad;
};
BPF_TABLE("lru_hash", struct steer_flow_key, struct steer_origdst, steer_origdst,
	  STEER_MAX_FLOWS);

/* steer_sockhash: both local sockets of steered connections, keyed by the socket's own
 * view (local, remote); sk_msg finds the peer by swapping the two. */
struct steer_sock_key {
	__u32 local_ip;
	__u32 remote_ip;
	__u32 local_port;
	__u32 remote_port;
};
BPF_SOCKHASH(steer_sockhash, struct steer_sock_key, STEER_MAX_FLOWS);

/* steer_svc: the Services connect4 balances over. Slot 0 of an address and port is the
 * frontend, whose count says how many backends follow in slots 1..count. The agent grows
 * a frontend by writing the new slots before the count, and shrinks it by lowering the
 * count before deleting slots, so a connect never picks a slot that was never written. */
struct steer_svc_key {
	__u32 ip;
	__u16 port_be;
	__u16 slot;
};
struct steer_svc_val {
	__u32 ip;      /* backend address (slot > 0) */
	__u16 port_be; /* backend port (slot > 0); slot 0: Envoy's listener for this Service
	                * port, where its flows that need Envoy go (0: the shared listener) */
	__u16 count;   /* backends (slot 0) */
};
BPF_HASH(steer_svc, struct steer_svc_key, struct steer_svc_val, STEER_MAX_SERVICE_ENTRIES);

/* steer_dialled: socket cookie -> the address the application dialled, for sockets
 * connect4 sent elsewhere (a Service's backend, Envoy): getpeername hands it back, so the
 * application sees the peer it asked for. Deleted when sockops sees the socket close; LRU
 * for those it never sees close (a connect that never completes). */
struct steer_addr {
	__u32 ip;
	__u16 port_be;
	__u16 pad;
};
BPF_TABLE("lru_hash", __u64, struct steer_addr, steer_dialled, STEER_MAX_FLOWS);

/* steer_counters[slot]: per-pod counters; slot 0 counts what belongs to no pod. */
struct steer_counters {
	__u64 redirects;    /* connects rewritten to Envoy */
	__u64 direct;       /* connects allowed without Envoy (L4 only) */
	__u64 denied;       /* connects refused */
	__u64 msgs;         /* sk_msg messages handed straight to the peer socket */
	__u64 bytes;        /* ... and their bytes */
	__u64 sockopt_hits; /* SO_ORIGINAL_DST answered from steer_origdst */
	__u64 sockopt_miss; /* SO_ORIGINAL_DST on a connection not steered by eBPF */
	__u64 map_full;     /* a map update failed: steering degraded, see the agent log */
	__u64 svc_balanced; /* connects to a Service sent to one of its backends */
	__u64 svc_empty;    /* connects to a Service without backends, refused */
	__u64 events_lost;  /* flow events the ring buffer had no room for */
};
BPF_PERCPU_ARRAY(steer_counters, struct steer_counters, STEER_MAX_PODS);

/* Flow events for `steer observe`: one record per flow a steered pod opens, sent when it
 * closes, or at connect when connect4 refused it. What connect4 knew (the opener, the
 * verdict) waits in steer_flows under the socket's cookie until sockops sees the close;
 * the agent reads the flows still there to tell of those that live long. */
#define STEER_FLOW_REFUSED 1
#define STEER_FLOW_CLOSED 2
#define STEER_FLOW_OPENED 3 /* established: its source port is known (for joining HTTP events) */
#define STEER_FLOW_LIVE 4   /* made by the agent from steer_flows, never by a program */
#define STEER_VERDICT_NO_BACKEND 4 /* a Service without backends: refused */
#define STEER_VERDICT_IPTABLES 5   /* a pod on iptables: its rules decide, not a hook here */
struct steer_flow {
	__u64 start_ns;
	__u32 tgid;            /* the process that called connect() */
	__u32 slot;
	__u32 dialled_ip;      /* what the application dialled (a ClusterIP, say) */
	__u32 dst_ip;          /* where the flow goes: the backend, even when Envoy is between */
	__u16 dialled_port_be;
	__u16 dst_port_be;
	__u8 verdict;          /* STEER_VERDICT_* */
	__u8 pad[3];
	char comm[16];
	__u32 local_ip;        /* the socket's own address, once connect() has chosen it */
	__u16 local_port;
	__u16 pad2;
};
BPF_TABLE("lru_hash", __u64, struct steer_flow, steer_flows, STEER_MAX_FLOWS);

struct steer_flow_end {
	__u64 at_ns;
	__u64 bytes_sent;     /* acknowledged by the peer */
	__u64 bytes_received;
	__u32 src_ip;
	__u16 src_port;
	__u8 kind;            /* STEER_FLOW_* */
	__u8 end_state;       /* the TCP state the socket closed from */
};
struct steer_flow_event {
	struct steer_flow flow;
	__u64 cookie;
	struct steer_flow_end end;
};
BPF_RINGBUF_OUTPUT(steer_events, STEER_EVENT_PAGES);

#endif
