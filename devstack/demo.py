"""Demo data for `make up`, created only through the public HTTP API.

Everything is get-or-create: meters, plans and rooms by code, tenants by e-mail,
subscriptions by (tenant, room). Usage comes from :func:`generate_usage`, a pure function of
the subscription (room, time zone, start) seeded with a fixed ``random.Random``, and every
event has a deterministic idempotency key (``demo:{room}:{meter}:{date}``), so seeding
again, on any later day, inserts nothing new.
"""

from __future__ import annotations

import asyncio
import csv
import io
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import httpx

from billing.money import format_money
from billing.periods import Interval, period

DEMO_SEED = 20240601
USAGE_BATCH = 500


@dataclass(frozen=True)
class DemoMeter:
    code: str
    name: str
    unit: str
    aggregation: str

    def body(self) -> dict[str, Any]:
        """The meter as ``POST /v1/meters`` takes it."""
        return {"code": self.code, "name": self.name, "unit": self.unit, "aggregation": self.aggregation}


@dataclass(frozen=True)
class DemoPlan:
    code: str
    name: str
    base_fee: int
    # (meter code, the charge's price fields as POST /v1/plans takes them; amounts in minor units)
    charges: tuple[tuple[str, dict[str, Any]], ...]
    currency: str = "USD"
    interval: str = "month"

    def body(self) -> dict[str, Any]:
        """The plan as ``POST /v1/plans`` takes it."""
        return {
            "code": self.code,
            "name": self.name,
            "currency": self.currency,
            "interval": self.interval,
            "base_fee": self.base_fee,
            "charges": [{"meter_code": m, **price} for m, price in self.charges],
        }


@dataclass(frozen=True)
class DemoRoom:
    code: str
    name: str
    plan: str

    def body(self, plan_id: object) -> dict[str, Any]:
        """The room as ``POST /v1/rooms`` takes it, on the plan ``plan_id`` (its code's id)."""
        return {"code": self.code, "name": self.name, "plan_id": str(plan_id)}


@dataclass(frozen=True)
class DemoTenant:
    name: str
    email: str
    timezone: str
    room: str
    days_ago: int  # the subscription starts this many days (at a whole hour) before `now`
    promo_code: str | None = None  # redeemed when the subscription is created
    card: str = "pm_card_visa"  # the saved card (a PSP test token), POST /v1/tenants/{id}/payment-method
    locale: str = "en_US"  # how the tenant portal formats its amounts and dates


METERS = (
    DemoMeter("electricity", "Electricity", "kWh", "sum"),
    DemoMeter("water", "Water", "m3", "sum"),
    DemoMeter("laundry", "Laundry", "cycles", "count"),
)
PLANS = (
    DemoPlan(
        "standard-monthly",
        "Standard room, monthly",
        65000,
        (
            ("electricity", {"unit_amount": "28.5"}),
            ("water", {"unit_amount": "410"}),
            ("laundry", {"price_model": "package", "package_size": "2", "unit_amount": "600"}),
        ),
    ),
    DemoPlan(
        "suite-monthly",
        "Suite, monthly",
        120000,
        (
            (
                "electricity",
                {
                    "price_model": "graduated",
                    "tiers": [
                        {"up_to": "150", "unit_amount": "25", "flat_amount": "0"},
                        {"up_to": None, "unit_amount": "20", "flat_amount": "0"},
                    ],
                },
            ),
            ("water", {"unit_amount": "400", "minimum_amount": 1500}),
        ),
    ),
)
# 10 % off the first two invoices of whoever is given it.
PROMO = {"code": "WELCOME10", "percent_off": "10", "duration": "repeating", "duration_invoices": 2}
ROOMS = (
    DemoRoom("R101", "Room 101", "standard-monthly"),
    DemoRoom("R102", "Room 102", "standard-monthly"),
    DemoRoom("R103", "Room 103", "standard-monthly"),
    DemoRoom("R104", "Room 104", "standard-monthly"),
    DemoRoom("S201", "Suite 201", "suite-monthly"),
    DemoRoom("S202", "Suite 202", "suite-monthly"),
)
DECLINING_CARD = "pm_card_chargeCustomerFail"
TENANTS = (
    DemoTenant("Lena Hoffmann", "lena.hoffmann@example.de", "Europe/Berlin", "R101", 40, locale="de_DE"),
    # The demo's purposely declining card: it attaches, then every charge declines (generic_decline).
    DemoTenant("Marcus Reed", "marcus.reed@example.com", "America/New_York", "R102", 41, card=DECLINING_CARD),
    DemoTenant("Aisha Okafor", "aisha.okafor@example.org", "UTC", "R103", 39),
    DemoTenant("Tomás Silva", "tomas.silva@example.net", "UTC", "S201", 42, promo_code="WELCOME10"),
)
# This part of the usage goes through the CSV upload instead of the JSON batch endpoint.
CSV_ROOM, CSV_METER = "R103", "water"

