"""Every list route is one envelope with keyset cursor pages: walked to the end while rows are
being added, it returns each row that existed at the start exactly once, and never a row twice."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio

from schema.models import Invoice
from tests import factories
from tests.test_api_support import api_client, created, meter, plan, room, tenant

pytestmark = pytest.mark.db


@pytest_asyncio.fixture
async def api(sessions, settings, temporal_env):
    async with api_client(settings, temporal_env.client) as client:
        yield client


def _code() -> str:
    return f"c{uuid.uuid4().hex[:10]}"


async def _invoice(sessions, cat: factories.Catalog) -> str:
    sub = await factories.subscriber(sessions, cat, datetime(2026, 1, 1, tzinfo=UTC), name=_code())
    row = Invoice(
        tenant_id=sub.tenant_id,
        subscription_id=sub.id,
        period_start=datetime(2026, 1, 1, tzinfo=UTC),
        period_end=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(days=31),
        currency="USD",
        subtotal=1,
        total=1,
        workflow_id=_code(),
    )
    async with sessions() as s:
        s.add(row)
        await s.commit()
    return str(row.id)


def makers(api, sessions) -> dict[str, Callable[[], Awaitable[str]]]:
    """Per list route, how to add one row (returning its id)."""

    async def a_tenant() -> str:
        return str((await tenant(api))["id"])

    async def a_meter() -> str:
        return str((await meter(api, _code()))["id"])

    async def a_plan() -> str:
        return str((await plan(api, _code()))["id"])

    async def a_room() -> str:
        return str((await room(api, (await plan(api, _code()))["id"]))["id"])

    async def a_promo() -> str:
        body = {"code": _code().upper(), "percent_off": 10, "duration": "once"}
        return str((await created(api, "/v1/promo-codes", body))["id"])

    async def a_subscription() -> str:
        r = await room(api, (await plan(api, _code()))["id"])
        t = await tenant(api)
        body = {"tenant_id": t["id"], "room_id": r["id"], "started_at": "2026-01-10T10:00:00Z"}
        return str((await created(api, "/v1/subscriptions", body))["id"])

    catalogs: list[factories.Catalog] = []

    async def an_invoice() -> str:
        if not catalogs:
            catalogs.append(await factories.catalog(sessions))
        return await _invoice(sessions, catalogs[0])

    return {
        "/v1/tenants": a_tenant,
        "/v1/meters": a_meter,
        "/v1/plans": a_plan,
        "/v1/rooms": a_room,
        "/v1/promo-codes": a_promo,
        "/v1/subscriptions": a_subscription,
        "/v1/invoices": an_invoice,
    }


@pytest.mark.parametrize(
    "path",
    ["/v1/tenants", "/v1/meters", "/v1/plans", "/v1/rooms", "/v1/promo-codes", "/v1/subscriptions", "/v1/invoices"],
)
async def test_walking_a_list_while_rows_are_added_returns_each_row_once(api, sessions, path):
    add = makers(api, sessions)[path]
    before = [await add() for _ in range(7)]
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, str | int] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        response = await api.get(path, params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        assert set(page) == {"data", "has_more", "next_cursor"} and len(page["data"]) <= 2
        seen += [row["id"] for row in page["data"]]
        pages += 1
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        if pages <= 4:
            await add()  # a row added mid-walk comes after every existing one
        cursor = page["next_cursor"]
    assert len(seen) == len(set(seen))  # no row twice
    assert [i for i in seen if i in before] == before  # every row there at the start, once, in order
    assert len(seen) == 11  # and the 4 added during the walk, at the end
