"""Logs are JSON and carry tenant, workflow and trace ids; traces span API -> workflow -> activity."""

from __future__ import annotations

import io
import json
import logging
from datetime import UTC, datetime

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor

from api.main import create_app
from core.observability import configure_logging, instrument_engine
from core.settings import LogFormat
from tests import factories
from tests.test_api_support import bearer
from worker import build_worker
from workflows.contracts import BILLING_RUN_WORKFLOW, BillingRunInput, BillingRunProgress

pytestmark = pytest.mark.db


@pytest.fixture
def log_lines(settings):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    configure_logging(settings.model_copy(update={"log_format": LogFormat.json}), stream=stream)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


async def test_activity_logs_carry_tenant_workflow_and_trace_ids(
    temporal_env, sessions, activities, settings, log_lines
):
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracer = provider.get_tracer("test")
    client = Client(**{**temporal_env.client.config(), "interceptors": [TracingInterceptor(tracer)]})

    cat = await factories.catalog(sessions)
    sub = await factories.subscriber(sessions, cat, datetime(2026, 1, 10, tzinfo=UTC))
    async with build_worker(client, settings, activities):
        with trace.use_span(tracer.start_span("operator request"), end_on_exit=True):
            handle = await client.start_workflow(
                BILLING_RUN_WORKFLOW,
                BillingRunInput(as_of=datetime(2026, 2, 15, tzinfo=UTC)),
                id="billing-run-traced",
                task_queue=settings.task_queue,
                result_type=BillingRunProgress,
            )
        await handle.result()

    written = [line for line in log_lines() if line["event"] == "invoice written"]
    assert len(written) == 2  # boundaries Jan 10 and Feb 10
    line = written[-1]
    assert line["tenant_id"] == str(sub.tenant_id)
    assert line["workflow_id"] == "billing-run-traced" and line["subscription_id"] == str(sub.id)
    assert line["activity"] == "invoice_batch"
    assert len(line["trace_id"]) == 32

    names = {span.name for span in spans.get_finished_spans()}
    assert {"StartWorkflow:BillingRun", "RunWorkflow:BillingRun", "RunActivity:invoice_batch"} <= names
    trace_ids = {span.context.trace_id for span in spans.get_finished_spans()}
    assert len(trace_ids) == 1  # one trace from the operator's request down to every activity
    assert format(trace_ids.pop(), "032x") == line["trace_id"]


async def test_a_real_request_is_one_trace_from_http_through_the_workflow_to_sql(
    temporal_env, sessions, activities, settings, engine
):
    """No hand-made root span: the FastAPI instrumentation starts the trace, Temporal's interceptor
    carries it into the run and its activities, and SQLAlchemy's adds the SQL."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    client = Client(
        **{**temporal_env.client.config(), "interceptors": [TracingInterceptor(provider.get_tracer("test"))]}
    )
    instrument_engine(engine, provider)
    cat = await factories.catalog(sessions)
    await factories.subscriber(sessions, cat, datetime(2026, 1, 10, tzinfo=UTC))
    app = create_app(settings, temporal_client=client, tracer_provider=provider)
    try:
        async with (
            build_worker(client, settings, activities),
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://localhost", headers=bearer(settings)
            ) as api,
        ):
            started = await api.post("/v1/billing-runs", json={"as_of": "2026-02-15T00:00:00Z"})
            assert started.status_code == 202, started.text
            await client.get_workflow_handle(started.json()["workflow_id"]).result()
    finally:
        EngineTracer.remove_all_event_listeners()

    finished = spans.get_finished_spans()
    [server] = [s for s in finished if s.name == "POST /v1/billing-runs"]
    assert server.parent is None  # the request itself is the root
    in_trace = [s for s in finished if s.context.trace_id == server.context.trace_id]
    names = {s.name for s in in_trace}
    assert {"StartWorkflow:BillingRun", "RunWorkflow:BillingRun", "RunActivity:invoice_batch"} <= names
    sql = [s for s in in_trace if s.attributes and s.attributes.get("db.system") == "postgresql"]
    assert any("usage_events" in str((s.attributes or {}).get("db.statement", "")) for s in sql)
