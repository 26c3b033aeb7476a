"""What a page declares: its roles (``api.auth.allow``, the API's one dependency, unchanged) and,
for every state-changing request, the CSRF check bound to the caller's login session."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.deps import AuthenticatedPrincipal
from core.principal import Principal
from web.session import check_csrf


async def csrf_protected(request: Request, principal: AuthenticatedPrincipal) -> Principal:
    """Router-level on every signed-in web router: a POST without this session's token is a 403."""
    await check_csrf(request, principal.session_id)
    return principal


CsrfProtected = Annotated[Principal, Depends(csrf_protected)]
