"""The browser's session: the security issue's tokens in cookies, refreshed transparently, and CSRF.

Cookies (one set per area, ``/portal`` or ``/console``, each ``Path``-scoped to its area so the
browser never sends them to ``/v1`` or to the other area):

- ``roomly_access``: the ES256 access token (``AUTH_ACCESS_TTL``);
- ``roomly_refresh``: the opaque refresh token (``AUTH_REFRESH_TTL``), rotated on every refresh;
- ``roomly_csrf``: 32 random bytes, the key of the session's CSRF token (below).

All ``HttpOnly``, ``SameSite=Strict``, and ``Secure`` unless the environment is local or test
(served over plain http on one machine); with ``Secure`` the names carry the ``__Secure-`` prefix.

:class:`WebSessionMiddleware` turns the access cookie into the ``Authorization: Bearer`` header
the API's one authorization dependency (``api.auth.allow``) reads, so a page is authorized exactly
as a v1 route: same roles, same tenant binding, same row-level-security scope. When the access
token is expired (or missing) and a refresh token is there, it refreshes through
``services.auth.refresh`` (rotation and reuse detection included) and sets the new cookies on the
answer. A refresh token refreshed a moment ago by a parallel request of the same browser is not
"reused": the result is kept in this process for ``REFRESH_GRACE`` seconds and handed out again,
after the database confirms the session was not revoked meanwhile (a sign-out).

CSRF (docs/security.md "Web pages"): every form carries ``csrf_token`` =
HMAC-SHA256(key = the ``roomly_csrf`` cookie, message = the login session id, ``sid``). A
state-changing request must send the field and the cookie, and the field must match the HMAC for
the session of the access token: another site can neither read the cookie (HttpOnly, another
origin) nor know the session id, and a token of one session is worthless in another. Before
sign-in (the login form) the message is the fixed word ``login`` (a plain double submit).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any

from fastapi import Request, status
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError
from core.settings import Settings
from schema.scope import operator_scope
from services import auth
from services.auth import Tokens
from services.errors import InvalidToken, Unauthenticated
from services.tokens import verify_access_token

AREAS = ("portal", "console")
ACCESS, REFRESH, CSRF = "roomly_access", "roomly_refresh", "roomly_csrf"
CSRF_FIELD = "csrf_token"
LOGIN_MESSAGE = "login"
REFRESH_GRACE = 10.0  # seconds a rotated refresh token's successor is handed out again (parallel requests)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def area_of(path: str) -> str | None:
    """``portal`` for ``/portal`` and ``/portal/...``; None outside the web areas."""
    first = path.lstrip("/").split("/", 1)[0]
    return first if first in AREAS else None


def secure_cookies(settings: Settings) -> bool:
    return not settings.environment.generates_secrets  # local and test serve plain http


def cookie_name(settings: Settings, name: str) -> str:
    return f"__Secure-{name}" if secure_cookies(settings) else name


def cookie_header(settings: Settings, area: str, name: str, value: str, max_age: int) -> tuple[bytes, bytes]:
    cookie: SimpleCookie = SimpleCookie()
    full = cookie_name(settings, name)
    cookie[full] = value
    morsel = cookie[full]
    morsel["path"] = f"/{area}"
    morsel["max-age"] = max_age
    morsel["httponly"] = True
    morsel["samesite"] = "Strict"
    if secure_cookies(settings):
        morsel["secure"] = True
    return b"set-cookie", morsel.OutputString().encode("latin-1")


def session_cookies(settings: Settings, area: str, tokens: Tokens, csrf_key: str | None) -> list[tuple[bytes, bytes]]:
    """Set-Cookie headers for a signed-in session (``csrf_key`` None: keep the current one)."""
    headers = [cookie_header(settings, area, ACCESS, tokens.access.token, tokens.access.expires_in)]
    if tokens.refresh_token is not None:
        headers.append(cookie_header(settings, area, REFRESH, tokens.refresh_token, settings.auth_refresh_ttl))
    if csrf_key is not None:
        headers.append(cookie_header(settings, area, CSRF, csrf_key, settings.auth_refresh_ttl))
    return headers


def cleared_cookies(settings: Settings, area: str) -> list[tuple[bytes, bytes]]:
    return [cookie_header(settings, area, name, "", 0) for name in (ACCESS, REFRESH)]


def new_csrf_key() -> str:
    return secrets.token_urlsafe(32)


def csrf_token(key: str, session_id: uuid.UUID | None) -> str:
    """The form field for the session ``session_id`` (None: the login form) under the cookie ``key``."""
    message = LOGIN_MESSAGE if session_id is None else str(session_id)
    return hmac.new(key.encode(), message.encode(), hashlib.sha256).hexdigest()


def csrf_key_of(request: Request) -> str | None:
    value = request.cookies.get(cookie_name(request.app.state.settings, CSRF))
    return value if value and len(value) <= 100 else None


async def check_csrf(request: Request, session_id: uuid.UUID | None) -> None:
    """403 naming ``csrf_token`` unless the form's token is this session's under the CSRF cookie."""
    if request.method in SAFE_METHODS:
        return
    form = await request.form()
    sent = form.get(CSRF_FIELD)
    key = csrf_key_of(request)
    if not isinstance(sent, str) or key is None or not hmac.compare_digest(sent, csrf_token(key, session_id)):
        raise ApiError(
            status.HTTP_403_FORBIDDEN,
            "csrf_failed",
            "the form expired or did not come from this site; reload the page and try again",
            CSRF_FIELD,
            "body",
        )


@dataclass
class _Refreshed:
    tokens: Tokens | None  # None: the refresh token was refused
    at: float


class WebSessionMiddleware:
    """On ``/portal`` and ``/console``: the access cookie (refreshed when needed) becomes the bearer
    header; any ``Authorization`` header the browser sent is dropped (pages are cookie-only)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._recent: dict[str, _Refreshed] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        area = area_of(scope.get("path", "")) if scope["type"] == "http" else None
        if area is None:
            await self.app(scope, receive, send)
            return
        app = scope["app"]
        settings: Settings = app.state.settings
        request = Request(scope)
        access = request.cookies.get(cookie_name(settings, ACCESS))
        refresh = request.cookies.get(cookie_name(settings, REFRESH))
        extra: list[tuple[bytes, bytes]] = []
        token = access if access and self._valid(app, settings, access) else None
        if token is None and refresh:
            tokens = await self._refresh(app, settings, refresh)
            if tokens is not None:
                token = tokens.access.token
                extra = session_cookies(settings, area, tokens, None)
            else:
                extra = cleared_cookies(settings, area)
        headers = [(k, v) for k, v in scope["headers"] if k != b"authorization"]
        if token is not None:
            headers.append((b"authorization", f"Bearer {token}".encode()))
        scope = {**scope, "headers": headers}
        if not extra:
            await self.app(scope, receive, send)
            return

        async def send_with_cookies(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_cookies)

    @staticmethod
    def _valid(app: Any, settings: Settings, token: str) -> bool:
        try:
            verify_access_token(token, app.state.keys.keyset(), settings, now=app.state.clock())
        except InvalidToken:
            return False
        return True

    async def _refresh(self, app: Any, settings: Settings, refresh_token: str) -> Tokens | None:
        key = hashlib.sha256(refresh_token.encode("utf-8", "surrogatepass")).hexdigest()
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            self._forget_old()
            recent = self._recent.get(key)
            if recent is not None:
                return recent.tokens if recent.tokens and await self._live(app, settings, recent.tokens) else None
            tokens: Tokens | None
            try:
                with operator_scope():  # refresh tokens are no caller's rows (as /v1/auth/refresh)
                    async with app.state.sessionmaker() as session:
                        tokens = await auth.refresh(
                            session, app.state.keys.keyset(), settings, refresh_token=refresh_token,
                            now=app.state.clock(),
                        )  # fmt: skip
            except Unauthenticated:
                tokens = None
            self._recent[key] = _Refreshed(tokens, time.monotonic())
        self._locks.pop(key, None)
        return tokens

    @staticmethod
    async def _live(app: Any, settings: Settings, tokens: Tokens) -> bool:
        """Whether the session of ``tokens`` is still live, asked of the database (no cache)."""
        sid = verify_access_token(tokens.access.token, app.state.keys.keyset(), settings, now=app.state.clock())
        assert sid.session_id is not None
        with operator_scope():
            async with app.state.sessionmaker() as session:
                return not await auth.is_session_revoked(session, sid.session_id, auth.RevocationCache(0))

    def _forget_old(self) -> None:
        now = time.monotonic()
        for key in [k for k, v in self._recent.items() if now - v.at > REFRESH_GRACE]:
            del self._recent[key]


def safe_next(area: str, target: str | None, default: Iterable[str] = ()) -> str:
    """Where to go after signing in: a path inside the area (never another site), else its home."""
    home = next(iter(default), f"/{area}")
    if not target or not target.startswith(f"/{area}") or target.startswith("//") or "\\" in target:
        return home
    if target.rstrip("/").endswith("/login"):
        return home
    return target
