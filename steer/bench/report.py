"""docs/benchmarks.md from the results of the last `steer bench all` (docs/bench/*.json).

One command regenerates it: `make benchmarks` (run everything, then write) or
`steer bench report` (write from the saved results).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from steer.bench import SCENARIOS, scenario

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = ROOT / "docs" / "bench"
REPORT = ROOT / "docs" / "benchmarks.md"

# What each scenario measures and how to read it; the figures come from the results.
# Where the time goes where a target is missed, as profiled when these figures were taken
# (py-spy, smaps, phase timers); kept with the generator so the doc says it next to them.
ANALYSIS = """\
## Where targets are missed, and why

- **propagation, SotW** (p99 <= 100 ms; delta meets it): state-of-the-world ADS resends
  every route configuration of the node on any change (1,001 routes, 11.5 MB at 1k pods
  and 10k rules) and Envoy re-reads all of them, about 0.35 s of each change. The protocol
  requires it; delta ADS, which the local bootstrap uses, sends the one route that changed
  (9 KB). The control plane's own part is the same in both modes.
- **propagation, delta**: at the target, with no margin on this 2-core machine: over
  seven runs p99 was 80-106 ms (median 97 ms; p50 48-60 ms), so a run lands on either
  side of 100 ms. The slow changes are those where the
  control plane's render (parsing the edited file, re-resolving one policy, rebuilding one
  route: ~17 ms on an idle machine) shares the two cores with the agent doing the same for
  its rules, Envoy, and the back-to-back requests that measure the change.
- **render, cold** (the target is met by the render after a change, which is what the
  control plane does on every update): a render from nothing, as at start-up or for a
  newly connected node, builds 1,001 route configurations and 2,002 filter chains in
  Python protobuf: ~0.1 s at 100 rules, ~0.3 s at 10k.
- **datapath, eBPF + sk_msg against iptables** (issue 3's targets): the rps ratio met in
  the last run (1.24x for >= 1.2x), the p50 ratio not (0.80x for <= 0.70x); both move
  between runs (p50 0.69-0.88x, rps 1.12-1.32x over the runs so far). Envoy's user-space
  work dominates every L7 path; sk_msg removes ~55% of the kernel CPU per request and
  keeps the payload off the veths, but cannot touch the user-space share. (The machine's
  speed varies between runs, for every path alike: direct ran at ~42k rps in the last
  run, ~18k in earlier ones; the ratios are what compare.)
- **flows** (issue 14: no flow event lost at 10k short connections a second, or losses
  counted exactly): met, at 11,882 connections/s for 4 x 10 s: 478,294 connections,
  478,362 flow events (the extra ones were still open when wrk stopped), 0 lost; with the
  node's conntrack new-flow events on for flows from elsewhere (12,315/s without them, in
  the same session). An early round reached only ~6,700/s: the agent's reader then cost
  ~6 us per flow on the same two cores (see services below for what changed).
