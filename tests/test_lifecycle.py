"""Subscription lifecycle: cancel (at the period end, now, at an instant), plan change, tenant
update with a time-zone change; the transitions a state does not allow; and the final invoice
through real billing runs on the time-skipping Temporal server, real PostgreSQL and Chromium.

Money is checked against amounts worked out by hand in the comments (rules: docs/pricing.md).
"""

from __future__ import annotations

import io
import uuid
from dataclasses import replace
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import hypothesis
import pytest
import pytest_asyncio
from dateutil.relativedelta import relativedelta
from hypothesis import given
from hypothesis import strategies as st
from pypdf import PdfReader
from sqlmodel import col, select

from adapters.storage import LocalDocumentStore
from billing.periods import Interval, ZoneChange
from billing.pricing import (
    Aggregation,
    FieldError,
    LineKind,
    Meter,
    MeteredCharge,
    Move,
    PerUnit,
    Plan,
    Subscription,
    UsageEvent,
    build_invoice,
    slice_usage,
)
from schema.models import Invoice, InvoiceLine, InvoiceStatus, RoomAssignment, SubscriptionStatus, Tenant
from schema.models import Subscription as SubscriptionRow
from services import invoicing
from tests.test_api_pricing import subscription
from tests.test_api_support import api_client, created, error_locs, meter, plan, room, tenant
from tests.test_billing_workflows import start_run
from worker import build_worker
from workflows.contracts import CreateInvoiceInput, InvoiceCycleResult

START = "2026-01-10T10:00:00+00:00"  # anchor 2026-01-10T00:00Z (tenant in UTC); monthly, 65000 a month


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


# The engine: what an end allows


STUDIO = Plan("studio", "Studio", "EUR", Interval.month, 50000)
SUITE = Plan("suite", "Suite", "EUR", Interval.month, 80000)
BERLIN_JAN_1 = datetime(2026, 1, 1, tzinfo=UTC) - timedelta(hours=1)


def test_the_final_invoice_is_the_last_and_bills_no_period_in_advance():
    ends_at = datetime(2026, 1, 20, 14, tzinfo=UTC)  # 15:00 in Berlin
    sub = Subscription(BERLIN_JAN_1, "Europe/Berlin", STUDIO, ends_at=ends_at)
    final = build_invoice(sub, 1)
    assert final.final and final.issued_at == ends_at
    assert (final.period.start, final.period.end) == (ends_at, ends_at)
    assert final.settled is not None and (final.settled.start, final.settled.end) == (BERLIN_JAN_1, ends_at)
    assert not build_invoice(sub, 0).final
    with pytest.raises(FieldError) as raised:
        build_invoice(sub, 2)
    assert raised.value.field == "index"


@pytest.mark.parametrize(
    "ends_at",
    [
        BERLIN_JAN_1,  # at the start
        BERLIN_JAN_1 - timedelta(days=1),  # before it
        datetime(2026, 1, 11, 8, tzinfo=UTC),  # at the move
        datetime(2026, 1, 5),  # naive
    ],
)
def test_an_end_must_come_after_the_start_and_every_move(ends_at):
    move = Move(datetime(2026, 1, 11, 8, tzinfo=UTC), SUITE)
    with pytest.raises(FieldError) as raised:
        Subscription(BERLIN_JAN_1, "Europe/Berlin", STUDIO, moves=(move,), ends_at=ends_at)
    assert raised.value.field == "ends_at"


# The API


@pytest_asyncio.fixture
async def api(sessions, settings, temporal_env):
    async with api_client(settings, temporal_env.client) as client:
        yield client


async def _set_invoiced(sessions, sub_id: str, next_index: int, next_at: datetime) -> None:
    """Pretend boundaries before ``next_index`` were invoiced (as create_invoice leaves the row)."""
    async with sessions() as s:
        row = await s.get(SubscriptionRow, uuid.UUID(sub_id))
        assert row is not None
        row.next_invoice_index, row.next_invoice_at = next_index, next_at
        s.add(row)
        await s.commit()


