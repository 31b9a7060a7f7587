"""The docker-compose stack, the Dockerfile, Prometheus' scrape config and alert rules, and the
Grafana dashboard, checked with the real tools where they exist here (`docker-compose config`,
`promtool`; `make deploy-tools` installs both from Debian). No Docker engine runs here, so
the images are not built and the stack is not started: what can be checked statically is.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest
import yaml

from .conftest import REPO

COMPOSE = REPO / "docker-compose.yml"
PROMETHEUS = REPO / "deploy" / "prometheus"
GRAFANA = REPO / "deploy" / "grafana"
SIEVE_SERVICES = ("init", "router", "reviewer", "router-gpu", "console")


def run(*command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def tool(name: str) -> str:
    from shutil import which

    path = which(name)
    assert path, f"{name} is missing: `make deploy-tools` installs it (Debian: docker-compose, prometheus)"
    return path


@cache
def compose_config() -> dict:
    out = run(tool("docker-compose"), "-f", str(COMPOSE), "--profile", "gpu", "config").stdout
    return yaml.safe_load(out)


@cache
def known_metrics() -> set[str]:
    """Every sample name the Sieve processes can expose (their prometheus_client registry)."""
    import prometheus_client

    import sieve.console.metrics  # noqa: F401  (the review console's sieve_console_* metrics)
    import sieve.review.metrics  # noqa: F401  (the LLM reviewer's sieve_review_* metrics)
    import sieve.worker.health  # noqa: F401
    import sieve.worker.metrics  # noqa: F401

    names: set[str] = set()
    for family in prometheus_client.REGISTRY.collect():
        suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                    "gauge": [""], "info": ["_info"], "summary": ["_sum", "_count"]}.get(family.type, [""])
        names.update(family.name + suffix for suffix in suffixes)
        names.update(sample.name for sample in family.samples)
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (sieve_*, process_*)."""
    return set(re.findall(r"\b((?:sieve|process)_[a-z0-9_]+)\b", expr))


# -- docker-compose ------------------------------------------------------------------------------


def test_compose_file_is_valid_for_docker_compose() -> None:
    services = compose_config()["services"]
    assert set(services) == {"kafka", "qdrant", "init", "router", "reviewer", "router-gpu", "console",
                             "prometheus", "grafana"}
    kafka = services["kafka"]
    assert re.fullmatch(r"apache/kafka:3\.9\.\d+", kafka["image"]), kafka["image"]
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller", "KRaft, no ZooKeeper"
    assert "KAFKA_ZOOKEEPER_CONNECT" not in kafka["environment"]
    for name in ("qdrant", "prometheus", "grafana"):
        image = services[name]["image"]
        assert re.search(r":v?\d+\.\d+\.\d+$", image), f"{name} image not pinned: {image}"


