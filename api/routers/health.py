"""Liveness (``/healthz``: a database round trip) and readiness (``/readyz``: the database and
Temporal both answer), for the probes; outside the token-authenticated tree."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import structlog
from fastapi import APIRouter, Response, status
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from api.deps import SessionDep, TemporalClientDep
from api.schemas import Health, Readiness
from schema.db import execute_sql

router = APIRouter(tags=["health"])
log = structlog.stdlib.get_logger("api")


@router.get("/healthz", responses={status.HTTP_503_SERVICE_UNAVAILABLE: {"model": Health}})
async def healthz(session: SessionDep, response: Response) -> Health:
    """``ok`` when PostgreSQL answers ``SELECT 1``; 503 otherwise."""
    try:
        await execute_sql(session, text("SELECT 1"))
    except (SQLAlchemyError, OSError) as exc:
        log.warning("health check failed", error=str(exc))
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return Health(status="unavailable")
    return Health(status="ok")


TEMPORAL_CHECK = timedelta(seconds=2)


@router.get("/readyz", responses={status.HTTP_503_SERVICE_UNAVAILABLE: {"model": Readiness}})
async def readyz(session: SessionDep, client: TemporalClientDep, response: Response) -> Readiness:
    """``ok`` when PostgreSQL answers ``SELECT 1`` and Temporal's health check passes (within 2 s);
    503 naming what did not, so a pod that cannot start workflows takes no traffic."""
    checks: dict[str, str] = {}
    try:
        await execute_sql(session, text("SELECT 1"))
        checks["database"] = "ok"
    except (SQLAlchemyError, OSError) as exc:
        log.warning("readiness: database unavailable", error=str(exc)[:300])
        checks["database"] = "unavailable"
    try:
        healthy = await asyncio.wait_for(
            client.service_client.check_health(timeout=TEMPORAL_CHECK), TEMPORAL_CHECK.total_seconds() + 1
        )
        checks["temporal"] = "ok" if healthy else "unavailable"
    except Exception as exc:  # unreachable, refused, timed out, or the lazy client's failed connect
        log.warning("readiness: temporal unavailable", error=str(exc)[:300], error_type=type(exc).__name__)
        checks["temporal"] = "unavailable"
    ready = all(value == "ok" for value in checks.values())
    if not ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Readiness(status="ok" if ready else "unavailable", checks=checks)