async def _recent_subscription(api, room_id: str) -> tuple[dict[str, Any], datetime]:
    """A subscription that started 3 days ago (UTC tenant): now is in its first period."""
    started = datetime.now(UTC) - timedelta(days=3)
    sub = await subscription(api, room_id, started_at=started.isoformat())
    anchor = started.replace(hour=0, minute=0, second=0, microsecond=0)
    assert ts(sub["anchor_at"]) == anchor
    return sub, anchor


async def _refused_while_ending(api, sub: dict[str, Any], other_room: str, field: str) -> None:
    """Move, plan change and promo codes are refused with 409 naming ``field``."""
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    sub_path = f"/v1/subscriptions/{sub['id']}"
    for path, body in (
        ("move-room", {"room_id": other_room, "effective_at": later}),
        ("change-plan", {"plan_id": sub["plan_id"], "effective_at": later}),
        ("promo-codes", {"code": "ANY"}),
    ):
        response = await api.post(f"{sub_path}/{path}", json=body)
        assert response.status_code == 409, (path, response.text)
        assert response.json()["errors"][0]["field"] == f"{field}", response.text


@pytest.mark.db
async def test_cancel_at_period_end_keeps_it_active_until_its_final_boundary(api, sessions):
    first = await room(api, (await plan(api))["id"])
    second = await room(api, first["plan_id"])
    sub, anchor = await _recent_subscription(api, first["id"])
    response = await api.post(f"/v1/subscriptions/{sub['id']}/cancel", json={"at": "period_end"})
    assert response.status_code == 200, response.text
    canceled = response.json()
    period_end = anchor + relativedelta(months=1)  # the end of period 0, which holds now
    assert canceled["status"] == "active" and canceled["cancel_at_period_end"] is True
    assert ts(canceled["ends_at"]) == ts(canceled["final_invoice_at"]) == period_end
    assert canceled["final_invoice_workflow_id"] is None and canceled["final_invoiced"] is False
    assert abs(ts(canceled["canceled_at"]) - datetime.now(UTC)) < timedelta(minutes=1)
    assert ts(canceled["next_invoice_at"]) == anchor  # boundary 0 is still to invoice
    shown = (await api.get(f"/v1/subscriptions/{sub['id']}")).json()
    assert shown["ends_at"] == canceled["ends_at"] and shown["cancel_at_period_end"] is True

    again = await api.post(f"/v1/subscriptions/{sub['id']}/cancel", json={"at": "now"})
    assert again.status_code == 409 and again.json()["errors"][0]["field"] == "ends_at"
    assert "already scheduled to cancel" in again.json()["errors"][0]["message"]
    await _refused_while_ending(api, sub, second["id"], "ends_at")
    new = await api.post("/v1/subscriptions", json={"tenant_id": sub["tenant_id"], "room_id": second["id"]})
    assert new.status_code == 409 and new.json()["errors"][0]["field"] == "tenant_id"
    assert "scheduled to end" in new.json()["errors"][0]["message"]
    async with sessions() as s:
        [assignment] = (await s.exec(select(RoomAssignment))).all()
    assert assignment.effective_to is None  # the room in force up to the end (and at the final boundary)

    # Withdrawn before the end: active again, as before the cancel; a second withdrawal is a 409.
    withdrawn = await api.delete(f"/v1/subscriptions/{sub['id']}/cancel")
    assert withdrawn.status_code == 200, withdrawn.text
    shown = (await api.get(f"/v1/subscriptions/{sub['id']}")).json()
    assert withdrawn.json() == shown
    assert {k: shown[k] for k in ("status", "ends_at", "canceled_at", "cancel_at_period_end", "next_invoice_at")} == {
        "status": "active", "ends_at": None, "canceled_at": None, "cancel_at_period_end": False,
        "next_invoice_at": sub["next_invoice_at"],
    }  # fmt: skip
    again = await api.delete(f"/v1/subscriptions/{sub['id']}/cancel")
    assert again.status_code == 409 and again.json()["errors"][0]["field"] == "ends_at"


