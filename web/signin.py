"""Sign in and sign out, for either area (``/portal/login``, ``/console/login``): the security
issue's accounts and tokens (``services.auth``), kept in cookies (``web/session.py``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request, status
from fastapi.responses import RedirectResponse, Response

from api.deps import ClockDep, KeyStoreDep, SessionDep, SettingsDep
from api.middleware import client_address
from schema.scope import operator_scope
from services import auth, throttle
from services.errors import InvalidToken, Unauthenticated
from services.inputs import PgText
from services.tokens import verify_access_token
from web.render import render
from web.session import (
    CSRF,
    REFRESH,
    check_csrf,
    cleared_cookies,
    cookie_header,
    cookie_name,
    csrf_key_of,
    new_csrf_key,
    safe_next,
    session_cookies,
)

# As the token route's fields: no NUL (they reach SQL parameters), bounded.
Email = Annotated[str, PgText, Form(min_length=3, max_length=320)]
Password = Annotated[str, PgText, Form(min_length=1, max_length=auth.PASSWORD_MAX_LENGTH)]
Next = Annotated[str | None, PgText, Form(max_length=2000)]


def _login_page(request: Request, area: str, next_url: str, error: str | None, status_code: int) -> Response:
    """The form; a CSRF cookie is set when the browser has none yet (the login double submit)."""
    settings = request.app.state.settings
    key = csrf_key_of(request)
    fresh = key is None
    if key is None:
        key = new_csrf_key()
    response = render(
        request, "login.html", title="Sign in", next_url=next_url, error=error, status_code=status_code,
        action=f"/{area}/login", csrf_key=key,
    )  # fmt: skip
    if fresh:
        response.raw_headers.append(cookie_header(settings, area, CSRF, key, settings.auth_refresh_ttl))
    return response


def router_for(area: str) -> APIRouter:
    router = APIRouter(prefix=f"/{area}", include_in_schema=False)

    @router.get("/login")
    async def login_form(request: Request, next: str | None = None) -> Response:
        return _login_page(request, area, safe_next(area, next), None, status.HTTP_200_OK)

    @router.post("/login")
    async def login(
        request: Request,
        session: SessionDep,
        settings: SettingsDep,
        keys: KeyStoreDep,
        clock: ClockDep,
        username: Email,
        password: Password,
        next: Next = None,
    ) -> Response:
        """The token route's password grant, answered with cookies and a redirect."""
        await check_csrf(request, None)
        target = safe_next(area, next)
        address = client_address(request) or "unknown"
        hit = [
            throttle.throttle_key("account", auth.normalize_email(username)),
            throttle.throttle_key("address", address),
        ]
        with operator_scope():  # accounts and refresh tokens are no caller's rows
            await throttle.hit(
                session, hit, limit=settings.auth_rate_limit_count, window=settings.auth_rate_limit_window, now=clock()
            )
            try:
                tokens = await auth.login_password(
                    session, keys.keyset(), settings, username=username, password=password, now=clock()
                )
            except Unauthenticated as refused:
                return _login_page(request, area, target, refused.message, status.HTTP_401_UNAUTHORIZED)
        response = RedirectResponse(target, status_code=status.HTTP_303_SEE_OTHER)
        # A new CSRF key for the new session (a key planted before sign-in is not kept).
        response.raw_headers.extend(session_cookies(settings, area, tokens, new_csrf_key()))
        return response

    @router.post("/logout")
    async def logout(
        request: Request, session: SessionDep, settings: SettingsDep, keys: KeyStoreDep, clock: ClockDep
    ) -> Response:
        """Revoke the session (as ``POST /v1/auth/logout``) and clear the cookies. The CSRF token is
        the session's (or the login form's kind when the session is already gone)."""
        refresh_token = request.cookies.get(cookie_name(settings, REFRESH))
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        try:
            session_id = verify_access_token(bearer, keys.keyset(), settings, now=clock()).session_id
        except InvalidToken:
            session_id = None
        await check_csrf(request, session_id)
        if refresh_token:
            with operator_scope():
                await auth.logout(session, refresh_token=refresh_token, now=clock())
        if session_id is not None:  # this process refuses the session's access tokens at once
            request.app.state.revocations.remember(session_id, True)
        response = RedirectResponse(f"/{area}/login", status_code=status.HTTP_303_SEE_OTHER)
        response.raw_headers.extend(cleared_cookies(settings, area))
        return response

    return router
