"""The alert rules in docs/prometheus-alerts.yml: Prometheus' own `promtool` accepts them, their unit
tests (tests/prometheus/alerts_test.yml) pass, and every metric and label they name is one a real
/metrics serves, so a rename in backends_app/metrics.py fails here rather than silently in
someone's Prometheus.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from backends_app import jobs
from backends_app import registry as portal_registry
from backends_app.models import JobKind, JobStatus, Node, UpgradeJob
from tests.conftest import REPO, missing_service
from tests.helpers.api import install

ALERTS = REPO / "docs" / "prometheus-alerts.yml"
UNIT_TESTS = REPO / "tests" / "prometheus" / "alerts_test.yml"
#: Labels Prometheus adds to every scraped series: the scrape job and target.
TARGET_LABELS = {"job", "instance"}

METRIC = re.compile(r"\bportal_[a-z0-9_]*[a-z0-9]")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run Debian's promtool (package `prometheus`); skip, or fail in CI, when it is missing."""
    binary = shutil.which("promtool")
    if binary is None:
        missing_service("promtool is missing (apt-get install prometheus)")
    assert binary is not None
    return subprocess.run([binary, *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def served_labels(client: Any) -> dict[str, set[str]]:
    """Every sample name a GET /metrics serves, with the label names it carries."""
    response = client.get("/metrics")
    assert response.status_code == 200
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def selector_labels(expr: str) -> dict[str, dict[str, str]]:
    """{metric: {label: matcher value}} for every `metric{...}` selector in a PromQL expression."""
    found: dict[str, dict[str, str]] = {}
    for metric, selector in re.findall(r"\b(portal_[a-z0-9_]+)\s*\{([^}]*)\}", expr):
        for label, value in re.findall(r'([a-z_]+)\s*(?:=~|!~|!=|=)\s*"([^"]*)"', selector):
            found.setdefault(metric, {})[label] = value
    return found


# --- promtool -----------------------------------------------------------------------------------


def test_promtool_accepts_the_alert_rules() -> None:
    checked = promtool("check", "rules", str(ALERTS.relative_to(REPO)))

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in checked.stdout


def test_every_alert_fires_and_stays_quiet_as_its_unit_tests_say() -> None:
    """`promtool test rules` compares each alert's labels and rendered annotations at each
    evaluation time; every alert has at least one time where it fires and one where it must not."""
    tested = promtool("test", "rules", str(UNIT_TESTS.relative_to(REPO)))

    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in alert_rules()}
    assert len(alerts) == 10
    assert fires == alerts, alerts ^ fires
    assert quiet == alerts, alerts ^ quiet


# --- the rules against what /metrics serves ------------------------------------------------------


def test_every_alert_rule_is_complete() -> None:
    rules = alert_rules()
    assert len({rule["alert"] for rule in rules}) == len(rules)
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule.get("alert")
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


@pytest.mark.django_db
def test_alert_rules_and_their_unit_tests_use_only_metrics_and_labels_that_are_served(
    client: Any, published: Any
) -> None:
    # Make every family appear: jobs, a check, registry requests, a gallery sync, heartbeats, drift.
    local = Node.local()
    local.heartbeat()
    other = Node.objects.create(name="gpu-1", backends_path="/srv/gpu-1", queue="gpu-1")
    install(published.backend, local, digest="sha256:" + "1" * 64)
    install(published.backend, other, digest="sha256:" + "2" * 64)
    job, _ = UpgradeJob.request_check("test", queue=False)
    assert jobs.run(job.pk).status in (JobStatus.SUCCEEDED, JobStatus.PARTIAL)
    published.gallery.sync(force=True)
    with portal_registry.client_from_settings() as registry_client:
        registry_client.head_digest(published.ref)

    served = served_labels(client)

    assert "portal_jobs_total" in served and "portal_registry_requests_total" in served
    for rule in alert_rules():
        alert, expr = rule["alert"], rule["expr"]
        used = set(METRIC.findall(expr))
        assert used, alert
        for metric in used:
            assert metric in served, f"{alert}: {metric} is not served"
        available = set().union(*(served[metric] for metric in used)) | TARGET_LABELS
        for metric, matchers in selector_labels(expr).items():
            for label in matchers:
                assert label in served[metric], f"{alert}: {metric} has no label {label}"
        dropped: set[str] = set()
        for way, clause in re.findall(r"\b(by|without|on|ignoring)\s*\(([^)]*)\)", expr):
            labels = set(re.findall(r"[a-z_]+", clause))
            assert labels <= available, f"{alert}: {way}({', '.join(sorted(labels - available))})"
            if way == "without":
                dropped |= labels
        # What an annotation shows must be a label the alert's series still carries.
        text = " ".join([*rule["annotations"].values(), *rule["labels"].values()])
        for label in re.findall(r"\$labels\.([a-z_]+)", text):
            assert label in available - dropped, f"{alert}: $labels.{label} is not on its series"

    # The unit tests feed the rules the series a scrape of the portal stores.
    for case in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        for series in case["input_series"]:
            metric, _, selector = series["series"].partition("{")
            labels = set(re.findall(r"([a-z_]+)=", selector))
            assert metric in served, f"{case['name']}: {metric} is not served"
            assert labels - TARGET_LABELS == served[metric], f"{case['name']}: {series['series']}"
            assert labels >= TARGET_LABELS, series["series"]


def test_the_job_kinds_and_outcomes_the_rules_match_exist() -> None:
    """A renamed job kind or status would leave `kind=~"..."` matching nothing, silently."""
    checked = 0
    for rule in alert_rules():
        matchers = selector_labels(rule["expr"]).get("portal_jobs_total", {})
        for label, values in (("kind", JobKind.values), ("outcome", JobStatus.FINISHED)):
            if label in matchers:
                assert set(matchers[label].split("|")) <= set(values), (rule["alert"], label)
                checked += 1
    assert checked >= 2