@pytest.mark.db
async def test_cancel_now_cancels_at_once_and_a_new_subscription_may_start_the_next_day(api, sessions):
    first = await room(api, (await plan(api))["id"])
    second = await room(api, first["plan_id"])
    sub, anchor = await _recent_subscription(api, first["id"])
    before = datetime.now(UTC).replace(microsecond=0)
    response = await api.post(f"/v1/subscriptions/{sub['id']}/cancel", json={"at": "now"})
    assert response.status_code == 200, response.text
    canceled = response.json()
    assert canceled["status"] == "canceled" and canceled["cancel_at_period_end"] is False
    assert before <= ts(canceled["ends_at"]) <= datetime.now(UTC) and ts(canceled["ends_at"]).microsecond == 0
    # Boundary 0 is not invoiced yet: the next billing run issues it, then the final invoice.
    assert canceled["final_invoice_workflow_id"] is None and ts(canceled["next_invoice_at"]) == anchor

    again = await api.post(f"/v1/subscriptions/{sub['id']}/cancel", json={"at": "now"})
    assert again.status_code == 409 and again.json()["errors"][0]["field"] == "status"
    assert "already canceled" in again.json()["errors"][0]["message"]
    await _refused_while_ending(api, sub, second["id"], "status")
    withdrawn = await api.delete(f"/v1/subscriptions/{sub['id']}/cancel")
    assert withdrawn.status_code == 409 and withdrawn.json()["errors"][0]["field"] == "status"

    # Usage up to the end is the old subscription's: a new one is anchored at local midnight of its
    # start day, so it may start only on a later day.
    body = {"tenant_id": sub["tenant_id"], "room_id": second["id"]}
    today = await api.post("/v1/subscriptions", json={**body, "started_at": datetime.now(UTC).isoformat()})
    assert error_locs(today) == [["body", "started_at"]]
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    renewed = await created(api, "/v1/subscriptions", {**body, "started_at": tomorrow})
    assert renewed["status"] == "active" and renewed["id"] != sub["id"]


@pytest.mark.db
async def test_cancel_refusals_name_the_field(api, sessions):
    r = await room(api, (await plan(api))["id"])
    sub = await subscription(api, r["id"])  # anchored 2026-01-10
    path = f"/v1/subscriptions/{sub['id']}/cancel"
    assert error_locs(await api.post(path, json={})) == [["body", "at"]]
    both = {"at": "now", "cancel_at": "2026-02-01T00:00:00Z"}
    assert error_locs(await api.post(path, json=both)) == [["body", "at"]]
    assert error_locs(await api.post(path, json={"at": "tomorrow"})) == [["body", "at"]]
    assert error_locs(await api.post(path, json={"cancel_at": "2026-02-01T00:00:00"})) == [["body", "cancel_at"]]
    far = (datetime.now(UTC) + timedelta(days=400)).isoformat()
    assert error_locs(await api.post(path, json={"cancel_at": far})) == [["body", "cancel_at"]]
    # Boundaries 0 and 1 invoiced: the end must come after boundary 1 (2026-02-10).
    await _set_invoiced(sessions, sub["id"], 2, datetime(2026, 3, 10, tzinfo=UTC))
    for instant in ("2026-02-10T00:00:00Z", "2026-02-09T12:00:00Z"):
        refused = await api.post(path, json={"cancel_at": instant})
        assert error_locs(refused) == [["body", "cancel_at"]] and "last boundary invoiced" in refused.text
    missing = await api.post(f"/v1/subscriptions/{uuid.uuid4()}/cancel", json={"at": "now"})
    assert missing.status_code == 404
    assert (await api.get(f"/v1/subscriptions/{sub['id']}")).json()["ends_at"] is None


@pytest.mark.db
async def test_cancel_before_a_scheduled_move_is_refused(api):
    small = await room(api, (await plan(api))["id"])
    large = await room(api, small["plan_id"])
    sub, _ = await _recent_subscription(api, small["id"])
    soon = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0)
    moved = await api.post(
        f"/v1/subscriptions/{sub['id']}/move-room", json={"room_id": large["id"], "effective_at": soon.isoformat()}
    )
    assert moved.status_code == 200, moved.text
    refused = await api.post(f"/v1/subscriptions/{sub['id']}/cancel", json={"at": "now"})
    assert refused.status_code == 409 and refused.json()["errors"][0]["field"] == "room_id"
    ok = await api.post(f"/v1/subscriptions/{sub['id']}/cancel", json={"at": "period_end"})
    assert ok.status_code == 200 and ok.json()["status"] == "active"


