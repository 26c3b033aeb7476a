"""Structured logs (structlog) and traces (OpenTelemetry), configured once per process.

Spans come from maintained instrumentations: FastAPI (each request), SQLAlchemy (each
statement), httpx (outgoing calls) and Temporal's ``TracingInterceptor`` (start, workflows,
activities), so one request is one trace from HTTP through the workflow to SQL.

Logs are JSON unless stderr is a terminal (or ``LOG_FORMAT`` says otherwise). Standard
library loggers (temporalio, uvicorn, workflow.logger) go through the same renderer, and
every record carries the current OpenTelemetry trace and span ids plus whatever the
caller bound with ``structlog.contextvars`` (tenant_id, workflow_id, activity_id).
"""

from __future__ import annotations

import logging
import sys
import uuid
from typing import Any, TextIO

import structlog
from opentelemetry import metrics, trace
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import activity
from temporalio import workflow as temporal_workflow
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Interceptor

from core.settings import LogFormat, Settings, TraceExporter


def bind_tenant(tenant_id: uuid.UUID) -> None:
    """Add the tenant to every log line of the current request or activity."""
    structlog.contextvars.bind_contextvars(tenant_id=str(tenant_id))


def _add_trace_ids(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event.setdefault("span_id", format(ctx.span_id, "016x"))
    return event


def _flatten_temporal_workflow(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """``temporal_workflow`` (from workflow.logger) -> top-level workflow_id / run_id / workflow_type."""
    info = event.pop("temporal_workflow", None)
    if isinstance(info, dict):
        for key in ("workflow_id", "run_id", "workflow_type", "attempt"):
            if key in info:
                event.setdefault(key, info[key])
    return event


def configure_logging(settings: Settings, stream: TextIO | None = None) -> None:
    use_json = settings.log_format is LogFormat.json or (
        settings.log_format is LogFormat.auto and not sys.stderr.isatty()
    )
    # workflow.logger puts the workflow's ids in a record attribute, not into the message.
    temporal_workflow.logger.workflow_info_on_message = False
    temporal_workflow.logger.workflow_info_on_extra = True
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.ExtraAdder(),
        _flatten_temporal_workflow,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_trace_ids,
    ]
    renderer: Any = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())


def instrument_engine(engine: AsyncEngine, tracer_provider: TracerProvider | None = None) -> EngineTracer:
    """A span per SQL statement of this engine (the maintained SQLAlchemy instrumentation's engine
    tracer), in the caller's trace. Per engine, not process-wide: a process may hold several."""
    tracer = trace.get_tracer("opentelemetry.instrumentation.sqlalchemy", tracer_provider=tracer_provider)
    connections = metrics.get_meter("opentelemetry.instrumentation.sqlalchemy").create_up_down_counter(
        name="db.client.connections.usage", unit="connections", description="Connections in use or idle"
    )
    return EngineTracer(tracer, engine.sync_engine, connections)  # type: ignore[no-untyped-call]


def instrument_http_clients(tracer_provider: TracerProvider | None = None) -> None:
    """Spans for outgoing HTTP made with httpx (the PSP, webhooks), joined to the current trace."""
    instrumentor = HTTPXClientInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(tracer_provider=tracer_provider)


def configure_tracing(settings: Settings, service: str) -> TracerProvider | None:
    """Install a global tracer provider exporting to the console or OTLP; None when disabled."""
    if settings.otel_traces_exporter is TraceExporter.none:
        return None
    exporter: SpanExporter
    if settings.otel_traces_exporter is TraceExporter.console:
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=settings.otel_exporter_otlp_endpoint)
    provider = TracerProvider(resource=Resource.create({"service.name": f"{settings.otel_service_name}-{service}"}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


class LogContextInterceptor(Interceptor):
    """Binds workflow and activity ids to structlog's context for every activity call."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _ActivityLogContext(next)


class _ActivityLogContext(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        info = activity.info()
        context: dict[str, Any] = {
            "workflow_id": info.workflow_id,
            "workflow_run_id": info.workflow_run_id,
            "activity": info.activity_type,
            "activity_id": info.activity_id,
            "attempt": info.attempt,
        }
        tenant_id = getattr(input.args[0], "tenant_id", None) if input.args else None
        if tenant_id is not None:
            context["tenant_id"] = str(tenant_id)
        with structlog.contextvars.bound_contextvars(**context):
            return await super().execute_activity(input)