def test_compose_routers_scale_and_the_gpu_profile_reserves_a_gpu() -> None:
    services = compose_config()["services"]
    for name in ("router", "router-gpu", "reviewer"):
        # `--scale router=N` needs no fixed name and no host port.
        assert "container_name" not in services[name] and "ports" not in services[name], name
    assert services["router"]["command"] == ["worker", "topologies/moderation.yaml"]
    assert services["reviewer"]["command"] == ["review", "topologies/moderation.yaml"]
    gpu = services["router-gpu"]
    assert gpu["profiles"] == ["gpu"] and "profiles" not in services["router"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert gpu["environment"]["SIEVE_DEVICE"] == "cuda" and gpu["build"]["args"]["VARIANT"] == "cuda"
    assert services["router"]["build"]["args"]["VARIANT"] == "cpu"
    for name in SIEVE_SERVICES:
        env = services[name]["environment"]
        assert env["SIEVE_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092", name
        assert env["SIEVE_QDRANT__URL"] == "http://qdrant:6333", name
    for name in ("router", "reviewer", "router-gpu", "console"):
        assert services[name]["depends_on"] == {"init": {"condition": "service_completed_successfully"}}


def test_compose_init_creates_topics_then_syncs_routes_of_shipped_files() -> None:
    init = compose_config()["services"]["init"]
    assert init["entrypoint"] == ["sh", "-c"]
    (script,) = init["command"]
    steps = [step.strip().split() for step in script.split("&&")]
    assert steps == [["sieve", "topics", "create", "topologies/moderation.yaml"],
                     ["sieve", "routes", "sync", "routes/moderation.yaml"]]
    for step in steps:
        assert (REPO / step[-1]).is_file(), step
    assert init["depends_on"] == {"kafka": {"condition": "service_healthy"},
                                  "qdrant": {"condition": "service_healthy"}}


def test_compose_commands_exist_in_the_sieve_cli() -> None:
    from typer.main import get_command

    from sieve.cli import app

    cli = get_command(app)
    services = compose_config()["services"]
    commands = [services[name]["command"][0] for name in ("router", "reviewer", "router-gpu")]
    commands += ["topics", "routes"]
    for command in commands:
        assert command in cli.commands, f"`sieve {command}` is not a command"  # type: ignore[attr-defined]


def test_compose_interpolates_the_reviewer_endpoint_from_the_environment() -> None:
    out = run(tool("docker-compose"), "-f", str(COMPOSE), "config",
              env={"SIEVE_LLM__BASE_URL": "http://vllm.internal:8000/v1",
                   "SIEVE_LLM__API_KEY": "k-123"}).stdout
    env = yaml.safe_load(out)["services"]["reviewer"]["environment"]
    assert env["SIEVE_LLM__BASE_URL"] == "http://vllm.internal:8000/v1"
    assert env["SIEVE_LLM__API_KEY"] == "k-123"


def test_compose_mounts_prometheus_and_grafana_provisioning_from_the_repository() -> None:
    services = compose_config()["services"]
    def binds(service: str) -> dict[str, str]:
        return {v.split(":")[0]: v.split(":")[1] for v in services[service]["volumes"] if v.startswith("/")}

    assert binds("prometheus") == {str(PROMETHEUS): "/etc/prometheus"}
    grafana = binds("grafana")
    assert grafana == {str(GRAFANA / "provisioning"): "/etc/grafana/provisioning",
                       str(GRAFANA / "dashboards"): "/var/lib/grafana/dashboards"}
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/sieve.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (GRAFANA / "dashboards" / Path(home).name).is_file()
    datasource = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    # Prometheus finds every router replica through Docker's DNS on the metrics port.
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["sieve-router"]["dns_sd_configs"][0]["names"] == ["router", "router-gpu"]
    assert jobs["sieve-router"]["dns_sd_configs"][0]["port"] == 9108
    assert jobs["sieve-reviewer"]["dns_sd_configs"][0]["names"] == ["reviewer"]


def test_compose_console_serves_one_replica_with_its_secret_and_users_file() -> None:
    services = compose_config()["services"]
    console = services["console"]
    assert console["command"] == ["console", "topologies/moderation.yaml"]
    reviewer = services["reviewer"]
    assert console["image"] == reviewer["image"] and console["build"] == reviewer["build"]
    assert "deploy" not in console and "scale" not in console, "one replica only"
    [port] = console["ports"]
    assert port.removesuffix("/tcp").endswith(":8088:8088"), port
    env = console["environment"]
    assert env["SIEVE_CONSOLE__PORT"] == "8088"
    assert "change-me" in env["SIEVE_CONSOLE__SECRET_KEY"], "the dev key says it is a placeholder"
    # The users file lies in the directory bound from the repository (its .gitignore keeps it out of git).
    [bind] = [v for v in console["volumes"] if v.startswith("/")]
    source, target = bind.split(":")[:2]
    assert Path(source) == REPO / "deploy" / "console"
    assert Path(env["SIEVE_CONSOLE__USERS_FILE"]).parent == Path(target)
    assert "users.yaml" in (REPO / "deploy/console/.gitignore").read_text().split()
    # The secret key comes from the environment when set.
    out = run(tool("docker-compose"), "-f", str(COMPOSE), "config",
              env={"SIEVE_CONSOLE__SECRET_KEY": "s3cret"}).stdout
    assert yaml.safe_load(out)["services"]["console"]["environment"]["SIEVE_CONSOLE__SECRET_KEY"] == "s3cret"
    # Prometheus scrapes it on its HTTP port as job sieve-console (the alerts and dashboard's job).
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["sieve-console"]["dns_sd_configs"][0]["names"] == ["console"]
    assert jobs["sieve-console"]["dns_sd_configs"][0]["port"] == 8088


def test_compose_console_command_exists_in_the_sieve_cli() -> None:
    from typer.main import get_command

    from sieve.cli import app

    command = compose_config()["services"]["console"]["command"][0]
    assert command in get_command(app).commands  # type: ignore[attr-defined]


# -- Dockerfile (static: no Docker engine here) --------------------------------------------------


def test_dockerfile_variants_pins_and_context() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    stages = re.findall(r"^FROM \S+ AS (\S+)$", text, re.M)
    assert {"torch-cpu", "torch-cuda"} <= set(stages) and "final" in stages
    assert re.search(r"^FROM torch-\$\{VARIANT\} AS final$", text, re.M)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = {dep.split("==")[0]: dep for dep in pyproject["project"]["dependencies"] if "==" in dep}
    for package in ("torch", "torchvision"):
        assert text.count(pins[package]) == 2, f"Dockerfile's {package} pin differs from pyproject's"
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for source in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", text, re.M):
        for path in source.split():
            assert (REPO / path).exists(), f"COPY {path}: not in the repository"
            assert path not in ignored, f"COPY {path}: excluded by .dockerignore"
    assert re.search(r"^USER sieve$", text, re.M), "the worker runs as a non-root user"
    assert '"/healthz"' in text or "/healthz" in text
    assert 'ENTRYPOINT ["sieve"]' in text
    assert "EXPOSE 9108" in text


# -- Prometheus ----------------------------------------------------------------------------------


def test_promtool_checks_the_scrape_config_and_the_rules() -> None:
    promtool = tool("promtool")
    out = run(promtool, "check", "config", str(PROMETHEUS / "prometheus.yml")).stdout
    assert "SUCCESS" in out
    out = run(promtool, "check", "rules", str(PROMETHEUS / "alerts.yml")).stdout
    assert "SUCCESS: 13 rules found" in out


def test_promtool_unit_tests_fire_every_alert() -> None:
    out = run(tool("promtool"), "test", "rules", str(PROMETHEUS / "tests" / "alerts.test.yml"))
    assert "SUCCESS" in out.stdout + out.stderr
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule}
    tests = yaml.safe_load((PROMETHEUS / "tests" / "alerts.test.yml").read_text())
    fired = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"]
             if case.get("exp_alerts")}
    assert alerts == fired, f"alerts without a firing test: {alerts - fired}"
    assert {"SieveConsumerLagGrowing", "SieveDeadLetterRate", "SieveReviewerFailures",
            "SieveNovelShareAboveBaseline", "SieveConsoleQueueStale", "SieveConsoleBrokerDown"} <= alerts
    # the drift alert is also tested quiet: at its baseline, on little traffic, with no baseline
    quiet = [test for test in tests["tests"] for case in test["alert_rule_test"]
             if case["alertname"] == "SieveNovelShareAboveBaseline" and case["exp_alerts"] == []]
    series = " ".join(s["series"] for test in quiet for s in test["input_series"])
    for route_set in ("steady", "rare", "noisy", "sparse", "unfitted"):
        assert f'route_set="{route_set}"' in series