@pytest.mark.db
async def test_change_plan_to_a_new_version_is_prorated_like_a_move(api, sessions):
    v1 = await plan(api)
    r = await room(api, v1["id"])
    sub = await subscription(api, r["id"])  # anchored 2026-01-10, period 0 Jan 10 .. Feb 9 (31 days)
    v2 = await created(api, "/v1/plans", {"code": "standard", "name": "Standard room", "currency": "USD",
                                          "interval": "month", "base_fee": 70000})  # fmt: skip
    assert v2["version"] == 2
    path = f"/v1/subscriptions/{sub['id']}/change-plan"
    response = await api.post(path, json={"plan_id": v2["id"], "effective_at": "2026-01-20T00:00:00Z"})
    assert response.status_code == 200, response.text
    changed = response.json()
    assert changed["plan_id"] == v2["id"] and changed["room_id"] == r["id"]
    async with sessions() as s:
        rows = (await s.exec(select(RoomAssignment).order_by(col(RoomAssignment.effective_from)))).all()
    assert [(str(a.room_id), str(a.plan_id), a.effective_to) for a in rows] == [
        (r["id"], v1["id"], datetime(2026, 1, 20, tzinfo=UTC)),
        (r["id"], v2["id"], None),
    ]
    # The invoice at boundary 1 (Feb 10), previewed once boundary 0 is invoiced:
    # Jan 20..Feb 9 = 21 of 31 days. Credit v1: 65000 x 21/31 = 1365000/31; 31 x 44032 = 1364992,
    # remainder 8 -> 44032.26 -> -44032. Charge v2: 70000 x 21/31 = 1470000/31; 31 x 47419 = 1469989,
    # remainder 11 -> 47419.35 -> 47419. March... February in advance at v2: 70000.
    await _set_invoiced(sessions, sub["id"], 1, datetime(2026, 2, 10, tzinfo=UTC))
    preview = (
        await api.get(f"/v1/subscriptions/{sub['id']}/upcoming-invoice", params={"as_of": "2026-02-10T00:00:00Z"})
    ).json()
    assert [(line["kind"], line["amount"], line["days"]) for line in preview["lines"]] == [
        ("proration", -44032, 21),
        ("proration", 47419, 21),
        ("base_fee", 70000, None),
    ]
    assert preview["total"] == 73387


@pytest.mark.db
async def test_change_plan_refusals(api, sessions):
    v1 = await plan(api)
    r = await room(api, v1["id"])
    sub = await subscription(api, r["id"])
    euro = await plan(api, "euro", currency="EUR")
    weekly = await created(api, "/v1/plans", {"code": "weekly", "name": "W", "currency": "USD", "interval": "week",
                                              "base_fee": 100})  # fmt: skip
    path = f"/v1/subscriptions/{sub['id']}/change-plan"

    async def refused(plan_id: str, effective_at: str = "2026-01-20T00:00:00Z") -> list[list[str | int]]:
        return error_locs(await api.post(path, json={"plan_id": plan_id, "effective_at": effective_at}))

    same = await api.post(path, json={"plan_id": v1["id"], "effective_at": "2026-01-20T00:00:00Z"})
    assert error_locs(same) == [["body", "plan_id"]] and "already on plan 'standard' v1" in same.text
    assert await refused(euro["id"]) == [["body", "plan_id"]]
    assert await refused(weekly["id"]) == [["body", "plan_id"]]
    assert await refused(str(uuid.uuid4())) == [["body", "plan_id"]]
    other = await plan(api, "other")
    assert await refused(other["id"], "2026-01-10T00:00:00Z") == [["body", "effective_at"]]  # the anchor
    await _set_invoiced(sessions, sub["id"], 2, datetime(2026, 3, 10, tzinfo=UTC))
    assert await refused(other["id"], "2026-02-10T00:00:00Z") == [["body", "effective_at"]]  # boundary 1
    ok = await api.post(path, json={"plan_id": other["id"], "effective_at": "2026-02-10T00:00:01Z"})
    assert ok.status_code == 200, ok.text
    async with sessions() as s:
        assert len((await s.exec(select(RoomAssignment))).all()) == 2


