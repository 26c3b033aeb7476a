"""``adapters.psp.StripePsp`` against the PSP emulator as a real process, through the real SDK.

Each error class is produced by the emulator's own behaviour or knobs (declining test cards, an
injected 500 or timeout, bad parameters) and "charged once" is counted by the emulator, never
inferred from what the adapter says. Idempotency keys are built from row-like ids as a caller
would (``invoice:{id}:attempt:{n}``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
import stripe

from adapters.psp import Bug, Declined, StripePsp, Transient, Unknown, _decide
from core.settings import Settings
from devstack.services import free_port
from tests.psp_support import RunningEmulator, running_emulator

KEY = "sk_test_roomly_adapter"
TIMEOUT = 0.5  # the adapter's request timeout here; the emulator holds a "timeout" answer longer


@pytest.fixture(scope="module")
def emulator() -> Iterator[RunningEmulator]:
    with running_emulator() as running:
        yield running


@pytest_asyncio.fixture
async def psp(emulator: RunningEmulator) -> AsyncIterator[StripePsp]:
    emulator.knob("reset")
    async with StripePsp(KEY, api_base=emulator.url, timeout=TIMEOUT) as adapter:
        yield adapter


def sdk(emulator: RunningEmulator) -> stripe.StripeClient:
    """A plain SDK client to look at what the adapter left at the PSP."""
    return stripe.StripeClient(KEY, base_addresses={"api": emulator.url}, max_network_retries=0)


def charge_key(invoice_id: str, attempt: int) -> str:
    return f"invoice:{invoice_id}:attempt:{attempt}"


async def customer_with_card(psp: StripePsp, token: str = "pm_card_visa") -> tuple[str, str, str]:
    tenant = str(uuid.uuid4())
    customer = await psp.ensure_customer(tenant, name="Ada", email="ada@example.com", key=f"tenant:{tenant}:customer")
    pm = await psp.attach_default_payment_method(customer, token, key=f"tenant:{tenant}:pm:1")
    return tenant, customer, pm


async def test_customer_default_card_and_an_off_session_payment(psp: StripePsp, emulator: RunningEmulator):
    tenant, customer, pm = await customer_with_card(psp)
    again = await psp.ensure_customer(tenant, name="Ada", email="ada@example.com", key=f"tenant:{tenant}:customer")
    known = await psp.ensure_customer(tenant, name="Ada", email=None, key="unused", customer_id=customer)
    assert again == known == customer and customer.startswith("cus_")
    stored = sdk(emulator).v1.customers.retrieve(customer)
    assert stored.metadata is not None and stored.metadata.to_dict() == {"tenant_id": tenant}
    assert stored.invoice_settings is not None and stored.invoice_settings.default_payment_method == pm
    assert pm.startswith("pm_") and pm != "pm_card_visa"
    with pytest.raises(Bug, match="does not belong"):
        await psp.ensure_customer(str(uuid.uuid4()), name="Eve", email=None, key="k", customer_id=customer)

    invoice = str(uuid.uuid4())
    paid = await psp.create_payment(
        amount=2000, currency="EUR", customer_id=customer, payment_method=pm, invoice_id=invoice, attempt=1,
        key=charge_key(invoice, 1),
    )  # fmt: skip
    assert (paid.status, paid.amount, paid.amount_received, paid.currency) == ("succeeded", 2000, 2000, "eur")
    assert paid.customer == customer and paid.metadata == {"invoice_id": invoice, "attempt": "1"}
    assert paid.latest_charge is not None and paid.latest_charge.startswith("ch_") and paid.decline_code is None
    assert await psp.retrieve_payment_intent(paid.id) == paid
    assert await psp.find_payment_intent(customer, invoice_id=invoice, attempt=1) == paid
    assert await psp.find_payment_intent(customer, invoice_id=invoice, attempt=2) is None
    assert emulator.charges(status="succeeded", **{"metadata.invoice_id": invoice}) == 1

    # The same key again is the same PaymentIntent, not a second charge.
    replay = await psp.create_payment(
        amount=2000, currency="eur", customer_id=customer, payment_method=pm, invoice_id=invoice, attempt=1,
        key=charge_key(invoice, 1),
    )  # fmt: skip
    assert replay.id == paid.id and emulator.charges(**{"metadata.invoice_id": invoice}) == 1


async def test_lookup_pages_through_the_customers_intents(psp: StripePsp, emulator: RunningEmulator):
    """More intents than one list page (100): the first attempt is on the last page."""
    _, customer, pm = await customer_with_card(psp)
    invoice = str(uuid.uuid4())
    for attempt in range(1, 103):
        await psp.create_payment(
            amount=100 + attempt, currency="usd", customer_id=customer, payment_method=pm, invoice_id=invoice,
            attempt=attempt, key=charge_key(invoice, attempt),
        )  # fmt: skip
    first = await psp.find_payment_intent(customer, invoice_id=invoice, attempt=1)
    assert first is not None and first.amount == 101
    assert emulator.charges(**{"metadata.invoice_id": invoice}) == 102


@pytest.mark.parametrize(
    ("token", "decline_code"),
    [
        ("pm_card_chargeDeclined", "generic_decline"),
        ("pm_card_chargeDeclinedInsufficientFunds", "insufficient_funds"),
        ("pm_card_chargeDeclinedLostCard", "lost_card"),
        ("pm_card_chargeDeclinedExpiredCard", "expired_card"),
    ],
)
async def test_each_decline_is_declined_with_its_code(psp: StripePsp, emulator: RunningEmulator, token, decline_code):
    tenant = str(uuid.uuid4())
    customer = await psp.ensure_customer(tenant, name="Bo", email=None, key=f"tenant:{tenant}:customer")
    # Stripe refuses to save a card that declines: attaching it is already a decline.
    with pytest.raises(Declined) as refused:
        await psp.attach_default_payment_method(customer, token, key=f"tenant:{tenant}:pm:1")
    assert refused.value.decline_code == decline_code

    invoice = str(uuid.uuid4())
    with pytest.raises(Declined) as declined:
        await psp.create_payment(
            amount=2500, currency="usd", customer_id=customer, payment_method=token, invoice_id=invoice, attempt=1,
            key=charge_key(invoice, 1),
        )  # fmt: skip
    assert declined.value.decline_code == decline_code and declined.value.message
    assert declined.value.request_id is not None and declined.value.request_id.startswith("req_")
    intent = await psp.retrieve_payment_intent(declined.value.payment_intent_id or "")
    assert (intent.status, intent.decline_code, intent.amount_received) == ("requires_payment_method", decline_code, 0)
    assert emulator.charges(status="failed", **{"metadata.invoice_id": invoice}) == 1
    assert emulator.charges(status="succeeded") == 0


async def test_a_saved_card_that_stopped_working_is_declined(psp: StripePsp, emulator: RunningEmulator):
    _, customer, pm = await customer_with_card(psp, "pm_card_chargeCustomerFail")
    invoice = str(uuid.uuid4())
    with pytest.raises(Declined) as declined:
        await psp.create_payment(
            amount=1200, currency="usd", customer_id=customer, payment_method=pm, invoice_id=invoice, attempt=1,
            key=charge_key(invoice, 1),
        )  # fmt: skip
    assert declined.value.decline_code == "generic_decline"
    found = await psp.find_payment_intent(customer, invoice_id=invoice, attempt=1)
    assert found is not None and found.id == declined.value.payment_intent_id and found.status != "succeeded"
    assert emulator.charges(status="succeeded") == 0


@pytest.mark.parametrize(("when", "charged_by_the_failed_call"), [("before", 0), ("after", 1)])
async def test_a_500_is_transient_and_the_retry_with_the_same_key_charges_once(
    psp: StripePsp, emulator: RunningEmulator, when, charged_by_the_failed_call
):
    _, customer, pm = await customer_with_card(psp)
    invoice = str(uuid.uuid4())
    emulator.knob("failures", mode="500", when=when, method="POST", path="/v1/payment_intents")
    with pytest.raises(Transient):
        await psp.create_payment(
            amount=4200, currency="usd", customer_id=customer, payment_method=pm, invoice_id=invoice, attempt=1,
            key=charge_key(invoice, 1),
        )  # fmt: skip
    assert emulator.charges(**{"metadata.invoice_id": invoice}) == charged_by_the_failed_call

    retried = await psp.create_payment(
        amount=4200, currency="usd", customer_id=customer, payment_method=pm, invoice_id=invoice, attempt=1,
        key=charge_key(invoice, 1),
    )  # fmt: skip
    assert retried.status == "succeeded" and retried.amount_received == 4200
    assert emulator.charges(status="succeeded", **{"metadata.invoice_id": invoice}) == 1
    assert emulator.stats()["injected_failures"] == 1


async def test_a_timeout_is_unknown_and_the_lookup_finds_the_charge(psp: StripePsp, emulator: RunningEmulator):
    """The call ran and the answer was lost: the lookup finds the intent; nothing is charged again."""
    _, customer, pm = await customer_with_card(psp)
    invoice = str(uuid.uuid4())
    emulator.knob("failures", mode="timeout", when="after", seconds=TIMEOUT * 3, path="/v1/payment_intents")
    with pytest.raises(Unknown):
        await psp.create_payment(
            amount=3100, currency="usd", customer_id=customer, payment_method=pm, invoice_id=invoice, attempt=1,
            key=charge_key(invoice, 1),
        )  # fmt: skip
    found = await psp.find_payment_intent(customer, invoice_id=invoice, attempt=1)
    assert found is not None and (found.status, found.amount_received) == ("succeeded", 3100)
    await asyncio.sleep(TIMEOUT * 3)  # the held answer is released: still one charge
    assert emulator.charges(**{"metadata.invoice_id": invoice}) == 1
    assert emulator.stats()["payment_intents"] == 1


async def test_a_timeout_before_the_call_ran_finds_nothing_and_the_same_key_charges_once(
    psp: StripePsp, emulator: RunningEmulator
):
    """The call is still held when we look: nothing found, so the attempt is retried with its key;
    when the held call finally runs it replays the retry's result."""
    _, customer, pm = await customer_with_card(psp)
    invoice = str(uuid.uuid4())
    emulator.knob("failures", mode="timeout", when="before", seconds=TIMEOUT * 3, path="/v1/payment_intents")
    with pytest.raises(Unknown):
        await psp.create_payment(
            amount=3300, currency="usd", customer_id=customer, payment_method=pm, invoice_id=invoice, attempt=1,
            key=charge_key(invoice, 1),
        )  # fmt: skip
    assert await psp.find_payment_intent(customer, invoice_id=invoice, attempt=1) is None
    retried = await psp.create_payment(
        amount=3300, currency="usd", customer_id=customer, payment_method=pm, invoice_id=invoice, attempt=1,
        key=charge_key(invoice, 1),
    )  # fmt: skip
    assert retried.status == "succeeded"
    await asyncio.sleep(TIMEOUT * 4)  # the held first call has run by now, as a replay
    assert emulator.charges(**{"metadata.invoice_id": invoice}) == 1
    assert emulator.stats()["idempotent_replays"] >= 1