_PLANS = {p.code: p for p in PLANS}
_ROOMS = {r.code: r for r in ROOMS}


def subscription_start(now: datetime, tenant: DemoTenant) -> datetime:
    """A whole UTC hour ``tenant.days_ago`` days before ``now``: its first month has ended, the second has not."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    hour = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return hour - timedelta(days=tenant.days_ago)


def charged_meters(room: str) -> list[str]:
    """The meters the room's plan charges for (the only usage worth generating for it)."""
    return [meter for meter, _ in _PLANS[_ROOMS[room].plan].charges]


@dataclass(frozen=True)
class UsageEvent:
    room: str
    meter: str
    quantity: str  # a decimal string, never a float
    occurred_at: datetime  # UTC, aware
    idempotency_key: str

    def payload(self, tenant_id: str) -> dict[str, str]:
        return {
            "tenant_id": tenant_id,
            "meter": self.meter,
            "quantity": self.quantity,
            "occurred_at": self.occurred_at.isoformat(),
            "idempotency_key": self.idempotency_key,
        }


def _decimal(rng: random.Random, low: int, high: int, places: int) -> str:
    return str(Decimal(rng.randint(low, high)).scaleb(-places))


def _local_midnight(day: date, zone: ZoneInfo) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=zone).astimezone(UTC)


def generate_usage(
    room: str,
    timezone: str,
    started_at: datetime,
    meters: Sequence[str] | None = None,
    seed: int = DEMO_SEED,
) -> list[UsageEvent]:
    """A month of synthetic usage inside the subscription's first period, the same every time.

    Per tenant-local day: one electricity reading (kWh with three decimals), water every
    third day (m3), laundry cycles on some days (one event per cycle). Dates in the keys are
    tenant-local.
    """
    meters = list(meters) if meters is not None else charged_meters(room)
    first = period(started_at, timezone, Interval.month, 0)
    zone = ZoneInfo(timezone)
    rng = random.Random(f"{seed}:{room}")  # noqa: S311 - reproducible demo data, not security
    events: list[UsageEvent] = []

    def at(lo: datetime, hi: datetime) -> datetime:
        seconds = int((hi - lo).total_seconds())
        return lo + timedelta(seconds=rng.randrange(seconds)) if seconds > 0 else lo

    day = first.start.astimezone(zone).date()
    last_day = (first.end - timedelta(microseconds=1)).astimezone(zone).date()
    index = 0
    while day <= last_day:
        lo = max(first.start, _local_midnight(day, zone))
        hi = min(first.end, _local_midnight(day + timedelta(days=1), zone))
        if "electricity" in meters:
            events.append(
                UsageEvent(
                    room, "electricity", _decimal(rng, 4000, 16000, 3), at(lo, hi), f"demo:{room}:electricity:{day}"
                )
            )
        if "water" in meters and index % 3 == 0:
            events.append(UsageEvent(room, "water", _decimal(rng, 150, 900, 3), at(lo, hi), f"demo:{room}:water:{day}"))
        if "laundry" in meters and rng.random() < 0.35:
            for cycle in range(rng.choice((1, 1, 1, 2))):
                events.append(UsageEvent(room, "laundry", "1", at(lo, hi), f"demo:{room}:laundry:{day}:{cycle + 1}"))
        day += timedelta(days=1)
        index += 1
    events.sort(key=lambda e: (e.occurred_at, e.idempotency_key))
    return events


