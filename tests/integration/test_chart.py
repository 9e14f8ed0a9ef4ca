"""The Helm chart, linted and rendered by a real Helm (v3.22.0, built by tools/setup.sh from
the Go module proxy): the objects it makes for the default values and a few value sets, their
selectors, probes and secrets, and the PrometheusRule made from prometheus/*.yml."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "eventaudit"
HELM = ROOT / ".tools" / "bin" / "helm"
FULL = [
    "--set", "serviceMonitor.enabled=true",
    "--set", "podMonitoring.enabled=true",
    "--set", "prometheusRule.enabled=true",
    "--set", "serviceAccount.gcpServiceAccount=audit@my-project.iam.gserviceaccount.com",
    "--set", "subscribers[0].subscription=create-user-audit",
    "--set", "subscribers[1].subscription=orders_dlq.audit",
    "--set", "subscribers[1].deadLetters=true",
    "--set", "push.subscriptions={create-user-push,orders-push}",
    "--set", "push.oidc.audience=https://push.example.com/push?s={subscription}",
    "--set", "push.oidc.serviceAccount=pusher@my-project.iam.gserviceaccount.com",
]  # fmt: skip


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    if not HELM.exists():
        pytest.fail(f"helm missing at {HELM}: run `make setup` (tools/setup.sh builds it)")
    return subprocess.run(
        [str(HELM), *args], capture_output=True, text=True, timeout=120, check=False
    )


def _render(*values: str) -> list[dict[str, Any]]:
    done = _helm("template", "audit", str(CHART), "--namespace", "ops", *values)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def _kinds(objects: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((o["kind"], o["metadata"]["name"]) for o in objects)


@pytest.mark.parametrize("name", ["alerts.yml", "rules.yml", "eventaudit.json"])
def test_the_charts_copies_are_the_sources(name: str) -> None:
    source = ROOT / ("dashboards" if name.endswith(".json") else "prometheus") / name
    copy = CHART / "files" / name
    assert copy.read_text() == source.read_text(), f"stale: run `make dashboards` ({copy})"


@pytest.mark.parametrize("values", [[], FULL], ids=["defaults", "everything"])
def test_helm_lint_strict_passes(values: list[str]) -> None:
    done = _helm("lint", "--strict", str(CHART), *values)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in done.stdout


def test_the_default_values_render_the_exporter_and_the_publisher() -> None:
    objects = _render()
    assert _kinds(objects) == [
        ("ConfigMap", "audit-eventaudit-dashboard"),
        ("Deployment", "audit-eventaudit-exporter"),
        ("Deployment", "audit-eventaudit-publisher"),
        ("PodDisruptionBudget", "audit-eventaudit-exporter"),
        ("Service", "audit-eventaudit-exporter"),
        ("Service", "audit-eventaudit-publisher"),
        ("ServiceAccount", "audit-eventaudit"),
    ]
    _check_wiring(objects)
    exporter = next(
        o for o in objects if o["kind"] == "Deployment" and "exporter" in o["metadata"]["name"]
    )
    # Two replicas dividing the topics by leases; a rolling update never drops below them.
    assert exporter["spec"]["replicas"] == 2
    assert exporter["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    [container] = exporter["spec"]["template"]["spec"]["containers"]
    assert {
        "name": "EVENTAUDIT_REPLICA_ID",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
    } in container["env"]


def test_every_option_renders_monitoring_rules_and_one_subscriber_per_subscription() -> None:
    objects = _render(*FULL)
    kinds = _kinds(objects)
    assert ("ServiceMonitor", "audit-eventaudit") in kinds
    assert [n for k, n in kinds if k == "PodMonitoring"] == [
        "eventaudit-exporter", "eventaudit-publisher", "eventaudit-push",
        "eventaudit-subscriber"]  # fmt: skip
    subscribers = [
        o for o in objects if o["kind"] == "Deployment" and "-sub-" in o["metadata"]["name"]
    ]
    assert [s["metadata"]["name"] for s in subscribers] == [
        "audit-eventaudit-sub-create-user-audit",
        "audit-eventaudit-sub-orders-dlq-audit",
    ]
    args = [s["spec"]["template"]["spec"]["containers"][0]["args"] for s in subscribers]
    assert args == [["--subscription", "create-user-audit"],
                    ["--subscription", "orders_dlq.audit", "--dead-letters"]]  # fmt: skip
    _check_wiring(objects)
    account = next(o for o in objects if o["kind"] == "ServiceAccount")
    assert account["metadata"]["annotations"] == {
        "iam.gke.io/gcp-service-account": "audit@my-project.iam.gserviceaccount.com"
    }
    rule = next(o for o in objects if o["kind"] == "PrometheusRule")
    sources = [
        yaml.safe_load((ROOT / "prometheus" / n).read_text()) for n in ("rules.yml", "alerts.yml")
    ]
    assert rule["spec"]["groups"] == sources[0]["groups"] + sources[1]["groups"]
    monitor = next(o for o in objects if o["kind"] == "ServiceMonitor")
    assert monitor["spec"]["jobLabel"] == "eventaudit.io/job"
    jobs = {
        o["metadata"]["labels"].get("eventaudit.io/job") for o in objects if o["kind"] == "Service"
    }
    assert jobs == {
        "eventaudit-exporter", "eventaudit-publisher", "eventaudit-subscriber", "eventaudit-push"
    }  # fmt: skip
    push = next(
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-push")
    )
    assert push["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "--subscriptions", "create-user-push,orders-push",
        "--oidc-audience", "https://push.example.com/push?s={subscription}",
        "--oidc-service-account", "pusher@my-project.iam.gserviceaccount.com",
    ]  # fmt: skip


def _check_wiring(objects: list[dict[str, Any]]) -> None:
    """Selectors match their pods' labels; every Service selects one Deployment's pods; every
    container is probed on /healthz and reads the MongoDB URI from the Secret."""
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    for d in deployments:
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
        [container] = d["spec"]["template"]["spec"]["containers"]
        assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        env = {e["name"]: e for e in container["env"]}
        assert env["EVENTAUDIT_MONGO_URI"]["valueFrom"] == {
            "secretKeyRef": {"name": "eventaudit-mongo", "key": "uri"}}  # fmt: skip
        port = container["ports"][0]["containerPort"]
        assert env["EVENTAUDIT_LISTEN_ADDRESS"]["value"] == f"0.0.0.0:{port}"
        assert d["spec"]["template"]["spec"]["serviceAccountName"] == "audit-eventaudit"
    for service in (o for o in objects if o["kind"] == "Service"):
        wanted = service["spec"]["selector"].items()
        selected = [
            d for d in deployments if wanted <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, service["metadata"]["name"]
    for budget in (o for o in objects if o["kind"] == "PodDisruptionBudget"):
        assert any(
            budget["spec"]["selector"]["matchLabels"].items()
            <= d["spec"]["template"]["metadata"]["labels"].items()
            for d in deployments
        )


@pytest.mark.parametrize(
    ("values", "error"),
    [
        (["--set", "exporter.replicas=6"], "maximum"),
        (["--set", "exporter.replicas=0"], "minimum"),
        (["--set", "project=Not_A_Project"], "project"),
        (["--set", "subscribers[0].subscription=ab"], "subscription"),
        (["--set", "subscribers[0].subscription=ok-sub", "--set", "subscribers[0].topic=x"],
         "topic"),
        (["--set", "mongo.existingSecret="], "existingSecret"),
        # The exporter refuses these databases at start (--database): the chart says so first.
        (["--set", "mongo.database=audit.prod"], "database"),
        (["--set", "mongo.database=" + "d" * 64], "database"),
        (["--set", "mongo.database=aüdit"], "database"),
        (["--set", "mongo.database="], "database"),
        (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
        (["--set", "push.subscriptions={ab}"], "/push/subscriptions/0"),
    ],
)  # fmt: skip
def test_bad_values_fail_with_the_reason(values: list[str], error: str) -> None:
    done = _helm("template", "audit", str(CHART), *values)
    assert done.returncode != 0
    assert "values don't meet the specifications of the schema" in done.stderr
    assert error in done.stderr


@pytest.mark.parametrize(
    ("values", "error"),
    [
        (["--set", "push.subscriptions={a-push,b-push}",
          "--set", "push.oidc.audience=https://x.example.com/push",
          "--set", "push.oidc.serviceAccount=p@x.iam.gserviceaccount.com"], "{subscription}"),
        (["--set", "push.subscriptions={a-push}",
          "--set", "push.oidc.audience=https://x.example.com/push"], "go together"),
        (["--set", "push.subscriptions={a-push}",
          "--set", "push.oidc.serviceAccount=p@x.iam.gserviceaccount.com"], "go together"),
    ],
)  # fmt: skip
def test_push_values_that_would_weaken_its_authentication_fail(
    values: list[str], error: str
) -> None:
    done = _helm("template", "audit", str(CHART), *values)
    assert done.returncode != 0
    assert error in done.stderr
