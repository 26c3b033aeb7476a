"""The web foundation and the portal's pages without a browser (the browser tests are
tests/test_portal_browser.py): the web route matrix generated from tests/web_policy.py, sign-in,
transparent refresh, sign-out revoking the session, CSRF, hostile input, formatting."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi.routing import APIRoute, iter_route_contexts
from sqlmodel import select

from api.main import create_app
from core.principal import Role
from core.settings import Environment, Settings
from core.temporal import connect
from devstack.services import free_port
from devstack.up import Stack, banner, login_lines
from devstack.users import Login
from schema.models import Meter, RefreshToken, Subscription, Tenant
from tests import factories
from tests.route_policy import OWNED_PARAMS, PUBLIC
from tests.test_api_support import api_client
from tests.test_route_matrix import Tenant as World
from tests.test_route_matrix import _tenant
from tests.web_policy import WEB_POLICY
from tests.web_support import csrf_for, csrf_of, sign_in, user
from web.format import Formatter
from web.session import ACCESS, AREAS, area_of, cookie_header

pytestmark = pytest.mark.db

ROLES = (Role.operator_admin, Role.operator, Role.tenant_admin, Role.tenant_member)


def web_routes() -> list[str]:
    app = create_app(Settings(database_url=None))
    found = []
    for context in iter_route_contexts(app.router.routes):
        path = str(context.path)
        if isinstance(context.original_route, APIRoute) and area_of(path) is not None:
            found += [f"{method} {path}" for method in sorted(context.methods or ())]
    return found


def test_every_page_has_a_policy_and_no_page_is_in_the_openapi_schema():
    routes = set(web_routes())
    assert sorted(routes - WEB_POLICY.keys()) == [], "pages without a decision in tests/web_policy.py"
    assert sorted(WEB_POLICY.keys() - routes) == [], "policy entries for pages that do not exist"
    schema = create_app(Settings(database_url=None)).openapi()
    assert not [p for p in schema["paths"] if area_of(p) is not None]


@pytest_asyncio.fixture
async def world(sessions, settings):
    cat = await factories.catalog(sessions)
    mine, theirs = await _tenant(sessions, cat), await _tenant(sessions, cat)
    emails = {role: await user(sessions, role, mine.tenant_id) for role in ROLES}
    unreachable = await connect(settings.model_copy(update={"temporal_address": f"127.0.0.1:{free_port()}"}), lazy=True)
    app = create_app(settings, temporal_client=unreachable)
    async with app.router.lifespan_context(app):
        yield app, mine, theirs, emails


def browser(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost", timeout=30)


def _path(template: str, target: World) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        return str(getattr(target, name)) if hasattr(target, name) else str(uuid.uuid4())

    return re.sub(r"\{(\w+)\}", value, template)


async def test_the_web_route_matrix(world):
    """anonymous -> redirect to the area's sign-in; another role -> 403; another tenant's row -> 404
    naming the path parameter; an allowed role -> neither (and never a 5xx but Temporal's 503)."""
    app, mine, theirs, emails = world
    problems: list[str] = []
    checked = 0
    clients: dict[str, httpx.AsyncClient | None] = {"anonymous": None}
    for role, email in emails.items():
        client = browser(app)
        for area in AREAS:  # one session per area (each area's cookies are scoped to its path)
            signed = await sign_in(client, area, email)
            assert signed.status_code == 303, signed.text
        clients[role.value] = client
    for operation, allowed in WEB_POLICY.items():
        if allowed == PUBLIC:
            continue
        assert isinstance(allowed, frozenset)
        method, template = operation.split(" ", 1)
        page_area = area_of(template)
        assert page_area is not None
        owned = [n for n in OWNED_PARAMS if "{" + n + "}" in template]
        for caller, signed_in in clients.items():
            cases = [("own", mine)] + ([("other", theirs)] if owned and caller.startswith("tenant") else [])
            for case, target in cases:
                client = signed_in or browser(app)
                posting = method == "POST" and signed_in is not None
                data = {"csrf_token": csrf_for(client, page_area)} if posting else {}
                response = await client.request(method, _path(template, target), data=data or None)
                checked += 1
                status, location = response.status_code, response.headers.get("location", "")
                if caller == "anonymous":
                    ok, expected = status == 303 and location.startswith(f"/{page_area}/login?next="), "303 to login"
                elif caller not in allowed:  # refused for the role (not, say, for the CSRF token)
                    ok, expected = status == 403 and 'data-field="Authorization"' in response.text, "403 (role)"
                elif case == "other":
                    fields = re.findall(r'data-field="([^"]*)"', response.text)
                    ok, expected = status == 404 and bool(set(fields) & set(owned)), f"404 naming {owned}"
                else:
                    ok = status not in (401, 403) and not location.startswith(f"/{page_area}/login") and status != 500
                    expected = "allowed"
                if not ok:
                    problems.append(f"{operation} as {caller} ({case}): {status} {location}, expected {expected}")
                if signed_in is None:
                    await client.aclose()
    for open_client in clients.values():
        if open_client is not None:
            await open_client.aclose()
    assert problems == [], "\n".join(problems)
    assert checked > 40


async def test_a_tenant_sees_only_their_invoices_and_amounts_in_their_locale(world, sessions):
    app, mine, theirs, emails = world
    async with sessions() as s:
        tenant = await s.get(Tenant, uuid.UUID(mine.tenant_id))
        assert tenant is not None
        tenant.locale, tenant.timezone = "de_DE", "Europe/Berlin"
        s.add(tenant)
        await s.commit()
    async with browser(app) as client:
        await sign_in(client, "portal", emails[Role.tenant_member])
        page = await client.get("/portal/invoices")
        assert page.status_code == 200
        assert mine.invoice_id in page.text and theirs.invoice_id not in page.text
        assert 'name="viewport"' in page.text
        detail = await client.get(f"/portal/invoices/{mine.invoice_id}")
        # the hand-made invoice (tests/credit_note_support.py): 64 000 minor units of USD, in German
        assert "640,00\xa0$" in detail.text and "1,00\xa0$" in detail.text  # and its credit note
        assert 'id="pay-button"' not in detail.text  # a member reads only


async def test_an_expired_access_token_is_refreshed_and_sign_out_revokes(world, sessions):
    app, _, _, emails = world
    async with browser(app) as client:
        await sign_in(client, "portal", emails[Role.tenant_admin])
        old_refresh = client.cookies.get("roomly_refresh")
        old_access = client.cookies.get("roomly_access")
        # The access token expires (AUTH_ACCESS_TTL, 600 s): two pages opened at once after that
        # both get through on one refresh, the session stays live (no "reuse" of the refresh token).
        started = app.state.clock()
        app.state.clock = lambda: started + timedelta(seconds=601)
        first, second = await asyncio.gather(client.get("/portal/account"), client.get("/portal/invoices"))
        assert first.status_code == second.status_code == 200, (first.text, second.text)
        assert client.cookies.get("roomly_access") != old_access
        assert client.cookies.get("roomly_refresh") not in (None, old_refresh)  # rotated
        account = await client.get("/portal/account")
        out = await client.post("/portal/logout", data={"csrf_token": csrf_of(account.text)})
        assert out.status_code == 303 and out.headers["location"] == "/portal/login"
    async with sessions() as s:
        rows = (await s.exec(select(RefreshToken))).all()
        assert rows and all(r.revoked_at is not None for r in rows if r.used_at is None)
    async with browser(app) as replay:  # the stolen refresh cookie is worthless after sign-out
        replay.cookies.set("roomly_refresh", str(client.cookies.get("roomly_refresh") or old_refresh))
        again = await replay.get("/portal/account")
        assert again.status_code == 303 and again.headers["location"].startswith("/portal/login")


async def test_forms_without_the_sessions_csrf_token_are_refused(world):
    app, mine, _, emails = world
    async with browser(app) as client:
        await sign_in(client, "portal", emails[Role.tenant_admin])
        for data in ({}, {"csrf_token": "0" * 64}):
            refused = await client.post(f"/portal/invoices/{mine.invoice_id}/pay", data=data)
            assert refused.status_code == 403 and 'data-field="csrf_token"' in refused.text
        async with browser(app) as other:  # a token of another session is worthless here
            await sign_in(other, "portal", emails[Role.tenant_member])
            foreign = csrf_of((await other.get("/portal/account")).text)
        refused = await client.post(f"/portal/invoices/{mine.invoice_id}/pay", data={"csrf_token": foreign})
        assert refused.status_code == 403
        # the sign-in form itself: a post without the login token is refused
        async with browser(app) as fresh:
            login = await fresh.post("/portal/login", data={"username": emails[Role.tenant_admin], "password": "x"})
            assert login.status_code == 403 and 'data-field="csrf_token"' in login.text
        cross = await client.post(
            "/portal/logout", data={"csrf_token": "x"}, headers={"Origin": "https://evil.example"}
        )
        assert cross.status_code == 403


async def test_hostile_input_is_a_4xx_page_naming_the_field(world):
    app, mine, _, emails = world
    async with browser(app) as client:
        await sign_in(client, "portal", emails[Role.tenant_member])
        cases = {
            "/portal/invoices/not-a-uuid": "invoice_id",
            "/portal/invoices?status=bogus": "status",
            f"/portal/invoices/{mine.invoice_id}?paid=%00": "paid",
            f"/portal/invoices/{mine.invoice_id}/payments/{uuid.uuid4()}/receipt": "attempt_id",
            f"/portal/invoices/{uuid.uuid4()}": "invoice_id",
        }
        for path, field in cases.items():
            page = await client.get(path)
            assert 400 <= page.status_code < 500, (path, page.status_code)
            assert page.headers["content-type"].startswith("text/html")
            assert f'data-field="{field}"' in page.text, (path, page.text)
        async with browser(app) as anonymous:
            form = await anonymous.get("/portal/login?next=https://evil.example/")
            assert 'name="next" value="/portal"' in form.text
            bad = await anonymous.post("/portal/login", data={"username": "", "password": "", "csrf_token": "x"})
            assert bad.status_code == 422 and 'data-field="username"' in bad.text
            token = csrf_of((await anonymous.get("/portal/login")).text)
            for field, value in (
                ("username", "a\x00b@example.com"),
                ("username", "x" * 400),
                ("password", "p\x00"),
                ("password", ""),
                ("next", "/portal/" + "x" * 3000),
                ("next", "/portal/\x00"),
            ):
                fields = {"username": "ada@example.com", "password": "pw", "next": "/portal", field: value}
                hostile = await anonymous.post("/portal/login", data={**fields, "csrf_token": token})
                assert hostile.status_code == 422 and f'data-field="{field}"' in hostile.text, (field, hostile.text)
            wrong = await sign_in(anonymous, "portal", emails[Role.tenant_member], password="not it")
            assert wrong.status_code == 401 and "Sign in" in wrong.text


async def test_usage_page_draws_a_chart_and_the_upcoming_invoice(world, sessions):
    app, mine, _, emails = world
    async with sessions() as s:
        sub = await s.get(Subscription, uuid.UUID(mine.subscription_id))
        meter = (await s.exec(select(Meter).where(Meter.code == "water"))).one()
    assert sub is not None
    await factories.usage(sessions, sub, meter, ["3.5", "4"], sub.current_period_start + timedelta(hours=1))
    async with browser(app) as client:
        await sign_in(client, "portal", emails[Role.tenant_member])
        page = await client.get("/portal/usage")
        assert page.status_code == 200, page.text
        chart = page.text.split('data-meter="water"', 1)[1].split("</svg>", 1)[0]
        assert "<svg" in chart and 'class="bar current"' in chart and "7.5" in chart
        assert 'id="upcoming"' in page.text and "Total so far" in page.text


def test_money_and_dates_follow_the_locale_and_time_zone():
    berlin = Formatter("de_DE", "Europe/Berlin")
    assert berlin.money(123456, "EUR") == "1.234,56\xa0€"
    assert Formatter("en_US").money(123456, "JPY") == "¥123,456"
    assert Formatter("en_US").money(5, "KWD") == "KWD0.005"  # three minor digits
    midnight_utc = datetime(2026, 1, 31, 23, 30, tzinfo=UTC)
    assert berlin.date(midnight_utc) == "01.02.2026"
    assert Formatter("en_US", "America/New_York").date(midnight_utc) == "Jan 31, 2026"


def test_make_up_prints_the_portal_and_the_tenant_admins_login():
    stack = Stack(Settings(database_url=None), "postgresql://x", "127.0.0.1:7233", None, "http://127.0.0.1:8000", None)
    logins = [
        Login("operator", "ops@roomly.local", "op-secret", "password"),
        Login("tenant admin (Lena Hoffmann)", "lena@example.com", "lena-secret", "password"),
    ]
    text = banner(stack, login_lines(stack, logins))
    assert "Tenant portal  http://127.0.0.1:8000/portal" in text
    assert "http://127.0.0.1:8000/portal/login" in text
    assert "sign in as tenant admin (Lena Hoffmann): lena@example.com   password lena-secret" in text
    assert "ops@roomly.local   password" not in text.split("Tenant portal (README")[1]


async def test_a_tenants_locale_is_set_through_the_api_and_checked(sessions, settings, temporal_env):
    async with api_client(settings, temporal_env.client) as api:
        created = await api.post(
            "/v1/tenants",
            json={"name": "Lena", "email": "lena@example.de", "currency": "EUR", "timezone": "Europe/Berlin",
                  "locale": "de-DE"},
        )  # fmt: skip
        assert created.status_code == 201 and created.json()["locale"] == "de_DE"
        tenant_id = created.json()["id"]
        bad = await api.patch(f"/v1/tenants/{tenant_id}", json={"locale": "xx_YY_bogus"})
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "locale"
        changed = await api.patch(f"/v1/tenants/{tenant_id}", json={"locale": "fr_FR"})
        assert changed.status_code == 200 and changed.json()["locale"] == "fr_FR"
        default = await api.post(
            "/v1/tenants", json={"name": "Ada", "email": "ada@example.com", "currency": "USD", "timezone": "UTC"}
        )
        assert default.json()["locale"] == "en_US"


async def test_an_admin_changes_the_details_and_bad_input_names_the_field(world, sessions):
    app, mine, _, emails = world
    async with browser(app) as client:
        await sign_in(client, "portal", emails[Role.tenant_admin])
        form = {
            "csrf_token": csrf_for(client), "name": "Grace Hopper", "email": "grace@example.com", "locale": "de-DE",
            "line1": "Hafenstraße 1", "postal_code": "20457", "city": "Hamburg", "country": "DE",
        }  # fmt: skip
        saved = await client.post("/portal/account", data=form)
        assert saved.status_code == 303 and saved.headers["location"] == "/portal/account?saved=details"
        page = await client.get(saved.headers["location"])
        assert "Your details are saved." in page.text and "Hafenstraße 1" in page.text
        for field, value, named in (
            ("country", "germany", "address.country"),
            ("email", "not-an-email", "email"),
            ("locale", "xx_bogus", "locale"),
            ("name", "a\x00b", "name"),
        ):
            refused = await client.post("/portal/account", data={**form, field: value})
            assert refused.status_code == 422 and f'data-field="{named}"' in refused.text, (field, refused.text)
        card = await client.post("/portal/account/payment-method", data={"csrf_token": csrf_for(client)})
        assert card.status_code == 422 and 'data-field="payment_method"' in card.text
        upload = await client.post(
            "/portal/account/payment-method", data={"csrf_token": csrf_for(client)}, files={"payment_method": b"x"}
        )
        assert upload.status_code == 422 and 'data-field="payment_method"' in upload.text
    async with sessions() as s:
        tenant = await s.get(Tenant, uuid.UUID(mine.tenant_id))
        assert tenant is not None
        assert (tenant.name, tenant.locale, tenant.address_city) == ("Grace Hopper", "de_DE", "Hamburg")


async def test_pages_are_not_cached_and_allow_only_this_sites_resources(world):
    app, _, _, emails = world
    async with browser(app) as client:
        login = await client.get("/portal/login")
        await sign_in(client, "portal", emails[Role.tenant_member])
        for page in (login, await client.get("/portal/invoices"), await client.get("/portal/nope")):
            assert page.headers["cache-control"] == "no-store"
            policy = page.headers["content-security-policy"]
            assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
            assert "<script>" not in page.text and " on" + "click=" not in page.text


def test_cookies_are_httponly_strict_path_scoped_and_secure_outside_local_and_test():
    for environment, secure in ((Environment.local, False), (Environment.test, False),
                                (Environment.staging, True), (Environment.production, True)):  # fmt: skip
        name, value = cookie_header(Settings.model_construct(environment=environment), "portal", ACCESS, "t", 600)
        attributes = {part.strip().split("=")[0].lower(): part for part in value.decode().split(";")}
        assert name == b"set-cookie"
        assert ("__secure-roomly_access" in attributes) is secure and ("roomly_access" in attributes) is not secure
        assert {"httponly", "path", "samesite", "max-age"} <= attributes.keys()
        assert attributes["path"].strip() == "Path=/portal" and attributes["samesite"].strip() == "SameSite=Strict"
        assert ("secure" in attributes) is secure