async def test_a_timeout_on_a_read_is_transient(psp: StripePsp, emulator: RunningEmulator):
    emulator.knob("failures", mode="timeout", when="before", seconds=TIMEOUT * 3, method="GET")
    with pytest.raises(Transient):
        await psp.retrieve_payment_intent("pi_whatever")


async def test_an_unreachable_psp_is_transient_not_unknown():
    async with StripePsp(KEY, api_base=f"http://127.0.0.1:{free_port()}", timeout=TIMEOUT) as nowhere:
        with pytest.raises(Transient, match="could not reach"):
            await nowhere.create_payment(
                amount=500, currency="usd", customer_id="cus_x", payment_method="pm_x", invoice_id="i", attempt=1,
                key="invoice:i:attempt:1",
            )  # fmt: skip


async def test_invalid_requests_and_bad_credentials_are_bugs(psp: StripePsp, emulator: RunningEmulator):
    _, customer, pm = await customer_with_card(psp)
    invoice = str(uuid.uuid4())
    with pytest.raises(Bug, match="amount"):  # below Stripe's minimum of 50
        await psp.create_payment(
            amount=10, currency="usd", customer_id=customer, payment_method=pm, invoice_id=invoice, attempt=0,
            key=charge_key(invoice, 0),
        )  # fmt: skip
    with pytest.raises(Bug):
        await psp.retrieve_payment_intent("pi_doesnotexist")
    paid = await psp.create_payment(
        amount=800, currency="usd", customer_id=customer, payment_method=pm, invoice_id=invoice, attempt=1,
        key=charge_key(invoice, 1),
    )  # fmt: skip
    with pytest.raises(Bug, match="IdempotencyError"):  # one key, another request: our bug
        await psp.create_payment(
            amount=900, currency="usd", customer_id=customer, payment_method=pm, invoice_id=invoice, attempt=1,
            key=charge_key(invoice, 1),
        )  # fmt: skip
    async with StripePsp("sk_live_not_for_the_emulator", api_base=emulator.url, timeout=TIMEOUT) as wrong:
        with pytest.raises(Bug, match="AuthenticationError"):
            await wrong.retrieve_payment_intent(paid.id)
    assert emulator.charges(**{"metadata.invoice_id": invoice}) == 1