def test_the_drift_alert_compares_the_novel_share_with_its_fitted_baseline() -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    (rule,) = [r for group in rules["groups"] for r in group["rules"]
               if r.get("alert") == "SieveNovelShareAboveBaseline"]
    assert metric_names(rule["expr"]) == {"sieve_novel_events_total", "sieve_novelty_measured_events_total",
                                          "sieve_novel_baseline"}
    assert "[30m]" in rule["expr"] and rule["for"] == "30m"


def test_the_console_alerts_watch_its_queue_age_and_its_broker() -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    by_name = {r["alert"]: r for group in rules["groups"] for r in group["rules"] if "alert" in r}
    stale, broker = by_name["SieveConsoleQueueStale"], by_name["SieveConsoleBrokerDown"]
    assert metric_names(stale["expr"]) == {"sieve_console_oldest_item_age_seconds"}
    assert stale["expr"].endswith("> 3600") and stale["for"] == "10m"
    assert stale["labels"]["severity"] == "warning"
    assert metric_names(broker["expr"]) == {"sieve_console_broker_up"}
    assert broker["expr"].endswith("== 0") and broker["for"] == "5m"


def test_alert_rules_select_only_metrics_the_workers_expose() -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            unknown = metric_names(rule["expr"]) - known_metrics()
            assert not unknown, f"{rule.get('alert')}: unknown metrics {unknown}"


