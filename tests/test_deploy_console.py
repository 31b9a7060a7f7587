"""The Helm chart's review console: off by default; one replica, recreated, with probes and its secret."""

from __future__ import annotations

import json

from .test_deploy_helm import by_kind, containers, env_of, merge, one, render, render_error, validate_core

CONSOLE = {"console": {"enabled": True, "existingSecret": "console-secrets"}}


def test_the_console_is_off_by_default() -> None:
    objects = render()
    assert [o["metadata"]["name"] for o in objects if "console" in o["metadata"]["name"]] == []
    assert [p["name"] for p in one(objects, "Service", "-metrics")["spec"]["ports"]] == ["metrics"]
    assert [e["port"] for e in one(objects, "ServiceMonitor")["spec"]["endpoints"]] == ["metrics"]
    assert "SIEVE_CONSOLE" not in json.dumps([c for _, c in containers(objects)])


def test_the_console_runs_one_replica_recreated_with_probes_and_its_secret() -> None:
    objects = render(CONSOLE)
    validate_core(objects)
    deployment = one(objects, "Deployment", "-console")
    # One replica, never two at once: the claims live in a compacted topic both would compete for.
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["console", "topologies/moderation.yaml"]
    assert container["ports"] == [{"name": "http", "containerPort": 8088, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    env = env_of(container)
    assert env["SIEVE_CONSOLE__PORT"] == "8088" and env["SIEVE_CONSOLE__HOST"] == "0.0.0.0"
    secret_key = {"secretKeyRef": {"name": "console-secrets", "key": "secret-key"}}
    assert env["SIEVE_CONSOLE__SECRET_KEY"] == secret_key
    assert env["SIEVE_CONSOLE__USERS_FILE"] == "/etc/sieve/console/users.yaml"
    assert env["SIEVE_CONSOLE__SECURE_COOKIES"] == "false"
    assert "SIEVE_CONSOLE__TRUSTED_USER_HEADER" not in env
    assert env["SIEVE_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
    # users.yaml is a file from the Secret, beside the topologies every worker mounts.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert {"/app/topologies", "/app/routes", "/tmp", "/etc/sieve/console"} <= set(mounts)
    assert mounts["/etc/sieve/console"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/etc/sieve/console"]["name"]]["secret"] == {
        "secretName": "console-secrets", "items": [{"key": "users.yaml", "path": "users.yaml"}]}
    reviewer = one(objects, "Deployment", "-reviewer")["spec"]["template"]["spec"]
    assert volumes["topologies"] == next(v for v in reviewer["volumes"] if v["name"] == "topologies")
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert by_kind(objects, "Secret") == [], "the chart references the console's Secret, never renders it"
    # The UI's Service selects the console pod, and only it.
    service = one(objects, "Service", "-console")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8088, "targetPort": "http", "protocol": "TCP"}]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"] == labels
    reviewer_labels = one(objects, "Deployment", "-reviewer")["spec"]["template"]["metadata"]["labels"]
    assert not all(reviewer_labels.get(k) == v for k, v in service["spec"]["selector"].items())
    # Scraped like the workers: the metrics Service and the ServiceMonitor, job sieve-console.
    metrics = one(objects, "Service", "-metrics")
    assert all(labels.get(k) == v for k, v in metrics["spec"]["selector"].items())
    ports = {p["name"]: p for p in metrics["spec"]["ports"]}
    assert ports["console"]["targetPort"] == "http" and ports["console"]["port"] == 8088
    endpoints = {e["port"]: e for e in one(objects, "ServiceMonitor")["spec"]["endpoints"]}
    assert set(endpoints) == {"metrics", "console"} and endpoints["console"]["path"] == "/metrics"
    assert endpoints["console"]["relabelings"] == endpoints["metrics"]["relabelings"]
    # No autoscaler or disruption budget would make sense for a single replica.
    for kind in ("ScaledObject", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
        assert not [o for o in by_kind(objects, kind) if o["metadata"]["name"].endswith("-console")], kind


def test_console_options_reach_its_environment() -> None:
    values = merge(CONSOLE, {"console": {"port": 9000, "secureCookies": True,
                                         "trustedUserHeader": "X-Forwarded-User",
                                         "service": {"type": "NodePort"}}})
    objects = render(values)
    validate_core(objects)
    container = one(objects, "Deployment", "-console")["spec"]["template"]["spec"]["containers"][0]
    env = env_of(container)
    assert env["SIEVE_CONSOLE__PORT"] == "9000" and container["ports"][0]["containerPort"] == 9000
    assert env["SIEVE_CONSOLE__SECURE_COOKIES"] == "true"
    assert env["SIEVE_CONSOLE__TRUSTED_USER_HEADER"] == "X-Forwarded-User"
    assert one(objects, "Service", "-console")["spec"]["type"] == "NodePort"


def test_the_console_needs_its_secret() -> None:
    assert "existingSecret" in render_error({"console": {"enabled": True}})


def test_the_console_command_exists_in_the_cli() -> None:
    from typer.main import get_command

    from sieve.cli import app

    container = one(render(CONSOLE), "Deployment", "-console")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][0] in get_command(app).commands  # type: ignore[attr-defined]


def test_the_console_policy_admits_its_clients_and_reaches_only_dns_kafka_and_images() -> None:
    ingress_nginx = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
    objects = render(merge(CONSOLE, {"networkPolicy": {"enabled": True, "consoleClients": ingress_nginx}}))
    validate_core(objects)
    spec = one(objects, "NetworkPolicy", "-console")["spec"]
    assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "console"
    [ingress] = spec["ingress"]
    assert ingress["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert ingress["from"] == ingress_nginx + [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    ports = {p["port"] for rule in spec["egress"] for p in rule["ports"]}
    assert ports == {53, 9092, 80, 443}, "DNS, Kafka, and the images it shows moderators"
    router = one(objects, "NetworkPolicy", "-router")["spec"]
    images = [r for r in spec["egress"] if any("ipBlock" in peer for peer in r.get("to", []))]
    assert images == [r for r in router["egress"] if any("ipBlock" in peer for peer in r.get("to", []))]
    # Without consoleClients the UI port is open to any source (the scrape included).
    open_spec = one(render(merge(CONSOLE, {"networkPolicy": {"enabled": True}})), "NetworkPolicy", "-console")
    assert "from" not in open_spec["spec"]["ingress"][0]
