"""Tokens over HTTP (outside the authenticated v1 tree): the token, refresh and logout routes, the
caller's identity, and the public keys (``/.well-known/jwks.json``). The rules live in
``services/auth.py`` (accounts, rotation, revocation), ``services/tokens.py`` (the JWT) and
``services/throttle.py`` (rate limits); this module parses and answers."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Form, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel.ext.asyncio.session import AsyncSession

from api.deps import AuthenticatedPrincipal, ClockDep, KeyStoreDep, SessionDep, SettingsDep, as_operator
from api.errors import body_errors, error_responses
from api.middleware import client_address
from core.settings import Settings
from services import auth, throttle
from services.auth import Tokens
from services.inputs import PgText

Text = Annotated[str, PgText]  # no NUL: a username or client id goes into SQL parameters

# The API on its own behalf: accounts and refresh tokens are no caller's rows (operator scope).
router = APIRouter(prefix="/v1/auth", tags=["auth"], dependencies=[Depends(as_operator)])
jwks_router = APIRouter(tags=["auth"])

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 section 5.1
JWKS_MAX_AGE = 60  # seconds; a verifier that meets an unknown kid fetches the set again


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 (the OAuth 2 token type, not a secret)
    expires_in: int = Field(description="Seconds the access token is valid")
    refresh_token: str | None = Field(default=None, description="Only for the password grant and refresh")


class RefreshBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    refresh_token: Text = Field(min_length=1, max_length=200)


class Me(BaseModel):
    subject: str
    kind: str
    roles: list[str]
    tenant_id: uuid.UUID | None
    session_id: uuid.UUID | None


class Jwk(BaseModel):
    kty: Literal["EC"]
    crv: Literal["P-256"]
    x: str
    y: str
    kid: str
    use: Literal["sig"]
    alg: Literal["ES256"]


class Jwks(BaseModel):
    keys: list[Jwk]


def _address(request: Request) -> str:
    """The caller's address, a rate-limit key (``unknown`` when the server saw none)."""
    return client_address(request) or "unknown"


async def _throttle(session: AsyncSession, settings: Settings, keys: list[str], now: datetime) -> None:
    await throttle.hit(
        session, keys, limit=settings.auth_rate_limit_count, window=settings.auth_rate_limit_window, now=now
    )


def _answer(tokens: Tokens, response: Response) -> TokenResponse:
    response.headers.update(NO_STORE)
    return TokenResponse(
        access_token=tokens.access.token, expires_in=tokens.access.expires_in, refresh_token=tokens.refresh_token
    )


@router.post("/token", response_model_exclude_none=True, responses=error_responses(401, 422, 429))
async def token(
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    keys: KeyStoreDep,
    clock: ClockDep,
    grant_type: Annotated[Literal["password", "client_credentials"], Form()],
    username: Annotated[Text | None, Form(min_length=1, max_length=320)] = None,
    password: Annotated[Text | None, Form(min_length=1, max_length=auth.PASSWORD_MAX_LENGTH)] = None,
    client_id: Annotated[Text | None, Form(min_length=1, max_length=100)] = None,
    client_secret: Annotated[Text | None, Form(min_length=1, max_length=auth.PASSWORD_MAX_LENGTH)] = None,
) -> TokenResponse:
    """OAuth 2 token endpoint, form-encoded (``application/x-www-form-urlencoded``):
    ``grant_type=password`` with ``username`` (the email) and ``password`` gives an access token and
    a refresh token; ``grant_type=client_credentials`` with ``client_id`` and ``client_secret`` an
    access token only. 401 for wrong credentials (one message for an unknown account and a wrong
    password), 429 with ``Retry-After`` past ``AUTH_RATE_LIMIT`` per account or per address."""
    needed = ("username", "password") if grant_type == "password" else ("client_id", "client_secret")
    sent = {"username": username, "password": password, "client_id": client_id, "client_secret": client_secret}
    missing = [name for name in needed if sent[name] is None]
    if missing:
        raise body_errors([((name,), f"required for grant_type {grant_type}", "missing") for name in missing])
    account = auth.normalize_email(username or "") if grant_type == "password" else f"client:{client_id}"
    keys_hit = [throttle.throttle_key("account", account), throttle.throttle_key("address", _address(request))]
    await _throttle(session, settings, keys_hit, clock())
    keyset = keys.keyset()
    if grant_type == "password":
        assert username is not None and password is not None
        tokens = await auth.login_password(session, keyset, settings, username=username, password=password, now=clock())
    else:
        assert client_id is not None and client_secret is not None
        tokens = await auth.login_client(
            session, keyset, settings, client_id=client_id, client_secret=client_secret, now=clock()
        )
    return _answer(tokens, response)


@router.post("/refresh", response_model_exclude_none=True, responses=error_responses(401, 422, 429))
async def refresh(
    body: RefreshBody,
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    keys: KeyStoreDep,
    clock: ClockDep,
) -> TokenResponse:
    """Rotate a refresh token (JSON ``{"refresh_token": ...}``): a new access token and the next
    refresh token of the same session. A refresh token used before revokes its whole session
    (every refresh and access token of it) and is answered 401, as are unknown, expired and
    revoked ones. Rate-limited per account and per address like the token route."""
    keys_hit = [throttle.throttle_key("address", _address(request))]
    subject = await auth.refresh_subject(session, body.refresh_token)
    if subject is not None:
        keys_hit.append(throttle.throttle_key("account", f"user:{subject}"))
    await _throttle(session, settings, keys_hit, clock())
    tokens = await auth.refresh(session, keys.keyset(), settings, refresh_token=body.refresh_token, now=clock())
    return _answer(tokens, response)


@router.post("/logout", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses(422))
async def logout(body: RefreshBody, session: SessionDep, clock: ClockDep) -> Response:
    """Revoke the session of ``refresh_token``: its refresh tokens, and its access tokens within
    ``AUTH_REVOCATION_CACHE_SECONDS``. 204 whether or not the token was known."""
    await auth.logout(session, refresh_token=body.refresh_token, now=clock())
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/me", responses=error_responses(401))
async def me(principal: AuthenticatedPrincipal) -> Me:
    """Who the bearer token says the caller is (the token verified and its session not revoked)."""
    return Me(
        subject=principal.subject,
        kind=principal.kind,
        roles=sorted(principal.roles),
        tenant_id=principal.tenant_id,
        session_id=principal.session_id,
    )


@jwks_router.get("/.well-known/jwks.json")
async def jwks(response: Response, settings: SettingsDep, keys: KeyStoreDep, clock: ClockDep) -> Jwks:
    """The public keys that verify access tokens: the current one and retired ones whose tokens may
    still be valid. Cached for ``JWKS_MAX_AGE`` seconds."""
    response.headers["Cache-Control"] = f"public, max-age={JWKS_MAX_AGE}"
    return Jwks.model_validate(keys.keyset().jwks(clock(), settings.auth_access_ttl))