- **datapath, observed** (issue 14: >= 0.95x rps and <= 1.10x CPU per request of the same
  path unobserved): not met. iptables_observed: 0.88x the rps, 1.09x the CPU per request
  (0.88x and 1.07x in the run before, 0.84x and 1.15x before that); ebpf_skmsg_observed:
  0.89x, 1.13x (0.83x, 1.22x; 0.88x, 1.15x). The run on the current code has the rule
  that copies closing packets first in PREROUTING: iptables' rps 14,444, as before it
  (14,511).
  The CPU per request now counts steer's agent and
  control plane with the lab's cgroup (they share its two cores); earlier rounds read the
  lab's cgroup alone, which left out the agent's work for every logged request and showed
  1.00x and 1.03x. What logging every request costs, per request, from the node Envoy's
  cgroup and the agent's /proc time at 16 connections: Envoy 5-8 us more (building,
  serialising and sending each ALS entry on the worker, inside the request's path), the
  agent ~10 us (one gRPC stream, the entries parsed by upb, then Python per entry). The
  agent now keeps each entry as read (its shape's event, shared by every request of that
  shape and counted by the metrics as such; its time, client end and process) and makes
  it an event only when `steer observe` reads it, as it does for flows: 4.4 -> 3.7 us of
  Python per entry in-process, plus 1.35 us of parsing (a 160-entry message of realistic
  entries, 257 bytes each). Against a request that costs the node 76-117 us, every
  request logged cannot stay within 5% of the rps on 2 cores: the target needs the whole
  of it under ~5 us. `steer.access_log_percent` samples at run time
  ([observability](observability.md#access-log-sampling)). Batches of 64 KiB (16 KiB
  before): 1 MiB batches, flushed by time, cut the agent's per-message work but stalled a
  worker while it serialised one, and p99 with one connection went to 3 ms.
  Where the floor is (measured with code changed for the measurement only, iptables, 16
  connections, 6-8 interleaved 5 s runs each, medians): with the agent reading each
  message off the stream and dropping it unparsed, logging every request still cost
  0.89x the rps, Envoy's user CPU per request 42.1 -> 49.5 us and the agent 3.8 us (gRPC
  receipt alone). The node Envoy's one worker is what bounds the rps (94% busy on this
  path), so whatever Envoy spends on each entry comes straight off the rps: the target's
  5% is ~2 us of Envoy's ~42 us, and Envoy's gRPC ALS takes ~7 us on its own. Envoy's
  OpenTelemetry access logger with the same fields as one tab-separated line did no
  better in Envoy (+4 to +7 us, 0.92x with the agent dropping the messages, 0.86-0.92x
  parsing them); the same logger with a one-character line cost 0.99x and +1.3 us, so
  it is formatting the request's fields, whatever the transport, that costs. No consumer
  can bring back what Envoy spends before the entry leaves it: every HTTP verdict logged
  meets 0.95x only where the node Envoy is not the bottleneck. Sampled at 10% of allowed
  requests (`steer.access_log_percent`; denials always logged), the same measurement gave
  0.94-0.97x the rps and 1.02x the CPU per request (two runs).

