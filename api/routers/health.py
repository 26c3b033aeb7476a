"""Liveness with a database round trip."""

from __future__ import annotations

import structlog
from fastapi import APIRouter, Response, status
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from api.deps import SessionDep
from api.schemas import Health
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
