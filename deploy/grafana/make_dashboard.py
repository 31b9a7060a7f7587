"""Write the Sieve Grafana dashboard (JSON) from the panel list below.

    python deploy/grafana/make_dashboard.py           # writes dashboards/sieve.json
    python deploy/grafana/make_dashboard.py --check   # fails if it differs from this file

The dashboard, deploy/grafana/dashboards/sieve.json, is provisioned by docker-compose and,
through the symbolic link deploy/helm/sieve/files/dashboard.json, shipped by the Helm chart
as a ConfigMap for Grafana's dashboard sidecar.
tests/test_deploy_stack.py checks every query: metric names against the workers'
registry, PromQL syntax with promtool.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TARGETS = [ROOT / "deploy/grafana/dashboards/sieve.json"]

DS = {"type": "prometheus", "uid": "${datasource}"}
T = 'topology=~"$topology"'
TENANT = 'tenant=~"$tenant"'
# The reviewer reports the same gauges (lag, heartbeat, partitions) for its needs-review topic;
# the compose scrape config and the chart's ServiceMonitor name the jobs sieve-router / sieve-reviewer.
ROUTER = f'job="sieve-router", {T}'
REVIEWER = f'job="sieve-reviewer", {T}'
RATE = "[$__rate_interval]"


def q(expr: str, legend: str = "", instant: bool = False) -> dict[str, Any]:
    """One Prometheus query of a panel."""
    target: dict[str, Any] = {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto"}
    if instant:
        target["instant"] = True
        target["range"] = False
    return target


def quantiles(metric: str, by: str, qs: tuple[float, ...], extra: str = "") -> list[dict[str, Any]]:
    """histogram_quantile queries of one histogram, one per quantile."""
    group = f"le, {by}" if by else "le"
    label = f"{{{{{by}}}}} " if by else ""
    return [
        q(f"histogram_quantile({qv}, sum by ({group}) (rate({metric}_bucket{{{T}{extra}}}{RATE})))",
          f"{label}p{round(qv * 100)}")
        for qv in qs
    ]


def timeseries(title: str, description: str, targets: list[dict[str, Any]], unit: str = "short",
               width: int = 8, stack: bool = False, dashed: str | None = None) -> dict[str, Any]:
    """A time-series panel (``dashed``: a regular expression of the series drawn dashed)."""
    custom: dict[str, Any] = {"lineWidth": 1, "fillOpacity": 10, "showPoints": "never"}
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    overrides = [] if dashed is None else [{
        "matcher": {"id": "byRegexp", "options": dashed},
        "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                       {"id": "custom.fillOpacity", "value": 0}],
    }]
    return {
        "type": "timeseries", "title": title, "description": description, "datasource": DS,
        "targets": targets, "_w": width, "_h": 8,
        "fieldConfig": {"defaults": {"unit": unit, "custom": custom}, "overrides": overrides},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
    }


def stat(title: str, description: str, target: dict[str, Any] | list[dict[str, Any]], unit: str = "short",
         width: int = 4, thresholds: list[tuple[float | None, str]] | None = None) -> dict[str, Any]:
    """A single-number panel."""
    steps = [{"color": color, "value": value} for value, color in (thresholds or [(None, "green")])]
    return {
        "type": "stat", "title": title, "description": description, "datasource": DS,
        "targets": target if isinstance(target, list) else [target], "_w": width, "_h": 4,
        "fieldConfig": {"defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
                        "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "textMode": "auto"},
    }


def row(title: str) -> dict[str, Any]:
    """A collapsible row header."""
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "_w": 24, "_h": 1}


ROUTER_DECISIONS = f'sieve_decisions_total{{{T}, decided_by="router"}}'
# The novel share per route set, as the SieveNovelShareAboveBaseline alert computes it (it over 30m).
BY_SET = "by (topology, route_set)"
NOVEL_SHARE = (f"sum {BY_SET} (rate(sieve_novel_events_total{{{T}}}{RATE}))"
               f" / sum {BY_SET} (rate(sieve_novelty_measured_events_total{{{T}}}{RATE}))")
BASELINE = f"max {BY_SET} (sieve_novel_baseline{{{T}}})"



def shadow_share(counter: str) -> str:
    """``sieve_shadow_<counter>_total`` over the shadowed events, per shadow version."""
    by = "sum by (shadow_version)"
    return (f"{by} (rate(sieve_shadow_{counter}_total{{{T}}}{RATE}))"
            f" / {by} (rate(sieve_shadow_events_total{{{T}}}{RATE}))")


PANELS: list[dict[str, Any]] = [
    row("Overview"),
    stat("Events in /s", "Records consumed from the input topics, all workers.",
         q(f"sum(rate(sieve_events_in_total{{{T}}}{RATE}))"), "ops"),
    stat("Review-tail share", "Share of the router's decisions that went to needs-review "
         "(the part an LLM or a person looks at). Lower is cheaper.",
         q(f'sum(rate(sieve_decisions_total{{{T}, decided_by="router", outcome="needs_review"}}{RATE}))'
           f" / sum(rate({ROUTER_DECISIONS}{RATE}))"), "percentunit",
         thresholds=[(None, "green"), (0.2, "orange"), (0.4, "red")]),
    stat("Dead-letter share", "Share of input records sent to the dead-letter topic.",
         q(f"sum(rate(sieve_dead_letters_total{{{T}}}{RATE}))"
           f" / sum(rate(sieve_events_in_total{{{T}}}{RATE}))"),
         "percentunit", thresholds=[(None, "green"), (0.001, "orange"), (0.01, "red")]),
    stat("Consumer lag", "Records waiting (high-water mark minus committed offset, all partitions): "
         "on the routers' input topics, and on needs-review for the reviewers.",
         [q(f"sum(sieve_consumer_lag{{{ROUTER}}}) or vector(0)", "input"),
          q(f"sum(sieve_consumer_lag{{{REVIEWER}}}) or vector(0)", "needs-review")], "short",
         thresholds=[(None, "green"), (1000, "orange"), (100000, "red")]),
    stat("Time to drain the input lag", "The routers' lag divided by their current consumption rate: "
         "how long the backlog would take at this speed.",
         q(f"sum(sieve_consumer_lag{{{ROUTER}}}) / sum(rate(sieve_events_in_total{{{T}}}[5m]))"), "s"),
    stat("Routers / partitions", "Router workers reporting, and input partitions assigned to them. "
         "Workers beyond the partition count stay idle.",
         [q(f"count(sieve_heartbeat_timestamp_seconds{{{ROUTER}}}) or vector(0)", "routers"),
          q(f"sum(sieve_assigned_partitions{{{ROUTER}}}) or vector(0)", "partitions")], "short"),

    row("Throughput: events in and out"),
    timeseries("Events in /s by topic", "Records consumed, by input topic.",
               [q(f"sum by (topic) (rate(sieve_events_in_total{{{T}}}{RATE}))", "{{topic}}")], "ops"),
    timeseries("Decisions out /s by verdict", "Published decisions by outcome (clean, violating, "
               "needs_review, or an intent) and who decided.",
               [q(f"sum by (outcome, decided_by) (rate(sieve_decisions_total{{{T}}}{RATE}))",
                  "{{outcome}} ({{decided_by}})")], "ops", stack=True),
    timeseries("Decisions out /s by route", "Decisions by the route behind them (route.<name> topics); "
               "'none' when nothing matched.",
               [q(f'sum by (route) (rate(sieve_decisions_total{{{T}, route!=""}}{RATE}))', "{{route}}"),
                q(f'sum(rate(sieve_decisions_total{{{T}, route=""}}{RATE}))', "none")], "ops", stack=True),
    timeseries("Review-tail share", "needs_review decisions over all router decisions.",
               [q(f'sum by (topology) (rate(sieve_decisions_total{{{T}, decided_by="router", '
                  f'outcome="needs_review"}}{RATE})) / sum by (topology) (rate({ROUTER_DECISIONS}{RATE}))',
                  "{{topology}}")], "percentunit"),
    timeseries("Dead letters /s by stage and reason", "Inputs sent to the dead-letter topic. "
               "`sieve tail sieve.dead-letter` shows them; `sieve dead-letters replay` re-sends them.",
               [q(f"sum by (stage, reason) (rate(sieve_dead_letters_total{{{T}}}{RATE}))",
                  "{{stage}}: {{reason}}")], "ops", stack=True),
    timeseries("Batch retries /s and route-set reloads", "Retried batches by stage (errors in the "
               "worker log) and new route-set versions picked up without a restart.",
               [q(f"sum by (stage) (rate(sieve_batch_retries_total{{{T}}}{RATE}))", "retry {{stage}}"),
                q(f"sum(increase(sieve_route_set_reloads_total{{{T}}}{RATE}))", "route-set reloads")],
               "short"),

    row("Tenants: decisions per tenant policy"),
    timeseries("Decisions out /s by tenant", "Published decisions by the tenant policy that decided "
               "them (the event's tenant when the topology has a policy of that name, else _default) "
               "and outcome. docs/tenants.md.",
               [q(f'sum by (tenant, outcome) (rate(sieve_tenant_decisions_total{{{T}, {TENANT}}}{RATE}))',
                  "{{tenant}}: {{outcome}}")], "ops", width=12, stack=True),
    timeseries("Review-tail share by tenant", "needs_review decisions over all decisions, per tenant policy.",
               [q(f'sum by (tenant) (rate(sieve_tenant_decisions_total{{{T}, {TENANT}, '
                  f'outcome="needs_review"}}{RATE})) / sum by (tenant) '
                  f'(rate(sieve_tenant_decisions_total{{{T}, {TENANT}}}{RATE}))', "{{tenant}}")],
               "percentunit", width=12),

    row("Drift: events far from everything the route set knows"),
    timeseries("Novel share (drift)", "Share of the decisions whose novelty was measured that were "
               "novel (far from every example of the route set: sent to review, never given the "
               "default outcome), per route set; dashed, the share on the calibration data the "
               "threshold was fitted on (baseline), and the level SieveNovelShareAboveBaseline "
               "fires above when the 30-minute share stays there for 30 minutes.",
               [q(NOVEL_SHARE, "{{route_set}} novel"),
                q(BASELINE, "{{route_set}} baseline"),
                q(f"{BASELINE} + clamp_min({BASELINE}, 0.05)", "{{route_set}} alert level")],
               "percentunit", width=16, dashed=".* (baseline|alert level)$"),
    timeseries("Novel events /s", "Decisions whose novelty was measured, and the novel ones among "
               "them, per route set.",
               [q(f"sum {BY_SET} (rate(sieve_novelty_measured_events_total{{{T}}}{RATE}))",
                  "{{route_set}} measured"),
                q(f"sum {BY_SET} (rate(sieve_novel_events_total{{{T}}}{RATE}))", "{{route_set}} novel")],
               "ops"),

    row("Known content: lists, repeats, faults"),
    timeseries("List hits /s by list and entry", "List entries that fired (term, pattern or image "
               "hash lists beside the route set; they decide before the encoder). docs/lists.md.",
               [q(f"sum by (list, entry) (rate(sieve_list_hits_total{{{T}}}{RATE}))",
                  "{{list}}: {{entry}}")], "ops", width=6, stack=True),
    timeseries("Repeat cache hit ratio", "Share of the decisions taken from the repeat cache "
               "(from_cache: the same content decided under the same policy and version within "
               "the cache's time to live).",
               [q(f"sum(rate(sieve_cache_hits_total{{{T}}}{RATE})) / "
                  f"sum(rate(sieve_decisions_total{{{T}}}{RATE}))", "hit ratio")],
               "percentunit", width=6),
    timeseries("LLM calls saved /s", "Reviews answered with the verdict of an earlier review of the "
               "same content (no LLM call), against the LLM calls made.",
               [q(f"sum(rate(sieve_review_reused_total{{{T}}}{RATE}))", "saved"),
                q(f"sum(rate(sieve_review_requests_total{{{T}}}{RATE}))", "made")], "ops", width=6),
    timeseries("Worker faults", "1 while a worker holds a fault that hits every event (it consumes "
               "nothing, /readyz is false; SieveWorkerFault), and faults by stage and error class.",
               [q(f"max by (instance) (sieve_worker_fault{{{T}}})", "fault {{instance}}"),
                q(f"sum by (stage, error) (increase(sieve_worker_faults_total{{{T}}}{RATE}))",
                  "{{stage}}: {{error}}")], "short", width=6),

    row("Latency and batches"),
    timeseries("End-to-end latency p50 / p95 / p99", "From the event's Kafka timestamp to its "
               "decision acknowledged by the broker (queueing in Kafka included).",
               quantiles("sieve_end_to_end_seconds", "", (0.5, 0.95, 0.99)), "s", width=6),
    timeseries("Stage latency p50 per batch", "Seconds per batch in each stage.",
               quantiles("sieve_stage_seconds", "stage", (0.5,)), "s", width=6),
    timeseries("Stage latency p99 per batch", "Seconds per batch in each stage, 99th percentile.",
               quantiles("sieve_stage_seconds", "stage", (0.99,)), "s", width=6),
    timeseries("Batch size", "Records per batch: median, 99th percentile and mean. Batches near "
               "batching.max_events mean the worker is saturated.",
               quantiles("sieve_batch_size", "", (0.5, 0.99))
               + [q(f"sum(rate(sieve_batch_size_sum{{{T}}}{RATE}))"
                    f" / sum(rate(sieve_batch_size_count{{{T}}}{RATE}))",
                    "mean")], "short", width=6),

    row("Consumer group"),
    timeseries("Consumer lag per partition", "High-water mark (from Fetch responses) minus the "
               "committed offset, per partition, reported by the worker that owns it: the routers' "
               "input topics and the reviewers' needs-review topic.",
               [q(f"sum by (topic, partition) (sieve_consumer_lag{{{T}}})", "{{topic}}/{{partition}}")],
               "short", width=12),
    timeseries("Partitions per worker", "Partitions assigned to each worker; a worker with 0 "
               "is idle (more workers than partitions).",
               [q(f"sum by (job, instance) (sieve_assigned_partitions{{{T}}})", "{{job}} {{instance}}")],
               "short",
               width=6),
    timeseries("Worker CPU (cores)", "CPU seconds per second of each Sieve process.",
               [q(f'rate(process_cpu_seconds_total{{job=~"sieve.*"}}{RATE})', "{{job}} {{instance}}")],
               "short", width=6),

    row("LLM reviewer"),
    timeseries("Reviews /s by final outcome", "Needs-review decisions finished by the reviewer "
               "(human_review: handed off to people).",
               [q(f"sum by (outcome) (rate(sieve_reviews_total{{{T}}}{RATE}))", "{{outcome}}")], "ops",
               stack=True),
    timeseries("LLM calls /s by result", "HTTP requests to the LLM endpoint: ok, timeout, "
               "transport_error, http_429/5xx/4xx, malformed.",
               [q(f"sum by (result) (rate(sieve_review_requests_total{{{T}}}{RATE}))", "{{result}}")], "ops",
               stack=True),
    timeseries("Review latency p50 / p99", "From the start of a review to its verdict or hand-off.",
               quantiles("sieve_review_seconds", "", (0.5, 0.99)), "s"),
    timeseries("Tokens /s", "Tokens spent on reviews, as reported by the endpoint.",
               [q(f"sum by (direction) (rate(sieve_review_tokens_total{{{T}}}{RATE}))", "{{direction}}")],
               "short", stack=True),
    timeseries("Cost per hour", "Estimated from the price-per-1k-token settings (SIEVE_LLM__PRICE_*).",
               [q(f"sum(rate(sieve_review_cost_total{{{T}}}{RATE})) * 3600", "cost / hour")], "short"),
    stat("Cost in range", "Estimated cost of reviews over the dashboard's time range.",
         q(f"sum(increase(sieve_review_cost_total{{{T}}}[$__range]))", instant=True), "short"),
    stat("LLM agrees with router", "Share of LLM verdicts equal to the outcome of the router's top route.",
         q(f'sum(rate(sieve_review_agreement_total{{{T}, agrees="true"}}{RATE})) / '
           f"sum(rate(sieve_review_agreement_total{{{T}}}{RATE}))"), "percentunit"),
    stat("Audit: automatic decisions the LLM upholds", "Of the audited automatic decisions "
         "(review.audit_share) the LLM answered, the share where its verdict is the router's outcome.",
         q(f'sum(rate(sieve_review_audits_total{{{T}, result="agrees"}}{RATE})) / '
           f'sum(rate(sieve_review_audits_total{{{T}, result=~"agrees|differs"}}{RATE}))'), "percentunit"),
    timeseries("Hand-offs to people /s by reason, breaker", "Events the reviewer handed to the "
               "human-review topic, and 1 while its circuit breaker is open.",
               [q(f"sum by (reason) (rate(sieve_review_handoffs_total{{{T}}}{RATE}))", "{{reason}}"),
                q(f"max(sieve_review_breaker_open{{{T}}})", "breaker open")], "short"),

    # The shadow (route_set.shadow, docs/routes.md): shares of the events it decided.
    row("Shadow: a candidate version decided beside the active one"),
    timeseries("Shadow agreement", "Share of the shadowed events (text events of the topology's own "
               "policy encoded by the router, not repeats from the cache or list decisions) whose "
               "shadow outcome and route were the active decision's, per shadow version; dashed, of "
               "the events both versions decided automatically, the share decided equivalently (the "
               "same outcome; the same route unless it is the default outcome), which promotion checks.",
               [q(shadow_share("agreed"), "{{shadow_version}} agreement"),
                q(f"sum by (shadow_version) (rate(sieve_shadow_both_automatic_equivalent_total{{{T}}}{RATE}))"
                  f" / sum by (shadow_version) (rate(sieve_shadow_both_automatic_total{{{T}}}{RATE}))",
                  "{{shadow_version}} equivalent where both automatic")],
               "percentunit", dashed=".* where both automatic$"),
    timeseries("Shadow automatic share", "Share of the shadowed events the shadow version would have "
               "decided automatically (not needs_review); dashed, the active version's share on the "
               "same events.",
               [q(shadow_share("automatic"), "{{shadow_version}} shadow"),
                q(shadow_share("active_automatic"), "{{shadow_version}} active")],
               "percentunit", dashed=".* active$"),
    timeseries("Shadow novel share", "Share of the shadowed events novel by the shadow version's "
               "novelty threshold (the Drift row has the active version's).",
               [q(shadow_share("novel"), "{{shadow_version}} novel")], "percentunit"),

    # The moderators' review console (`sieve console`, one replica per topology).
    row("Review console"),
    stat("Items waiting", "Hand-offs to people not yet decided: unclaimed, and claimed by a moderator.",
         [q(f"sum(sieve_console_items_waiting{{{T}}}) or vector(0)", "waiting"),
          q(f"sum(sieve_console_items_claimed{{{T}}}) or vector(0)", "claimed")], "short"),
    stat("Oldest undecided item", "Age of the oldest undecided item (0 when none); "
         "SieveConsoleQueueStale fires after 10 minutes over an hour.",
         q(f"max(sieve_console_oldest_item_age_seconds{{{T}}})"), "s",
         thresholds=[(None, "green"), (900, "orange"), (3600, "red")]),
    stat("LLM-human agreement", "Share of the human verdicts, on items the LLM had answered, "
         "that agree with the LLM's.",
         q(f'sum(rate(sieve_console_llm_agreement_total{{{T}, agree="true"}}{RATE})) / '
           f"sum(rate(sieve_console_llm_agreement_total{{{T}}}{RATE}))"), "percentunit"),
    stat("Console broker up", "1 while the console is connected to Kafka; SieveConsoleBrokerDown "
         "fires after 5 minutes at 0.",
         q(f"min(sieve_console_broker_up{{{T}}})"), "short",
         thresholds=[(None, "red"), (1, "green")]),
    timeseries("Decisions per hour by moderator", "Verdicts recorded in the console, per moderator.",
               [q(f"sum by (moderator) (rate(sieve_console_decisions_total{{{T}}}{RATE})) * 3600",
                  "{{moderator}}")], "short", stack=True),
]


def layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Place panels left to right, wrapping at 24 columns; number them."""
    x = y = 0
    line_height = 0
    placed = []
    for number, panel in enumerate(panels, start=1):
        panel = dict(panel)
        w, h = panel.pop("_w"), panel.pop("_h")
        if panel["type"] == "row" or x + w > 24:
            y += line_height
            x, line_height = 0, 0
        panel["gridPos"] = {"h": h, "w": w, "x": x, "y": y}
        panel["id"] = number
        x += w
        line_height = max(line_height, h)
        if panel["type"] == "row":
            y += h
            x, line_height = 0, 0
        placed.append(panel)
    return placed