def usage_csv(events: Sequence[UsageEvent], tenant_ids: dict[str, str]) -> str:
    """The CSV upload body: header tenant_id,meter,quantity,occurred_at,idempotency_key."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["tenant_id", "meter", "quantity", "occurred_at", "idempotency_key"])
    for e in events:
        p = e.payload(tenant_ids[e.room])
        writer.writerow([p["tenant_id"], p["meter"], p["quantity"], p["occurred_at"], p["idempotency_key"]])
    return out.getvalue()


# --- seeding through the API ------------------------------------------------------------------


class DemoError(RuntimeError):
    pass


@dataclass
class UsageCounts:
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0

    def add(self, body: dict[str, Any]) -> None:
        self.accepted += int(body.get("accepted", 0))
        self.duplicates += int(body.get("duplicates", 0))
        self.rejected += int(body.get("rejected", 0))


@dataclass
class DemoSummary:
    created: dict[str, int] = field(default_factory=dict)  # kind -> number created now
    existing: dict[str, int] = field(default_factory=dict)  # kind -> number found already there
    events: int = 0
    usage: UsageCounts = field(default_factory=UsageCounts)
    csv: UsageCounts = field(default_factory=UsageCounts)
    rejections: list[str] = field(default_factory=list)  # the first few, for the log
    tenant_names: dict[str, str] = field(default_factory=dict)  # tenant id -> name

    @property
    def fresh(self) -> bool:
        return any(self.created.values())

    def line(self) -> str:
        made = ", ".join(f"{n} {k}" for k, n in self.created.items() if n) or "nothing"
        u, c = self.usage, self.csv
        return (
            f"demo data: created {made}; usage {self.events} events -> "
            f"{u.accepted + c.accepted} accepted, {u.duplicates + c.duplicates} duplicates, "
            f"{u.rejected + c.rejected} rejected ({c.accepted + c.duplicates + c.rejected} via CSV)"
        )


def _check(response: httpx.Response, expected: int) -> Any:
    if response.status_code != expected:
        raise DemoError(
            f"{response.request.method} {response.request.url.path} -> {response.status_code}: {response.text[:500]}"
        )
    return response.json()


async def _list_all(client: httpx.AsyncClient, path: str, params: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """GET a list endpoint, following its cursor to the last page."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        query: dict[str, str | int] = {**(params or {}), "limit": 100}
        if cursor:
            query["cursor"] = cursor
        page = _check(await client.get(path, params=query), 200)
        items.extend(page["data"])
        if not page["has_more"]:
            return items
        cursor = page["next_cursor"]


def _bump(summary: DemoSummary, kind: str, created: bool) -> None:
    bucket = summary.created if created else summary.existing
    bucket[kind] = bucket.get(kind, 0) + 1
    summary.created.setdefault(kind, 0)


