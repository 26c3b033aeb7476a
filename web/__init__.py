"""The web interface: server-rendered pages over the same services and authorization as the API.

``install(app)`` (called by ``api.main.create_app``) adds the session middleware (cookies to the
bearer header, transparent refresh), the sign-in routes of both areas, the tenant portal, the
static files, and HTML answers for errors on web paths. Pages are not in the OpenAPI schema;
``tests/web_policy.py`` is their route table. The foundation's API for page authors is described
in ``docs/web.md``.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from web import console, errors, portal, signin
from web.render import STATIC, STATIC_PREFIX
from web.session import AREAS, WebSessionMiddleware


def install(app: FastAPI) -> None:
    errors.install(app)
    app.add_middleware(WebSessionMiddleware)
    for area in AREAS:
        app.include_router(signin.router_for(area))
    app.include_router(portal.router)
    app.include_router(console.router)
    app.mount(STATIC_PREFIX, StaticFiles(directory=STATIC), name="web-static")