- **services** (connect-time LB >= 1.3x kube-proxy's new-connection rate at 5,000
  Services, and >= 0.95x its own rate at 10): both met: 1.32x (14,969 against 11,366
  connections/s; a second run of the same code 1.33x, 14,814 against 11,117) and 1.06x
  (against 14,092 at 10 Services). Per connection connect4 costs 124 us of the lab's CPU
  at 5,000 Services against 161 us through kube-proxy, whose walk of a 10,001-rule chain
  (two rules per Service port, the measured one in the middle) costs ~32 us of each
  connection; connect4's map lookup costs nothing measurable, and a flow to a pod's
  address skips kube-proxy's chain (`steer/to-a-pod-address`). At 10 Services kube-proxy
  is as fast (its chain is short), and the eBPF client pays for its flows being recorded
  for `steer observe`, which the unsteered kube-proxy client is not. That recording was
  what missed the target last round (1.26x): the agent spent ~6 us of CPU per flow,
  outside the lab's cgroup but on the same two cores. It now maps the ring buffer itself
  (libbpf's callback into Python cost more per record than the rest) and keeps each flow
  as its record plus what its shape says, made an event only when `steer observe` reads
  it: ~1.7 us per flow under this load (the agent's flow thread, /proc). Three flaws of an
  earlier bench were fixed the round before: the measured Service sorted first in the
  stand-in's chain (by name), so kube-proxy walked 2 rules rather than 5,000; a new
  ClusterIP per round made the client's TCP timestamps (offset per destination address)
  fail the backends' PAWS check against their TIME_WAIT entries, and SYNs waited 1 s
  each; and Envoy backends spent ~80 us of each ~290 us connection.
- **churn** (RSS slope <= 1 MiB per 10 min after warm-up, p99 change-to-enforcement <= 200
  ms, at 5 changes/s): both met in this run: 5.0 changes/s, p50 100 ms, p99 181 ms (policy
  edits p99 114 ms, pod relabels p99 252 ms); RSS slope +0.66 MiB/10 min for the agent,
  -0.63 for the control plane. The p99 sits close to the line and moves between runs (the
  run before this one: 201 ms; the one before: 164 ms). The agent's CPU per change fell
  from 92 to ~55-60 ms: the iptables commit ~16 ms, the conntrack listing and revocation
  ~17 ms (a `conntrack -L` walks the kernel's whole 262k-bucket table, ~7 ms even when
  empty), render ~17 ms, resolve ~13 ms, load ~11 ms; the control plane's reload ~38 ms.
  Before the clock starts, every pod and policy is changed once: without that, the
  agent's RSS rose while the run changed each pod for the first time (+1.27 MiB/10 min,
  flat after ~7 minutes; in-process it is flat after one pass), which is the allocator
  placing each first replacement away from the start-up heap, not a leak (a unit test
  relabels every pod repeatedly and counts the live objects).
- **faults**: every drill kept its promise on both datapaths: no failed and no unchecked
  request through kill -9 of the agent (which adopted the pinned programs) or of Envoy
  (L7 fails closed, served again 0.1-0.2 s after the restart), a control-plane restart
  (changes flowing again after 0.8-1.1 s, now that Envoy's xDS reconnect backs off to 1 s
  at most instead of 30 s), and a policy tightened under load (nothing served against
  the new rules after the 1 s deadline).

What closed the rest of the churn gap (py-spy on the live agent and control plane): the
idle collector measured the frozen heap after every change and status write, and
`gc.get_freeze_count()` walks the whole frozen list (19 ms at 2M objects): a fifth of the
agent's and a third of the control plane's CPU; it now looks every 10 s. A change no longer
reads steer's iptables chains back before it writes (12 ms at 1k pods); a drift check every
5 s (names and jumps) and 30 s (every rule) finds what other tools do instead. Pods share
their steering and address objects, and glibc's free heap is trimmed every 10 s.

What closed the churn gap the round before (py-spy on the live processes, cProfile on a
recording kernel, phase timers now in `steer status`): a pod's eBPF map entries patched
for the touched addresses only, and only differing entries written (the agent's eBPF work
per change 400 ms -> 1 ms); replicas sharing one iptables chain of their rules (28k ->
4.7k rules); applies that trust iptables-restore's commit instead of reading rules back
(230 ms -> 0 at the old size); conntrack listed once per change by `conntrack -L` (every
dump walks the kernel's whole 262k-bucket table, and pyroute2 decoded 740 us per entry);
per-pod re-parsing of the lab state and per-pod label-index updates; xDS routes looked at
only for touched addresses; the control plane's status written on change rather than
every 100 ms; each change collecting what it allocated before freezing it (full
collections went from every few seconds to two in 10 minutes, ~100 ms each, between
changes); an RBAC cache that held
every rule a churning cluster ever had replaced by one that keeps the last two renders'
(control plane +132 -> +0.35 MiB/10 min); and the benchmark no longer re-reading a hundred
policy files every 5 ms while it waits.

What closed the gaps this round (profiled with cProfile, phase timers, /proc): an
incremental resolver and identity-keyed caches downstream (snapshot render after a change
0.61 s -> 6 ms at 10k rules), libyaml for policy files (50 ms -> 6 ms per 100-rule file),
encodings and references of unchanged resources reused, automatic garbage collection held
off during a change and run when idle (a full pass cost ~110 ms inside a change), a 2 ms
file-watch step, and the BPF compile moved to a short-lived child with libbpf for
everything else (agent 217 -> 132 MiB; the child peaks at ~194 MiB for the second or two
it runs).
"""

PRICE = """\
## The price of performance

What each path costs, from `steer bench cost` (above): CPU per request over the whole lab
(client, server, proxies), p50 with one connection, and the node Envoy's own user CPU.

Profile of the node Envoy (its binary is stripped, so `perf` names no function in it; the
split comes from switching one thing at a time in steer's own configuration and reading
the Envoy cgroup's CPU per request: medians of three alternating 5 s runs at 16
connections, L7 via iptables / via eBPF + sk_msg, on this 2-core VM):

| change (alone) | Envoy user us/req | Envoy sys us/req | rps |
|---|---|---|---|
| before | 126 / 124 | 31 / 17 | 6,913 / 7,949 |
| one worker instead of two (`--concurrency`) | 111 / 105 | 25 / 13 | 7,312 / 8,113 |
| router without dynamic stats, no x-envoy headers | 118 / 116 | 30 / 19 | 7,287 / 8,090 |
| stats kept to an inclusion list (measured as none) | 119 / 116 | 33 / 19 | 7,334 / 8,345 |
| no request ids generated | 127 / 120 | 33 / 19 | 6,990 / 7,963 |
| **all of the above (shipped)** | **111 / 102** | **26 / 13** | **7,052 / 8,239** |
| for scale, not shipped: no RBAC filters | 111 / 115 | 32 / 19 | 7,441 / 7,846 |
| for scale, not shipped: Envoy's floor (see below) | 100 / 90 | 32 / 15 | 7,326 / 8,389 |

- **Workers**: a per-node proxy shares the node's cores with its pods; two workers on two
  cores woke each other and the backends more. The default is now half the CPUs Envoy
  may run on, at least one (`steer envoy --concurrency`).
- **Stats**: per-request histograms and per-response-code cluster stats are gone; what
  users read is kept (RBAC verdicts, listener request and connection totals, Envoy's and
  its control plane's health). steer's own metrics count requests by verdict.
- **Request ids**: no measurable CPU, but Envoy no longer invents an `x-request-id` that a
  policy author would have to think of; `suppress_envoy_headers` likewise stops the
  `x-envoy-*` headers that described the proxy to servers and clients.
- **Upstream connections**: already reused: 18 upstream connections carried 26,302
  requests at 16 connections; nothing to gain.
- **Filter order and RBAC**: the RBAC filters cost ~5-10%; each request is checked only
  against its own destination's rules (per-route configuration), and the refusal routes'
  regexes did not show above the noise (about +-8% between runs).
- **Buffer limits**: the GET/HEAD body check keeps a one-byte buffer; no CPU to gain.
- Nothing here weakens path normalisation, header handling or the refusal routes.

What is left is Envoy's own floor (measured with no RBAC filters, refusal routes, buffer
filter, access log, path normalisation or stats, and one worker): two HTTP/1 codecs, the
event loop and the socket calls, ~90-100 us of user CPU per request on the VM of those
runs (where wrk and a direct-response Envoy backend together took ~43 us); the node Envoy
was 10-20% above it, at 102-111 us.

The machine these figures come from is faster than the one of the table above (direct:
~42k rps against ~18k), and the node Envoy's user CPU per request falls with it: 41.9 us
on iptables and 31.5 us on eBPF + sk_msg in this run (target <= 40 us: not met), 38.3 /
32.7 and 44.4 / 34.8 us in two other runs that day (met in one of the three). The target
sits at the line on this machine, at no change of configuration; it is not met on the
slower one. Tried again on
this machine, one variant per node, three alternating runs each (L7 via iptables / eBPF
+ sk_msg, Envoy user us/req): shipped 39-43 / 31-39; no refusal routes 42-44 / 38-40;
no stream idle timer 38-40 / 30-36; no access log filter at all 39-44 / 30-38: all within
the spread between runs of the same configuration (one node's shipped runs: 44-53 /
47-52), so nothing left in steer's configuration moves Envoy's CPU measurably. Pinning
Envoy to one of the two cores cost 20-30% of the rps. Why the rps ratio stops short of
what the CPU per request predicts (73 against 116 us of the whole node's CPU per request
would allow ~1.6x): the node Envoy's worker is 94-95% busy on the iptables path but only
78-80% on eBPF + sk_msg, and the machine is ~35% idle on both (/proc/stat). `perf sched`
shows why: sk_msg hands each message to the peer socket and wakes its reader with a sync
wake-up, so the scheduler places the backend on the node Envoy's core, and the two take
turns there in 10-40 us slices while the other core waits for wrk. Keeping them apart
(the node Envoy on one core, the pods on the other) was worse: every hand-over then
crosses cores, 102 against 73 us of CPU per request, 0.94x the rps of iptables.
The p50 with one connection is mostly neither path's own: this VM halts an idle vCPU at
once (`/sys/module/haltpoll/parameters/guest_halt_poll_ns` is 0), so each of the
request's hand-overs that wakes the other core waits for it to come out of a halt. With
polling turned on for a measurement (200 us, then set back), p50 fell from 0.259 to
0.148 ms on iptables and from 0.218 to 0.131 ms on eBPF + sk_msg, and the ratio rose
from 0.84x to 0.88x: what is left is two Envoys' and wrk's user-space work, the same on
both paths. The kernel's whole share of a request on the iptables path (52 us of system
CPU per request over the whole node, in the cost run above: 20% of its 0.260 ms p50) is
less than the 30% of p50 that 0.70x asks sk_msg to remove; sk_msg removes about half of
it (23 us left: the socket calls and the scheduler).
(The HTTP/1 parser cannot be
chosen: Envoy removed the runtime switch to http-parser in 2025.) The eBPF + sk_msg path
against iptables: p50 0.74-0.81x (target 0.70x) and rps 1.17-1.36x (target 1.3x) over
three runs of the day; sk_msg halves the kernel's share (13 against 26 us of Envoy's system
CPU), but user space is most of each request. The L7 path via eBPF + sk_msg at 1.94x
direct p50 in this run (target 2.5x: met; 1.87-1.98x that day, 2.42-2.59x on the slower
machine).

