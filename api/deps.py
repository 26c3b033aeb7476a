"""Request dependencies: the resources the lifespan put on ``app.state``, and the caller.

Authentication is :func:`authenticated_principal` alone: a bearer access token, verified, its
login session not revoked. Which roles may call a route, and which tenant's rows they may touch,
is ``api.auth.allow``, the one dependency every v1 route declares.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client

from adapters.psp import Psp
from adapters.signing_keys import KeyStore
from adapters.storage import DocumentStore
from core.principal import Principal
from core.settings import Settings
from schema.scope import Scope, operator_scope
from services.auth import RevocationCache, is_session_revoked
from services.errors import InvalidToken
from services.tokens import verify_access_token

_bearer = HTTPBearer(auto_error=False, description="An access token from POST /v1/auth/token")


def get_clock(request: Request) -> Callable[[], datetime]:
    """The API's clock (tests set one they can move)."""
    clock: Callable[[], datetime] = request.app.state.clock
    return clock


def get_key_store(request: Request) -> KeyStore:
    store: KeyStore = request.app.state.keys
    return store


def get_revocations(request: Request) -> RevocationCache:
    cache: RevocationCache = request.app.state.revocations
    return cache


async def as_operator() -> AsyncIterator[Scope]:
    """The API acting on its own behalf (a PSP webhook, authenticated by its signature): every tenant's rows."""
    with operator_scope() as bound:
        yield bound


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request; whatever is not committed is rolled back when it closes."""
    async with get_sessionmaker(request)() as session:
        yield session


async def get_report_session(request: Request) -> AsyncIterator[AsyncSession]:
    """A session for a report route: on the read replica (DATABASE_REPLICA_URL) when there is
    one. Only reports read there — they may trail the primary by the replica's lag; every route a
    client may call right after a write (a POST, then a GET of what it made) reads the primary."""
    async with get_report_sessionmaker(request)() as session:
        yield session


def get_report_sessionmaker(request: Request) -> async_sessionmaker[AsyncSession]:
    """For a report streamed after the handler returns, on the replica when there is one."""
    sessions: async_sessionmaker[AsyncSession] = request.app.state.report_sessionmaker
    return sessions


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


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
SessionmakerDep = Annotated[async_sessionmaker[AsyncSession], Depends(get_sessionmaker)]
ReportSessionDep = Annotated[AsyncSession, Depends(get_report_session)]
ReportSessionmakerDep = Annotated[async_sessionmaker[AsyncSession], Depends(get_report_sessionmaker)]
TemporalClientDep = Annotated[Client, Depends(get_temporal_client)]
DocumentStoreDep = Annotated[DocumentStore, Depends(get_document_store)]
PspDep = Annotated[Psp, Depends(get_psp)]
ClockDep = Annotated[Callable[[], datetime], Depends(get_clock)]
KeyStoreDep = Annotated[KeyStore, Depends(get_key_store)]


async def _revoked(request: Request, session_id: uuid.UUID) -> bool:
    """Whether the login session was revoked: asked in a session of its own, in operator scope (the
    refresh tokens are no caller's to read), so the request's own transaction begins later, in the
    caller's scope (``api.auth.allow``)."""
    cache = get_revocations(request)
    with operator_scope():
        async with get_sessionmaker(request)() as session:
            return await is_session_revoked(session, session_id, cache)


async def authenticated_principal(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    request: Request,
) -> Principal:
    """The caller of a bearer access token: verified (``services.tokens.verify_access_token``) and,
    for a user, its login session not revoked; 401 with ``WWW-Authenticate`` otherwise."""
    if credentials is None:
        raise InvalidToken("a bearer access token is required", missing=True)
    settings = get_settings(request)
    principal = verify_access_token(
        credentials.credentials, get_key_store(request).keyset(), settings, now=get_clock(request)()
    )
    if principal.session_id is not None and await _revoked(request, principal.session_id):
        raise InvalidToken("the session of this token was revoked")
    return principal


AuthenticatedPrincipal = Annotated[Principal, Depends(authenticated_principal)]
# The caller of a v1 route (verified once per request: FastAPI caches the dependency).
CurrentPrincipal = AuthenticatedPrincipal
