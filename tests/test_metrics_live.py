"""A real Prometheus (Debian's binary) scrapes the running API (uvicorn on a loopback port) and a real worker
process (``worker.py`` on the Temporal dev server) and finds their series; it loads the alert rules and
evaluates each of them without error; and every metric the rules and dashboards select is one the two
processes export.

The worker bills two subscriptions: one whose invoices are written and rendered, one whose plan the pricing
engine refuses, so failure series (which the SDK exports from their first event on) exist too.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import col, select
from temporalio.client import WorkflowFailureError

from api.main import create_app
from billing.pricing.models import PriceModel
from core.settings import Settings
from devstack.services import free_port, serving
from schema.models import Interval as PlanInterval
from schema.models import Invoice, Plan, PlanCharge
from tests import factories
from tests.promql import RULES, exported_names, promql_names, rules, unknown_metrics
from tests.test_api_support import bearer
from tests.test_worker_crash import Workers, dev_server  # noqa: F401  (dev_server: a fixture)
from workflows.contracts import INVOICE_WORKFLOW, InvoiceCycleInput

pytestmark = pytest.mark.db


class Prometheus:
    """``prometheus`` scraping ``targets`` ({job: host:port}) every second, with our rules loaded."""

    def __init__(self, data: Path, targets: dict[str, str]) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is missing: `make prometheus` installs Debian's prometheus package"
        shutil.copy(RULES, data / "alerts.yml")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [
                {"job_name": job, "metrics_path": "/metrics", "static_configs": [{"targets": [target]}]}
                for job, target in targets.items()
            ],
        }
        (data / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = (data / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={data / 'prometheus.yml'}",
                f"--storage.tsdb.path={data / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def api(self, path: str, **params: str) -> Any:
        answer = self.http.get(f"/api/v1/{path}", params=params)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["status"] == "success", body
        return body["data"]

    def names(self) -> set[str]:
        try:
            return set(self.api("label/__name__/values"))
        except httpx.HTTPError:
            assert self.process.poll() is None, "prometheus exited"
            return set()

    def value(self, query: str) -> float:
        result = self.api("query", query=query)["result"]
        assert len(result) == 1, (query, result)
        return float(result[0]["value"][1])

    def close(self) -> None:
        self.http.close()
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture
def workers(dev_server, settings: Settings, database_url: str) -> Iterator[Workers]:  # noqa: F811
    w = Workers(dev_server.client, settings, database_url)
    try:
        yield w
    finally:
        w.close()


# Series of the API (in this process) and how much the test adds to each.
API_QUERIES = {
    'usage_events_total{job="api",source="api",outcome="accepted"}': 3,
    'usage_events_total{job="api",source="api",outcome="duplicate"}': 1,
    'http_requests_total{job="api",route="/v1/usage",method="POST",status="200"}': 1,
}


def api_value(query: str) -> float:
    """The value this process's registry holds for ``query`` (``name{label="value",...}``, ``job`` left out)."""
    name, _, labels = query.partition("{")
    pairs = dict(re.findall(r'(\w+)="([^"]*)"', labels))
    pairs.pop("job", None)
    return REGISTRY.get_sample_value(name, pairs) or 0.0


async def broken_plan_subscriber(sessions, cat: factories.Catalog, started: datetime):
    """A subscriber to a plan whose graduated charge has no tiers: the pricing engine refuses to draft it
    (non-retryable PricingError), so its invoice workflow fails."""
    async with sessions() as s:
        plan = Plan(code="broken", name="Broken plan", currency="USD", interval=PlanInterval.month, base_fee=1000)
        s.add(plan)
        await s.flush()
        s.add(
            PlanCharge(
                plan_id=plan.id, meter_id=cat.kwh.id, unit_amount=Decimal(0), price_model=PriceModel.graduated, tiers=[]
            )
        )
        await s.commit()
    return await factories.subscriber(sessions, factories.Catalog(plan, cat.kwh, cat.water), started, name="Broken")


async def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.25)