@pytest.mark.db
async def test_update_a_tenant(api, sessions):
    t = await tenant(api)
    assert t["address"] is None and t["timezone_effective_at"] is None
    path = f"/v1/tenants/{t['id']}"
    address = {"line1": "Hauptstr. 1", "city": "Berlin", "postal_code": "10115", "country": "DE"}
    response = await api.patch(path, json={"name": "Ada King", "email": "ada@king.example", "address": address})
    assert response.status_code == 200, response.text
    updated = response.json()
    assert updated["name"] == "Ada King" and updated["email"] == "ada@king.example"
    assert updated["address"] == {**address, "line2": None, "state": None}
    assert updated["timezone"] == "UTC" and updated["currency"] == "USD"
    assert (await api.get(path)).json() == updated
    assert (await api.patch(path, json={"address": None})).json()["address"] is None
    with_address = await created(api, "/v1/tenants", {"name": "B", "email": "b@example.com", "currency": "EUR",
                                                      "timezone": "UTC", "address": {"city": "Porto"}})  # fmt: skip
    assert with_address["address"] == {"line1": None, "line2": None, "city": "Porto", "postal_code": None,
                                       "state": None, "country": None}  # fmt: skip

    for body, field in (
        ({"currency": "EUR"}, "currency"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"name": None}, "name"),
        ({"email": "not-an-email"}, "email"),
        ({"address": {"country": "Germany"}}, "address"),
        ({"plan": "x"}, "plan"),
    ):
        assert error_locs(await api.patch(path, json=body))[0][:2] == ["body", field], body
    assert "cannot change" in (await api.patch(path, json={"currency": "EUR"})).text
    assert (await api.patch(f"/v1/tenants/{uuid.uuid4()}", json={"name": "X"})).status_code == 404

    # Without a subscription being billed, a new zone is in force at once.
    moved = (await api.patch(path, json={"timezone": "Europe/Berlin"})).json()
    assert moved["timezone"] == "Europe/Berlin"
    assert abs(ts(moved["timezone_effective_at"]) - datetime.now(UTC)) < timedelta(minutes=1)


@pytest.mark.db
async def test_a_time_zone_change_takes_effect_at_the_next_boundary_not_yet_invoiced(api, sessions):
    r = await room(api, (await plan(api))["id"])
    sub = await subscription(api, r["id"])  # UTC tenant, anchored 2026-01-10T00:00Z
    await _set_invoiced(sessions, sub["id"], 2, datetime(2026, 3, 10, tzinfo=UTC))  # boundaries 0, 1 invoiced
    path = f"/v1/tenants/{sub['tenant_id']}"
    changed = (await api.patch(path, json={"timezone": "Asia/Tokyo"})).json()
    assert changed["timezone"] == "Asia/Tokyo"
    # Boundary 2 keeps its instant (it ends the period billed in advance); from it on, Tokyo.
    assert ts(changed["timezone_effective_at"]) == datetime(2026, 3, 10, tzinfo=UTC)
    async with sessions() as s:
        row = await s.get(SubscriptionRow, uuid.UUID(sub["id"]))
    assert row is not None and row.timezone == "UTC"
    assert row.timezone_changes == [{"from_index": 2, "timezone": "Asia/Tokyo"}]
    # Period 2 ends at Tokyo midnight of Apr 10: 2026-04-09T15:00Z (Tokyo is UTC+9, no DST).
    preview = await api.get(f"/v1/subscriptions/{sub['id']}/upcoming-invoice", params={"as_of": "2026-03-10T00:00:00Z"})
    assert ts(preview.json()["period_start"]) == datetime(2026, 3, 10, tzinfo=UTC)
    assert ts(preview.json()["period_end"]) == datetime(2026, 4, 9, 15, tzinfo=UTC)
    async with sessions() as s:
        due = await invoicing.list_due_periods(s, datetime(2026, 4, 9, 15, tzinfo=UTC), None, 10)
    assert [(d.period_index, d.period_start, d.period_end) for d in due.periods] == [
        (2, datetime(2026, 3, 10, tzinfo=UTC), datetime(2026, 4, 9, 15, tzinfo=UTC)),
        (3, datetime(2026, 4, 9, 15, tzinfo=UTC), datetime(2026, 5, 9, 15, tzinfo=UTC)),
    ]
    # Changed back before boundary 2 is invoiced: the waiting change is replaced, nothing moves.
    back = (await api.patch(path, json={"timezone": "UTC"})).json()
    assert ts(back["timezone_effective_at"]) == datetime(2026, 3, 10, tzinfo=UTC)
    async with sessions() as s:
        row = await s.get(SubscriptionRow, uuid.UUID(sub["id"]))
        tenant_row = await s.get(Tenant, uuid.UUID(sub["tenant_id"]))
    assert row is not None and row.timezone_changes == [] and tenant_row is not None
    assert tenant_row.timezone == "UTC"


