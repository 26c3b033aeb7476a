"""Rendering a page: one Jinja2 environment (autoescaped) over ``web/templates``.

A page handler returns ``render(request, "portal/invoices.html", caller=caller, fmt=fmt, **context)``.
Every template extends ``base.html`` and gets ``request``, ``area`` (``portal`` / ``console``),
``principal`` (or None), ``csrf_field`` (the hidden input every POST form must contain), ``fmt``
(a :class:`web.format.Formatter`) and ``static(name)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup, escape

from api.auth import Caller
from core.principal import Principal
from web.format import Formatter
from web.session import CSRF_FIELD, area_of, csrf_key_of, csrf_token

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
STATIC_PREFIX = "/web-static"

environment = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,  # a misspelt name fails the page's test, not silently blank
    trim_blocks=True,
    lstrip_blocks=True,
)

# Every page: never kept by caches (a tenant's money), and a policy that lets the browser load and
# send nothing but this site's own files and forms (no inline script, no framing).
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}


def static(name: str) -> str:
    return f"{STATIC_PREFIX}/{name}"


def csrf_field(request: Request, principal: Principal | None, key: str | None = None) -> Markup:
    """The hidden input of a POST form for this browser's session (``key``: the CSRF cookie being
    set with this answer; default the one the browser sent; empty without one)."""
    key = key or csrf_key_of(request)
    value = csrf_token(key, principal.session_id if principal else None) if key else ""
    return Markup(f'<input type="hidden" name="{CSRF_FIELD}" value="{escape(value)}">')  # noqa: S704 (escaped)


def render(
    request: Request,
    template: str,
    *,
    caller: Caller | None = None,
    principal: Principal | None = None,
    fmt: Formatter | None = None,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
    csrf_key: str | None = None,
    **context: Any,
) -> HTMLResponse:
    who = caller.principal if caller is not None else principal
    context.setdefault("title", "")
    context.setdefault("message", None)  # a line shown above the content (base.html's messages block)
    page = environment.get_template(template).render(
        request=request,
        area=area_of(request.url.path) or "portal",
        principal=who,
        csrf_field=csrf_field(request, who, csrf_key),
        fmt=fmt or Formatter(),
        static=static,
        **context,
    )
    return HTMLResponse(page, status_code=status_code, headers={**PAGE_HEADERS, **(headers or {})})