async def test_a_real_prometheus_scrapes_the_api_and_the_worker(dev_server, sessions, settings, workers, tmp_path):  # noqa: F811
    started = datetime.now(UTC) - timedelta(days=35)  # monthly: two boundaries due now
    cat = await factories.catalog(sessions)
    good = await factories.subscriber(sessions, cat, started, name="Good")
    broken = await broken_plan_subscriber(sessions, cat, started)

    worker_port = free_port()
    workers.env.update(
        WORKER_METRICS_HOST="127.0.0.1",
        WORKER_METRICS_PORT=str(worker_port),
        METRICS_REFRESH_INTERVAL="1",
        PSP_EVENTS_SWEEP_SCHEDULE_ID=f"live-sweep-{uuid.uuid4().hex[:8]}",
        NOTICES_SWEEP_SCHEDULE_ID=f"live-notices-{uuid.uuid4().hex[:8]}",
        RENEWAL_REMINDERS_SCHEDULE_ID=f"live-reminders-{uuid.uuid4().hex[:8]}",
    )
    worker = workers.start("worker.py")
    api_settings = settings.model_copy(update={"temporal_address": dev_server.client.service_client.config.target_host})
    with serving(create_app(api_settings)) as api_url:
        prometheus = Prometheus(
            tmp_path, {"api": api_url.removeprefix("http://"), "worker": f"127.0.0.1:{worker_port}"}
        )
        try:
            async with httpx.AsyncClient(base_url=api_url, timeout=30, headers=bearer(api_settings)) as api:
                rows = [
                    {"tenant_id": str(good.tenant_id), "meter": "electricity", "quantity": q,
                     "occurred_at": (started + timedelta(days=3)).isoformat(), "idempotency_key": f"live-{i}"}
                    for i, q in enumerate(["1.5", "2", "3.25"])
                ]  # fmt: skip
                # The API runs in this process (a uvicorn thread): its counters hold what earlier tests counted.
                before = {q: api_value(q) for q in API_QUERIES}
                posted = await api.post("/v1/usage", json={"events": [*rows, rows[0]]})
                assert posted.json()["accepted"] == 3 and posted.json()["duplicates"] == 1, posted.text
                await wait_until(lambda: workers.ready(worker), 60, "the worker to poll")
                run = await api.post("/v1/billing-runs", json={"as_of": datetime.now(UTC).isoformat()})
                assert run.status_code == 202, run.text
                run_id = run.json()["workflow_id"]

                async def run_done():
                    state = (await api.get(f"/v1/billing-runs/{run_id}")).json()
                    return state["status"] != "RUNNING"

                await wait_until(run_done, 120, "the billing run")
                progress = (await api.get(f"/v1/billing-runs/{run_id}")).json()["progress"]
                assert progress["invoices_created"] == 2 and progress["failed"] == 1, progress
                assert progress["failures"][0]["subscription_id"] == str(broken.id)
                assert progress["failures"][0]["error_type"] == "PricingError"
                async with sessions() as s:
                    invoices = (await s.exec(select(Invoice).where(col(Invoice.subscription_id) == good.id))).all()
                assert len(invoices) == 2
                # An invoice workflow of its own (as a cancel's final invoice starts one) fails on the broken plan.
                lone = await dev_server.client.start_workflow(
                    INVOICE_WORKFLOW,
                    InvoiceCycleInput(broken.id, 0, broken.anchor_at, broken.anchor_at, tenant_id=broken.tenant_id),
                    id=f"invoice-live-{uuid.uuid4().hex[:8]}",
                    task_queue=settings.task_queue,
                )
                with pytest.raises(WorkflowFailureError):
                    await asyncio.wait_for(lone.result(), 60)

                api_text = (await api.get("/metrics")).text
            worker_text = httpx.get(f"http://127.0.0.1:{worker_port}/metrics", timeout=10).text

            wanted = {
                "up",
                "http_requests_total",
                "http_request_duration_seconds_bucket",
                "usage_events_total",
                "db_pool_checked_out",
                "invoices_created_total",
                "invoiced_amount_minor_total",
                "pdf_render_seconds_bucket",
                "billing_runs_total",
                "billing_run_duration_seconds_bucket",
                "billing_run_invoice_failures_total",
                "worker_sdk_metrics_up",
                "temporal_workflow_task_schedule_to_start_latency_seconds_bucket",
                "temporal_activity_schedule_to_start_latency_seconds_bucket",
                "temporal_workflow_completed_total",
                "temporal_workflow_failed_total",
                "temporal_sticky_cache_size",
                "psp_events_backlog",
                "dunning_tenants",
            }

            async def scraped():
                return (
                    wanted <= prometheus.names() and prometheus.api("query", query="billing_runs_total")["result"] != []
                )

            await wait_until(scraped, 60, f"the series {sorted(wanted - prometheus.names())}")
            assert worker.poll() is None

            assert prometheus.value('up{job="api"}') == 1 and prometheus.value('up{job="worker"}') == 1
            for query, added in API_QUERIES.items():
                assert prometheus.value(query) == before[query] + added, query
            assert prometheus.value('invoices_created_total{job="worker",currency="USD"}') == 2
            assert prometheus.value('billing_runs_total{workflow_type="BillingRun",outcome="with_failures"}') == 1
            assert prometheus.value("billing_run_invoice_failures_total") == 1
            assert prometheus.value('temporal_workflow_failed_total{workflow_type="InvoiceCycle"}') == 1
            assert prometheus.value('pdf_render_seconds_count{document="invoice",job="worker"}') == 2
            assert prometheus.value('worker_sdk_metrics_up{job="worker"}') == 1
            assert prometheus.value('db_pool_size{job="worker",pool="primary"}') == settings.database_pool_size
            assert prometheus.value('sum(temporal_num_pollers{job="worker"})') > 0
            # Billing runs last minutes to hours: their histogram has buckets up to 6 h (core/metrics.py).
            assert prometheus.value('billing_run_duration_seconds_bucket{le="21600"}') == 1

            # The rules load into a real Prometheus and every one of them evaluates without error.
            async def evaluated():
                found = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
                return len(found) == len(rules()) and all(r.get("lastEvaluation", "").startswith("2") for r in found)

            await wait_until(evaluated, 30, "the rules to be evaluated")
            loaded = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
            assert {r["name"] for r in loaded} == {r["alert"] for r in rules()}
            assert all(r["health"] == "ok" for r in loaded), [(r["name"], r.get("lastError")) for r in loaded]
            firing = {a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"]}
            assert "BillingWorkerMissing" not in firing  # the worker serves its metrics
            scraped_names = prometheus.names()
        finally:
            prometheus.close()

    # One family per name on the worker's endpoint: ours and the SDK's never collide.
    worker_families = [f.name for f in text_string_to_metric_families(worker_text)]
    assert len(worker_families) == len(set(worker_families))
    assert any(n.startswith("temporal_") for n in worker_families) and "db_pool_size" in worker_families

    exported = exported_names(api_text) | exported_names(worker_text) | scraped_names
    assert unknown_metrics(promql_names(), exported) == {}
