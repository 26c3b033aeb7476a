"""Request dependencies: the resources the lifespan put on ``app.state``, and the caller.

Authentication is :func:`current_principal` alone. Today every caller is the anonymous
operator; real JWT auth replaces that one function (and may take a bearer token parameter),
and every v1 route, which depends on it through its router, is covered.

The database sees the caller again: :func:`request_scope` (a dependency of every v1 route) runs
the request in the principal's row-level security scope (``schema/scope.py``), so each of its
transactions sees that tenant's rows only, or every tenant's for an operator, or none.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client

from adapters.psp import Psp
from adapters.storage import DocumentStore
from core.settings import Settings
from schema.scope import Scope, operator_scope, tenant_scope, unscoped

OPERATOR_ROLES = frozenset({"operator_admin", "operator"})


@dataclass(frozen=True)
class Principal:
    subject: str
    roles: frozenset[str]
    tenant_id: uuid.UUID | None = None  # a tenant's user or client: its tenant


ANONYMOUS_OPERATOR = Principal(subject="anonymous", roles=frozenset({"operator"}))


async def current_principal() -> Principal:
    """Who is calling. Replace with token verification; handlers stay untouched."""
    return ANONYMOUS_OPERATOR


async def request_scope(principal: Annotated[Principal, Depends(current_principal)]) -> AsyncIterator[Scope]:
    """The request's database scope: every tenant for an operator, its own tenant for a tenant's
    principal, nothing for anyone else. Held until the response is sent (a streamed body included)."""
    if principal.roles & OPERATOR_ROLES:
        scope = operator_scope()
    elif principal.tenant_id is not None:
        scope = tenant_scope(principal.tenant_id)
    else:
        scope = unscoped()
    with scope as bound:
        yield bound


async def as_operator() -> AsyncIterator[Scope]:
    """The API acting on its own behalf (a PSP webhook, authenticated by its signature): every tenant's rows."""
    with operator_scope() as bound:
        yield bound


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request; whatever is not committed is rolled back when it closes."""
    sessions: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    async with sessions() as session:
        yield session


def get_sessionmaker(request: Request) -> async_sessionmaker[AsyncSession]:
    """For a response streamed after the handler returns: it opens its own session."""
    sessions: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    return sessions


def get_temporal_client(request: Request) -> Client:
    client: Client = request.app.state.temporal_client
    return client


def get_document_store(request: Request) -> DocumentStore:
    store: DocumentStore = request.app.state.documents
    return store


def get_psp(request: Request) -> Psp:
    """The PSP adapter, built once at start-up from the settings (closed at shutdown)."""
    psp: Psp = request.app.state.psp
    return psp


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
SessionmakerDep = Annotated[async_sessionmaker[AsyncSession], Depends(get_sessionmaker)]
TemporalClientDep = Annotated[Client, Depends(get_temporal_client)]
DocumentStoreDep = Annotated[DocumentStore, Depends(get_document_store)]
PspDep = Annotated[Psp, Depends(get_psp)]