async def seed(client: httpx.AsyncClient, now: datetime) -> DemoSummary:
    """Create the demo meters, plans, rooms, tenants, subscriptions and usage unless present."""
    summary = DemoSummary()

    meters = {m["code"]: m for m in await _list_all(client, "/v1/meters")}
    for meter in METERS:
        exists = meter.code in meters
        if not exists:
            meters[meter.code] = _check(await client.post("/v1/meters", json=meter.body()), 201)
        _bump(summary, "meters", not exists)

    plans: dict[str, dict[str, Any]] = {}
    for p in await _list_all(client, "/v1/plans"):
        if p["code"] not in plans or p["version"] > plans[p["code"]]["version"]:
            plans[p["code"]] = p
    for plan in PLANS:
        exists = plan.code in plans
        if not exists:
            plans[plan.code] = _check(await client.post("/v1/plans", json=plan.body()), 201)
        _bump(summary, "plans", not exists)

    promos = {p["code"] for p in await _list_all(client, "/v1/promo-codes")}
    if PROMO["code"] not in promos:
        _check(await client.post("/v1/promo-codes", json=PROMO), 201)
    _bump(summary, "promo codes", PROMO["code"] not in promos)

    rooms = {r["code"]: r for r in await _list_all(client, "/v1/rooms")}
    for room in ROOMS:
        exists = room.code in rooms
        if not exists:
            rooms[room.code] = _check(await client.post("/v1/rooms", json=room.body(plans[room.plan]["id"])), 201)
        _bump(summary, "rooms", not exists)

    tenants = {t["email"]: t for t in await _list_all(client, "/v1/tenants")}
    tenant_ids: dict[str, str] = {}  # room code -> tenant id
    events: list[UsageEvent] = []
    for spec in TENANTS:
        tenant = tenants.get(spec.email)
        if tenant is None:
            body = {
                "name": spec.name, "email": spec.email, "currency": "USD", "timezone": spec.timezone,
                "locale": spec.locale,
            }  # fmt: skip
            tenant = _check(await client.post("/v1/tenants", json=body), 201)
        _bump(summary, "tenants", spec.email not in tenants)
        summary.tenant_names[tenant["id"]] = tenant["name"]
        if tenant.get("default_payment_method") is None:  # saved once; a later start keeps it
            body = {"payment_method": spec.card}
            _check(await client.post(f"/v1/tenants/{tenant['id']}/payment-method", json=body), 200)
            _bump(summary, "cards", True)
        else:
            _bump(summary, "cards", False)
        tenant_ids[spec.room] = tenant["id"]

        room_id = rooms[spec.room]["id"]
        subs = await _list_all(client, "/v1/subscriptions", {"tenant_id": tenant["id"]})
        sub = next((s for s in subs if s["room_id"] == room_id), None)
        if sub is None:
            body = {
                "tenant_id": tenant["id"],
                "room_id": room_id,
                "started_at": subscription_start(now, spec).isoformat(),
            }
            if spec.promo_code is not None:
                body["promo_code"] = spec.promo_code
            sub = _check(await client.post("/v1/subscriptions", json=body), 201)
            _bump(summary, "subscriptions", True)
        else:
            _bump(summary, "subscriptions", False)
        started_at = datetime.fromisoformat(sub["started_at"])
        events.extend(generate_usage(spec.room, tenant["timezone"], started_at))

    summary.events = len(events)
    via_csv = [e for e in events if e.room == CSV_ROOM and e.meter == CSV_METER]
    via_json = [e for e in events if not (e.room == CSV_ROOM and e.meter == CSV_METER)]
    for i in range(0, len(via_json), USAGE_BATCH):
        batch = via_json[i : i + USAGE_BATCH]
        batch_body = {"events": [e.payload(tenant_ids[e.room]) for e in batch]}
        result = _check(await client.post("/v1/usage", json=batch_body), 200)
        summary.usage.add(result)
        _collect_rejections(summary, result)
    if via_csv:
        files = {"file": ("demo-usage.csv", usage_csv(via_csv, tenant_ids).encode(), "text/csv")}
        result = _check(await client.post("/v1/usage/csv", files=files), 200)
        summary.csv.add(result)
        _collect_rejections(summary, result)
    return summary


def _collect_rejections(summary: DemoSummary, result: dict[str, Any]) -> None:
    for row in result.get("results", []):
        if row.get("status") == "rejected" and len(summary.rejections) < 5:
            summary.rejections.append(f"{row.get('idempotency_key')}: {row.get('errors')}")


# --- billing run and invoices -----------------------------------------------------------------


@dataclass
class BillingRunOutcome:
    workflow_id: str
    status: str
    progress: dict[str, Any]
    seconds: float


