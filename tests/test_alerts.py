"""Alert rules, checked offline: ``promtool check rules`` and ``promtool test rules`` (Debian's ``prometheus``
package, installed by ``make test``) on ops/prometheus/, each alert firing and quiet, and its runbook. The
dashboards are tests/test_dashboards.py's; that every metric the rules select is exported is checked there
(offline) and by tests/test_metrics_live.py (scraped from the running processes)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.settings import PROJECT_ROOT
from tests.promql import RULES, metric_names, rules

RULE_TESTS = RULES.parent / "alerts_test.yml"
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


# --- metric names inside PromQL ----------------------------------------------------------------------


def test_metric_names_are_read_out_of_promql():
    expr = (
        'histogram_quantile(0.95, sum by (le, route) (rate(http_request_duration_seconds_bucket{route=~"/v1/.*"}[5m])))'
        ' / on (instance) group_left() (x_total offset 1h) > 2 and absent(worker_up == 1) or time() - {__name__="y"}'
    )
    assert metric_names(expr) == {"http_request_duration_seconds_bucket", "x_total", "worker_up", "y"}
    with pytest.raises(ValueError, match="unclosed left parenthesis"):
        metric_names("sum(rate(x_total[5m])")
    with pytest.raises(ValueError, match="without a metric name"):
        metric_names('rate({job="api"}[5m])')


def test_every_rule_selects_some_metric():
    assert all(metric_names(rule["expr"]) for rule in rules())


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
