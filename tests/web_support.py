"""Helpers of the web tests (no tests here): users who sign in through the form, and the CSRF
field of a page."""

from __future__ import annotations

import re
import uuid

import httpx
import jwt
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from core.principal import Role
from schema.scope import operator_scope
from services import auth
from web.session import csrf_token

PASSWORD = "correct horse battery staple"


async def user(
    sessions: async_sessionmaker[AsyncSession], role: Role, tenant_id: uuid.UUID | str | None, email: str | None = None
) -> str:
    """A user of ``role`` (bound to ``tenant_id`` for a tenant role); returns the email."""
    address = email or f"{role.value}-{uuid.uuid4().hex[:8]}@example.com"
    bound = uuid.UUID(str(tenant_id)) if tenant_id is not None and role.is_tenant_role else None
    with operator_scope():
        async with sessions() as session:
            await auth.create_user(session, email=address, password=PASSWORD, role=role, tenant_id=bound)
    return address


def csrf_for(client: httpx.AsyncClient, area: str = "portal") -> str:
    """The CSRF field of the client's signed-in session in ``area``, computed from its cookies as
    the pages do (for a caller who may open no page of the area: an operator on the portal)."""
    access = client.cookies.get("roomly_access", path=f"/{area}")
    key = client.cookies.get("roomly_csrf", path=f"/{area}")
    assert access and key, f"not signed in to /{area}"
    claims = jwt.decode(access, options={"verify_signature": False})
    return csrf_token(key, uuid.UUID(claims["sid"]))


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]*)"', html)
    assert found, "no CSRF field on the page"
    return found.group(1)


async def sign_in(client: httpx.AsyncClient, area: str, email: str, password: str = PASSWORD) -> httpx.Response:
    """The sign-in form as a browser fills it: GET (the CSRF cookie and field), then POST."""
    form = await client.get(f"/{area}/login")
    assert form.status_code == 200, form.text
    data = {"username": email, "password": password, "csrf_token": csrf_of(form.text)}
    return await client.post(f"/{area}/login", data=data)