async def run_billing(
    client: httpx.AsyncClient,
    as_of: datetime,
    *,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    poll_interval: float = 0.5,
    max_wait: float = 600.0,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> BillingRunOutcome:
    """Start a billing run as of ``as_of`` and poll it until its progress says done."""
    started = time.monotonic()
    run = _check(await client.post("/v1/billing-runs", json={"as_of": as_of.isoformat()}), 202)
    workflow_id: str = run["workflow_id"]
    last: dict[str, Any] | None = None
    while True:
        state = _check(await client.get(f"/v1/billing-runs/{workflow_id}"), 200)
        progress: dict[str, Any] = state.get("progress") or {}
        if progress != last and on_progress is not None:
            on_progress(progress)
        last = progress
        status = str(state.get("status", ""))
        if progress.get("done") or status not in ("RUNNING", ""):
            return BillingRunOutcome(workflow_id, status, progress, time.monotonic() - started)
        if time.monotonic() - started > max_wait:
            raise DemoError(f"billing run {workflow_id} still running after {max_wait:.0f} s")
        await sleep(poll_interval)


async def list_invoices(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    return await _list_all(client, "/v1/invoices")


async def tenant_names(client: httpx.AsyncClient) -> dict[str, str]:
    """Tenant id -> name, for every tenant (not only the demo ones)."""
    return {str(t["id"]): str(t["name"]) for t in await _list_all(client, "/v1/tenants")}


def _day(value: str) -> str:
    return datetime.fromisoformat(value).date().isoformat()


def invoice_table(
    invoices: Sequence[dict[str, Any]],
    tenant_names: dict[str, str],
    payments: dict[str, list[dict[str, Any]]] | None = None,
) -> str:
    """A fixed-width table: number, tenant, period, total, status, what is due, the last payment."""
    header = ("Number", "Tenant", "Period (UTC)", "Total", "Status", "Due", "Last payment")
    rows = [
        (
            str(inv["number"] or "(draft)"),  # a draft has no number yet
            tenant_names.get(str(inv["tenant_id"]), str(inv["tenant_id"])[:8]),
            f"{_day(inv['period_start'])} .. {_day(inv['period_end'])}",
            format_money(int(inv["total"]), str(inv["currency"])),
            str(inv["status"]),
            format_money(int(inv.get("amount_due", 0)), str(inv["currency"])),
            _last_payment((payments or {}).get(str(inv.get("id")), [])),
        )
        for inv in sorted(invoices, key=lambda i: (str(i["period_start"]), str(i["number"])))
    ]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]

    def fmt(row: tuple[str, ...]) -> str:
        cells = [
            cell.rjust(w) if c in (3, 5) else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    lines = [fmt(header), fmt(tuple("-" * w for w in widths)), *(fmt(r) for r in rows)]
    return "\n".join(lines)


def _last_payment(attempts: Sequence[dict[str, Any]]) -> str:
    if not attempts:
        return "-"
    last = attempts[-1]
    text = f"#{last['number']} {last['status']}"
    return f"{text} ({last['decline_code']})" if last.get("decline_code") else text


async def payments_of(client: httpx.AsyncClient, invoices: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for inv in invoices:
        if inv["status"] != "draft":
            out[str(inv["id"])] = _check(await client.get(f"/v1/invoices/{inv['id']}/payments"), 200)
    return out


def _settled(invoice: dict[str, Any], attempts: Sequence[dict[str, Any]]) -> bool:
    """Collection has had its say: paid, nothing due, or the last attempt ended (a decline)."""
    if invoice["status"] in ("paid", "void") or int(invoice.get("amount_due", 0)) == 0:
        return True
    return bool(attempts) and attempts[-1]["status"] in ("succeeded", "failed")


async def wait_for_collection(
    client: httpx.AsyncClient, *, max_wait: float = 90.0, poll_interval: float = 0.5
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Every invoice and its payment attempts once automatic capture has settled them (a card that
    declines leaves its invoice open; a tenant without a card is not charged)."""
    deadline = time.monotonic() + max_wait
    while True:
        invoices = await list_invoices(client)
        payments = await payments_of(client, invoices)
        waiting = [
            inv
            for inv in invoices
            if inv["status"] == "open" and int(inv["amount_due"]) > 0 and not _settled(inv, payments[str(inv["id"])])
        ]
        if not waiting or time.monotonic() > deadline:
            return invoices, payments
        await asyncio.sleep(poll_interval)


async def pay_out_and_reconcile(
    client: httpx.AsyncClient, psp_url: str, *, max_wait: float = 60.0
) -> list[dict[str, Any]]:
    """The emulator's automatic payout of what is available, then its reconciliation reports
    (started by the ``payout.paid`` webhook); the reports of the payouts made now."""
    async with httpx.AsyncClient(base_url=psp_url, timeout=30.0) as psp:
        made = (await psp.post("/_emulator/payouts")).json().get("payouts", [])
    ids = {str(p["id"]) for p in made}
    deadline = time.monotonic() + max_wait
    while True:
        reports = [r for r in await _list_all(client, "/v1/reconciliation/payouts") if str(r["payout_id"]) in ids]
        if len(reports) == len(ids) or time.monotonic() > deadline:
            return reports
        await asyncio.sleep(0.5)


async def ledger_lines(client: httpx.AsyncClient, tenant_names: dict[str, str]) -> list[str]:
    """Each account's balance (debits - credits), tenants' accounts named."""
    rows = await _list_all(client, "/v1/ledger/balances")
    lines = []
    for row in sorted(rows, key=lambda r: (str(r["currency"]), str(r["account"]))):
        if int(row["balance"]) == 0:
            continue
        code = str(row["account"])
        for tenant_id, name in tenant_names.items():
            code = code.replace(tenant_id, name)
        lines.append(f"  {code:<40} {format_money(int(row['balance']), str(row['currency'])):>14}")
    return lines
