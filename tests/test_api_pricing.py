"""The pricing engine over HTTP: meters, priced plans, promo codes, room moves and the upcoming invoice."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import func
from sqlmodel import col, select

from api.pricing import field_loc
from schema.models import Plan, PlanCharge, PromoCode, RoomAssignment, Subscription, SubscriptionPromo
from tests.test_api_support import api_client, created, error_locs, meter, plan, room, tenant

pytestmark = pytest.mark.db

BASE = {"code": "p", "name": "P", "currency": "USD", "interval": "month", "base_fee": 100}
START = "2026-01-10T10:00:00+00:00"  # anchor: 2026-01-10T00:00Z in UTC


@pytest_asyncio.fixture
async def api(sessions, settings, temporal_env):
    async with api_client(settings, temporal_env.client) as client:
        yield client


async def subscription(api, room_id: str, *, started_at: str = START, **extra: Any) -> dict[str, Any]:
    t = await tenant(api)
    return await created(
        api, "/v1/subscriptions", {"tenant_id": t["id"], "room_id": room_id, "started_at": started_at, **extra}
    )


async def promo(api, code: str = "WELCOME", **fields: Any) -> dict[str, Any]:
    return await created(api, "/v1/promo-codes", {"code": code, "percent_off": 10, "duration": "once", **fields})


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


# The one path -> loc helper


@pytest.mark.parametrize(
    ("path", "loc"),
    [
        ("charges[0].price.tiers[2].up_to", ("charges", 0, "tiers", 2, "up_to")),
        ("charges[3].meter", ("charges", 3, "meter_code")),
        ("charges[1].minimum", ("charges", 1, "minimum_amount")),
        ("charges[0].price.package_amount", ("charges", 0, "unit_amount")),
        ("duration_invoices", ("duration_invoices",)),
    ],
)
def test_field_loc_names_the_field_as_sent(path, loc):
    assert field_loc(path) == loc


# Meters


async def test_unique_count_meters_need_their_property(api):
    guests = await created(
        api,
        "/v1/meters",
        {"code": "guests", "name": "Guests", "unit": "guest", "aggregation": "unique_count", "property_name": "guest"},
    )
    assert guests["aggregation"] == "unique_count" and guests["property_name"] == "guest"
    assert (await api.get(f"/v1/meters/{guests['id']}")).json() == guests
    assert (await meter(api, "electricity"))["property_name"] is None
    body = {"code": "visitors", "name": "Visitors", "unit": "visitor"}
    missing = await api.post("/v1/meters", json={**body, "aggregation": "unique_count"})
    assert error_locs(missing) == [["body", "property_name"]]
    stray = await api.post("/v1/meters", json={**body, "aggregation": "sum", "property_name": "guest"})
    assert error_locs(stray) == [["body", "property_name"]]
    assert [m["code"] for m in (await api.get("/v1/meters")).json()["data"]] == [
        "guests",
        "electricity",
    ]  # oldest first


# Plans


async def test_plans_store_and_echo_every_price_model(api, sessions):
    for code in ("electricity", "water", "gas", "wifi"):
        await meter(api, code)
    tiers: list[dict[str, Any]] = [
        {"up_to": 100, "unit_amount": "2.5"},
        {"up_to": "1000", "unit_amount": 2, "flat_amount": 300},
        {"up_to": None, "unit_amount": "1.25"},
    ]
    charges: list[dict[str, Any]] = [
        {"meter_code": "wifi", "price_model": "package", "unit_amount": 500, "package_size": "10", "minimum_amount": 0},
        {"meter_code": "electricity", "price_model": "graduated", "tiers": tiers, "minimum_amount": 1000},
        {"meter_code": "water", "unit_amount": "410"},
        {"meter_code": "gas", "price_model": "volume", "tiers": [{"unit_amount": "0.125"}]},
    ]
    p = await plan(api, charges=charges)
    public_tiers = [
        {"up_to": "100", "unit_amount": "2.5", "flat_amount": "0"},
        {"up_to": "1000", "unit_amount": "2", "flat_amount": "300"},
        {"up_to": None, "unit_amount": "1.25", "flat_amount": "0"},
    ]
    assert p["charges"] == [
        {"meter_code": "electricity", "price_model": "graduated", "unit_amount": "0", "tiers": public_tiers,
         "package_size": None, "minimum_amount": 1000},
        {"meter_code": "gas", "price_model": "volume", "unit_amount": "0",
         "tiers": [{"up_to": None, "unit_amount": "0.125", "flat_amount": "0"}], "package_size": None,
         "minimum_amount": 0},
        {"meter_code": "water", "price_model": "per_unit", "unit_amount": "410", "tiers": None, "package_size": None,
         "minimum_amount": 0},
        {"meter_code": "wifi", "price_model": "package", "unit_amount": "500", "tiers": None, "package_size": "10",
         "minimum_amount": 0},
    ]  # fmt: skip
    assert (await api.get(f"/v1/plans/{p['id']}")).json() == p
    async with sessions() as s:
        rows = {c.price_model.value: c for c in await s.exec(select(PlanCharge))}
    # SCHEMA3: tiers are decimal strings, a tiered charge's unit_amount is 0.
    assert rows["graduated"].tiers == [
        {"up_to": "100", "unit_amount": "2.5", "flat_amount": "0"},
        {"up_to": "1000", "unit_amount": "2", "flat_amount": "300"},
        {"up_to": None, "unit_amount": "1.25", "flat_amount": "0"},
    ]
    assert rows["graduated"].unit_amount == 0 and rows["graduated"].minimum_amount == 1000
    assert rows["package"].package_size == Decimal(10) and rows["package"].unit_amount == Decimal(500)
    assert rows["per_unit"].tiers is None and rows["per_unit"].package_size is None


TIERS: list[dict[str, Any]] = [
    {"up_to": 10, "unit_amount": 3},
    {"up_to": 20, "unit_amount": 2},
    {"up_to": None, "unit_amount": 1},
]


def _with(index: int, **fields: Any) -> list[dict[str, Any]]:
    return [dict(t, **fields) if i == index else t for i, t in enumerate(TIERS)]


@pytest.mark.parametrize(
    ("charge", "loc"),
    [
        # tiers: ascending, only the last unbounded (and it must be), amounts non-negative
        ({"price_model": "graduated", "tiers": _with(1, up_to=10)}, ["tiers", 1, "up_to"]),
        ({"price_model": "graduated", "tiers": _with(2, up_to=30)}, ["tiers", 2, "up_to"]),
        ({"price_model": "volume", "tiers": _with(0, up_to=None)}, ["tiers", 0, "up_to"]),
        ({"price_model": "volume", "tiers": _with(0, up_to="-1")}, ["tiers", 0, "up_to"]),
        ({"price_model": "graduated", "tiers": _with(1, unit_amount="-0.5")}, ["tiers", 1, "unit_amount"]),
        ({"price_model": "volume", "tiers": _with(2, flat_amount=-1)}, ["tiers", 2, "flat_amount"]),
        ({"price_model": "graduated", "tiers": []}, ["tiers"]),
        ({"price_model": "graduated"}, ["tiers"]),
        ({"price_model": "graduated", "tiers": TIERS, "unit_amount": 1}, ["unit_amount"]),
        ({"price_model": "volume", "tiers": TIERS, "package_size": 10}, ["package_size"]),
        # package: a positive size and a non-negative price per package
        ({"price_model": "package", "unit_amount": 100}, ["package_size"]),
        ({"price_model": "package", "unit_amount": 100, "package_size": 0}, ["package_size"]),
        ({"price_model": "package", "unit_amount": 100, "package_size": "-5"}, ["package_size"]),
        ({"price_model": "package", "unit_amount": -100, "package_size": 5}, ["unit_amount"]),
        ({"price_model": "package", "package_size": 5}, ["unit_amount"]),
        ({"price_model": "package", "unit_amount": 1, "package_size": 5, "tiers": TIERS}, ["tiers"]),
        # per_unit
        ({}, ["unit_amount"]),
        ({"unit_amount": "-0.5"}, ["unit_amount"]),
        ({"unit_amount": 1, "tiers": TIERS}, ["tiers"]),
        ({"unit_amount": 1, "package_size": 2}, ["package_size"]),
        # shapes the body type refuses
        ({"unit_amount": 1, "minimum_amount": -1}, ["minimum_amount"]),
        ({"unit_amount": 1, "minimum_amount": 1.5}, ["minimum_amount"]),
        ({"price_model": "tiered", "tiers": TIERS}, ["price_model"]),
        ({"unit_amount": "1e-10"}, ["unit_amount"]),
        ({"price_model": "graduated", "tiers": [{"up_to": "NaN"}, {"unit_amount": 1}]}, ["tiers", 0, "up_to"]),
    ],
)
async def test_price_validation_names_the_field(api, sessions, charge, loc):
    await meter(api, "electricity")
    await meter(api, "water")
    charges = [{"meter_code": "water", "unit_amount": 1}, {"meter_code": "electricity", **charge}]
    assert error_locs(await api.post("/v1/plans", json={**BASE, "charges": charges})) == [["body", "charges", 1, *loc]]
    async with sessions() as s:
        assert (await s.exec(select(func.count()).select_from(Plan))).one() == 0


async def test_plan_refuses_unknown_and_duplicate_meters_with_price_errors(api):
    await meter(api, "electricity")
    charges = [
        {"meter_code": "gas", "unit_amount": 1},
        {"meter_code": "electricity", "price_model": "graduated", "tiers": _with(2, up_to=30)},
        {"meter_code": "electricity", "unit_amount": 1},
    ]
    # Every charge is checked: an unknown meter and a bad tier in one answer.
    assert error_locs(await api.post("/v1/plans", json={**BASE, "charges": charges})) == [
        ["body", "charges", 0, "meter_code"],
        ["body", "charges", 1, "tiers", 2, "up_to"],
    ]
    # The plan as a whole (a meter priced twice) is checked once every price is valid.
    charges[1] = {"meter_code": "electricity", "price_model": "graduated", "tiers": TIERS}
    assert error_locs(await api.post("/v1/plans", json={**BASE, "charges": charges})) == [
        ["body", "charges", 0, "meter_code"],
        ["body", "charges", 2, "meter_code"],
    ]


# Promo codes


async def test_promo_codes_create_read_list(api):
    percent = await promo(api, "SPRING", percent_off=12.5, duration="repeating", duration_invoices=3,
                          expires_at="2030-06-01T00:00:00+02:00", max_redemptions=100)  # fmt: skip
    assert percent["percent_off"] == "12.5" and percent["amount_off"] is None and percent["currency"] is None
    assert percent["duration"] == "repeating" and percent["duration_invoices"] == 3
    assert ts(percent["expires_at"]) == datetime(2030, 5, 31, 22, tzinfo=UTC)
    assert percent["max_redemptions"] == 100 and percent["times_redeemed"] == 0
    fixed = await created(
        api, "/v1/promo-codes", {"code": "TENOFF", "amount_off": 1000, "currency": "usd", "duration": "forever"}
    )
    assert fixed["percent_off"] is None and fixed["amount_off"] == 1000 and fixed["currency"] == "USD"
    assert (await api.get(f"/v1/promo-codes/{percent['id']}")).json() == percent
    assert [p["code"] for p in (await api.get("/v1/promo-codes")).json()["data"]] == ["SPRING", "TENOFF"]
    again = await api.post("/v1/promo-codes", json={"code": "SPRING", "percent_off": 5, "duration": "once"})
    assert again.status_code == 409 and again.json()["errors"][0]["field"] == "code"
    assert (await api.get(f"/v1/promo-codes/{uuid.uuid4()}")).status_code == 404


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({}, "percent_off"),
        ({"percent_off": 10, "amount_off": 100, "currency": "USD"}, "percent_off"),
        ({"percent_off": 0}, "percent_off"),
        ({"percent_off": "-5"}, "percent_off"),
        ({"percent_off": "100.01"}, "percent_off"),
        ({"percent_off": 1000}, "percent_off"),
        ({"percent_off": "12.345"}, "percent_off"),
        ({"amount_off": 0, "currency": "USD"}, "amount_off"),
        ({"amount_off": -100, "currency": "USD"}, "amount_off"),
        ({"amount_off": 100}, "currency"),
        ({"amount_off": 100, "currency": "XYZ"}, "currency"),
        ({"percent_off": 10, "duration": "repeating"}, "duration_invoices"),
        ({"percent_off": 10, "duration": "repeating", "duration_invoices": 0}, "duration_invoices"),
        ({"percent_off": 10, "duration_invoices": 3}, "duration_invoices"),
        ({"percent_off": 10, "duration": "forever", "duration_invoices": 3}, "duration_invoices"),
        ({"percent_off": 10, "duration": "weekly"}, "duration"),
        ({"percent_off": 10, "expires_at": "2030-01-01T00:00:00"}, "expires_at"),
        ({"percent_off": 10, "max_redemptions": 0}, "max_redemptions"),
        ({"percent_off": 10, "max_redemptions": 2**31}, "max_redemptions"),
    ],
)
async def test_promo_validation_names_the_field(api, sessions, fields, field):
    body = {"code": "BAD", "duration": "once", **fields}
    assert error_locs(await api.post("/v1/promo-codes", json=body)) == [["body", field]]
    async with sessions() as s:
        assert (await s.exec(select(func.count()).select_from(PromoCode))).one() == 0


# Redeeming promo codes


async def _times_redeemed(api, promo_id: str) -> int:
    redeemed: int = (await api.get(f"/v1/promo-codes/{promo_id}")).json()["times_redeemed"]
    return redeemed


async def test_redeeming_promo_codes_in_order(api, sessions):
    r = await room(api, (await plan(api))["id"])
    sub = await subscription(api, r["id"])
    first = await promo(api, "FIRST")
    second = await created(api, "/v1/promo-codes", {"code": "SECOND", "amount_off": 500, "currency": "USD",
                                                    "duration": "forever"})  # fmt: skip
    before = datetime.now(UTC)
    one = await created(api, f"/v1/subscriptions/{sub['id']}/promo-codes", {"code": "FIRST"})
    assert one["promo_code"] == "FIRST" and one["position"] == 1 and one["invoices_applied"] == 0
    assert before <= ts(one["redeemed_at"]) <= datetime.now(UTC)
    two = await created(api, f"/v1/subscriptions/{sub['id']}/promo-codes", {"code": "SECOND"})
    assert two["position"] == 2
    assert await _times_redeemed(api, first["id"]) == 1 and await _times_redeemed(api, second["id"]) == 1

    twice = await api.post(f"/v1/subscriptions/{sub['id']}/promo-codes", json={"code": "FIRST"})
    assert twice.status_code == 409 and twice.json()["errors"][0]["field"] == "code"
    unknown = await api.post(f"/v1/subscriptions/{sub['id']}/promo-codes", json={"code": "NOPE"})
    assert error_locs(unknown) == [["body", "code"]]
    missing = await api.post(f"/v1/subscriptions/{uuid.uuid4()}/promo-codes", json={"code": "FIRST"})
    assert missing.status_code == 404
    assert await _times_redeemed(api, first["id"]) == 1
    async with sessions() as s:
        rows = (await s.exec(select(SubscriptionPromo).order_by(col(SubscriptionPromo.position)))).all()
    assert [(r.promo_code_id, r.position) for r in rows] == [(uuid.UUID(first["id"]), 1), (uuid.UUID(second["id"]), 2)]


async def test_promo_codes_that_cannot_be_redeemed(api):
    r = await room(api, (await plan(api))["id"])
    sub = await subscription(api, r["id"])
    yesterday = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    await promo(api, "EXPIRED", expires_at=yesterday)
    await created(api, "/v1/promo-codes", {"code": "EUROS", "amount_off": 500, "currency": "EUR", "duration": "once"})
    await created(
        api, "/v1/promo-codes", {"code": "EURPCT", "percent_off": 5, "currency": "EUR", "duration": "forever"}
    )
    for code in ("EXPIRED", "EUROS", "EURPCT"):
        refused = await api.post(f"/v1/subscriptions/{sub['id']}/promo-codes", json={"code": code})
        assert error_locs(refused) == [["body", "code"]], code
    assert all(p["times_redeemed"] == 0 for p in (await api.get("/v1/promo-codes")).json()["data"])


async def test_max_redemptions_is_race_safe(api, sessions, monkeypatch):
    r = await room(api, (await plan(api))["id"])
    subs = [await subscription(api, r["id"]) for _ in range(3)]
    single = await promo(api, "SINGLE", max_redemptions=1)
    await created(api, f"/v1/subscriptions/{subs[0]['id']}/promo-codes", {"code": "SINGLE"})
    second = await api.post(f"/v1/subscriptions/{subs[1]['id']}/promo-codes", json={"code": "SINGLE"})
    assert error_locs(second) == [["body", "code"]]

    # Without the read-time check (as if both requests had read times_redeemed = 0),
    # the conditional UPDATE alone still refuses the redemption past the limit.
    monkeypatch.setattr("services.redemptions.check_redeemable", lambda *args: None)
    raced = await api.post(f"/v1/subscriptions/{subs[2]['id']}/promo-codes", json={"code": "SINGLE"})
    assert error_locs(raced) == [["body", "code"]] and "no redemptions left" in raced.json()["errors"][0]["message"]
    assert await _times_redeemed(api, single["id"]) == 1
    async with sessions() as s:
        assert (await s.exec(select(func.count()).select_from(SubscriptionPromo))).one() == 1


async def test_concurrent_redemptions_never_exceed_the_limit(api):
    r = await room(api, (await plan(api))["id"])
    subs = [await subscription(api, r["id"]) for _ in range(5)]
    limited = await promo(api, "LIMITED", max_redemptions=2)
    responses = await asyncio.gather(
        *(api.post(f"/v1/subscriptions/{s['id']}/promo-codes", json={"code": "LIMITED"}) for s in subs)
    )
    assert sorted(r.status_code for r in responses) == [201, 201, 422, 422, 422]
    assert await _times_redeemed(api, limited["id"]) == 2


async def test_promo_code_on_subscription_create(api, sessions):
    r = await room(api, (await plan(api))["id"])
    welcome = await promo(api, "WELCOME", max_redemptions=1)
    sub = await subscription(api, r["id"], promo_code="WELCOME")
    async with sessions() as s:
        redemption = (await s.exec(select(SubscriptionPromo))).one()
    assert redemption.subscription_id == uuid.UUID(sub["id"]) and redemption.position == 1
    # It discounts the first invoice, issued at the anchor (local midnight before the start).
    assert redemption.redeemed_at == ts(sub["anchor_at"]) == datetime(2026, 1, 10, tzinfo=UTC)
    assert await _times_redeemed(api, welcome["id"]) == 1

    for code in ("WELCOME", "NOPE"):  # exhausted, unknown: nothing is written
        t = await tenant(api)
        body = {"tenant_id": t["id"], "room_id": r["id"], "promo_code": code}
        assert error_locs(await api.post("/v1/subscriptions", json=body)) == [["body", "promo_code"]]
    async with sessions() as s:
        assert (await s.exec(select(func.count()).select_from(Subscription))).one() == 1
        assert (await s.exec(select(func.count()).select_from(RoomAssignment))).one() == 1


# Room moves


async def _rooms(api) -> dict[str, dict[str, Any]]:
    """Rooms on four plans: two compatible USD monthly plans, one in EUR and one weekly."""
    rooms = {}
    for code, currency in (("small", "USD"), ("large", "USD"), ("euro", "EUR")):
        rooms[code] = await room(api, (await plan(api, code, currency=currency))["id"])
    weekly = await created(api, "/v1/plans", {**BASE, "code": "weekly", "interval": "week"})
    rooms["weekly"] = await room(api, weekly["id"])
    return rooms


async def _assignments(sessions, sub_id: str) -> list[tuple[uuid.UUID, datetime, datetime | None]]:
    async with sessions() as s:
        rows = await s.exec(
            select(RoomAssignment)
            .where(col(RoomAssignment.subscription_id) == uuid.UUID(sub_id))
            .order_by(col(RoomAssignment.effective_from))
        )
        return [(a.room_id, a.effective_from, a.effective_to) for a in rows]


async def test_move_room(api, sessions):
    rooms = await _rooms(api)
    sub = await subscription(api, rooms["small"]["id"])
    moved_at = datetime(2026, 1, 20, 9, 30, tzinfo=UTC)
    response = await api.post(
        f"/v1/subscriptions/{sub['id']}/move-room",
        json={"room_id": rooms["large"]["id"], "effective_at": "2026-01-20T10:30:00+01:00"},
    )
    assert response.status_code == 200, response.text
    moved = response.json()
    assert moved["room_id"] == rooms["large"]["id"] and moved["plan_id"] == rooms["large"]["plan_id"]
    unchanged = ("anchor_at", "next_invoice_at", "current_period_start", "current_period_end", "started_at")
    assert all(moved[k] == sub[k] for k in unchanged)
    assert (await api.get(f"/v1/subscriptions/{sub['id']}")).json() == moved
    small, large = uuid.UUID(rooms["small"]["id"]), uuid.UUID(rooms["large"]["id"])
    assert await _assignments(sessions, sub["id"]) == [
        (small, ts(START), moved_at),
        (large, moved_at, None),
    ]
    # And back again, later.
    back = await api.post(
        f"/v1/subscriptions/{sub['id']}/move-room",
        json={"room_id": rooms["small"]["id"], "effective_at": "2026-03-01T00:00:00Z"},
    )
    assert back.status_code == 200 and back.json()["plan_id"] == rooms["small"]["plan_id"]
    assert [a[2] for a in await _assignments(sessions, sub["id"])] == [
        moved_at,
        datetime(2026, 3, 1, tzinfo=UTC),
        None,
    ]


async def test_move_room_refusals(api, sessions):
    rooms = await _rooms(api)
    sub = await subscription(api, rooms["small"]["id"])
    path = f"/v1/subscriptions/{sub['id']}/move-room"

    async def refused(room_id: str, effective_at: str) -> list[list[str | int]]:
        return error_locs(await api.post(path, json={"room_id": room_id, "effective_at": effective_at}))

    large, later = rooms["large"]["id"], "2026-01-20T00:00:00Z"
    assert await refused(rooms["small"]["id"], later) == [["body", "room_id"]]  # the same room
    assert await refused(rooms["euro"]["id"], later) == [["body", "room_id"]]  # another currency
    assert await refused(rooms["weekly"]["id"], later) == [["body", "room_id"]]  # another cadence
    assert await refused(str(uuid.uuid4()), later) == [["body", "room_id"]]
    assert await refused(large, "2026-01-20T00:00:00") == [["body", "effective_at"]]  # naive
    assert await refused(large, "2026-01-10T00:00:00Z") == [["body", "effective_at"]]  # the anchor
    assert await refused(large, "2026-01-09T12:00:00Z") == [["body", "effective_at"]]  # before it
    assert await refused(large, "2026-01-10T09:00:00Z") == [["body", "effective_at"]]  # before the first room
    incompatible = await api.post(path, json={"room_id": rooms["euro"]["id"], "effective_at": later})
    assert "EUR" in incompatible.json()["errors"][0]["message"]
    missing = await api.post(
        f"/v1/subscriptions/{uuid.uuid4()}/move-room", json={"room_id": large, "effective_at": later}
    )
    assert missing.status_code == 404
    assert len(await _assignments(sessions, sub["id"])) == 1

    # Two invoices issued (boundaries 0 and 1): the move must come after boundary 1, 2026-02-10.
    async with sessions() as s:
        row = await s.get(Subscription, uuid.UUID(sub["id"]))
        assert row is not None
        row.next_invoice_index = 2
        s.add(row)
        await s.commit()
    assert await refused(large, "2026-02-09T23:59:59Z") == [["body", "effective_at"]]
    assert await refused(large, "2026-02-10T00:00:00Z") == [["body", "effective_at"]]
    ok = await api.post(path, json={"room_id": large, "effective_at": "2026-02-10T00:00:01Z"})
    assert ok.status_code == 200, ok.text
    # A move cannot start before the room it leaves was taken.
    assert await refused(rooms["small"]["id"], "2026-02-10T00:00:00.5Z") == [["body", "effective_at"]]
    assert await refused(rooms["small"]["id"], "2026-02-10T00:00:01Z") == [["body", "effective_at"]]
    assert len(await _assignments(sessions, sub["id"])) == 2


# Upcoming invoice


async def test_upcoming_invoice_at_the_start(api):
    r = await room(api, (await plan(api))["id"])
    sub = await subscription(api, r["id"])
    response = await api.get(f"/v1/subscriptions/{sub['id']}/upcoming-invoice", params={"as_of": START})
    assert response.status_code == 200, response.text
    upcoming = response.json()
    anchor, end = datetime(2026, 1, 10, tzinfo=UTC), datetime(2026, 2, 10, tzinfo=UTC)
    assert upcoming["subscription_id"] == sub["id"] and upcoming["currency"] == "USD"
    assert ts(upcoming["issued_at"]) == ts(upcoming["period_start"]) == anchor and ts(upcoming["period_end"]) == end
    assert upcoming["settled_start"] is None and upcoming["settled_end"] is None
    [line] = upcoming["lines"]
    assert line["kind"] == "base_fee" and line["amount"] == 65000 and line["quantity"] == "1"
    assert line["plan_code"] == "standard" and ts(line["period_start"]) == anchor and ts(line["period_end"]) == end
    assert upcoming["total"] == 65000 and upcoming["credit_carried_forward"] == 0
    assert (await api.get(f"/v1/subscriptions/{sub['id']}/upcoming-invoice")).status_code == 200  # as of now

    missing = await api.get(f"/v1/subscriptions/{uuid.uuid4()}/upcoming-invoice")
    assert missing.status_code == 404 and missing.json()["errors"][0]["field"] == "id"
    naive = await api.get(f"/v1/subscriptions/{sub['id']}/upcoming-invoice", params={"as_of": "2026-01-10T10:00:00"})
    assert error_locs(naive) == [["query", "as_of"]]