The sidecar model costs more on every count: two Envoys per request instead of one, each
with its pod's iptables redirect: 2.7x the CPU per request of L7 via eBPF + sk_msg, and
2.1x its p50, in this run (1.9x and 1.9x on the slower machine). Memory: one sidecar
holding only its own pod's configuration (the sidecar model's best case) takes ~64 MiB;
the node Envoy with the configuration of 100 pods takes ~76 MiB, 0.012x the sidecars'
6.3 GiB (target <= 0.2x: met), and ~180 MiB at 1,000 pods.
"""

ABOUT = {
    "cost": (
        "Each way a pod's traffic can go, side by side in one run: direct, L4-only under "
        "eBPF, L7 via iptables, L7 via eBPF + sk_msg, and Istio's sidecar model built in "
        "the lab (unsteered pods, each with its own Envoy holding the same policy as steer "
        "renders it, reached through iptables REDIRECT in the pods). CPU is the whole node's "
        "per request at 16 connections (the lab's cgroup subtree, and steer's agent and "
        "control plane); latency with one connection. Memory: "
        "a real Envoy per model with the configuration for N pods, VmRSS once ready."
    ),
    "datapath": (
        "The same HTTP GET through each path a pod's traffic can take, one client and one "
        "server pod per path on one node; servers are Envoy instances answering from a "
        "static route, the load is wrk inside the client pod. CPU is the whole node's per 10k "
        "requests: the lab's cgroup subtree (clients, servers, node Envoy), and steer's "
        "agent and control plane, which share its cores (the agent reads every observed "
        "request)."
    ),
    "l4-rules": (
        "Bulk and small-write TCP throughput between two pods with growing numbers of L4 "
        "rules: steer's verdict cached in the conntrack mark (the policy chain walked once "
        "per flow) against the same rules walked for every packet."
    ),
    "propagation": (
        "A policy change at 1k pods and 10k rules, from writing the policy to the next "
        "request on an existing keep-alive connection seeing the new verdict, for "
        "state-of-the-world and delta ADS."
    ),
    "render": (
        "The control plane's snapshot render (resolve, xDS resources, encoding and "
        "versions) and the agent's ruleset render, after one policy changed (through "
        "their incremental caches, as the running processes render) and cold; and "
        "applying the rules to a fresh network namespace (first apply, and re-apply "
        "after one change)."
    ),
    "memory": (
        "Resident memory of the agent (eBPF datapath on; its programs compiled by a "
        "short-lived child, whose peak is shown too) and of the control plane."
    ),
    "l7-rules": (
        "1-connection p50 latency to one destination with 10 HTTP rules, with 10k more "
        "rules on other destinations, and with 1k rules on the destination itself: a "
        "request is checked only against its own destination's rules."
    ),
    "churn": (
        "Continuous policy and pod changes (5 a second, alternating) on a 1k-pod node with "
        "live traffic: agent and control-plane RSS over time and its slope after warm-up, "
        "change-to-enforcement (agent, control plane and Envoy all caught up) during "
        "churn, and the agent's CPU per change."
    ),
    "services": (
        "Short connections (one request each) to a ClusterIP with two backends, balanced "
        "by kube-proxy's iptables DNAT (the lab's stand-in, with kube-proxy v1.20's rules) "
        "from a pod steer does not steer, and by connect4 from a pod on eBPF, with 10 and "
        "with 5,000 Services on the node; no policy, so only the balancing differs. The "
        "backends are nginx (a short connection costs an Envoy backend ~80 us, nginx ~25 "
        "us). The measured Service sits in the middle of kube-proxy's chain and keeps its "
        "ClusterIP in every round; each round starts on a quiet machine. CPU is the whole "
        "lab's cgroup subtree per connection (and its client and backend pods' shares); "
        "keep-alive p50 is one connection."
    ),
    "flows": (
        "Short connections (one request each) from a pod on eBPF to a pod no policy covers, "
        "as fast as the machine allows: each is a flow connect4 records and sockops reports "
        "at close through a BPF ring buffer. Counts the flow events the agent received and "
        "the losses the kernel counted; every connection must be one or the other."
    ),
    "faults": (
        "Fault drills under steady L7 and L4-only load on both datapaths: kill -9 of the "
        "agent, of Envoy, a control-plane restart, and a policy tightened under load. "
        "`failed`: requests steer promised to keep that failed (for envoy-kill, L4-only "
        "ones; L7 ones fail closed by design), or, for tighten, requests served against the "
        "new rules after the 1 s revocation deadline; `unchecked`: L7 requests that "
        "reached a backend without passing Envoy."
    ),
}


def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "unknown"


def machine() -> list[str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    memory_kb = next(
        (
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        0,
    )
    from steer.node.envoy import envoy_binary

    found = re.search(r"/(\d+\.\d+\.\d+)/", _run([envoy_binary(), "--version"]))
    envoy = [found.group(1) if found else "unknown"]
    return [
        f"- CPU: {os.cpu_count()} x {cpu}",
        f"- memory: {memory_kb / 1024 / 1024:.0f} GiB",
        f"- kernel: {platform.release()}",
        f"- OS: {_run(['sh', '-c', '. /etc/os-release; echo $PRETTY_NAME'])}",
        f"- Envoy {envoy[0]}, Python {platform.python_version()}",
    ]


def write_report(bench_dir: Path = BENCH_DIR, report: Path = REPORT) -> Path:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make benchmarks` (or `steer bench report` from the saved results in "
        "`docs/bench/`) on "
        f"{datetime.now(UTC).strftime('%Y-%m-%d')}. Figures are medians of interleaved "
        "rounds, with min and max in the JSON; they are measurements, never asserted in "
        "tests. Re-run them on your own machine: on a busy 2-core VM they vary by up to 2x.",
        "",
        "## Machine",
        "",
        *machine(),
    ]
    for name in SCENARIOS:
        path = bench_dir / f"{name}.json"
        if not path.exists():
            continue
        result = json.loads(path.read_text())
        lines += ["", f"## {name} (`steer bench {name}`)", "", ABOUT.get(name, ""), ""]
        lines += ["```", scenario(name).table(result), "```"]
        if (bench_dir / f"{name}.png").exists():
            lines += ["", f"![{name}](bench/{name}.png)"]
    lines += ["", PRICE.rstrip(), "", ANALYSIS.rstrip()]
    report.write_text("\n".join(lines) + "\n")
    return report
