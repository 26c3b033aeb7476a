"""Every route x every kind of caller x own / other tenant, generated from ``tests/route_policy.py``.

- no token: 401 on every non-public route;
- a role the route does not allow: 403;
- an allowed role: neither 401 nor 403;
- a caller bound to tenant A naming tenant B's row in the path: 404 naming that path parameter,
  exactly as for an id that does not exist; naming B in a list's ``tenant_id`` filter: 404 too.

A route without an entry in the policy (or an entry without a route) fails the first test, so a
new route cannot ship without a decision about who may call it.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import pytest_asyncio

from api.main import create_app
from core.principal import Role
from core.settings import Settings
from core.temporal import connect
from devstack.services import free_port
from services import credit_notes
from services.credit_notes import CreditNoteLineInput
from tests import factories
from tests.credit_note_support import finalized_invoice
from tests.route_policy import OWNED_PARAMS, POLICY, PUBLIC, TENANT_ROLES
from tests.test_api_support import token_for

pytestmark = pytest.mark.db

CALLERS = ("anonymous", "operator_admin", "operator", "tenant_admin", "tenant_member", "meter_gateway")


def operations() -> list[str]:
    schema = create_app(Settings(database_url=None)).openapi()
    return [f"{method.upper()} {path}" for path, ops in schema["paths"].items() for method in ops]


def test_every_route_has_a_policy_and_every_policy_a_route():
    routes = set(operations())
    assert sorted(routes - POLICY.keys()) == [], "routes without a decision in tests/route_policy.py"
    assert sorted(POLICY.keys() - routes) == [], "policy entries for routes that do not exist"


@dataclass
class Tenant:
    tenant_id: str
    subscription_id: str
    invoice_id: str
    credit_note_id: str


async def _tenant(sessions: Any, cat: factories.Catalog) -> Tenant:
    sub = await factories.subscriber(sessions, cat, datetime(2026, 1, 10, tzinfo=UTC))
    invoice_id, _ = await finalized_invoice(sessions, sub)
    async with sessions() as session:
        note = await credit_notes.issue_credit_note(
            session, invoice_id, [CreditNoteLineInput("Goodwill", 100)], "order_change", refund=False
        )
    return Tenant(str(sub.tenant_id), str(sub.id), str(invoice_id), str(note.id))


@pytest_asyncio.fixture
async def world(sessions, settings):
    cat = await factories.catalog(sessions)
    mine, theirs = await _tenant(sessions, cat), await _tenant(sessions, cat)
    # Temporal is a closed port here: a route that reaches it answers 503 at once (after its
    # authorization, which is what this file checks) instead of waiting on a workflow no worker runs.
    unreachable = await connect(settings.model_copy(update={"temporal_address": f"127.0.0.1:{free_port()}"}), lazy=True)
    app = create_app(settings, temporal_client=unreachable)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=30) as client:
            yield client, mine, theirs


def _path(template: str, target: Tenant) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if hasattr(target, name):
            return str(getattr(target, name))
        if name == "action":
            return "pause"
        if name == "workflow_id":
            return "billing-run:none"
        if name == "payout_id":
            return "po_none"
        return str(uuid.uuid4())  # a catalog row or a gateway: not a tenant's

    return re.sub(r"\{(\w+)\}", value, template)


async def _call(client: httpx.AsyncClient, operation: str, target: Tenant, token: str | None, query: dict[str, str]):
    method, template = operation.split(" ", 1)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    kwargs: dict[str, Any] = {"headers": headers, "params": query}
    if method in ("POST", "PUT", "PATCH"):
        if template.endswith("/csv"):
            kwargs["files"] = {"file": ("usage.csv", b"tenant_id,meter,quantity,occurred_at,idempotency_key\n")}
        else:
            # Not an object: an allowed caller is answered 422 by validation, after authorization
            # and before the handler, so nothing waits on a workflow no worker runs here.
            kwargs["json"] = []
    return await client.request(method, _path(template, target), **kwargs)


def _owned_in(template: str) -> list[str]:
    return [name for name in OWNED_PARAMS if "{" + name + "}" in template]


async def test_the_route_matrix(world, settings):
    client, mine, theirs = world
    tokens: dict[str, str | None] = {"anonymous": None}
    for role in CALLERS[1:]:
        bound = mine.tenant_id if role in TENANT_ROLES else None
        tokens[role] = token_for(settings, Role(role), bound, subject=f"matrix-{role}")
    problems: list[str] = []
    checked = 0
    for operation in operations():
        allowed = POLICY[operation]
        if allowed == PUBLIC:
            continue
        assert isinstance(allowed, frozenset)
        template = operation.split(" ", 1)[1]
        owned = _owned_in(template)
        lists_tenants = operation.startswith("GET ") and not owned and "{" not in template
        for caller in CALLERS:
            token = tokens[caller]
            cases = [("own", mine)] + ([("other", theirs)] if caller in TENANT_ROLES and owned else [])
            for case, target in cases:
                response = await _call(client, operation, target, token, {})
                checked += 1
                status = response.status_code
                if caller == "anonymous":
                    expected: str = "401"
                    ok = status == 401
                elif caller not in allowed:
                    expected, ok = "403", status == 403
                elif case == "other":
                    fields = {e.get("field") for e in response.json().get("errors", [])} if status == 404 else set()
                    expected, ok = f"404 naming one of {owned}", status == 404 and bool(fields & set(owned))
                else:
                    expected, ok = "allowed (not 401/403)", status not in (401, 403)
                if not ok:
                    problems.append(
                        f"{operation} as {caller} ({case}): {status}, expected {expected}: {response.text[:160]}"
                    )
            if lists_tenants and caller in TENANT_ROLES and caller in allowed:
                # Asking a list for tenant B's rows: a 404 naming tenant_id, or none of B's rows.
                response = await _call(client, operation, mine, token, {"tenant_id": theirs.tenant_id})
                checked += 1
                if response.status_code == 404:
                    ok = response.json()["errors"][0]["field"] == "tenant_id"
                else:
                    rows = response.json().get("data", []) if response.status_code == 200 else []
                    ok = response.status_code == 200 and all(
                        theirs.tenant_id not in (row.get("tenant_id"), row.get("id")) for row in rows
                    )
                if not ok:
                    problems.append(
                        f"{operation} as {caller} with tenant_id=B: {response.status_code} {response.text[:160]}"
                    )
    assert problems == [], "\n".join(problems)
    assert checked > 300


async def test_lists_show_a_tenant_its_own_rows_only(world, settings):
    client, mine, theirs = world
    for role in ("tenant_admin", "tenant_member"):
        headers = {"Authorization": f"Bearer {token_for(settings, Role(role), mine.tenant_id)}"}
        for path, key in (
            ("/v1/tenants", "id"),
            ("/v1/subscriptions", "tenant_id"),
            ("/v1/invoices", "tenant_id"),
            ("/v1/credit-notes", "tenant_id"),
        ):
            rows = (await client.get(path, headers=headers)).json()["data"]
            assert rows and {row[key] for row in rows} == {mine.tenant_id}, (role, path)
            other = await client.get(path, headers=headers, params={"tenant_id": theirs.tenant_id})
            if path != "/v1/tenants":
                assert other.status_code == 404 and other.json()["errors"][0]["field"] == "tenant_id", (role, path)
    operator = {"Authorization": f"Bearer {token_for(settings)}"}
    everyone = (await client.get("/v1/invoices", headers=operator)).json()["data"]
    assert {row["tenant_id"] for row in everyone} == {mine.tenant_id, theirs.tenant_id}


async def test_another_tenants_pdf_is_a_404_not_a_download(world, settings):
    client, mine, theirs = world
    headers = {"Authorization": f"Bearer {token_for(settings, Role.tenant_member, mine.tenant_id)}"}
    refused = await client.get(f"/v1/invoices/{theirs.invoice_id}/pdf", headers=headers)
    unknown = await client.get(f"/v1/invoices/{uuid.uuid4()}/pdf", headers=headers)
    assert refused.status_code == unknown.status_code == 404
    assert refused.json()["errors"][0]["field"] == unknown.json()["errors"][0]["field"] == "invoice_id"


async def test_a_bound_meter_gateway_cannot_put_usage_on_another_tenant(world, settings, sessions):
    client, mine, theirs = world
    headers = {"Authorization": f"Bearer {token_for(settings, Role.meter_gateway, mine.tenant_id)}"}
    event = {
        "tenant_id": theirs.tenant_id,
        "meter": "electricity",
        "quantity": "999999",
        "occurred_at": "2026-01-20T10:00:00Z",
        "idempotency_key": "steal",
    }
    batch = await client.post("/v1/usage", json={"events": [event]}, headers=headers)
    assert batch.status_code == 200 and batch.json()["results"][0]["errors"][0]["field"] == "tenant_id"
    single = await client.post("/v1/usage/events", json=event, headers=headers)
    assert single.status_code == 422 and single.json()["errors"][0]["field"] == "tenant_id"
    refused = await client.get(f"/v1/invoices/{mine.invoice_id}", headers=headers)
    assert refused.status_code == 403  # a gateway reports usage and reads nothing