# The final invoice through billing runs


async def _usage(api, tenant_id: str, meter_code: str, quantity: str, at: str) -> None:
    body = {"tenant_id": tenant_id, "meter": meter_code, "quantity": quantity, "occurred_at": at,
            "idempotency_key": uuid.uuid4().hex}  # fmt: skip
    response = await api.post("/v1/usage/events", json=body)
    assert response.status_code in (200, 201), response.text


@pytest.mark.db
async def test_a_canceled_subscription_gets_exactly_its_final_invoice_and_nothing_after(
    temporal_env, sessions, activities, settings, api
):
    for code in ("electricity", "water"):
        await meter(api, code)
    charges = [{"meter_code": "electricity", "unit_amount": "28.5"}, {"meter_code": "water", "unit_amount": "410"}]
    p = await plan(api, charges=charges)  # 65000 a month

    async def subscribed() -> dict[str, Any]:
        sub = await subscription(api, (await room(api, p["id"]))["id"])  # anchored 2026-01-10T00:00Z
        await _usage(api, sub["tenant_id"], "electricity", "1500", "2026-02-12T10:00:00Z")
        await _usage(api, sub["tenant_id"], "water", "2", "2026-02-15T10:00:00Z")
        await _usage(api, sub["tenant_id"], "electricity", "777", "2026-02-20T15:00:00Z")  # at the end: not billed
        await _usage(api, sub["tenant_id"], "electricity", "50", "2026-02-25T10:00:00Z")  # after it: not billed
        return sub

    end = "2026-02-20T15:00:00Z"
    a = await subscribed()
    async with build_worker(temporal_env.client, settings, activities):
        first = await (await start_run(temporal_env, settings, as_of=datetime(2026, 2, 15, tzinfo=UTC))).result()
        assert first.invoices_created == 2  # A's boundaries 0 and 1
        # A: every boundary before the end is invoiced, so the cancel starts the final invoice itself.
        canceled = (await api.post(f"/v1/subscriptions/{a['id']}/cancel", json={"cancel_at": end})).json()
        assert canceled["status"] == "canceled" and canceled["final_invoice_workflow_id"]
        handle = temporal_env.client.get_workflow_handle(
            canceled["final_invoice_workflow_id"], result_type=InvoiceCycleResult
        )
        final_a = await handle.result()
        assert final_a.created is True and final_a.total == 4106
        # B: nothing invoiced yet when canceled; a run at the end issues boundaries 0, 1 and the final one.
        b = await subscribed()
        canceled_b = (await api.post(f"/v1/subscriptions/{b['id']}/cancel", json={"cancel_at": end})).json()
        assert canceled_b["status"] == "canceled" and canceled_b["final_invoice_workflow_id"] is None
        at_end = await (await start_run(temporal_env, settings, as_of=ts(end))).result()
        later = await (await start_run(temporal_env, settings, as_of=datetime(2026, 9, 1, tzinfo=UTC))).result()
    assert at_end.failed == 0 and at_end.periods_found == 3 and at_end.invoices_created == 3
    assert later.periods_found == 0 and later.invoices_created == 0

    async with sessions() as s:
        invoices = (
            await s.exec(select(Invoice).order_by(col(Invoice.subscription_id), col(Invoice.period_start)))
        ).all()
        assert len(invoices) == 6
        for sub in (a, b):
            row = await s.get(SubscriptionRow, uuid.UUID(sub["id"]))
            assert row is not None and row.status is SubscriptionStatus.canceled and row.final_invoiced
            final = (
                await s.exec(
                    select(Invoice).where(Invoice.subscription_id == row.id).order_by(col(Invoice.boundary_index))
                )
            ).all()[-1]
            assert final.boundary_index == 2 and final.period_start == final.period_end == ts(end)
            assert (final.settled_start, final.settled_end) == (datetime(2026, 2, 10, tzinfo=UTC), ts(end))
            lines = (
                await s.exec(
                    select(InvoiceLine).where(InvoiceLine.invoice_id == final.id).order_by(col(InvoiceLine.position))
                )
            ).all()
            # Period 1: Feb 10 .. Mar 9, 28 days. The end at 15:00 (after noon) counts from Feb 21:
            # Feb 21 .. Mar 9 = 17 unused days. Credit 65000 x 17/28 = 1105000/28 = 39464.29 -> -39464.
            # Usage before the end: 1500 kWh x 28.5 = 42750; 2 m3 x 410 = 820 (the 777 kWh at the end
            # instant and the 50 kWh after it are not billed). No base fee in advance.
            assert [(line.kind, line.days, line.quantity, line.amount) for line in lines] == [
                ("proration", 17, Decimal(17), -39464),
                ("usage", None, Decimal(1500), 42750),
                ("usage", None, Decimal(2), 820),
            ]
            assert final.total == 4106 and final.status == InvoiceStatus.open and final.pdf_location
    pdf = await LocalDocumentStore(settings.documents_root).get(final.pdf_location or "")
    text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)
    assert final.number in text and "$41.06" in text
    assert "Final invoice" in text and "subscription ended Feb 20, 2026, 3:00:00" in text
    assert "Billing period" not in text  # nothing is billed in advance


