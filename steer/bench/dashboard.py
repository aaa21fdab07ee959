"""A picture of the shipped Grafana dashboard, drawn from a real run of a local node.

No Grafana or Prometheus here: this scrapes the agent's and the control plane's metrics
endpoints once a second while a node carries load (allowed and denied requests on both
datapaths, policy changes that revoke flows), then evaluates each panel's own PromQL
expression over those samples and draws the panels in the dashboard's layout. Only the
query forms the dashboard uses are understood (`sum by (...) (rate(...))`, `increase`,
`histogram_quantile` over `sum by (le)`, `max by (...)` of a gauge, and a sum of two
terms); the range of every
`rate` and `increase` is shortened to the run's (`window_s`), since the run lasts a
minute, not hours.

    python -m steer.bench.dashboard docs/observability-dashboard.png
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from steer.bench.plots import new_figure, save
from steer.constants import CONTROL_METRICS_PORT, METRICS_PORT, NODE_NETNS

DASHBOARD = Path(__file__).resolve().parents[2] / "manifests" / "grafana" / "steer-dashboard.json"
Labels = tuple[tuple[str, str], ...]
# One scrape: (metric sample name, labels) -> value.
Scrape = dict[tuple[str, Labels], float]

_RANGE = r"\[[0-9]+[smhd]\]"
_SUM_RATE = re.compile(
    rf"^sum(?: by \((?P<by>[a-z_, ]+)\) )?\((?P<fn>rate|increase)\((?P<metric>[a-z_]+)"
    rf"(?:\{{(?P<match>[^}}]*)\}})?{_RANGE}\)\)$"
)
_QUANTILE = re.compile(
    rf"^histogram_quantile\((?P<q>[0-9.]+), sum by \(le\) \(rate\((?P<metric>[a-z_]+)"
    rf"{_RANGE}\)\)\)$"
)

_MAX_GAUGE = re.compile(r"^max by \((?P<by>[a-z_, ]+)\) \((?P<metric>[a-z_]+)\)$")


@dataclass(frozen=True)
class Series:
    label: str
    points: list[tuple[float, float]]


def _matchers(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    pairs = (part.split("=", 1) for part in text.split(","))
    return {name.strip(): value.strip().strip('"') for name, value in pairs}


def _delta(
    samples: Sequence[tuple[float, Scrape]],
    index: int,
    window_s: float,
    metric: str,
    wanted: Mapping[str, str],
) -> tuple[float, dict[Labels, float]]:
    """The increase of each series of `metric` over the window ending at sample `index`."""
    now, current = samples[index]
    start = index
    while start > 0 and now - samples[start - 1][0] <= window_s:
        start -= 1
    then, before = samples[start]
    out: dict[Labels, float] = {}
    for (name, labels), value in current.items():
        if name != metric or any(dict(labels).get(k) != v for k, v in wanted.items()):
            continue
        # A counter that reset (a restart) counts from zero, as Prometheus does.
        previous = before.get((name, labels), 0.0)
        out[labels] = value - previous if value >= previous else value
    return max(now - then, 1e-9), out


def _group(labels: Labels, by: Sequence[str]) -> str:
    """A series' name under `by (...)`: its values of those labels."""
    return ", ".join(dict(labels).get(b, "") for b in by)


def _sum_rate(
    found: re.Match[str], samples: Sequence[tuple[float, Scrape]], window_s: float
) -> list[Series]:
    by = [b.strip() for b in (found["by"] or "").split(",") if b.strip()]
    per_second = found["fn"] == "rate"
    series: dict[str, list[tuple[float, float]]] = {}
    for index in range(1, len(samples)):
        span, deltas = _delta(samples, index, window_s, found["metric"], _matchers(found["match"]))
        grouped: dict[str, float] = {}
        for labels, value in deltas.items():
            key = _group(labels, by) or "total"
            grouped[key] = grouped.get(key, 0.0) + (value / span if per_second else value)
        for key, value in grouped.items():
            series.setdefault(key, []).append((samples[index][0], value))
    return [Series(k, v) for k, v in sorted(series.items())]


def _max_gauge(found: re.Match[str], samples: Sequence[tuple[float, Scrape]]) -> list[Series]:
    by = [b.strip() for b in found["by"].split(",")]
    series: dict[str, list[tuple[float, float]]] = {}
    for when, scrape in samples:
        grouped: dict[str, float] = {}
        for (name, labels), value in scrape.items():
            if name == found["metric"]:
                key = _group(labels, by)
                grouped[key] = max(grouped.get(key, value), value)
        for key, value in grouped.items():
            series.setdefault(key, []).append((when, value))
    return [Series(k, v) for k, v in sorted(series.items())]


