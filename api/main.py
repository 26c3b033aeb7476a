"""The FastAPI application. ``uvicorn api.main:app``; tests call :func:`create_app`.

Creating the app connects nothing: the database engine, the Temporal client and the
document store are made in the lifespan and kept on ``app.state``.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime

import structlog
from asgi_correlation_id import CorrelationIdMiddleware
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from starlette.exceptions import HTTPException as StarletteHTTPException
from temporalio.client import Client

from adapters.psp import Psp, StripePsp
from adapters.signing_keys import KeyStore
from adapters.storage import document_store
from api.errors import (
    DATABASE_REFUSALS,
    OUTAGE_ERRORS,
    database_error_handler,
    http_error_handler,
    service_error_handler,
    unexpected_error_handler,
    validation_error_handler,
)
from api.idempotency import IdempotencyMiddleware
from api.middleware import (
    REQUEST_ID_HEADER,
    BodyLimitMiddleware,
    CrossOriginGuard,
    HostGuard,
    MetricsMiddleware,
    RequestContextMiddleware,
    is_sane_request_id,
    new_request_id,
)
from api.openapi import install as install_openapi
from api.routers import auth_router, health_router, jwks_router, metrics_router, v1_router, webhooks_router
from core import flags, metrics
from core.observability import configure_logging, configure_tracing, instrument_engine, instrument_http_clients
from core.settings import Settings, get_settings
from core.temporal import connect
from schema.db import make_engine, make_sessionmaker
from services.auth import RevocationCache
from services.errors import ServiceError
from web import install as install_web

log = structlog.stdlib.get_logger("api")


# A usage batch of 10 000 events makes ~20 objects per event that live until its answer is sent. At
# Python's default thresholds (700, 10, 10) the cycle collector ran hundreds of times per batch and
# its older generations kept walking the batch and everything imported: more than half of the
# API's CPU per event (docs/performance.md). Collected less often, and never what startup built.
GC_THRESHOLDS = (50_000, 20, 20)


@contextmanager
def collecting_less() -> Iterator[None]:
    """While the app serves: the startup objects frozen out of collection, higher thresholds;
    both undone at shutdown (tests run many apps in one process)."""
    before = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def create_app(
    settings: Settings | None = None,
    *,
    temporal_client: Client | None = None,
    tracer_provider: TracerProvider | None = None,
    psp: Psp | None = None,
    clock: Callable[[], datetime] | None = None,
) -> FastAPI:
    """The app for ``settings`` (default: the environment); ``temporal_client`` skips connecting;
    ``tracer_provider`` (default: the global one the lifespan configures) receives the spans;
    ``psp`` replaces the adapter built from the settings (and is not closed by the app); ``clock``
    (default: the system's, UTC) is the time tokens are issued and checked at."""
    settings = settings or get_settings()
    now = clock or _utc_now
    configure_logging(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        flags.configure(settings.feature_flags_file)  # this process's flags (core/flags.py)
        if settings.database_url is None:
            raise RuntimeError("DATABASE_URL must be set to run the API (e.g. postgresql://user@host:5432/billing)")
        app.state.keys = KeyStore.open(settings, now())  # refuses to start without a usable signing key
        app.state.revocations = RevocationCache(settings.auth_revocation_cache_seconds)
        configured = configure_tracing(settings, "api") if tracer_provider is None else None
        provider = tracer_provider or configured
        engine = make_engine(settings.database_url, settings.database_pool_size)
        instrument_engine(engine, provider)
        untrack_pool = metrics.POOLS.track(engine)
        # The reports' replica (DATABASE_REPLICA_URL), else the primary (api/deps.py get_report_session).
        replica = (
            make_engine(settings.database_replica_url, settings.database_pool_size)
            if settings.database_replica_url
            else None
        )
        if replica is not None:
            instrument_engine(replica, provider)
        untrack_replica = metrics.POOLS.track(replica, "replica") if replica is not None else (lambda: None)
        instrument_http_clients(provider)
        built = StripePsp.from_settings(settings) if psp is None else None  # connects nothing yet
        try:
            app.state.engine = engine
            app.state.sessionmaker = make_sessionmaker(engine)
            app.state.report_sessionmaker = (
                make_sessionmaker(replica) if replica is not None else app.state.sessionmaker
            )
            tracer = provider.get_tracer("billing.api") if provider is not None else None
            # Lazily: the API starts (and stores webhooks) while Temporal is unreachable.
            app.state.temporal_client = temporal_client or await connect(settings, tracer, lazy=True)
            app.state.documents = document_store(settings)
            app.state.psp = psp or built
            log.info("api started", temporal=settings.temporal_target, task_queue=settings.task_queue)
            with collecting_less():
                yield
        finally:
            if built is not None:
                await built.aclose()
            untrack_pool()
            untrack_replica()
            await engine.dispose()
            if replica is not None:
                await replica.dispose()
            if configured is not None:
                configured.shutdown()

    app = FastAPI(
        title="Billing API",
        version="1",
        summary="Tenants, catalog, usage ingestion, billing runs and invoices",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.clock = now
    install_openapi(app)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(ServiceError, service_error_handler)
    for outage in (*OUTAGE_ERRORS, RuntimeError):  # answered here, not re-raised: an outage is not a bug
        app.add_exception_handler(outage, unexpected_error_handler)  # (RuntimeError: Temporal's failed connect)
    for refusal in DATABASE_REFUSALS:  # 403 when row-level security refused the statement
        app.add_exception_handler(refusal, database_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)
    install_web(app)  # pages: HTML errors on web paths, the session middleware (innermost), routes
    app.add_middleware(IdempotencyMiddleware)  # the innermost: sees the body after the size check
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.api_max_body_bytes)
    app.add_middleware(CrossOriginGuard, allowed=settings.cors_origins)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        allow_headers=["Authorization", "Content-Type", "Idempotency-Key", REQUEST_ID_HEADER],
        expose_headers=[REQUEST_ID_HEADER, "Retry-After", "Idempotent-Replayed"],
        max_age=600,
    )
    app.add_middleware(HostGuard, allowed=settings.allowed_hosts)
    app.add_middleware(RequestContextMiddleware)
    app.add_middleware(
        CorrelationIdMiddleware, header_name=REQUEST_ID_HEADER, validator=is_sane_request_id, generator=new_request_id
    )
    app.add_middleware(MetricsMiddleware)  # the outermost: every answer counted, its whole time measured
    FastAPIInstrumentor.instrument_app(app, tracer_provider=tracer_provider, excluded_urls="healthz,readyz,metrics")
    app.include_router(health_router)
    app.include_router(metrics_router)
    app.include_router(v1_router)
    app.include_router(webhooks_router)
    app.include_router(auth_router)
    app.include_router(jwks_router)
    return app


def _utc_now() -> datetime:
    return datetime.now(UTC)


app = create_app()