@pytest.mark.db
async def test_a_boundary_listed_before_a_cancel_is_refused_and_the_final_one_is_written_once(api, sessions):
    r = await room(api, (await plan(api))["id"])
    sub = await subscription(api, r["id"])  # anchored 2026-01-10T00:00Z, 65000 a month
    sub_id = uuid.UUID(sub["id"])
    anchor, feb_10, end = datetime(2026, 1, 10, tzinfo=UTC), datetime(2026, 2, 10, tzinfo=UTC), ts("2026-01-20T09:00Z")
    async with sessions() as s:
        due = await invoicing.list_due_periods(s, datetime(2026, 2, 11, tzinfo=UTC), None, 10)
    assert [(d.period_index, d.period_start) for d in due.periods] == [(0, anchor), (1, feb_10)]
    # Canceled after the run listed boundary 1 at Feb 10: the end (Jan 20) is now the final boundary.
    canceled = await api.post(f"/v1/subscriptions/{sub['id']}/cancel", json={"cancel_at": end.isoformat()})
    assert canceled.status_code == 200 and canceled.json()["final_invoice_workflow_id"] is None

    def create(index: int, start: datetime) -> CreateInvoiceInput:
        return CreateInvoiceInput(sub_id, index, start, workflow_id=f"test:{index}:{start.isoformat()}")

    async with sessions() as s:
        assert (await invoicing.create_invoice(s, create(0, anchor))).created
    async with sessions() as s:
        with pytest.raises(FieldError) as raised:
            await invoicing.create_invoice(s, create(1, feb_10))
    assert raised.value.field == "period_start" and "2026-01-20T09:00:00+00:00" in raised.value.message
    async with sessions() as s:
        with pytest.raises(invoicing.OutOfOrderError):
            await invoicing.create_invoice(s, create(2, end))
    async with sessions() as s:
        due = await invoicing.list_due_periods(s, datetime(2026, 2, 11, tzinfo=UTC), None, 10)
    assert [(d.period_index, d.period_start, d.period_end) for d in due.periods] == [(1, end, end)]
    preview = (await api.get(f"/v1/subscriptions/{sub['id']}/upcoming-invoice")).json()
    assert ts(preview["issued_at"]) == ts(preview["period_start"]) == ts(preview["period_end"]) == end
    assert [(line["kind"], line["amount"]) for line in preview["lines"]] == [
        ("proration", -44032),
        ("credit_carried", 44032),
    ]
    for _ in range(2):  # twice: the second call returns the invoice written by the first
        async with sessions() as s:
            result = await invoicing.create_invoice(s, create(1, end))
    assert not result.created
    async with sessions() as s:
        final = (await s.exec(select(Invoice).where(Invoice.boundary_index == 1))).one()
        row = await s.get(SubscriptionRow, sub_id)
        due = await invoicing.list_due_periods(s, datetime(2027, 1, 1, tzinfo=UTC), None, 10)
    # Jan 20 09:00 is before noon: Jan 20 .. Feb 9 = 21 of 31 days unused.
    # Credit 65000 x 21/31 = 1365000/31; 31 x 44032 = 1364992, remainder 8 -> 44032.26 -> -44032.
    assert final.total == 0 and final.credit_carried_forward == 44032
    assert row is not None and row.status is SubscriptionStatus.canceled and row.final_invoiced
    assert row.credit_balance == 44032  # the credit stays on the canceled subscription
    assert due.periods == []
    refused = await api.get(f"/v1/subscriptions/{sub['id']}/upcoming-invoice")
    assert refused.status_code == 409 and refused.json()["errors"][0]["field"] == "status"


