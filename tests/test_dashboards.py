"""The Grafana dashboards (ops/grafana/*.json), checked offline against real things:

- **Grafana's dashboard schema.** Grafana publishes its dashboard model as the TypeScript types of
  ``@grafana/schema`` (generated from its CUE kinds); no JSON Schema of it ships in a package. The
  ``Dashboard`` type is turned into a JSON Schema by ``ts-json-schema-generator`` (both pinned in
  ops/grafana/schema/package-lock.json, installed by ``make grafana-schema``), and each dashboard is validated
  against it with ``jsonschema``: required fields, types, enums, and no property the model does not have.
- **PromQL.** Every panel query is parsed by Prometheus's own parser (``promtool check rules`` on the queries
  as recording rules) and by ``promql-parser``, which names the metrics each selects.
- **Metric names.** Every metric a dashboard or alert rule selects is one the product exports: what the worker's
  endpoint serves (core/metrics.py's registry, which the API serves too, and the Temporal SDK's metrics of the
  runtime the worker builds, ``core.metrics.temporal_runtime``) after the real BillingRun and InvoiceCycle
  workflows ran on the time-skipping server, one invoice failing and one activity retried (stand-in
  activities, no database).
  tests/test_metrics_live.py checks the same names against a real Prometheus scraping the running processes.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator
from prometheus_client import generate_latest
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from core.metrics import SdkMetrics, WorkerMetrics, free_loopback_address, temporal_runtime
from core.settings import PROJECT_ROOT
from core.temporal import data_converter
from tests.conftest import VENV_BIN
from tests.promql import DASHBOARDS, dashboard_targets, exported_names, metric_names, promql_names, unknown_metrics
from tests.test_workflow_branches import JAN, StandIns, due, run_billing, start_invoice
from workflows.contracts import ERR_PRICING, CreateInvoiceInput

SCHEMA_TOOLS = PROJECT_ROOT / "ops" / "grafana" / "schema"
GENERATOR = SCHEMA_TOOLS / "node_modules" / ".bin" / "ts-json-schema-generator"
GRAFANA_SCHEMA = SCHEMA_TOOLS / "node_modules" / "@grafana" / "schema"
# The classic dashboard JSON model (what Grafana exports and provisions from files), not the v2 resources.
DASHBOARD_TYPES = GRAFANA_SCHEMA / "dist" / "types" / "raw" / "dashboard" / "x" / "types.gen.d.ts"


def load(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


# --- Grafana's dashboard schema -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard_schema(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    assert GENERATOR.is_file() and DASHBOARD_TYPES.is_file(), (
        "Grafana's schema package is missing: `make grafana-schema` installs ops/grafana/schema (npm ci)"
    )
    out = tmp_path_factory.mktemp("grafana-schema") / "dashboard.schema.json"
    generated = subprocess.run(
        [str(GENERATOR), "--path", str(DASHBOARD_TYPES), "--type", "Dashboard", "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=180,
    )
    assert generated.returncode == 0, generated.stdout + generated.stderr
    schema: dict[str, Any] = json.loads(out.read_text())
    Draft7Validator.check_schema(schema)
    return schema


def schema_errors(schema: dict[str, Any], dashboard: dict[str, Any]) -> list[str]:
    return sorted(
        f"{'/'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"
        for error in Draft7Validator(schema).iter_errors(dashboard)
    )


def test_the_schema_is_grafanas_dashboard_model(dashboard_schema: dict[str, Any]):
    pinned = json.loads((SCHEMA_TOOLS / "package.json").read_text())["devDependencies"]["@grafana/schema"]
    installed = json.loads((GRAFANA_SCHEMA / "package.json").read_text())
    assert (installed["name"], installed["version"], installed["author"]) == ("@grafana/schema", pinned, "Grafana Labs")
    dashboard = dashboard_schema["definitions"]["Dashboard"]
    assert dashboard_schema["$ref"] == "#/definitions/Dashboard"
    assert "schemaVersion" in dashboard["required"] and dashboard["additionalProperties"] is False
    assert {"panels", "templating", "time", "uid", "title"} <= set(dashboard["properties"])
    assert {"Panel", "RowPanel", "GridPos", "DataSourceRef", "VariableModel"} <= set(dashboard_schema["definitions"])


def test_there_are_the_three_dashboards():
    assert [p.name for p in DASHBOARDS] == ["billing-overview.json", "ingestion.json", "temporal-worker.json"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_each_dashboard_is_valid_under_grafanas_schema(dashboard_schema: dict[str, Any], path: Path):
    assert schema_errors(dashboard_schema, load(path)) == []


def test_the_schema_refuses_what_grafana_would_not_read(dashboard_schema: dict[str, Any]):
    """The check can fail: a misspelt panel field, a cursor-sync mode Grafana lacks, a refresh rate as a
    number, a variable's ``current`` without its text and value, and a dashboard without ``schemaVersion``."""
    dashboard = load(DASHBOARDS[0])
    assert schema_errors(dashboard_schema, dashboard) == []
    broken = copy.deepcopy(dashboard)
    panel = broken["panels"][1]
    panel["gridpos"] = panel.pop("gridPos")
    broken["graphTooltip"] = 3
    broken["refresh"] = 60
    broken["templating"]["list"][0]["current"] = {}
    del broken["schemaVersion"]
    errors = schema_errors(dashboard_schema, broken)
    assert any(e.startswith("panels/1: ") for e in errors), errors
    assert any(e.startswith("graphTooltip: 3 is not one of") for e in errors), errors
    assert "refresh: 60 is not of type 'string'" in errors
    assert "templating/list/0/current: 'text' is a required property" in errors
    assert "(root): 'schemaVersion' is a required property" in errors