def test_rate_limits_and_a_key_in_flight_are_transient():
    """The emulator has no 429 knob and serializes concurrent keys, so these two rows of the
    decision table are checked on the SDK's own error objects as Stripe would answer them."""
    limited = stripe.RateLimitError("Too many requests", http_status=429, code="rate_limit")
    in_flight = stripe.IdempotencyError("another request in progress", http_status=409)
    mismatch = stripe.IdempotencyError("Keys for idempotent requests ...", http_status=400)
    assert isinstance(_decide(limited, mutating=True), Transient)
    assert isinstance(_decide(in_flight, mutating=True), Transient)
    assert isinstance(_decide(mismatch, mutating=True), Bug)


async def test_refunds_carry_their_key(psp: StripePsp, emulator: RunningEmulator):
    _, customer, pm = await customer_with_card(psp)
    invoice = str(uuid.uuid4())
    paid = await psp.create_payment(
        amount=2000, currency="usd", customer_id=customer, payment_method=pm, invoice_id=invoice, attempt=1,
        key=charge_key(invoice, 1),
    )  # fmt: skip
    part = await psp.refund(paid.id, amount=500, key="credit-note:cn-1:refund", metadata={"credit_note_id": "cn-1"})
    again = await psp.refund(paid.id, amount=500, key="credit-note:cn-1:refund", metadata={"credit_note_id": "cn-1"})
    assert part == again and (part.status, part.amount, part.currency) == ("succeeded", 500, "usd")
    assert part.payment_intent == paid.id and part.charge == paid.latest_charge
    rest = await psp.refund(paid.id, amount=None, key="credit-note:cn-2:refund")
    assert rest.amount == 1500  # 2000 - 500: what was left
    with pytest.raises(Bug):  # nothing left to refund
        await psp.refund(paid.id, amount=100, key="credit-note:cn-3:refund")
    assert emulator.stats()["refunds"] == 2


