"""Prometheus metrics: every metric of ours is defined here, once (docs/operations.md "Metrics and alerts").

Both processes expose the default registry (``prometheus_client.REGISTRY``): the API on its own port at
``/metrics``, the worker on ``WORKER_METRICS_PORT`` (with the Temporal SDK's metrics folded in by
:class:`SdkMetrics`). A metric is counted where its fact becomes true: in a service or an activity,
after the transaction that made it true commits (:func:`on_commit`), never in workflow code (workflows
record through ``workflow.metric_meter()``, which the SDK skips while replaying).

Labels are bounded: route templates, not paths; event types and decline codes folded into small sets;
currencies (ISO 4217). Nothing carries an id except ``usage_tenant_silence_seconds``, which lists at most
:data:`SILENT_TENANTS_SHOWN` tenants.
"""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session
from sqlalchemy.pool import QueuePool
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

log = structlog.stdlib.get_logger("metrics")

# No ``*_created`` series beside every counter and histogram: they double the series for nothing we use.
disable_created_metrics()  # type: ignore[no-untyped-call]

# --- HTTP (the API) ----------------------------------------------------------------------------

HTTP_REQUESTS = Counter(
    "http_requests", "HTTP requests answered, by route template, method and status", ["method", "route", "status"]
)
HTTP_DURATION = Histogram(
    "http_request_duration_seconds",
    "Time from a request's arrival to the end of its answer, by route template",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
HTTP_IN_FLIGHT = Gauge("http_requests_in_flight", "HTTP requests being answered now")

# --- usage ingestion, webhooks in (the API) ------------------------------------------------------

USAGE_EVENTS = Counter(
    "usage_events",
    "Usage events received, by source (api, csv, manual, webhook) and outcome "
    "(accepted: stored; duplicate; conflict; rejected)",
    ["source", "outcome"],
)
PSP_WEBHOOKS = Counter(
    "psp_webhooks_received",
    "Verified PSP webhook deliveries, by event type (types we do not act on are 'other') and whether the "
    "event was stored before (duplicate)",
    ["type", "duplicate"],
)
PSP_WEBHOOKS_REFUSED = Counter("psp_webhooks_refused", "PSP webhook deliveries refused (bad or stale signature)")
PSP_WEBHOOK_LAG = Histogram(
    "psp_webhook_lag_seconds",
    "From the PSP creating an event to our storing it (first delivery only)",
    buckets=(1, 5, 15, 30, 60, 120, 300, 900, 3600, 6 * 3600, 24 * 3600),
)
METER_WEBHOOKS_ACCEPTED = Counter("meter_webhooks_accepted", "Signed meter webhook deliveries accepted")
METER_WEBHOOKS_REFUSED = Counter(
    "meter_webhooks_refused",
    "Signed meter webhook deliveries refused, by reason (gateway_unknown, signature_missing, "
    "signature_malformed, signature_stale, signature_invalid, signature_replayed)",
    ["reason"],
)

# --- billing, payments, dunning, notices (the worker) -------------------------------------------

INVOICES_CREATED = Counter("invoices_created", "Invoices written by billing, by currency", ["currency"])
INVOICED_AMOUNT = Counter(
    "invoiced_amount_minor", "Totals of the invoices written, in minor units of their currency", ["currency"]
)
PDF_RENDER = Histogram(
    "pdf_render_seconds",
    "Time to render one document's PDF in Chromium, by document (invoice, credit_note)",
    ["document"],
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
PAYMENT_ATTEMPTS = Counter(
    "payment_attempts",
    "Payment attempts that reached an outcome (succeeded, failed, unknown), failed ones by decline code",
    ["outcome", "decline_code"],
)
DUNNING_STAGES = Counter(
    "dunning_stage_transitions", "Tenants entering a dunning stage (reminder, ..., suspended, resolved)", ["stage"]
)
NOTICES = Counter(
    "notices_delivered",
    "Notice deliveries by channel (email, webhook) and outcome (sent; failed: given up; retry: "
    "a transient failure that will be retried)",
    ["channel", "outcome"],
)

# --- gauges read from the database and Temporal by the worker (refreshed every METRICS_REFRESH_INTERVAL s) ---

PSP_EVENTS_BACKLOG = Gauge(
    "psp_events_backlog", "PSP events still 'received' (not processed) longer than PSP_EVENTS_BACKLOG_AGE s"
)
PSP_EVENTS_BACKLOG_OLDEST = Gauge(
    "psp_events_backlog_oldest_seconds", "Age of the oldest PSP event still 'received' (0: none)"
)
DUNNING_TENANTS = Gauge("dunning_tenants", "Tenants whose dunning is at a stage now", ["stage"])
USAGE_SILENT_TENANTS = Gauge(
    "usage_silent_tenants",
    "Tenants with an active subscription that reported usage in the last 7 days but none for USAGE_SILENCE_AFTER s",
)
USAGE_TENANT_SILENCE = Gauge(
    "usage_tenant_silence_seconds",
    "Seconds since the last usage event of a silent tenant (the longest silent ones only)",
    ["tenant_id"],
)
SILENT_TENANTS_SHOWN = 20
BILLING_SCHEDULE_LAST_STARTED = Gauge(
    "billing_schedule_last_started_timestamp_seconds", "When the billing Schedule last started a run (Unix time)"
)
BILLING_SCHEDULE_LAST_COMPLETED = Gauge(
    "billing_schedule_last_completed_timestamp_seconds",
    "When the latest run the billing Schedule started and that completed did so (Unix time; 0: none of its "
    "recent runs completed)",
)
BILLING_SCHEDULE_PAUSED = Gauge("billing_schedule_paused", "1 while the billing Schedule is paused")
REFRESH_FAILURES = Counter(
    "metrics_refresh_failures", "Refreshes of the worker's gauges that failed, by source", ["source"]
)
REFRESHED = Gauge("metrics_refreshed_timestamp_seconds", "When the worker's gauges were last refreshed (Unix time)")


# --- decline codes: a small bounded set -----------------------------------------------------------

DECLINE_CODES = frozenset(
    {
        "generic_decline",
        "insufficient_funds",
        "card_declined",
        "expired_card",
        "incorrect_cvc",
        "lost_card",
        "stolen_card",
        "do_not_honor",
        "fraudulent",
        "authentication_required",
        "processing_error",
    }
)


def decline_label(code: str | None) -> str:
    """A PSP decline code as a label: one of :data:`DECLINE_CODES`, ``none``, or ``other``."""
    if not code:
        return "none"
    return code if code in DECLINE_CODES else "other"


# --- counting after commit ------------------------------------------------------------------------

_PENDING = "metrics.pending"


def on_commit(session: Any, count: Callable[[], None]) -> None:
    """Run ``count`` when the session's current transaction commits; drop it if it rolls back.

    ``session`` is an ``AsyncSession`` or a ``Session``. A fact counted this way is counted once: when
    it became true in the database, not when a retry finds it done.
    """
    sync: Session = getattr(session, "sync_session", session)
    sync.info.setdefault(_PENDING, []).append(count)


@event.listens_for(Session, "after_commit")
def _run_pending(session: Session) -> None:
    for count in session.info.pop(_PENDING, ()):
        count()


@event.listens_for(Session, "after_rollback")
def _drop_pending(session: Session) -> None:
    session.info.pop(_PENDING, None)


# --- the database pools, read on scrape --------------------------------------------------------------


class PoolCollector(Collector):
    """SQLAlchemy pool figures of every tracked engine, by pool name (engines of one name are summed)."""

    def __init__(self) -> None:
        self._engines: list[tuple[str, AsyncEngine]] = []

    def track(self, engine: AsyncEngine, name: str = "primary") -> Callable[[], None]:
        """Report ``engine``'s pool from now on; call the result to stop (when the engine is disposed)."""
        entry = (name, engine)
        self._engines.append(entry)
        return lambda: self._engines.remove(entry) if entry in self._engines else None

    def collect(self) -> Iterator[Metric]:
        families = {
            "size": GaugeMetricFamily(
                "db_pool_size", "Connections the pool keeps (DATABASE_POOL_SIZE)", labels=["pool"]
            ),
            "max_overflow": GaugeMetricFamily(
                "db_pool_max_overflow", "Connections the pool may open beyond its size", labels=["pool"]
            ),
            "checked_out": GaugeMetricFamily(
                "db_pool_checked_out", "Connections in use by a session now", labels=["pool"]
            ),
            "checked_in": GaugeMetricFamily("db_pool_checked_in", "Open connections idle in the pool", labels=["pool"]),
            "overflow": GaugeMetricFamily(
                "db_pool_overflow", "Connections open beyond the pool's size now", labels=["pool"]
            ),
        }
        totals: dict[str, dict[str, float]] = {}
        for name, engine in list(self._engines):
            pool = engine.sync_engine.pool
            if not isinstance(pool, QueuePool):  # NullPool (tests' admin engines) keeps nothing
                continue
            figures = totals.setdefault(name, dict.fromkeys(families, 0.0))
            figures["size"] += pool.size()
            figures["max_overflow"] += pool._max_overflow
            figures["checked_out"] += pool.checkedout()
            figures["checked_in"] += pool.checkedin()
            figures["overflow"] += max(pool.overflow(), 0)
        for name, figures in totals.items():
            for key, family in families.items():
                family.add_metric([name], figures[key])
        yield from families.values()


POOLS = PoolCollector()
REGISTRY.register(POOLS)


# --- the Temporal SDK's metrics, folded into the worker's endpoint -----------------------------------


class SdkMetrics(Collector):
    """The Temporal SDK's Prometheus endpoint (served by its Rust core on a loopback port), read and
    re-emitted on each scrape, so the worker has one metrics port. ``worker_sdk_metrics_up`` is 0 when
    the SDK's endpoint did not answer (its metrics are then missing from that scrape)."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url
        self.timeout = timeout

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("worker_sdk_metrics_up", "1 when the Temporal SDK's metrics were read for this scrape")
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout) as answer:  # noqa: S310  (our loopback URL)
                text = answer.read().decode()
            families: Iterable[Metric] = list(text_string_to_metric_families(text))
        except (OSError, ValueError) as error:
            log.warning("temporal sdk metrics unreadable", url=self.url, error=str(error))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families


class WorkerMetrics(Collector):
    """What the worker's endpoint serves: this process's registry, then the SDK's metrics."""

    def __init__(self, sdk: SdkMetrics) -> None:
        self.sdk = sdk

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()
        yield from self.sdk.collect()


# Billing runs last minutes to hours; the SDK's default buckets stop at seconds.
BILLING_RUN_BUCKETS = (10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 21600.0)


def temporal_runtime(bind_address: str) -> Runtime:
    """An SDK runtime serving its metrics at ``http://bind_address/metrics``: counters end in ``_total``,
    durations are seconds with a ``_seconds`` suffix (``temporal_workflow_task_schedule_to_start_latency_seconds``)."""
    config = PrometheusConfig(
        bind_address=bind_address,
        counters_total_suffix=True,
        unit_suffix=True,
        durations_as_seconds=True,
        histogram_bucket_overrides={"billing_run_duration": BILLING_RUN_BUCKETS},
    )
    return Runtime(telemetry=TelemetryConfig(metrics=config))


def free_loopback_address() -> str:
    """``127.0.0.1:<a port free now>`` for the SDK's endpoint (its core cannot report a port it picked)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@dataclass
class MetricsServer:
    server: WSGIServer
    port: int

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_worker_metrics(host: str, port: int, sdk_address: str) -> MetricsServer:
    """``/metrics`` on ``host:port`` (0: a free port) in a thread: ours and the SDK's (read from ``sdk_address``)."""
    server, _ = start_http_server(port, addr=host, registry=WorkerMetrics(SdkMetrics(f"http://{sdk_address}/metrics")))
    return MetricsServer(server, server.server_port)
