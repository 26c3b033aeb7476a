"""Shared helpers of the API tests (no tests here): the app in-process, and catalog seeding."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
from temporalio.client import Client

from adapters.signing_keys import KeyStore
from api.main import create_app
from core.principal import Role
from core.settings import Settings
from services.tokens import issue_access_token


def token_for(
    settings: Settings,
    role: Role = Role.operator_admin,
    tenant_id: uuid.UUID | str | None = None,
    subject: str = "test-operator",
) -> str:
    """A real access token (signed with the settings' current key, verified by the app as any
    other) for a service client with ``role``: the caller of the API tests."""
    now = datetime.now(UTC)
    keys = KeyStore.open(settings, now).keyset()
    tenant = uuid.UUID(str(tenant_id)) if tenant_id is not None else None
    issued = issue_access_token(
        keys, settings, subject=subject, kind="client", role=role, tenant_id=tenant, session_id=None, now=now
    )
    return issued.token


def bearer(
    settings: Settings, role: Role = Role.operator_admin, tenant_id: uuid.UUID | str | None = None
) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_for(settings, role, tenant_id)}"}


@asynccontextmanager
async def api_client(
    settings: Settings,
    temporal_client: Client,
    *,
    role: Role | None = Role.operator_admin,
    tenant_id: uuid.UUID | str | None = None,
) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, called through ASGI (no sockets), as a caller with
    ``role`` (an operator unless told; None: no token)."""
    app = create_app(settings, temporal_client=temporal_client)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        headers = bearer(settings, role, tenant_id) if role is not None else {}
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost", headers=headers) as client:
            yield client


async def created(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(path, json=body)
    assert response.status_code == 201, response.text
    data: dict[str, Any] = response.json()
    return data


async def tenant(client: httpx.AsyncClient, *, currency: str = "USD", timezone: str = "UTC") -> dict[str, Any]:
    return await created(
        client,
        "/v1/tenants",
        {"name": "Ada Lovelace", "email": "ada@example.com", "currency": currency, "timezone": timezone},
    )


async def meter(client: httpx.AsyncClient, code: str = "electricity") -> dict[str, Any]:
    return await created(client, "/v1/meters", {"code": code, "name": code.title(), "unit": "kWh"})


async def plan(
    client: httpx.AsyncClient,
    code: str = "standard",
    *,
    currency: str = "USD",
    charges: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    body = {
        "code": code,
        "name": "Standard room",
        "currency": currency,
        "interval": "month",
        "base_fee": 65000,
        "charges": charges or [],
    }
    return await created(client, "/v1/plans", body)


async def room(client: httpx.AsyncClient, plan_id: str) -> dict[str, Any]:
    return await created(client, "/v1/rooms", {"code": f"R-{uuid.uuid4().hex[:8]}", "name": "Room", "plan_id": plan_id})


def loc_of(error: dict[str, Any]) -> list[str | int]:
    """An error of the one shape as a location path: ``{"in": "body", "field": "charges[0].price"}``
    -> ``["body", "charges", 0, "price"]``."""
    parts: list[str | int] = [error["in"]] if error["in"] else []
    for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", error["field"] or ""):
        parts.append(int(index) if index else name)
    return parts


def error_locs(response: httpx.Response) -> list[list[str | int]]:
    assert response.status_code == 422, response.text
    body = response.json()
    assert set(body) == {"errors"} and all(set(e) == {"type", "message", "field", "in"} for e in body["errors"])
    return [loc_of(error) for error in body["errors"]]