# --- our conventions, beyond Grafana's schema -----------------------------------------------------------


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_each_dashboard_follows_our_conventions(path: Path):
    """What Grafana's schema leaves open and we rely on: a stable uid Grafana accepts, an integer schemaVersion
    Grafana 10.3+ reads without migrating, panels with unique ids inside the 24-column grid and, but for rows,
    queries with unique refIds against the Prometheus data source chosen by the ``datasource`` variable."""
    dashboard = load(path)
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", dashboard["uid"]) and dashboard["title"].strip()
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 39
    assert set(dashboard["time"]) == {"from", "to"}
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    assert panels and len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) and grid[k] >= 0 for k in ("h", "w", "x", "y"))
        assert grid["w"] >= 1 and grid["x"] + grid["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        targets = panel["targets"]
        assert targets and len({t["refId"] for t in targets}) == len(targets)
        assert all(t["expr"].strip() and t["datasource"] == panel["datasource"] for t in targets)


def test_the_dashboards_uids_differ():
    uids = [load(p)["uid"] for p in DASHBOARDS]
    assert len(set(uids)) == len(uids)


# --- PromQL ------------------------------------------------------------------------------------------


def promtool_check(queries: list[tuple[str, str]], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``promtool check rules`` on ``queries`` ((name, expr) pairs) as recording rules: Prometheus's parser."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make prometheus` installs Debian's prometheus package"
    rules = [{"record": name, "expr": expr} for name, expr in queries]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}))
    return subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False)


def rule_name(dashboard: str, panel: int, ref_id: str) -> str:
    return f"dashboard:{dashboard.removesuffix('.json').replace('-', '_')}:panel_{panel}_{ref_id}"


def test_every_panel_query_parses_with_prometheus_parser(tmp_path: Path):
    targets = dashboard_targets()
    assert len(targets) >= 30
    checked = promtool_check([(rule_name(t.dashboard, t.panel, t.ref_id), t.expr) for t in targets], tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(targets)} rules found" in checked.stdout
    for target in targets:  # the same queries through promql-parser, which names the metrics
        assert metric_names(target.expr), target


def test_a_query_prometheus_cannot_parse_is_refused(tmp_path: Path):
    checked = promtool_check([("dashboard:broken", "sum(rate(http_requests_total[5m])")], tmp_path)
    assert checked.returncode != 0
    assert "unclosed left parenthesis" in checked.stdout + checked.stderr


# --- metric names ----------------------------------------------------------------------------------


async def worker_exposition() -> str:
    """What the worker's ``/metrics`` serves (this process's registry, ``worker_sdk_metrics_up`` and the Temporal
    SDK's metrics, read from the runtime the worker builds) after a billing run with a subscription left behind,
    an invoice workflow with a retried activity and one that failed, on a time-skipping server of its own (a
    runtime is bound when its client connects)."""
    address = free_loopback_address()
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(VENV_BIN / "temporal-test-server"),
        data_converter=data_converter,
        runtime=temporal_runtime(address),
    )
    try:
        broken, fine = uuid.uuid4(), uuid.uuid4()
        stand_ins = StandIns([[due(broken, 0, JAN), due(fine, 0, JAN)]])

        def refuse_broken(data: CreateInvoiceInput, attempt: int) -> ApplicationError | None:
            if data.subscription_id == broken:
                return ApplicationError("tiers missing", type=ERR_PRICING, non_retryable=True)
            return None

        stand_ins.fail_create = refuse_broken
        progress, _ = await run_billing(env, stand_ins)
        assert progress.invoices_created == 1 and progress.failed == 1, progress
        stand_ins.fail_create = lambda data, attempt: None
        stand_ins.fail_render_attempts = 1
        rendered, _ = await start_invoice(env, stand_ins)  # a final invoice on its own, its render retried once
        assert rendered is not None
        stand_ins.fail_create = lambda data, attempt: ApplicationError("gone", type=ERR_PRICING, non_retryable=True)
        _, failed = await start_invoice(env, stand_ins)
        assert failed is not None
        served = generate_latest(WorkerMetrics(SdkMetrics(f"http://{address}/metrics"))).decode()
        assert "worker_sdk_metrics_up 1.0" in served
        return served
    finally:
        await env.shutdown()


async def test_every_metric_a_dashboard_or_rule_selects_is_exported(tmp_path: Path):
    # The worker's endpoint; the API serves this process's registry (``REGISTRY``), which the worker's includes.
    exported = exported_names(await worker_exposition())
    assert {"temporal_workflow_failed_total", "billing_runs_total", "usage_events_total"} <= exported
    selected = promql_names()
    assert all(selected.values()) and len(selected) >= 3
    assert unknown_metrics(selected, exported) == {}

    # The check can fail: a dashboard whose panel selects a misspelt metric is named with it.
    dashboard = load(DASHBOARDS[0])
    target = next(t for p in dashboard["panels"] for t in p.get("targets", []))
    target["expr"] = "sum(rate(invoices_creatd_total[5m]))"
    tampered = tmp_path / DASHBOARDS[0].name
    tampered.write_text(json.dumps(dashboard))
    assert unknown_metrics(promql_names([tampered]), exported) == {
        f"dashboard {DASHBOARDS[0].name}": ["invoices_creatd_total"]
    }