# -- Grafana -------------------------------------------------------------------------------------


def dashboard() -> dict:
    return json.loads((GRAFANA / "dashboards" / "sieve.json").read_text())


def panel_exprs() -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in dashboard()["panels"]
            for target in panel.get("targets", [])]


def test_dashboard_file_is_what_its_generator_writes() -> None:
    run(sys.executable, str(GRAFANA / "make_dashboard.py"), "--check")


def test_dashboard_has_the_panels_operators_need() -> None:
    titles = [panel["title"] for panel in dashboard()["panels"]]
    wanted = ["Events in /s by topic", "Decisions out /s by verdict", "Decisions out /s by route",
              "Review-tail share", "Dead letters /s by stage and reason", "Batch size",
              "Stage latency p50 per batch", "Stage latency p99 per batch",
              "End-to-end latency p50 / p95 / p99", "Consumer lag per partition",
              "LLM calls /s by result", "Tokens /s", "Cost per hour", "Novel share (drift)",
              "List hits /s by list and entry", "Repeat cache hit ratio", "LLM calls saved /s",
              "Worker faults", "Items waiting", "Oldest undecided item", "LLM-human agreement",
              "Console broker up", "Decisions per hour by moderator"]
    assert [t for t in wanted if t not in titles] == []
    ids = [panel["id"] for panel in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells, f"panel {panel['title']!r} overlaps another"
        cells |= mine
    lag = next(expr for title, expr in panel_exprs() if title == "Consumer lag per partition")
    assert "sieve_consumer_lag" in lag and "partition" in lag
    drift = {expr for title, expr in panel_exprs() if title == "Novel share (drift)"}
    assert {"sieve_novel_events_total", "sieve_novel_baseline"} <= set().union(*map(metric_names, drift))


def test_dashboard_queries_name_known_metrics_and_parse_as_promql(tmp_path: Path) -> None:
    exprs = panel_exprs()
    assert len(exprs) > 25
    for title, expr in exprs:
        unknown = metric_names(expr) - known_metrics()
        assert not unknown, f"panel {title!r}: unknown metrics {unknown}"
    # Grafana's variables replaced by what Grafana sends, each query becomes a recording rule,
    # and promtool parses them all.
    concrete = [expr.replace("$topology", ".*").replace("$__rate_interval", "1m").replace("$__range", "1h")
                for _, expr in exprs]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(concrete)]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    out = run(tool("promtool"), "check", "rules", str(path)).stdout
    assert f"SUCCESS: {len(concrete)} rules found" in out


@pytest.mark.parametrize("broken", ["sum(rate(sieve_events_in_total[1m])", "sieve_no_such_metric"])
def test_the_dashboard_checks_can_fail(tmp_path: Path, broken: str) -> None:
    # The two checks above, on a bad query: promtool rejects the syntax; the name check the metric.
    if "(" in broken:
        path = tmp_path / "bad.yml"
        rule = {"record": "x:y", "expr": broken}
        path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [rule]}]}))
        result = subprocess.run([tool("promtool"), "check", "rules", str(path)],
                                capture_output=True, text=True)
        assert result.returncode != 0
    else:
        assert metric_names(broken) - known_metrics() == {broken}