# Properties of an end, over drawn zones, cadences and boundaries


MODEST = hypothesis.settings(max_examples=60, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow])
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "America/Santiago"]
KWH = Meter("kwh", "kWh", Aggregation.sum)


@st.composite
def timelines(draw: st.DrawFn) -> tuple[Subscription, int]:
    zone = draw(st.sampled_from(ZONES))
    day = draw(st.dates(min_value=date(2020, 1, 1), max_value=date(2030, 12, 31)))
    anchor = datetime.combine(day, time(0), tzinfo=ZoneInfo(zone)).astimezone(UTC)
    interval = draw(st.sampled_from(list(Interval)))
    charge = MeteredCharge(KWH, PerUnit(Decimal(draw(st.integers(0, 500)))), draw(st.integers(0, 10_000)))
    plan = Plan("p", "P", "EUR", interval, draw(st.integers(0, 10_000_000)), charges=(charge,))
    return Subscription(anchor, zone, plan), draw(st.integers(min_value=1, max_value=30))


@MODEST
@given(timelines(), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 10_000)), max_size=5))
def test_a_cancel_at_a_period_end_is_that_boundary_without_its_base_fee(case, readings):
    sub, k = case
    settled = sub.period(k - 1)
    span = settled.end - settled.start
    events = [
        UsageEvent("kwh", Decimal(q), settled.start + span * f, f"e{i}") for i, (f, q) in enumerate(readings) if f < 1
    ]
    ended = replace(sub, ends_at=settled.end)
    assert ended.final_index == k
    ordinary = build_invoice(sub, k, slice_usage(sub, k, events))
    final = build_invoice(ended, k, slice_usage(ended, k, events))
    assert final.final and final.lines == tuple(line for line in ordinary.lines if line.kind is not LineKind.base_fee)


@MODEST
@given(timelines())
def test_an_end_on_the_first_day_credits_the_whole_fee_billed_in_advance(case):
    sub, k = case
    ended = replace(sub, ends_at=sub.period(k - 1).start + timedelta(seconds=1))  # before local noon
    assert ended.final_index == k
    credits = [line for line in build_invoice(ended, k).lines if line.kind is LineKind.proration]
    fee = sub.plan.base_fee
    assert [(c.amount, c.days) for c in credits] == ([(-fee, c.period_days) for c in credits] if fee else [])
    assert len(credits) == (1 if fee else 0)


@MODEST
@given(timelines(), st.sampled_from(ZONES), st.integers(min_value=0, max_value=12))
def test_a_time_zone_change_moves_no_boundary_up_to_its_own_and_puts_later_ones_at_local_midnight(case, zone, offset):
    sub, k = case
    changed = replace(sub, zone_changes=(ZoneChange(k, zone),))
    for n in range(k + 1):
        assert changed.period(n).start == sub.period(n).start
    for n in range(k + 1, k + 2 + offset):
        local = changed.period(n).start.astimezone(ZoneInfo(zone))
        calendar_date = sub.period(n).start.astimezone(ZoneInfo(sub.timezone)).date()  # the anchor's calendar
        # Local midnight of the same date, or the first instant after it where midnight does not exist.
        assert local.date() == calendar_date and local.hour <= 1 and local.minute in (0, 30) and local.second == 0
        assert changed.zone_of(n) == zone and changed.zone_of(k - 1) == sub.timezone
