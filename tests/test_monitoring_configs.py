"""configs/grafana-dashboard.json and configs/prometheus-alerts.yml against the
metrics control/metrics.py really exports.

The exported names come from the metrics endpoint itself (a view with every
kind of figure in it, rendered as Prometheus text), not from a list kept here.
The alert rules go through `promtool check rules` and their unit tests
(configs/prometheus-alerts.test.yml) through `promtool test rules`; the
dashboard's queries go through promtool's PromQL parser as well. Without
promtool (Debian's `prometheus` package; .ci/run installs it as root) those
three skip and say so."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from control.metrics import MetricsEndpoint
from harness import REPO_ROOT
from shared.imaging.shm_usage import ShmUsage
from shared.ipc.task_stats import PHASES, TaskStats
from shared.state.pool_registry import QueueDepths

pytestmark = pytest.mark.timeout(60)

CONFIGS = REPO_ROOT / "configs"
DASHBOARD = CONFIGS / "grafana-dashboard.json"
ALERTS = CONFIGS / "prometheus-alerts.yml"
ALERT_TESTS = CONFIGS / "prometheus-alerts.test.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (apt-get install -y prometheus; .ci/run does it as root)"
)
# Prometheus's own series, which every scrape adds.
SCRAPE_SERIES = {"up"}
METRIC_NAME = re.compile(r"\b(image_result_[a-z_]+)\b")


class _Queue:
    """What the endpoint asks of the queue, with a figure for everything."""

    replicated_claims = True

    def depths(self) -> QueueDepths:
        return QueueDepths(waiting=3, in_flight_by_list={"a": 1}, delayed=2, dead=1)

    def replicas_connected(self) -> int:
        return 1


def exported_series() -> set[str]:
    """Every sample name /metrics serves when each kind of figure has a value."""
    endpoint = MetricsEndpoint(address="127.0.0.1", port=0, registry=_Queue(), queue=_Queue())
    try:
        stats = TaskStats()
        for phase in PHASES:
            stats.observe(status="completed", source="shm", timings={phase: 0.01})
        snapshot = stats.to_bytes()
        read_end, write_end = os.pipe2(os.O_NONBLOCK)
        try:
            os.write(write_end, len(snapshot).to_bytes(4, "big") + snapshot)
            endpoint.read_snapshots(read_end)
        finally:
            os.close(read_end)
            os.close(write_end)
        endpoint.child_restarted("worker")
        endpoint.publish(healthy=True, live_workers=2, shm=ShmUsage(waiting_bytes=10, budget_bytes=100))
        text = generate_latest(endpoint.registry).decode()
    finally:
        endpoint.close()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


@pytest.fixture(scope="module")
def exported() -> set[str]:
    names = exported_series()
    # The figures the brief names, so that a renamed metric fails here first.
    for name in (
        "image_result_tasks_total", "image_result_task_phase_seconds_bucket", "image_result_queue_depth",
        "image_result_in_flight", "image_result_delayed_retries", "image_result_dead_letters",
        "image_result_workers", "image_result_child_restarts_total", "image_result_replicas_connected",
        "image_result_shm_waiting_bytes", "image_result_shm_budget_bytes", "image_result_tasks_expired_total",
    ):
        assert name in names, f"control/metrics.py no longer exports {name}"
    return names


# ---------------------------------------------------------------- Grafana


def dashboard_panels() -> list[dict]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # rows carry their own
    return panels


@pytest.mark.fast
def test_grafana_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= variables
    panels = dashboard_panels()
    assert len(panels) >= 10
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["type"] in ("stat", "timeseries", "row"), panel["title"]
        position = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= position.keys() and position["x"] + position["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            expr = target["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr


def test_every_grafana_query_names_only_metrics_the_pool_exports(exported: set[str]) -> None:
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            named = set(METRIC_NAME.findall(target["expr"]))
            assert named or "up{" in target["expr"], f"{panel['title']}: its query names no metric"
            unknown = named - exported
            assert not unknown, f"{panel['title']}: {sorted(unknown)} is not exported by control/metrics.py"


@needs_promtool
def test_every_grafana_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses rules: each query, with Grafana's variables filled in,
    becomes a recording rule of a throwaway file."""
    rules = []
    for number, panel in enumerate(dashboard_panels()):
        for target in panel.get("targets", []):
            expr = (
                target["expr"].replace("$__rate_interval", "1m").replace("$job", "image-result-worker")
                .replace("$instance", ".*")
            )
            rules.append({"record": f"grafana:panel_{number}:{target['refId']}", "expr": expr})
    path = tmp_path / "grafana-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "grafana", "rules": rules}]}))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- alerts


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


@pytest.mark.fast
def test_alert_rules_name_only_exported_metrics_and_cover_the_issue(exported: set[str]) -> None:
    rules = alert_rules()
    for rule in rules:
        unknown = set(METRIC_NAME.findall(rule["expr"])) - exported
        assert not unknown, f"{rule['alert']}: {sorted(unknown)} is not exported by control/metrics.py"
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    names = {rule["alert"] for rule in rules}
    assert {
        "ImageResultBacklogStalled", "ImageResultDeadLettersRising", "ImageResultChildrenRestarting",
        "ImageResultLedgerLag", "ImageResultPoolNotReady", "ImageResultTargetDown",
    } <= names
    # Every alert has a unit test that makes it fire.
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    quiet = {case["alertname"] for test in tests for case in test["alert_rule_test"] if not case["exp_alerts"]}
    assert fired == names and quiet == names


@needs_promtool
def test_promtool_checks_the_alert_rules() -> None:
    result = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_each_alert_fires_on_a_sick_pool_and_not_on_a_healthy_one() -> None:
    result = subprocess.run(
        [PROMTOOL, "test", "rules", ALERT_TESTS.name], cwd=CONFIGS, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
