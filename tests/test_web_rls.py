"""The portal with the app logged in as a member of billing_app (row-level security on), as
``make up`` runs it: signing in (the throttle and the accounts in operator scope), every page in
the tenant's scope (its own rows only; another tenant's invoice a 404), changing the account,
signing out. The data is tests/test_rls.py's: two tenants with everything a tenant has."""

from __future__ import annotations

import httpx
import pytest

from api.main import create_app
from core.principal import Role
from schema.models import Tenant
from schema.scope import operator_scope
from tests.test_rls import app_engine, app_sessions, app_url, seeded  # noqa: F401 (fixtures)
from tests.web_support import csrf_for, sign_in, user

pytestmark = pytest.mark.db


async def test_the_portal_as_billing_app_shows_a_tenant_its_own_rows_only(
    app_sessions,  # noqa: F811
    app_url,  # noqa: F811
    seeded,  # noqa: F811
    settings,
    temporal_env,
):
    a, b = seeded.a, seeded.b
    email = await user(app_sessions, Role.tenant_admin, a)
    configured = settings.model_copy(update={"database_url": app_url})
    app = create_app(configured, temporal_client=temporal_env.client)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=30) as client:
            signed = await sign_in(client, "portal", email)
            assert signed.status_code == 303, signed.text
            invoices = await client.get("/portal/invoices")
            assert invoices.status_code == 200
            assert str(seeded.invoices[a]) in invoices.text and str(seeded.invoices[b]) not in invoices.text
            mine = await client.get(f"/portal/invoices/{seeded.invoices[a]}")
            assert mine.status_code == 200 and "CN-" in mine.text  # its credit note
            theirs = await client.get(f"/portal/invoices/{seeded.invoices[b]}")
            assert theirs.status_code == 404 and 'data-field="invoice_id"' in theirs.text
            for page in ("/portal/usage", "/portal/account"):
                answer = await client.get(page)
                assert answer.status_code == 200, (page, answer.text)
            account = await client.get("/portal/account")
            assert "payment receipt" in account.text  # the notice seeded for A
            changed = await client.post(
                "/portal/account",
                data={"csrf_token": csrf_for(client), "name": "Ada L.", "email": "ada@example.com", "city": "London"},
            )
            assert changed.status_code == 303, changed.text
            out = await client.post("/portal/logout", data={"csrf_token": csrf_for(client)})
            assert out.status_code == 303
            again = await client.get("/portal/invoices")
            assert again.status_code == 303 and again.headers["location"].startswith("/portal/login")
    with operator_scope():
        async with app_sessions() as s:
            tenant = await s.get(Tenant, a)
            assert tenant is not None and (tenant.name, tenant.address_city) == ("Ada L.", "London")
