"""Alert rules and dashboards, checked offline: ``promtool check rules`` and ``promtool test rules`` (Debian's
``prometheus`` package, installed by ``make test``) on ops/prometheus/, and the structure Grafana requires of
each dashboard under ops/grafana/. That every metric they name is exported is tests/test_metrics_live.py's."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.settings import PROJECT_ROOT

OPS = PROJECT_ROOT / "ops"
RULES = OPS / "prometheus" / "alerts.yml"
RULE_TESTS = OPS / "prometheus" / "alerts_test.yml"
DASHBOARDS = sorted((OPS / "grafana").glob("*.json"))
RUNBOOKS = PROJECT_ROOT / "docs" / "runbooks"
# The runbooks' agreed names (written with the deployment work): every alert links one of them.
RUNBOOK_NAMES = {
    "payment-webhook-failures.md",
    "billing-anomalies.md",
    "database-contention.md",
    "temporal-backlog.md",
    "key-rotation.md",
    "restore-from-backup.md",
}
REQUIRED_ALERTS = {
    "BillingRunFailed",
    "BillingRunLate",
    "InvoiceWorkflowsFailing",
    "ScheduleToStartLatencyHigh",
    "PspWebhookBacklog",
    "PaymentFailureRatioHigh",
    "DatabasePoolExhausted",
    "TenantUsageMissing",
}


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is missing: `make prometheus` installs Debian's prometheus package"
    return found


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


# --- metric names inside PromQL ----------------------------------------------------------------------

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions, keywords, label
    names (inside ``{}`` or ``by (...)``), durations or numbers."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # strings (label values, regexes)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name in _KEYWORDS or re.fullmatch(r"\d+[smhdwy]", name):
            continue
        names.add(name)
    return names


def test_metric_names_are_read_out_of_promql():
    expr = (
        'histogram_quantile(0.95, sum by (le, route) (rate(http_request_duration_seconds_bucket{route=~"/v1/.*"}[5m])))'
        " / on (instance) group_left() (x_total offset 1h) > 2 and absent(worker_up == 1) or time() - y"
    )
    assert metric_names(expr) == {"http_request_duration_seconds_bucket", "x_total", "worker_up", "y"}


def dashboard_expressions() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in DASHBOARDS:
        panels = json.loads(path.read_text())["panels"]
        found[path.name] = [t["expr"] for p in panels for t in p.get("targets", [])]
    return found


def promql_names() -> dict[str, set[str]]:
    """Every metric name each rule and dashboard panel selects, by where it is."""
    names = {f"alert {rule['alert']}": metric_names(rule["expr"]) for rule in rules()}
    for dashboard, expressions in dashboard_expressions().items():
        names[f"dashboard {dashboard}"] = set().union(*(metric_names(e) for e in expressions))
    return names


# --- alert rules ---------------------------------------------------------------------------------------


def test_the_rules_pass_promtool_check():
    checked = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout


def test_every_alert_passes_its_unit_tests():
    tested = subprocess.run(
        [promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, check=False, cwd=RULES.parent
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_has_a_case_where_it_fires_and_one_where_it_does_not():
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fires = {check["alertname"] for case in cases for check in case["alert_rule_test"] if check["exp_alerts"]}
    quiet = {check["alertname"] for case in cases for check in case["alert_rule_test"] if not check["exp_alerts"]}
    names = {rule["alert"] for rule in rules()}
    assert REQUIRED_ALERTS <= names
    assert fires == names and quiet == names


def test_a_broken_rule_fails_its_unit_tests(tmp_path: Path):
    """The unit tests can fail: the same tests against rules where BillingRunFailed never fires."""
    broken = RULES.read_text().replace(
        'sum(increase(billing_runs_total{outcome="with_failures"}[1h])) > 0\n', "vector(0) > 1\n", 1
    )
    broken = re.sub(r'          or sum\(billing_runs_total\{outcome="with_failures"\} unless .*\n', "", broken)
    assert broken != RULES.read_text()
    (tmp_path / "alerts.yml").write_text(broken)
    shutil.copy(RULE_TESTS, tmp_path / "alerts_test.yml")
    tested = subprocess.run(
        [promtool(), "test", "rules", "alerts_test.yml"], capture_output=True, text=True, check=False, cwd=tmp_path
    )
    assert tested.returncode != 0
    assert "alertname: BillingRunFailed" in tested.stdout + tested.stderr


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r["alert"])
def test_every_alert_says_how_bad_what_and_where_its_runbook_is(rule: dict[str, Any]):
    assert rule["labels"]["severity"] in {"critical", "warning"}
    annotations = rule["annotations"]
    assert annotations["summary"].strip() and annotations["description"].strip()
    link = annotations["runbook_url"]
    assert link.startswith("docs/runbooks/") and link.removeprefix("docs/runbooks/") in RUNBOOK_NAMES
    if RUNBOOKS.is_dir():  # the runbooks land with the deployment work; once they do, each link resolves
        assert (PROJECT_ROOT / link).is_file(), f"{rule['alert']} links {link}, which does not exist"


# --- dashboards ------------------------------------------------------------------------------------------


def test_there_are_the_three_dashboards():
    assert [p.name for p in DASHBOARDS] == ["billing-overview.json", "ingestion.json", "temporal-worker.json"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_each_dashboard_has_the_structure_grafana_requires(path: Path):
    """Grafana's dashboard model (no JSON schema of it ships in a package): a uid and a title, an integer
    schemaVersion, a time range, and panels each with a unique id, a type, a gridPos inside the 24-column
    grid and, but for rows, targets with a refId and an expression against the Prometheus data source
    chosen by the dashboard's ``datasource`` variable."""
    dashboard = json.loads(path.read_text())
    assert isinstance(dashboard["uid"], str) and re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", dashboard["uid"])
    assert isinstance(dashboard["title"], str) and dashboard["title"].strip()
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert set(dashboard["time"]) == {"from", "to"}
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    assert panels and len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert isinstance(panel["type"], str) and isinstance(panel["title"], str)
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid) and all(isinstance(grid[k], int) and grid[k] >= 0 for k in grid)
        assert grid["w"] >= 1 and grid["x"] + grid["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        targets = panel["targets"]
        assert targets and len({t["refId"] for t in targets}) == len(targets)
        assert all(t["expr"].strip() and t["datasource"] == panel["datasource"] for t in targets)


def test_the_dashboards_uids_differ():
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS]
    assert len(set(uids)) == len(uids)


def test_every_dashboard_and_rule_selects_some_metric():
    assert all(names for names in promql_names().values())
