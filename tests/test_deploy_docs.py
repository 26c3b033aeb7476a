"""The runbooks: each linked from its alerts, each with symptoms, diagnosis and mitigation, and the
names their commands use are this product's: Schedules, workflow types, tables and columns, API
routes, Deployments and Jobs of the chart."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlmodel import SQLModel

import schema.models  # noqa: F401  (registers every table)
from api.main import create_app
from core.settings import PROJECT_ROOT, Settings
from workflows import contracts

pytestmark = pytest.mark.deploy

RUNBOOKS = PROJECT_ROOT / "docs" / "runbooks"
NAMES = (
    "payment-webhook-failures",
    "billing-anomalies",
    "database-contention",
    "temporal-backlog",
    "key-rotation",
    "restore-from-backup",
)
ALERTS = {
    "BillingRunFailed": "billing-anomalies",
    "BillingRunLate": "billing-anomalies",
    "InvoiceWorkflowsFailing": "billing-anomalies",
    "TenantUsageMissing": "billing-anomalies",
    "ScheduleToStartLatencyHigh": "temporal-backlog",
    "PspWebhookBacklog": "payment-webhook-failures",
    "PaymentFailureRatioHigh": "payment-webhook-failures",
    "DatabasePoolExhausted": "database-contention",
}


def text(name: str) -> str:
    return (RUNBOOKS / f"{name}.md").read_text()


def all_text() -> str:
    return "\n".join(text(n) for n in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_a_runbook_has_symptoms_diagnosis_and_mitigation(name: str):
    headings = re.findall(r"^## (\w+)", text(name), flags=re.M)
    assert headings[:3] == ["Symptoms", "Diagnosis", "Mitigation"], headings
    assert text(name).splitlines()[2].startswith("**Alerts:**")


def test_every_alert_names_one_runbook_and_the_index_links_it():
    index = (RUNBOOKS / "README.md").read_text()
    for alert, runbook in ALERTS.items():
        owners = [n for n in NAMES if f"`{alert}`" in text(n).splitlines()[2]]
        assert owners == [runbook], f"{alert}: {owners}"
        row = next(line for line in index.splitlines() if f"({runbook}.md)" in line)
        assert f"`{alert}`" in row


def test_the_schedules_and_workflow_types_named_exist():
    defaults = Settings()
    schedules = {
        defaults.billing_schedule_id,
        defaults.psp_events_sweep_schedule_id,
        defaults.renewal_reminders_schedule_id,
    }
    named = set(re.findall(r"--schedule-id ([\w-]+)", all_text()))
    assert named and named <= schedules, named - schedules
    types = {v for k, v in vars(contracts).items() if k.endswith("_WORKFLOW") and isinstance(v, str)}
    used = set(re.findall(r"WorkflowType = '(\w+)'", all_text()))
    assert used and used <= types, used - types
    assert set(re.findall(r"--task-queue (\w+)", all_text())) == {defaults.task_queue}


def test_the_tables_and_columns_named_in_sql_exist():
    tables = SQLModel.metadata.tables
    sql = re.findall(r'psql "\$\w+" -c "(.*?)"', all_text(), flags=re.S)
    assert sql
    seen = set()
    for statement in sql:
        for table, alias in re.findall(r"\b(?:FROM|JOIN)\s+(\w+)(?:\s+(\w+))?", statement):
            if table.startswith("pg_") or table == "alembic_version":
                continue
            assert table in tables, f"no table {table}"
            seen.add(table)
            columns = set(tables[table].columns.keys())
            if alias and alias.upper() not in ("WHERE", "GROUP", "ORDER", "JOIN", "ON"):
                for column in re.findall(rf"\b{alias}\.(\w+)", statement):
                    assert column in columns, f"{table}.{column}"
            else:
                where = statement.split(table, 1)[1]
                for column in re.findall(r"\b(\w+) (?:=|>|<|IS) ", where):
                    if column not in ("now", "interval"):
                        assert column in columns, f"{table}.{column}"
    assert {"psp_events", "payment_attempts", "usage_events"} <= seen


def test_the_api_routes_named_exist():
    paths = create_app(Settings(database_url=None)).openapi()["paths"]
    patterns = [re.compile("^" + re.sub(r"\{[^}]+\}", r"[^/]+", p) + "$") for p in paths]
    used = {p.rstrip(".,`'\")") for p in re.findall(r"(/v1/[\w/{}\-.:]+)", all_text())}
    assert used
    for path in used:
        concrete = re.sub(r"\{\w+\}", "x", path.split("?")[0])
        assert any(p.match(concrete) for p in patterns), f"no route {path}"


def test_the_kubernetes_objects_named_are_the_charts(tmp_path: Path):
    from tests.deploy_support import DIGESTS, load_documents, render

    done = render("prod", *DIGESTS, out=tmp_path)
    assert done.returncode == 0, done.stderr
    objects = {(d["kind"], d["metadata"]["name"]) for d in load_documents(tmp_path)}
    kinds = {"deploy": "Deployment", "hpa": "HorizontalPodAutoscaler", "job": "Job", "externalsecret": "ExternalSecret"}
    used = set(re.findall(r"\b(deploy|hpa|job|externalsecret)[/ ](roomly-billing[\w-]*)", all_text()))
    assert used
    for short, name in used:
        assert (kinds[short], name) in objects, f"{short}/{name}"