def test_settings_build_the_adapter_and_production_refuses_the_local_secrets():
    adapter = StripePsp.from_settings(Settings(stripe_api_base="http://127.0.0.1:1", stripe_timeout=2.5))
    assert adapter._http._timeout == 2.5
    base = {"environment": "production", "database_url": "postgresql://db/x", "temporal_address": "t:7233"}
    base |= {"smtp_host": "smtp.example.com", "smtp_from": "billing@example.com"}
    issuer = {"issuer_name": "Roomly AG", "issuer_address": "Bahnhofstrasse 1", "issuer_tax_id": "CHE-1"}
    with pytest.raises(ValueError, match="STRIPE_API_KEY, STRIPE_WEBHOOK_SECRET must be set"):
        Settings.model_validate(base | issuer)
    with pytest.raises(ValueError, match="STRIPE_WEBHOOK_SECRET must be set") as one:
        Settings.model_validate(base | issuer | {"stripe_api_key": "sk_live_1"})
    assert "STRIPE_API_KEY" not in str(one.value)
    real = Settings.model_validate(base | issuer | {"stripe_api_key": "sk_live_1", "stripe_webhook_secret": "whsec_1"})
    assert (real.stripe_api_key, real.stripe_webhook_secret) == ("sk_live_1", "whsec_1")