def dashboard() -> dict[str, Any]:
    """The whole dashboard model."""
    return {
        "uid": "sieve-overview",
        "title": "Sieve",
        "description": "Sieve router and reviewer workers: throughput, verdicts, drift, latency, "
                       "consumer lag, LLM reviews, the review console. Metrics from the workers' /metrics "
                       "(sieve.worker.metrics, sieve.review.metrics) and the console's.",
        "tags": ["sieve", "kafka"],
        "timezone": "browser",
        "editable": False,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1},
            {"name": "topology", "label": "Topology", "type": "query", "datasource": DS,
             "query": {"query": "label_values(sieve_events_in_total, topology)", "refId": "topology"},
             "definition": "label_values(sieve_events_in_total, topology)",
             "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "refresh": 2,
             "sort": 1, "hide": 0},
            {"name": "tenant", "label": "Tenant", "type": "query", "datasource": DS,
             "query": {"query": "label_values(sieve_tenant_decisions_total, tenant)", "refId": "tenant"},
             "definition": "label_values(sieve_tenant_decisions_total, tenant)",
             "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "refresh": 2,
             "sort": 1, "hide": 0},
        ]},
        "annotations": {"list": []},
        "panels": layout(PANELS),
    }


def render() -> str:
    """The dashboard as the committed JSON text."""
    return json.dumps(dashboard(), indent=2, sort_keys=True) + "\n"


def main() -> None:
    """Write or check the dashboard file."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="fail if the committed copies differ")
    args = parser.parse_args()
    text = render()
    stale = [path for path in TARGETS if not path.exists() or path.read_text() != text]
    if args.check:
        if stale:
            sys.exit(f"dashboard out of date: {', '.join(map(str, stale))}; "
                     "run python deploy/grafana/make_dashboard.py")
        print("dashboard up to date")
        return
    for path in TARGETS:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
