"""The local node: a Kubernetes-like node built from namespaces on one machine.

`spec` (pure: pods to create, the recorded state and its one parser), `wiring` (netlink,
sysctls, teardown), `updown` (lab up/down/status), `localnode` (control plane, agent and
Envoy as real processes), `podproc` and `servers` (workers and servers inside pods, for
the demo, benchmarks and tests). Nothing in model/, render/, node/ or control/ imports it.
"""
