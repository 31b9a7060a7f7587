"""The Helm chart, rendered by Helm's own engine (helm-python-sdk: a library build of Helm v4's
Go SDK, no `helm` binary and no cluster), its values checked against values.schema.json, and
the rendered core manifests validated against Kubernetes' OpenAPI schemas (kubernetes-validate).

Not checked here (no cluster, no CRDs installed): the custom resources (KEDA ScaledObject and
TriggerAuthentication, Prometheus Operator ServiceMonitor and PrometheusRule) against their
CRD schemas: their key fields are asserted by hand below. Nothing is installed or scheduled.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from .conftest import REPO

CHART = REPO / "deploy" / "helm" / "sieve"
KUBERNETES = "1.30.0"
CUSTOM_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"}

logging.getLogger("helm_python.native").setLevel(logging.WARNING)


def values_yaml() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def schema() -> dict[str, Any]:
    return json.loads((CHART / "values.schema.json").read_text())


def render(values: dict[str, Any] | None = None, *, release: str = "demo") -> list[dict[str, Any]]:
    """Every object the chart renders with these values (hooks included), parsed."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values or {}, name=release, namespace="sieve")
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for document in yaml.safe_load_all(text):
            if document:
                document["_template"] = path
                objects.append(document)
    return objects


def render_error(values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmError) as info, helm.Chart.load(CHART) as chart:
        chart.render(values, name="demo", namespace="sieve")
    return str(info.value)


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [o for o in by_kind(objects, kind) if o["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{kind} *{name_suffix}: {[o['metadata']['name'] for o in found]}"
    return found[0]


def containers(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for workload in by_kind(objects, "Deployment") + by_kind(objects, "Job"):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            yield workload["metadata"]["name"], container


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def validate_core(objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        clean = {k: v for k, v in obj.items() if k != "_template"}
        kubernetes_validate.validate(clean, KUBERNETES, strict=True)


# -- values and schema ---------------------------------------------------------------------------


def test_values_yaml_satisfies_the_schema_and_the_schema_is_valid() -> None:
    validator = jsonschema.Draft7Validator(schema())
    jsonschema.Draft7Validator.check_schema(schema())
    assert list(validator.iter_errors(values_yaml())) == []
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema({})  # Helm's own check of the defaults


@pytest.mark.parametrize("override, where", [
    ({"autoscaling": {"mode": "both"}}, "mode"),
    ({"router": {"gpu": {"count": 0}}}, "count"),
    ({"router": {"replicas": "two"}}, "replicas"),
    ({"kafka": {"securityProtocol": "TLS"}}, "securityProtocol"),
    ({"kafka": {"saslMechanism": "GSSAPI"}}, "saslMechanism"),
    ({"routr": {}}, "routr"),
    ({"probes": {"liveness": {"periodSeconds": 0}}}, "periodSeconds"),
    ({"topology": "moderation.json"}, "topology"),
    ({"console": {"enabled": True}}, "existingSecret"),
    ({"console": {"replicas": 2}}, "replicas"),
])
def test_the_schema_rejects_bad_values(override: dict[str, Any], where: str) -> None:
    merged = merge(values_yaml(), override)
    errors = list(jsonschema.Draft7Validator(schema()).iter_errors(merged))
    assert errors and any(where in (str(e.path) + e.message) for e in errors), errors
    with pytest.raises(helm.HelmError), helm.Chart.load(CHART) as chart:
        chart.validate_schema(override)


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if nested else value
    return out


def test_helm_lint_finds_no_errors() -> None:
    report = helm.lint(str(CHART), strict=True)
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report["messages"]


# -- rendered manifests --------------------------------------------------------------------------


def test_default_render_is_valid_kubernetes() -> None:
    objects = render()
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(["ServiceAccount", "ConfigMap", "ConfigMap", "ConfigMap", "ConfigMap", "Service",
                            "Deployment", "Deployment", "Job", "PodDisruptionBudget", "PodDisruptionBudget",
                            "ScaledObject", "ScaledObject", "ServiceMonitor", "PrometheusRule"])
    validate_core(objects)


def test_core_validation_can_fail() -> None:
    deployment = copy.deepcopy(one(render(), "Deployment", "-router"))
    deployment.pop("_template")
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "metrics"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


def test_router_and_reviewer_run_the_topology_with_probes_on_the_worker_endpoints() -> None:
    objects = render()
    router = one(objects, "Deployment", "-router")["spec"]["template"]["spec"]["containers"][0]
    reviewer = one(objects, "Deployment", "-reviewer")["spec"]["template"]["spec"]["containers"][0]
    assert router["args"] == ["worker", "topologies/moderation.yaml"]
    assert reviewer["args"] == ["review", "topologies/moderation.yaml"]
    for container in (router, reviewer):
        assert container["ports"] == [{"name": "metrics", "containerPort": 9108, "protocol": "TCP"}]
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert env_of(container)["SIEVE_METRICS_PORT"] == "9108"
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/app/topologies", "/app/routes", "/tmp"} <= mounts
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert env_of(router)["SIEVE_DEVICE"] == "cpu"
    assert env_of(reviewer)["SIEVE_LLM__BASE_URL"] == "http://vllm:8000/v1"


def test_configmaps_carry_the_repository_topologies_and_route_sets() -> None:
    objects = render()
    topologies = one(objects, "ConfigMap", "-topologies")["data"]
    routes = one(objects, "ConfigMap", "-routes")["data"]
    assert topologies == {p.name: p.read_text() for p in (REPO / "topologies").glob("*.yaml")}
    lists = {f"list.{p.name}": p.read_text() for p in (REPO / "routes" / "lists").glob("*.yaml")}
    assert lists and routes == {p.name: p.read_text() for p in (REPO / "routes").glob("*.yaml")} | lists
    # Every pod sees a route set's lists where its `lists` names them (relative to the route file).
    router = one(objects, "Deployment", "-router")["spec"]["template"]["spec"]
    volume = next(v for v in router["volumes"] if v["name"] == "routes")
    paths = {i["key"]: i["path"] for i in volume["configMap"]["items"]}
    assert set(paths) == set(routes)
    for text in routes.values():
        for name in (yaml.safe_load(text) or {}).get("lists") or []:
            assert name in paths.values()
    # The route file a topology names (relative to itself) is where the ConfigMaps put it.
    for text in topologies.values():
        route_file = (Path("/app/topologies") / yaml.safe_load(text)["route_set"]["file"]).resolve()
        assert route_file.parent == Path("/app/routes") and route_file.name in routes


def test_the_init_hook_creates_topics_and_syncs_routes_before_the_workers() -> None:
    objects = render()
    job = one(objects, "Job", "-init")
    hook = job["metadata"]["annotations"]
    assert hook["helm.sh/hook"] == "pre-install,pre-upgrade"
    config = one(objects, "ConfigMap", "-init")
    assert int(config["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(hook["helm.sh/hook-weight"])
    container = job["spec"]["template"]["spec"]["containers"][0]
    steps = [s.split() for s in container["args"][0].split("&&")]
    assert steps == [["sieve", "topics", "create", '"topologies/moderation.yaml"'],
                     ["sieve", "routes", "sync", '"routes/moderation.yaml"']]
    items = {i["path"]: i["key"] for i in job["spec"]["template"]["spec"]["volumes"][0]["configMap"]["items"]}
    assert items["topologies/moderation.yaml"] == "topology.moderation.yaml"
    assert items["routes/moderation.yaml"] == "route.moderation.yaml"
    assert items["routes/lists/profanity.yaml"] == "list.profanity.yaml"
    assert set(items.values()) == set(config["data"])
    # The Job's pods are not picked by the metrics Service.
    service = one(objects, "Service", "-metrics")
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert not all(labels.get(k) == v for k, v in service["spec"]["selector"].items())


def test_worker_commands_exist_in_the_cli() -> None:
    from typer.main import get_command

    from sieve.cli import app

    cli = get_command(app)
    commands = [c["args"] for _, c in containers(render()) if "args" in c and c.get("command") is None]
    assert commands, "the chart runs sieve subcommands"
    for args in commands:
        assert args[0] in cli.commands, args  # type: ignore[attr-defined]


def test_keda_scales_on_the_topology_consumer_group_up_to_the_partition_count() -> None:
    objects = render()
    scaled = one(objects, "ScaledObject", "-router")
    topology = yaml.safe_load((REPO / "topologies" / "moderation.yaml").read_text())
    router = one(objects, "Deployment", "-router")
    assert scaled["spec"]["scaleTargetRef"]["name"] == router["metadata"]["name"]
    assert scaled["spec"]["maxReplicaCount"] == topology["input"]["partitions"] == 4
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    metadata = trigger["metadata"]
    assert metadata["consumerGroup"] == topology["group_id"]
    assert metadata["topic"] == topology["input"]["topics"][0]
    assert metadata["allowIdleConsumers"] == "false"
    assert all(isinstance(v, str) for v in metadata.values()), "KEDA trigger metadata must be strings"
    assert "replicas" not in one(objects, "Deployment", "-router")["spec"], "KEDA owns the replica count"
    assert by_kind(objects, "HorizontalPodAutoscaler") == []


@pytest.mark.parametrize("mode", ["keda", "hpa", "none"])
def test_one_autoscaler_at_most_never_keda_and_hpa_together(mode: str) -> None:
    objects = render({"autoscaling": {"mode": mode}, "router": {"replicas": 3}})
    scalers = [o for o in by_kind(objects, "ScaledObject") + by_kind(objects, "HorizontalPodAutoscaler")
               if o["spec"]["scaleTargetRef"]["name"].endswith("-router")]
    assert len(scalers) == (0 if mode == "none" else 1)
    router = one(objects, "Deployment", "-router")["spec"]
    assert ("replicas" in router) == (mode == "none")
    if mode == "none":
        assert router["replicas"] == 3
    if mode == "hpa":
        hpa = one(objects, "HorizontalPodAutoscaler")
        assert hpa["spec"]["maxReplicas"] == 4 and hpa["spec"]["minReplicas"] == 1
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    validate_core(objects)


def test_the_replica_ceiling_is_the_partition_count() -> None:
    message = render_error({"autoscaling": {"maxReplicas": 8}})
    assert "above the input partition count (4)" in message
    message = render_error({"autoscaling": {"mode": "none"}, "router": {"replicas": 5}})
    assert "above the input partition count (4)" in message
    assert "mode hpa" in render_error({"autoscaling": {"mode": "hpa", "minReplicas": 0}})
    # A topology with 8 partitions (given as a value) lifts the ceiling to 8.
    wide = (REPO / "topologies" / "moderation.yaml").read_text().replace("partitions: 4", "partitions: 8")
    objects = render({"topology": "wide.yaml", "topologies": {"wide.yaml": wide}})
    assert one(objects, "ScaledObject", "-router")["spec"]["maxReplicaCount"] == 8
    args = one(objects, "Deployment", "-router")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == ["worker", "topologies/wide.yaml"]
    assert "wide.yaml" in one(objects, "ConfigMap", "-topologies")["data"]
    assert "neither in files/topologies" in render_error({"topology": "missing.yaml"})


def test_gpu_routers_request_gpus_and_go_where_the_values_say() -> None:
    values = {"router": {"gpu": {"enabled": True, "count": 1},
                         "nodeSelector": {"nvidia.com/gpu.present": "true"},
                         "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                          "effect": "NoSchedule"}]},
              "image": {"repository": "registry.example/sieve", "tag": "1.2.3"}}
    objects = render(values)
    pod = one(objects, "Deployment", "-router")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["memory"] == "3Gi"
    assert container["image"] == "registry.example/sieve:1.2.3-cuda"
    assert env_of(container)["SIEVE_DEVICE"] == "cuda"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    reviewer = one(objects, "Deployment", "-reviewer")["spec"]["template"]["spec"]["containers"][0]
    assert reviewer["image"] == "registry.example/sieve:1.2.3" and "nvidia.com/gpu" not in str(reviewer)
    validate_core(objects)


def test_secrets_are_referenced_never_rendered() -> None:
    values = {"kafka": {"securityProtocol": "SASL_SSL", "saslMechanism": "SCRAM-SHA-512",
                        "sasl": {"existingSecret": "kafka-user"},
                        "tls": {"existingSecret": "kafka-ca"}},
              "qdrant": {"apiKey": {"existingSecret": "qdrant"}},
              "llm": {"apiKey": {"existingSecret": "llm", "key": "token"}}}
    objects = render(values)
    assert by_kind(objects, "Secret") == [], "the chart creates no Secret; it references yours"
    assert any(name.endswith("-reviewer") for name, _ in containers(objects)), "the chart has a reviewer"
    for name, container in containers(objects):
        env = env_of(container)
        password = {"secretKeyRef": {"name": "kafka-user", "key": "password"}}
        assert env["SIEVE_KAFKA__SASL_PASSWORD"] == password
        assert env["SIEVE_KAFKA__SASL_MECHANISM"] == "SCRAM-SHA-512"
        assert env["SIEVE_KAFKA__SSL_CAFILE"] == "/etc/sieve/kafka-tls/ca.crt"
        assert env["SIEVE_QDRANT__API_KEY"] == {"secretKeyRef": {"name": "qdrant", "key": "api-key"}}
        assert "/etc/sieve/kafka-tls" in {m["mountPath"] for m in container["volumeMounts"]}, name
        if name.endswith("-reviewer"):
            assert env["SIEVE_LLM__API_KEY"] == {"secretKeyRef": {"name": "llm", "key": "token"}}
            assert env["SIEVE_LLM__ALLOW_PLAINTEXT_API_KEY"] == "false"  # https, or say so
    trigger = one(objects, "ScaledObject", "-router")["spec"]["triggers"][0]
    assert trigger["metadata"]["sasl"] == "scram_sha512" and trigger["metadata"]["tls"] == "enable"
    auth = one(objects, "TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert {p["parameter"] for p in auth["spec"]["secretTargetRef"]} == {"username", "password", "ca"}
    validate_core(objects)


def test_metrics_service_servicemonitor_rules_and_dashboard() -> None:
    objects = render()
    service = one(objects, "Service", "-metrics")
    # Unready workers (joining the group, or idle) are scraped too.
    assert service["spec"]["publishNotReadyAddresses"] is True
    for deployment in by_kind(objects, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    monitor = one(objects, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert all(service["metadata"]["labels"].get(k) == v for k, v in selector.items())
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    rules = one(objects, "PrometheusRule")["spec"]
    assert rules == yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    dashboard = one(objects, "ConfigMap", "-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"]["sieve.json"] == (REPO / "deploy/grafana/dashboards/sieve.json").read_text()
    off = render({"metrics": {"serviceMonitor": {"enabled": False}, "prometheusRule": {"enabled": False},
                              "grafanaDashboard": {"enabled": False}}, "reviewer": {"enabled": False}})
    assert {o["kind"] for o in off} & {"ServiceMonitor", "PrometheusRule"} == set()
    assert [o["metadata"]["name"] for o in by_kind(off, "Deployment")] == ["demo-sieve-router"]
    assert [o["metadata"]["name"] for o in by_kind(off, "PodDisruptionBudget")] == ["demo-sieve-router"]


def test_pod_disruption_budgets_select_their_workers() -> None:
    objects = render()
    for component in ("router", "reviewer"):
        pdb = one(objects, "PodDisruptionBudget", f"-{component}")
        labels = one(objects, "Deployment", f"-{component}")["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["maxUnavailable"] == 1
        assert all(labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items())


def test_reviewers_scale_on_the_needs_review_lag_of_their_group() -> None:
    objects = render()
    scaled = one(objects, "ScaledObject", "-reviewer")
    topology = yaml.safe_load((REPO / "topologies" / "moderation.yaml").read_text())
    metadata = scaled["spec"]["triggers"][0]["metadata"]
    assert metadata["topic"] == topology["output"]["outcome_topics"]["needs_review"]
    review_group = (topology.get("review") or {}).get("group_id") or f"{topology['group_id']}-review"
    assert metadata["consumerGroup"] == review_group
    assert scaled["spec"]["maxReplicaCount"] == topology["output"]["partitions"]
    assert "replicas" not in one(objects, "Deployment", "-reviewer")["spec"]
    fixed = render({"autoscaling": {"mode": "hpa"}, "reviewer": {"replicas": 2}})
    assert one(fixed, "Deployment", "-reviewer")["spec"]["replicas"] == 2
    assert by_kind(fixed, "ScaledObject") == [], "no KEDA objects when KEDA is off"


def test_every_pod_and_container_runs_locked_down() -> None:
    """The whole security context, not one field: non-root user, read-only root, no escalation,
    no capabilities, the runtime's seccomp profile; for every workload the chart renders."""
    objects = render()
    workloads = by_kind(objects, "Deployment") + by_kind(objects, "Job")
    assert {w["metadata"]["name"].rsplit("-", 1)[-1] for w in workloads} >= {"router", "reviewer"}
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"] == {
            "runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"}}, workload["metadata"]["name"]
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            assert container["securityContext"] == {
                "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]}}, workload["metadata"]["name"]


def test_no_network_policy_unless_asked() -> None:
    assert by_kind(render(), "NetworkPolicy") == []


def test_network_policies_admit_the_scrape_and_reach_only_the_dependencies() -> None:
    kafka = [{"podSelector": {"matchLabels": {"app": "kafka"}}}]
    objects = render({"networkPolicy": {"enabled": True, "kafka": {"peers": kafka, "ports": [9092]},
                                        "probeCidrs": ["10.0.0.0/24"]}})
    validate_core(objects)
    router, reviewer = one(objects, "NetworkPolicy", "-router"), one(objects, "NetworkPolicy", "-reviewer")
    for policy, kind in ((router, "router"), (reviewer, "reviewer")):
        spec = policy["spec"]
        assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == kind
        assert spec["policyTypes"] == ["Ingress", "Egress"]
        [ingress] = spec["ingress"]
        assert ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}]
        assert ingress["from"] == [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
            {"ipBlock": {"cidr": "10.0.0.0/24"}}]
        egress = spec["egress"]
        assert all(rule["ports"] for rule in egress), "every egress rule names its ports"
        by_port = {p["port"]: rule for rule in egress for p in rule["ports"]}
        assert by_port[9092]["to"] == kafka
        assert {p["protocol"] for p in by_port[53]["ports"]} == {"TCP", "UDP"}
        assert 6333 in by_port
    router_ports = {p["port"] for rule in router["spec"]["egress"] for p in rule["ports"]}
    reviewer_ports = {p["port"] for rule in reviewer["spec"]["egress"] for p in rule["ports"]}
    assert 8000 not in router_ports and 8000 in reviewer_ports, "only reviewers call the LLM"
    images = [r for r in router["spec"]["egress"] if any("ipBlock" in peer for peer in r.get("to", []))]
    assert len(images) == 1 and {p["port"] for p in images[0]["ports"]} == {80, 443}
    [v4] = [peer["ipBlock"] for peer in images[0]["to"] if peer["ipBlock"]["cidr"] == "0.0.0.0/0"]
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= set(v4["except"])
    assert not any("ipBlock" in peer for rule in reviewer["spec"]["egress"] for peer in rule.get("to", []))


def test_a_release_without_reviewers_gets_no_reviewer_policy() -> None:
    objects = render({"networkPolicy": {"enabled": True}, "reviewer": {"enabled": False}})
    assert [p["metadata"]["name"] for p in by_kind(objects, "NetworkPolicy")] == ["demo-sieve-router"]

