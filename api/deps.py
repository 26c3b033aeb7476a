"""Request dependencies: the resources the lifespan put on ``app.state``, and the caller.

Authentication is :func:`current_principal` alone. Today every caller is the anonymous
operator; real JWT auth replaces that one function (and may take a bearer token parameter),
and every v1 route, which depends on it through its router, is covered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client

from adapters.psp import Psp
from adapters.storage import DocumentStore
from api.middleware import client_of
from core.settings import Settings
from services import audit


@dataclass(frozen=True)
class Principal:
    subject: str
    roles: frozenset[str]


ANONYMOUS_OPERATOR = Principal(subject="anonymous", roles=frozenset({"operator"}))


async def current_principal() -> Principal:
    """Who is calling. Replace with token verification; handlers stay untouched."""
    return ANONYMOUS_OPERATOR


async def audited_principal(request: Request, principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
    """The caller, also named as the actor of the writes this request makes (services/audit.py)."""
    address, request_id = client_of(request)
    audit.set_actor(audit.Actor(principal.subject, "user", tuple(sorted(principal.roles)), address, request_id))
    return principal


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
