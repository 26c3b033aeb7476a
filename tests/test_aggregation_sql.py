"""The SQL aggregation of the invoicing path agrees with the engine's Python reference
(billing.pricing.usage) for every aggregation, over many random data sets: ties on
occurred_at, repeated quantities, properties that are numbers, strings, or missing."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import delete

from billing.pricing.usage import UsageEvent as RefEvent
from billing.pricing.usage import aggregate_usage
from schema.models import Aggregation, Meter, Tenant, UsageEvent, UsageSource
from services.drafting import aggregate
from services.mapping import meter_of

pytestmark = pytest.mark.db

START = datetime(2026, 5, 1, tzinfo=UTC)
END = datetime(2026, 6, 1, tzinfo=UTC)


def random_events(rng: random.Random, meters: list[Meter]) -> list[RefEvent]:
    instants = [START - timedelta(days=1) + timedelta(hours=rng.randrange(0, 24 * 33)) for _ in range(6)]
    events = []
    for i in range(rng.randrange(0, 25)):
        meter = rng.choice(meters)
        properties: dict[str, object] = {}
        if rng.random() < 0.8:
            properties["guest"] = rng.choice([7, "7", "ada", "bob", 7.5, None, True])
        events.append(
            RefEvent(
                meter_code=meter.code,
                quantity=Decimal(rng.randrange(0, 10_000)) / Decimal(rng.choice([1, 10, 1000])),
                occurred_at=rng.choice(instants),  # few instants: many ties for `latest`
                idempotency_key=f"k{rng.randrange(10**6):06d}-{i}",
                properties=properties,
            )
        )
    return events


async def test_sql_aggregation_matches_the_python_reference(sessions):
    async with sessions() as s:
        tenant = Tenant(name="Agg", email="agg@example.com", currency="USD", timezone="UTC")
        meters = [
            Meter(code=f"m-{agg.value}", name=agg.value, unit="u", aggregation=agg)
            for agg in (Aggregation.sum, Aggregation.count, Aggregation.max, Aggregation.latest)
        ] + [
            Meter(
                code="m-unique",
                name="unique",
                unit="guests",
                aggregation=Aggregation.unique_count,
                property_name="guest",
            )
        ]
        s.add(tenant)
        s.add_all(meters)
        await s.commit()
    codes = [m.code for m in meters]
    by_code = {m.code: m for m in meters}
    rng = random.Random(20261125)
    for _ in range(40):
        events = random_events(rng, meters)
        async with sessions() as s:
            await s.exec(delete(UsageEvent))
            s.add_all(
                UsageEvent(
                    tenant_id=tenant.id,
                    meter_id=by_code[e.meter_code].id,
                    quantity=e.quantity,
                    occurred_at=e.occurred_at,
                    idempotency_key=e.idempotency_key,
                    source=UsageSource.api,
                    properties=dict(e.properties),
                )
                for e in events
            )
            await s.commit()
        async with sessions() as s:
            in_sql = await aggregate(s, tenant.id, START, END, codes)
        expected = aggregate_usage(events, [meter_of(m) for m in meters], START, END)
        assert in_sql == expected, events
