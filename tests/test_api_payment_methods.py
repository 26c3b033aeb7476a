"""``POST /v1/tenants/{id}/payment-method``: the tenant's saved card, through the API on real
PostgreSQL against the PSP emulator (a process; its customers and cards read back with the stripe SDK)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import text

from adapters.psp import Declined, StripePsp
from devstack import demo
from devstack.services import free_port
from tests.psp_support import RunningEmulator, running_emulator
from tests.test_api_support import api_client, error_locs, tenant

pytestmark = pytest.mark.db


@pytest.fixture(scope="module")
def psp_process() -> Iterator[RunningEmulator]:
    with running_emulator() as running:
        yield running


@pytest.fixture
def emulator(psp_process: RunningEmulator) -> RunningEmulator:
    psp_process.knob("reset")
    return psp_process


@pytest_asyncio.fixture
async def api(sessions, settings, temporal_env, emulator) -> AsyncIterator[httpx.AsyncClient]:
    configured = settings.model_copy(update={"stripe_api_base": emulator.url, "stripe_timeout": 5.0})
    async with api_client(configured, temporal_env.client) as client:
        yield client


def path(tenant_id: str) -> str:
    return f"/v1/tenants/{tenant_id}/payment-method"


async def stored(sessions, tenant_id: str) -> tuple[str | None, str | None]:
    async with sessions() as s:
        row = (
            await (await s.connection()).execute(
                text("SELECT psp_customer_id, default_payment_method FROM tenants WHERE id = :id"), {"id": tenant_id}
            )
        ).one()
        return row.psp_customer_id, row.default_payment_method


async def test_a_card_is_saved_as_the_default_of_the_tenants_customer(api, sessions, emulator):
    ada = await tenant(api)
    response = await api.post(path(ada["id"]), json={"payment_method": "pm_card_visa"})
    assert response.status_code == 200, response.text
    saved = response.json()
    assert saved["psp_customer_id"].startswith("cus_") and saved["default_payment_method"].startswith("pm_")
    assert await stored(sessions, ada["id"]) == (saved["psp_customer_id"], saved["default_payment_method"])
    shown = (await api.get(f"/v1/tenants/{ada['id']}")).json()
    assert (shown["psp_customer_id"], shown["default_payment_method"]) == tuple(saved.values())

    sdk = emulator.client()
    customer = sdk.v1.customers.retrieve(saved["psp_customer_id"])
    assert customer.metadata["tenant_id"] == ada["id"] and customer.email == ada["email"]
    assert customer.invoice_settings.default_payment_method == saved["default_payment_method"]

    # The same request again (a client's retry): the same customer and card, nothing new at the PSP.
    again = await api.post(path(ada["id"]), json={"payment_method": "pm_card_visa"})
    assert again.json() == saved
    # Another card: the same customer, a new default.
    other = (await api.post(path(ada["id"]), json={"payment_method": "pm_card_mastercard"})).json()
    assert other["psp_customer_id"] == saved["psp_customer_id"]
    assert other["default_payment_method"] not in (None, saved["default_payment_method"])
    assert len(sdk.v1.customers.list(params={"limit": 100}).data) == 1
    assert (
        sdk.v1.customers.retrieve(saved["psp_customer_id"]).invoice_settings.default_payment_method
        == (other["default_payment_method"])
    )

    # The card is charged off-session as saved.
    async with StripePsp("sk_test_cards", api_base=emulator.url, timeout=5) as psp:
        paid = await psp.create_payment(
            amount=1000, currency="usd", customer_id=other["psp_customer_id"],
            payment_method=other["default_payment_method"], invoice_id="inv", attempt=1, key="k1",
        )  # fmt: skip
    assert paid.status == "succeeded"


async def test_the_demo_declining_card_attaches_then_every_charge_declines(api, sessions, emulator):
    ada = await tenant(api)
    response = await api.post(path(ada["id"]), json={"payment_method": "pm_card_chargeCustomerFail"})
    assert response.status_code == 200, response.text
    saved = response.json()
    async with StripePsp("sk_test_cards", api_base=emulator.url, timeout=5) as psp:
        with pytest.raises(Declined) as declined:
            await psp.create_payment(
                amount=1000, currency="usd", customer_id=saved["psp_customer_id"],
                payment_method=saved["default_payment_method"], invoice_id="inv", attempt=1, key="k2",
            )  # fmt: skip
    assert declined.value.decline_code == "generic_decline"


@pytest.mark.parametrize(
    ("card", "code"),
    [
        ("pm_card_chargeDeclined", "generic_decline"),
        ("pm_card_chargeDeclinedInsufficientFunds", "insufficient_funds"),
    ],
)
async def test_a_card_declined_when_attached_is_a_422_naming_the_field(api, sessions, emulator, card, code):
    ada = await tenant(api)
    response = await api.post(path(ada["id"]), json={"payment_method": card})
    assert error_locs(response) == [["body", "payment_method"]]
    [error] = response.json()["errors"]
    assert error["type"] == "card_declined" and code in error["message"]
    customer, default = await stored(sessions, ada["id"])
    assert customer is not None and default is None  # the customer stays for the next card


async def test_an_unknown_payment_method_is_a_422(api, sessions, emulator):
    ada = await tenant(api)
    response = await api.post(path(ada["id"]), json={"payment_method": "pm_card_nonexistent"})
    assert error_locs(response) == [["body", "payment_method"]]
    assert (await stored(sessions, ada["id"]))[1] is None


@pytest.mark.parametrize(
    "body",
    [{}, {"payment_method": ""}, {"payment_method": "tok_visa"}, {"payment_method": 42}, {"payment_method": "pm_ x"}],
)
async def test_a_bad_body_is_a_422_naming_the_field(api, sessions, emulator, body):
    ada = await tenant(api)
    response = await api.post(path(ada["id"]), json=body)
    assert ["body", "payment_method"] in error_locs(response)
    assert await stored(sessions, ada["id"]) == (None, None)


async def test_an_unknown_tenant_is_a_404(api, emulator):
    response = await api.post(path("00000000-0000-0000-0000-000000000001"), json={"payment_method": "pm_card_visa"})
    assert response.status_code == 404
    [error] = response.json()["errors"]
    assert (error["type"], error["in"]) == ("not_found", "path")


async def test_a_psp_error_is_a_503_and_the_retry_makes_one_customer(api, sessions, emulator):
    ada = await tenant(api)
    emulator.knob("failures", mode="500", when="after", method="POST", path="/v1/customers")
    response = await api.post(path(ada["id"]), json={"payment_method": "pm_card_visa"})
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "5"
    assert response.json()["errors"][0]["type"] == "service_unavailable"
    assert await stored(sessions, ada["id"]) == (None, None)

    retried = await api.post(path(ada["id"]), json={"payment_method": "pm_card_visa"})
    assert retried.status_code == 200, retried.text
    assert len(emulator.client().v1.customers.list(params={"limit": 100}).data) == 1  # the key replayed it


async def test_an_unreachable_psp_is_a_503(sessions, settings, temporal_env):
    configured = settings.model_copy(update={"stripe_api_base": f"http://127.0.0.1:{free_port()}"})
    async with api_client(configured, temporal_env.client) as client:
        ada = await tenant(client)
        response = await client.post(path(ada["id"]), json={"payment_method": "pm_card_visa"})
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert await stored(sessions, ada["id"]) == (None, None)


async def test_the_demo_saves_a_card_per_tenant_and_one_that_declines(api, sessions, emulator):
    now = datetime.now(UTC)
    first = await demo.seed(api, now)
    assert first.created["cards"] == len(demo.TENANTS)
    tenants = {t["email"]: t for t in (await api.get("/v1/tenants")).json()["data"]}
    assert all(t["default_payment_method"] and t["psp_customer_id"] for t in tenants.values())
    again = await demo.seed(api, now)  # a second `make up` saves nothing again
    assert (again.created["cards"], again.existing["cards"]) == (0, len(demo.TENANTS))

    declining = next(t for t in demo.TENANTS if t.card == demo.DECLINING_CARD)
    async with StripePsp("sk_test_cards", api_base=emulator.url, timeout=5) as psp:
        for spec in demo.TENANTS:
            row = tenants[spec.email]
            charge = psp.create_payment(
                amount=1000, currency="usd", customer_id=row["psp_customer_id"],
                payment_method=row["default_payment_method"], invoice_id=row["id"], attempt=1, key=row["id"],
            )  # fmt: skip
            if spec is declining:
                with pytest.raises(Declined):
                    await charge
            else:
                assert (await charge).status == "succeeded"
