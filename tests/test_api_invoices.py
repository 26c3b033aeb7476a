"""Invoices over HTTP: per-line discount amounts (stored and previewed) and the list filters."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio

from schema.models import Invoice, PromoCode, PromoDuration, SubscriptionPromo
from services import invoicing
from services.invoicing import InvoiceTerms
from tests import factories
from tests.test_api_support import api_client, error_locs
from workflows.contracts import CreateInvoiceInput

pytestmark = pytest.mark.db

START = datetime(2026, 1, 10, 9, tzinfo=UTC)
ANCHOR = datetime(2026, 1, 10, tzinfo=UTC)
FEB_10 = datetime(2026, 2, 10, tzinfo=UTC)
TERMS = InvoiceTerms("Roomly Rooms GmbH", "Musterstraße 1", "DE123456789")


@pytest_asyncio.fixture
async def api(sessions, settings, temporal_env):
    async with api_client(settings, temporal_env.client) as client:
        yield client


async def create(sessions, sub, index: int, start: datetime) -> uuid.UUID:
    async with sessions() as s:
        result = await invoicing.create_invoice(s, CreateInvoiceInput(sub.id, index, start, f"wf-{index}"))
    return result.invoice_id


def amounts(lines: list[dict[str, Any]]) -> list[tuple[str, int, list[dict[str, Any]]]]:
    return [(line["kind"], line["amount"], line["discount_amounts"]) for line in lines]


async def test_a_fixed_discount_is_spread_over_the_charge_lines_in_the_preview_and_the_invoice(api, sessions):
    cat = await factories.catalog(sessions)
    sub = await factories.subscriber(sessions, cat, START)
    await factories.usage(sessions, sub, cat.kwh, ["12.5", "7.25", "0.1"], START + timedelta(days=1))
    await factories.usage(sessions, sub, cat.water, ["1.5"], START + timedelta(days=3))
    async with sessions() as s:
        promo = PromoCode(code="FIXED10", amount_off=1000, currency="USD", duration=PromoDuration.forever)
        s.add(promo)
        await s.flush()
        s.add(
            SubscriptionPromo(
                subscription_id=sub.id, promo_code_id=promo.id, redeemed_at=datetime(2026, 1, 1, tzinfo=UTC)
            )
        )
        await s.commit()
    first = await create(sessions, sub, 0, ANCHOR)

    # Boundary 1: 19.85 kWh x 28.5 = 565.725 -> 566; 1.5 m3 x 410 = 615; base fee 65000; charges 66181.
    # 1000 off in proportion: 8.552.., 9.292.., 982.155..; floors 8 + 9 + 982 = 999; the last 1 goes
    # to the largest remainder (electricity, 0.552..): 9, 9, 982.
    spread = [
        ("usage", 566, [{"promo_code": "FIXED10", "amount": 9}]),
        ("usage", 615, [{"promo_code": "FIXED10", "amount": 9}]),
        ("base_fee", 65000, [{"promo_code": "FIXED10", "amount": 982}]),
        ("discount", -1000, []),
    ]
    preview = await api.get(f"/v1/subscriptions/{sub.id}/upcoming-invoice", params={"as_of": "2026-02-15T00:00:00Z"})
    assert preview.status_code == 200, preview.text
    assert amounts(preview.json()["lines"]) == spread and preview.json()["total"] == 65181

    second = await create(sessions, sub, 1, FEB_10)
    detail = (await api.get(f"/v1/invoices/{second}")).json()
    assert amounts(detail["lines"]) == spread and detail["total"] == 65181
    assert detail["number"] is None and detail["status"] == "draft"  # no number before finalization
    async with sessions() as s:
        await invoicing.finalize_invoice(s, first, TERMS, datetime(2026, 2, 15, tzinfo=UTC))
    only_fee = (await api.get(f"/v1/invoices/{first}")).json()
    assert amounts(only_fee["lines"]) == [
        ("base_fee", 65000, [{"promo_code": "FIXED10", "amount": 1000}]),
        ("discount", -1000, []),
    ]
    assert only_fee["number"] == "INV-000001" and only_fee["status"] == "open"


async def invoice_row(sessions, sub, start: datetime) -> Invoice:
    invoice = Invoice(
        tenant_id=sub.tenant_id,
        subscription_id=sub.id,
        period_start=start,
        period_end=start + timedelta(days=28),
        currency="USD",
        subtotal=100,
        total=100,
        workflow_id=f"wf-{uuid.uuid4().hex}",
    )
    async with sessions() as s:
        s.add(invoice)
        await s.flush()
        s.add(factories.base_fee_line(invoice.id, 100))  # lines sum to the total: finalization posts them
        await s.commit()
    return invoice


JAN, FEB, MAR = (datetime(2026, m, 1, tzinfo=UTC) for m in (1, 2, 3))


async def test_invoices_are_listed_by_subscription_and_period_start(api, sessions):
    cat = await factories.catalog(sessions)
    a = await factories.subscriber(sessions, cat, START, name="Ada")
    b = await factories.subscriber(sessions, cat, START, name="Grace")
    rows = {
        "a-jan": await invoice_row(sessions, a, JAN),
        "a-feb": await invoice_row(sessions, a, FEB),
        "a-mar": await invoice_row(sessions, a, MAR),
        "b-jan": await invoice_row(sessions, b, JAN),
        "b-feb": await invoice_row(sessions, b, FEB),
    }
    async with sessions() as s:
        await invoicing.finalize_invoice(s, rows["b-feb"].id, TERMS, datetime(2026, 2, 2, tzinfo=UTC))
    names = {str(invoice.id): name for name, invoice in rows.items()}

    async def listed(**params: str) -> set[str]:
        response = await api.get("/v1/invoices", params=params)
        assert response.status_code == 200, response.text
        return {names[i["id"]] for i in response.json()["data"]}

    assert await listed(subscription_id=str(a.id)) == {"a-jan", "a-feb", "a-mar"}
    assert await listed(subscription_id=str(a.id), period_start=FEB.isoformat()) == {"a-feb"}
    assert await listed(period_start="2026-01-01T01:00:00+01:00") == {"a-jan", "b-jan"}  # the same instant
    assert await listed(period_start_from=FEB.isoformat()) == {"a-feb", "a-mar", "b-feb"}
    assert await listed(period_start_from=FEB.isoformat(), period_start_to=MAR.isoformat()) == {"a-feb", "b-feb"}
    assert await listed(period_start_to=FEB.isoformat()) == {"a-jan", "b-jan"}
    assert await listed(tenant_id=str(b.tenant_id), status="open") == {"b-feb"}
    assert await listed(subscription_id=str(b.id), period_start_from=MAR.isoformat()) == set()
    assert await listed(subscription_id=str(uuid.uuid4())) == set()

    backwards = await api.get(
        "/v1/invoices", params={"period_start_from": MAR.isoformat(), "period_start_to": FEB.isoformat()}
    )
    assert error_locs(backwards) == [["query", "period_start_to"]]
    assert error_locs(await api.get("/v1/invoices", params={"period_start": "2026-02-01T00:00:00"})) == [
        ["query", "period_start"]
    ]  # no zone: refused rather than guessed
    assert error_locs(await api.get("/v1/invoices", params={"subscription_id": "nope"})) == [
        ["query", "subscription_id"]
    ]
