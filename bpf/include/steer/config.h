/* Every build option of steer's BPF programs, each with its default.
 *
 * steer compiles with every one of them set as a -D flag from one Python table
 * (BUILD_OPTIONS in steer/node/bpfmaps.py, sizes from steer/constants.py); the defaults here
 * serve a compile by hand. Values that change at run time (Envoy's address, which
 * pods are steered) live in maps, not here, so adding a pod never recompiles.
 */
#ifndef STEER_CONFIG_H
#define STEER_CONFIG_H

/* Envoy's listeners. connect4 rewrites steered connects to the outbound port. */
#ifndef STEER_OUTBOUND_PORT
#define STEER_OUTBOUND_PORT 15001
#endif
#ifndef STEER_INBOUND_PORT
#define STEER_INBOUND_PORT 15006
#endif

/* Envoy's per-Service listeners (steer.model.servicepolicy): a pod never dials them. */
#ifndef STEER_SERVICE_PORT_MIN
#define STEER_SERVICE_PORT_MIN 15100
#endif
#ifndef STEER_SERVICE_PORT_MAX
#define STEER_SERVICE_PORT_MAX 15999
#endif

/* Pods per node with eBPF steering; slot 0 is reserved for "not a pod". */
#ifndef STEER_MAX_PODS
#define STEER_MAX_PODS 4096
#endif

/* Destination prefixes across all pods (one LPM entry per prefix and source pod). */
#ifndef STEER_MAX_PREFIXES
#define STEER_MAX_PREFIXES 65536
#endif

/* Port segments one destination prefix can carry; more falls back to iptables. */
#ifndef STEER_MAX_SEGMENTS
#define STEER_MAX_SEGMENTS 16
#endif

/* Connections between connect() and the handshake, and steered connections alive. */
#ifndef STEER_MAX_PENDING
#define STEER_MAX_PENDING 65536
#endif
#ifndef STEER_MAX_FLOWS
#define STEER_MAX_FLOWS 262144
#endif

/* Service frontends plus their backends: one steer_svc entry each. */
#ifndef STEER_MAX_SERVICE_ENTRIES
#define STEER_MAX_SERVICE_ENTRIES 65536
#endif

/* The flow events' ring buffer, in 4 KiB pages (a power of two). */
#ifndef STEER_EVENT_PAGES
#define STEER_EVENT_PAGES 256
#endif

#endif