def _quantile(
    found: re.Match[str], samples: Sequence[tuple[float, Scrape]], window_s: float
) -> list[Series]:
    q = float(found["q"])
    points = []
    for index in range(1, len(samples)):
        _, deltas = _delta(samples, index, window_s, found["metric"], {})
        buckets: dict[float, float] = {}
        for labels, value in deltas.items():
            le = dict(labels)["le"]
            bound = math.inf if le == "+Inf" else float(le)
            buckets[bound] = buckets.get(bound, 0.0) + value
        ordered = sorted(buckets.items())
        total = ordered[-1][1] if ordered else 0.0
        if total <= 0:
            continue
        rank, lower, below = q * total, 0.0, 0.0
        for bound, count in ordered:
            if count >= rank:
                if math.isinf(bound):
                    value = lower
                else:  # linear within the bucket, as histogram_quantile does
                    value = lower + (bound - lower) * (rank - below) / max(count - below, 1e-9)
                points.append((samples[index][0], value))
                break
            lower, below = bound, count
    return [Series(f"p{q * 100:g}", points)]


def evaluate(
    expr: str, samples: Sequence[tuple[float, Scrape]], window_s: float
) -> list[Series] | None:
    """The expression's series over the samples; None for a form this does not read."""
    terms = [t.strip() for t in expr.split(" + ")]
    if len(terms) > 1:
        parts = [evaluate(t, samples, window_s) for t in terms]
        if any(p is None for p in parts):
            return None
        summed: dict[float, float] = {}
        for part in parts:
            for line in part or ():
                for when, value in line.points:
                    summed[when] = summed.get(when, 0.0) + value
        return [Series("total", sorted(summed.items()))]
    if found := _SUM_RATE.match(expr):
        return _sum_rate(found, samples, window_s)
    if found := _QUANTILE.match(expr):
        return _quantile(found, samples, window_s)
    if found := _MAX_GAUGE.match(expr):
        return _max_gauge(found, samples)
    return None


def parse_scrape(text: str) -> Scrape:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def draw(
    dashboard: Mapping[str, Any],
    samples: Sequence[tuple[float, Scrape]],
    path: Path,
    window_s: float = 10.0,
) -> None:
    panels = dashboard["panels"]
    columns = 3
    rows = math.ceil(len(panels) / columns)
    figure, _ = new_figure(1)
    figure.clear()
    figure.set_size_inches(6 * columns, 3.2 * rows)
    start = samples[0][0] if samples else 0.0
    for number, panel in enumerate(panels, 1):
        axes = figure.add_subplot(rows, columns, number)
        axes.set_title(panel["title"], fontsize=10)
        drawn = False
        for target in panel["targets"]:
            for line in evaluate(target["expr"], samples, window_s) or ():
                if line.points:
                    axes.plot(
                        [t - start for t, _ in line.points],
                        [v for _, v in line.points],
                        label=line.label,
                    )
                    drawn = True
        if drawn:
            axes.legend(fontsize=7, loc="upper left")
        else:
            axes.text(
                0.5, 0.5, "no data in this run", ha="center", va="center", transform=axes.transAxes
            )
        axes.set_xlabel("s", fontsize=8)
        axes.tick_params(labelsize=7)
    figure.suptitle(
        f"{dashboard.get('title', 'steer')}: panels evaluated on a local node's metrics"
    )
    save(figure, path)


# --- the run ---------------------------------------------------------------------------------


def _scrape_all() -> Scrape:
    from steer.node.netns import run_in_netns

    def get(port: int, where: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{where}", timeout=5) as reply:
            return str(reply.read().decode())

    def all_three() -> Scrape:
        merged: Scrape = {}
        for port, where in (
            (METRICS_PORT, "/metrics"),
            (METRICS_PORT, "/stats/prometheus"),
            (CONTROL_METRICS_PORT, "/metrics"),
        ):
            merged.update(parse_scrape(get(port, where)))
        return merged

    return run_in_netns(NODE_NETNS, all_three)


def record(seconds: float = 60.0) -> list[tuple[float, Scrape]]:
    """A local node under load for `seconds` (allowed and denied requests on both
    datapaths, a policy change and its undo), scraped once a second."""
    from steer.bench.datapath import PAIRS, PORT, bench_node, policies

    samples: list[tuple[float, Scrape]] = []
    with bench_node(1) as (bench, _, _):
        node, clients = bench.node, bench.clients
        bench._access_log(True)
        policy_text = policies()
        for second in range(int(seconds)):
            began = time.monotonic()
            for config in ("iptables", "ebpf_skmsg", "l4_direct"):
                server = PAIRS[config][1]
                client = clients[config]
                for _ in range(20):
                    client.request(node.ip(server), PORT, "GET", f"/page/{second}")
                # POST is outside the rule (GET only): denied by the default.
                if config != "l4_direct":
                    for _ in range(3 + second % 5):
                        client.request(node.ip(server), PORT, "POST", "/form")
            if second % 15 == 7:
                # A change the node must propagate, and undo: syncs, pushes, revocations.
                node.write_policies(
                    {
                        **policy_text,
                        "extra.yaml": policy_text["bench-l4.yaml"].replace("bench-l4", "extra"),
                    }
                )
            elif second % 15 == 12:
                node.write_policies(policy_text)
            samples.append((time.time(), _scrape_all()))
            time.sleep(max(0.0, 1.0 - (time.monotonic() - began)))
    return samples


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    out = Path(args[0]) if args else Path("docs/observability-dashboard.png")
    samples = record()
    draw(json.loads(DASHBOARD.read_text()), samples, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
