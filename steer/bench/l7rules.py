"""`steer bench l7-rules`: does a request pay for HTTP rules that are not its destination's?

One-connection p50 latency (wrk -c1 --latency, inside the client pod) through the node's
Envoy to `web`, where an Envoy answering from a static route stands in for the server (a
Python server would measure Python; steer.bench.datapath's backend). Three configurations
of the same node, interleaved ABBA over `rounds` rounds:

    10               web has 10 HTTP rules
    10000_elsewhere  web has the same 10, and 10k more HTTP rules sit on 100 modelled pods
                     (100 each): steer gives every destination its own filter chain and
                     route configuration, so a request to web should never see them
    1000_here        web itself has 1000 HTTP rules, for contrast

Every rule on web names port 8080 and a path prefix the request does not have, so Envoy
must check each one; the single rule admitting the client is named to sort last, and
Envoy's RBAC filter evaluates its policies in name order, so each request is checked
against every rule before it is admitted. Modelled pods are lab state entries with no
netns (steer.bench.propagation); they exist in every configuration, so the listeners are
the same size throughout and only the rules move. Each switch rewrites the policies,
waits until agent, control plane and Envoy are in sync, and sends one warm-up request.
Quick mode: 10 on web, 1000 elsewhere, 100 on web; the JSON's "sizes" says what ran.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steer.bench import BenchOptions
from steer.bench.datapath import PORT, backend, latency_ms
from steer.bench.plots import new_figure, save
from steer.bench.propagation import (
    NAMESPACE,
    cidr_peer,
    modelled_pod,
    policy_text,
    populated_node,
    real_pods,
    rule_text,
    selector_peer,
)
from steer.bench.stats import abba, summarize
from steer.lab.localnode import LocalNode
from steer.lab.podproc import PodProcess, PodProcessError

CONFIGS = ("10", "10000_elsewhere", "1000_here")
FIGURES = ("p50_ms", "p99_ms")
RULES_PER_MODELLED_POD = 100
TARGET_RATIO = 1.1
SYNC_TIMEOUT_S = 300.0
BACKEND_TIMEOUT_S = 15.0
# Distinct from steer.bench.datapath's backends (20-24), should both ever share a host.
BACKEND_BASE_ID = 30
# Sorts after every filler rule ("r...") in Envoy's name-ordered RBAC policies.
ADMIT_RULE = "zz-admit-client"


@dataclass(frozen=True)
class Sizes:
    here: int
    elsewhere: int
    here_large: int
    seconds: int

    @classmethod
    def of(cls, quick: bool) -> Sizes:
        return cls(10, 1000, 100, 1) if quick else cls(10, 10_000, 1000, 2)

    @property
    def modelled_pods(self) -> int:
        return max(1, self.elsewhere // RULES_PER_MODELLED_POD)

    def of_config(self, config: str) -> dict[str, int]:
        """Rules on web and elsewhere in `config`."""
        return {
            "10": {"here": self.here, "elsewhere": 0},
            "10000_elsewhere": {"here": self.here, "elsewhere": self.elsewhere},
            "1000_here": {"here": self.here_large, "elsewhere": 0},
        }[config]


def _http_rule(n: int) -> str:
    # Port 8080 matches every request, so the path must be checked, and never matches.
    return rule_text(f"r{n:05d}", cidr_peer(n), PORT, f"/r{n}/")


def policies(sizes: Sizes, config: str) -> dict[str, str]:
    counts = sizes.of_config(config)
    admit = rule_text(ADMIT_RULE, selector_peer({"app": "client"}), PORT, "/")
    web = [*(_http_rule(n) for n in range(counts["here"] - 1)), admit]
    texts = {"web.yaml": policy_text("web", {"app": "web"}, web)}
    first = counts["here"]  # rule numbers (and so CIDRs and paths) stay distinct
    for pod in range(counts["elsewhere"] // RULES_PER_MODELLED_POD):
        base = first + pod * RULES_PER_MODELLED_POD
        rules = [_http_rule(base + r) for r in range(RULES_PER_MODELLED_POD)]
        texts[f"m{pod}.yaml"] = policy_text(f"m{pod}", {"app": f"m{pod}"}, rules)
    return texts


def _wrk(client: PodProcess, url: str, seconds: int) -> dict[str, float]:
    argv = ["wrk", "-t1", "-c1", f"-d{seconds}s", "--latency", url]
    code, out, err = client.run(argv, timeout=seconds + 30)
    if code != 0:
        raise RuntimeError(f"wrk failed: {err or out}")
    return {"p50_ms": latency_ms(out, "50"), "p99_ms": latency_ms(out, "99")}


def _answers(client: PodProcess, ip: str) -> bool:
    try:
        return client.request(ip, PORT, "GET", "/").status == 200
    except PodProcessError:  # the backend Envoy still starting: refused, or reset
        return False


def _switch(node: LocalNode, client: PodProcess, texts: Mapping[str, str]) -> None:
    node.write_policies(texts)
    node.wait_synced(SYNC_TIMEOUT_S)
    # Warm-up: the first request on a new route configuration is not the steady state.
    if not _answers(client, node.ip("web")):
        raise RuntimeError("client -> web is not admitted after the policy switch")


def run(options: BenchOptions) -> dict[str, Any]:
    sizes = Sizes.of(options.quick)
    modelled = [modelled_pod(i, {"app": f"m{i}"}) for i in range(sizes.modelled_pods)]
    samples: dict[str, dict[str, list[float]]] = {c: {f: [] for f in FIGURES} for c in CONFIGS}
    order = list(abba(CONFIGS, options.rounds))
    with (
        populated_node(real_pods(), modelled, policies(sizes, order[0])) as node,
        ExitStack() as stack,
    ):
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        web = node.lab.pod(NAMESPACE, "web")
        stack.enter_context(backend(web, BACKEND_BASE_ID, workdir))
        client_pod = node.lab.pod(NAMESPACE, "client")
        client = stack.enter_context(PodProcess.start(client_pod.netns, client_pod.cgroup))
        deadline = time.monotonic() + BACKEND_TIMEOUT_S
        while not _answers(client, web.ip):
            if time.monotonic() > deadline:
                raise TimeoutError("the backend Envoy in web never answered")
            time.sleep(0.1)
        url = f"http://{web.ip}:{PORT}/"
        for step, config in enumerate(order, 1):
            options.progress(f"[{step}/{len(order)}] {config}")
            _switch(node, client, policies(sizes, config))
            for figure, value in _wrk(client, url, sizes.seconds).items():
                samples[config][figure].append(value)
        dataplane = node.dataplane_of("client")
    configs: dict[str, dict[str, Any]] = {
        config: summarize(figures) for config, figures in samples.items()
    }
    p50 = {config: figures["p50_ms"] for config, figures in configs.items()}
    ratio = {config: value / p50["10"] for config, value in p50.items()}
    return {
        "scenario": "l7-rules",
        "rounds": options.rounds,
        "seconds_per_run": sizes.seconds,
        "sizes": {
            **{config: sizes.of_config(config) for config in CONFIGS},
            "modelled_pods": sizes.modelled_pods,
        },
        "configs": configs,
        "p50_ms": p50,
        "p99_ms": {config: figures["p99_ms"] for config, figures in configs.items()},
        "ratio_to_10": ratio,
        "target": f"10000_elsewhere p50 <= {TARGET_RATIO}x that of 10",
        "target_met": ratio["10000_elsewhere"] <= TARGET_RATIO,
        "client_dataplane": dataplane,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"1 connection to web, {result['rounds']} rounds of {result['seconds_per_run']} s "
        f"(client on {result['client_dataplane']})",
        f"{'config':<16} {'on web':>7} {'elsewhere':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'p50 range':>15} {'vs 10':>6}",
    ]
    for config, figures in result["configs"].items():
        size = result["sizes"][config]
        lo, hi = figures["min"]["p50_ms"], figures["max"]["p50_ms"]
        lines.append(
            f"{config:<16} {size['here']:>7} {size['elsewhere']:>9} {figures['p50_ms']:>8.3f} "
            f"{figures['p99_ms']:>8.3f} {f'{lo:.3f}-{hi:.3f}':>15} "
            f"{result['ratio_to_10'][config]:>5.2f}x"
        )
    lines.append(f"target {result['target']}: {'met' if result['target_met'] else 'NOT met'}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    figure, axes = new_figure(1)
    configs = list(result["configs"])
    p50 = [result["configs"][c]["p50_ms"] for c in configs]
    spread = [
        [v - result["configs"][c]["min"]["p50_ms"] for c, v in zip(configs, p50, strict=True)],
        [result["configs"][c]["max"]["p50_ms"] - v for c, v in zip(configs, p50, strict=True)],
    ]
    axes.bar(configs, p50, yerr=spread, capsize=4)
    axes.set(ylabel="ms (p50, min-max over rounds)", title="1-connection latency to web")
    save(figure, path)
