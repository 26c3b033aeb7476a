"""Payout reconciliation against the PSP emulator as a real process and real PostgreSQL.

Payments are made through ``StripePsp`` (customer, ``pm_card_visa``, ``create_payment``); our
``payment_attempts`` rows and their ledger captures are written as collection will write them;
the emulator's automatic payout (``POST /_emulator/payouts``) pays the available balance out.
Fees are the emulator's 2.9% + 30, worked by hand: 2000 -> 88, 1050 -> 60, 500 -> 45,
1200 -> 65, 1500 -> 74.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import pytest_asyncio
from sqlmodel import func, select
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ActivityError, ApplicationError, RetryState

from activities.reconciliation import ReconciliationActivities
from adapters.psp import Bug, PaymentIntent, StripePsp
from api.main import create_app
from schema.models import (
    AttemptStatus,
    LedgerPosting,
    PaymentAttempt,
    PaymentMethodKind,
    PaymentSource,
    ReconciliationOutcome,
    Subscription,
)
from services import ledger, reconciliation
from services.errors import NotFound
from tests import factories
from tests.psp_support import RunningEmulator, running_emulator
from tests.test_api_support import bearer
from tests.test_invoice_immutability import BASE, invoice_with_lines
from worker import build_worker
from workflows.contracts import (
    ERR_PSP_BUG,
    PAYOUT_RECONCILIATION_WORKFLOW,
    ReconcilePayoutInput,
    ReconcilePayoutResult,
    reconciliation_workflow_id,
)

pytestmark = pytest.mark.db

KEY = "sk_test_roomly_reconciliation"
M = ReconciliationOutcome


@pytest.fixture(scope="module")
def emulator() -> Iterator[RunningEmulator]:
    # Charges stay pending for an hour unless settled: the tests decide what a payout pays out.
    with running_emulator("--available-after", "3600") as running:
        yield running


@pytest_asyncio.fixture
async def psp(emulator: RunningEmulator) -> AsyncIterator[StripePsp]:
    emulator.knob("reset")
    async with StripePsp(KEY, api_base=emulator.url, timeout=5) as adapter:
        yield adapter


class Shop:
    """A tenant with a PSP customer and card, one invoice, and our records of its payments."""

    def __init__(self, sessions, psp: StripePsp, sub: Subscription, invoice_id: uuid.UUID, customer: str, pm: str):
        self.sessions, self.psp, self.sub, self.invoice_id = sessions, psp, sub, invoice_id
        self.customer, self.pm = customer, pm
        self.attempts = 0

    async def pay(self, amount: int) -> tuple[PaymentIntent, int]:
        """A real payment at the PSP; its intent and the fee of its balance transaction."""
        self.attempts += 1
        n = self.attempts
        key = f"invoice:{self.invoice_id}:attempt:{n}"
        intent = await self.psp.create_payment(
            amount=amount, currency="USD", customer_id=self.customer, payment_method=self.pm,
            invoice_id=str(self.invoice_id), attempt=n, key=key,
        )  # fmt: skip
        assert intent.status == "succeeded" and intent.latest_charge
        (txn,) = await self.psp.list_source_balance_transactions(intent.latest_charge)
        return intent, txn.fee

    async def record(
        self,
        *,
        amount: int,
        charge_id: str | None,
        fee: int | None,
        intent_id: str | None = None,
        post_fee: bool = True,
        status: AttemptStatus = AttemptStatus.succeeded,
    ) -> PaymentAttempt:
        """Our attempt row (succeeded a minute ago) and its capture posting (and fee posting)."""
        if intent_id is None:
            self.attempts += 1
        at = datetime.now(UTC) - timedelta(minutes=1)
        attempt = PaymentAttempt(
            invoice_id=self.invoice_id,
            tenant_id=self.sub.tenant_id,
            number=self.attempts,
            idempotency_key=f"invoice:{self.invoice_id}:attempt:{self.attempts}",
            source=PaymentSource.automatic,
            method=PaymentMethodKind.card,
            amount=amount,
            currency="USD",
            status=status,
            psp_payment_intent_id=intent_id,
            psp_charge_id=charge_id,
            psp_fee=fee,
            succeeded_at=at,
        )
        async with self.sessions() as s:
            s.add(attempt)
            await s.flush()
            await ledger.post_payment_captured(s, str(attempt.id), self.sub.tenant_id, "USD", amount, at)
            if post_fee and fee:
                await ledger.post_psp_fee(s, str(attempt.id), "USD", fee, at, tenant_id=self.sub.tenant_id)
            await s.commit()
            await s.refresh(attempt)
        return attempt

    async def paid_and_recorded(self, amount: int) -> tuple[PaymentIntent, PaymentAttempt]:
        intent, fee = await self.pay(amount)
        attempt = await self.record(amount=amount, charge_id=intent.latest_charge, fee=fee, intent_id=intent.id)
        return intent, attempt


@pytest_asyncio.fixture
async def shop(sessions, psp: StripePsp) -> Shop:
    sub = await factories.subscriber(sessions, await factories.catalog(sessions), BASE)
    invoice_id = await invoice_with_lines(sessions, sub, finalized=False)
    tenant = str(sub.tenant_id)
    customer = await psp.ensure_customer(tenant, name="Ada", email=None, key=f"tenant:{tenant}:customer")
    pm = await psp.attach_default_payment_method(customer, "pm_card_visa", key=f"tenant:{tenant}:pm:1")
    return Shop(sessions, psp, sub, invoice_id, customer, pm)


def payout_now(emulator: RunningEmulator, *, settle: bool = True) -> str:
    """Settle what is pending (unless told not to), run the automatic payout; its one po_ id."""
    if settle:
        emulator.knob("settle")
    (payout,) = emulator.knob("payouts")["payouts"]
    payout_id: str = payout["id"]
    return payout_id


async def reconcile(sessions, psp: StripePsp, payout_id: str) -> reconciliation.Reconciled:
    async with sessions() as s:
        return await reconciliation.reconcile_payout(s, psp, payout_id)


async def clearing(sessions) -> int:
    async with sessions() as s:
        return await reconciliation.clearing_balance(s, "USD")


def outcomes(report: reconciliation.PayoutReport) -> list[tuple[str, ReconciliationOutcome]]:
    return [(item.type, item.outcome) for item in report.items]


async def postings(sessions, source_type: str, kind: str) -> int:
    async with sessions() as s:
        count = (
            await s.exec(
                select(func.count())
                .select_from(LedgerPosting)
                .where(LedgerPosting.source_type == source_type, LedgerPosting.kind == kind)
            )
        ).one()
        return int(count)


async def test_every_payout_matches_and_psp_clearing_is_the_psps_pending_plus_available(
    sessions, psp: StripePsp, emulator: RunningEmulator, shop: Shop
):
    await shop.paid_and_recorded(2000)  # fee 88, net 1912
    await shop.paid_and_recorded(1050)  # fee 60, net 990
    emulator.knob("settle")
    late, late_attempt = await shop.paid_and_recorded(500)  # fee 45, net 455: still pending at the payout
    assert late_attempt.psp_fee == 45
    first = payout_now(emulator, settle=False)

    done = await reconcile(sessions, psp, first)
    report = done.report
    assert outcomes(report) == [("charge", M.matched), ("charge", M.matched), ("payout", M.matched)]
    assert (report.currency, report.amount, report.payout_status) == ("USD", 2902, "paid")  # 1912 + 990
    assert (report.matched, report.missing_ours, report.missing_psp, report.amount_mismatch) == (3, 0, 0, 0)
    assert report.all_matched and done.postings_created == 1  # the payout; the fees were posted at capture
    assert [(i.psp_amount, i.psp_fee, i.psp_net, i.our_amount, i.our_fee) for i in report.items] == [
        (2000, 88, 1912, 2000, 88),
        (1050, 60, 990, 1050, 60),
        (-2902, 0, -2902, -2902, 0),
    ]
    # psp_clearing: 2000 + 1050 + 500 - 88 - 60 - 45 - 2902 = 455 = the PSP's pending 455 + available 0.
    balance = await psp.balance()
    assert (balance.pending["USD"], balance.available["USD"]) == (455, 0)
    assert await clearing(sessions) == 455 == balance.total("USD")
    assert (report.clearing_balance, report.psp_balance) == (455, 455)

    # Again: the same stored report, nothing posted twice.
    again = await reconcile(sessions, psp, first)
    assert again.postings_created == 0
    assert dataclasses.replace(again.report, reconciled_at=report.reconciled_at) == report
    assert await postings(sessions, "payout", ledger.PAYOUT) == 1 and await clearing(sessions) == 455

    # The late payment comes in the next payout; then clearing and the PSP are both empty.
    second = payout_now(emulator)
    report2 = (await reconcile(sessions, psp, second)).report
    assert outcomes(report2) == [("charge", M.matched), ("payout", M.matched)]
    assert report2.items[0].source_id == late.latest_charge and report2.amount == 455
    assert await clearing(sessions) == 0 == (await psp.balance()).total("USD")


async def test_reconciliation_flags_a_missing_payment_and_a_wrong_amount(
    sessions, psp: StripePsp, emulator: RunningEmulator, shop: Shop
):
    good, good_attempt = await shop.paid_and_recorded(2000)
    # Recorded without its fee: reconciliation posts the PSP's 88 under the capture's key.
    unfeed, fee = await shop.pay(1050)
    unfeed_attempt = await shop.record(
        amount=1050, charge_id=unfeed.latest_charge, fee=None, intent_id=unfeed.id, post_fee=False
    )
    assert fee == 60
    theirs, _ = await shop.pay(1500)  # the PSP has it, we have no record: missing_ours
    wrong, wrong_fee = await shop.pay(1200)  # we recorded 1300: amount_mismatch
    wrong_attempt = await shop.record(amount=1300, charge_id=wrong.latest_charge, fee=wrong_fee, intent_id=wrong.id)
    # We claim a payment succeeded that the PSP never had: missing_psp.
    ghost = await shop.record(amount=700, charge_id="ch_never_paid_out", fee=None)
    payout_id = payout_now(emulator)

    done = await reconcile(sessions, psp, payout_id)
    report = done.report
    by_source = {item.source_id: item for item in report.items}
    assert by_source[good.latest_charge].outcome == M.matched
    assert by_source[good.latest_charge].payment_attempt_id == good_attempt.id
    assert by_source[unfeed.latest_charge].outcome == M.matched
    missing_ours = by_source[theirs.latest_charge]
    assert (missing_ours.outcome, missing_ours.psp_amount, missing_ours.our_amount) == (M.missing_ours, 1500, None)
    mismatch = by_source[wrong.latest_charge]
    assert (mismatch.outcome, mismatch.psp_amount, mismatch.our_amount) == (M.amount_mismatch, 1200, 1300)
    assert mismatch.message == "amount: ours 1300, PSP 1200" and mismatch.payment_attempt_id == wrong_attempt.id
    missing_psp = by_source["ch_never_paid_out"]
    assert (missing_psp.outcome, missing_psp.type, missing_psp.balance_transaction_id) == (
        M.missing_psp,
        "charge",
        None,
    )
    assert missing_psp.payment_attempt_id == ghost.id and missing_psp.our_amount == 700
    assert "no balance transaction" in missing_psp.message
    # 1912 + 990 + 1426 + 1135 = 5463 paid out; the payout's own transaction matches its transactions.
    assert report.amount == 5463 and by_source[payout_id].outcome == M.matched
    assert (report.matched, report.missing_ours, report.missing_psp, report.amount_mismatch) == (3, 1, 1, 1)
    assert not report.all_matched
    assert [item.type for item in report.items] == ["charge"] * 4 + ["payout", "charge"]
    assert done.postings_created == 2  # the payout and the missing fee (60)
    async with sessions() as s:
        fee_posting = (
            await s.exec(
                select(LedgerPosting).where(
                    LedgerPosting.source_type == "payment",
                    LedgerPosting.source_id == str(unfeed_attempt.id),
                    LedgerPosting.kind == ledger.PSP_FEE,
                )
            )
        ).one()
    assert fee_posting.tenant_id == shop.sub.tenant_id

    # Posting the fee again as capture will (same key, same entries) adds nothing.
    async with sessions() as s:
        again = await ledger.post_psp_fee(s, str(unfeed_attempt.id), "USD", 60, datetime.now(UTC))
        assert not again.created

    # Reconciling again: the same report; the ghost stays missing until someone fixes our record.
    second = await reconcile(sessions, psp, payout_id)
    assert second.postings_created == 0
    assert dataclasses.replace(second.report, reconciled_at=report.reconciled_at) == report

    # CSV rows of the report, one per item.
    rows = list(reconciliation.report_rows(report))
    assert len(rows) == 6 and rows[-1][2] == "missing_psp" and rows[-1][5] == "ch_never_paid_out"


async def test_a_refund_is_matched_to_its_ledger_posting(
    sessions, psp: StripePsp, emulator: RunningEmulator, shop: Shop
):
    intent, attempt = await shop.paid_and_recorded(2000)  # net 1912
    refund = await psp.refund(intent.id, amount=500, key=f"payment:{attempt.id}:refund:1")
    async with sessions() as s:
        await ledger.post_refund(s, refund.id, shop.sub.tenant_id, "USD", 500, datetime.now(UTC))
        await s.commit()
    other = await psp.refund(intent.id, amount=100, key=f"payment:{attempt.id}:refund:2")  # not in our ledger
    payout_id = payout_now(emulator)

    report = (await reconcile(sessions, psp, payout_id)).report
    by_source = {item.source_id: item for item in report.items}
    assert report.amount == 1312  # 1912 - 500 - 100
    assert (by_source[refund.id].outcome, by_source[refund.id].psp_amount, by_source[refund.id].our_amount) == (
        M.matched,
        -500,
        -500,
    )
    assert by_source[other.id].outcome == M.missing_ours
    assert by_source[intent.latest_charge].outcome == M.matched and by_source[payout_id].outcome == M.matched
    # psp_clearing: 2000 - 88 - 500 - 1312 = 100 = the refund we did not record. The PSP has 0.
    assert await clearing(sessions) == 100 and (await psp.balance()).total("USD") == 0


async def test_an_unknown_payout_is_the_psps_bug_and_nothing_is_written(sessions, psp: StripePsp, shop: Shop):
    with pytest.raises(Bug):
        await reconcile(sessions, psp, "po_unknown")
    async with sessions() as s:
        with pytest.raises(NotFound):
            await reconciliation.get_report(s, "po_unknown")


async def test_the_workflow_reconciles_a_payout_once(
    sessions, psp: StripePsp, emulator: RunningEmulator, shop: Shop, temporal_env, settings, activities
):
    await shop.paid_and_recorded(2000)
    payout_id = payout_now(emulator)
    recon = ReconciliationActivities(sessions, psp)
    async with build_worker(temporal_env.client, settings, activities, reconciliation=recon):
        result = await temporal_env.client.execute_workflow(
            PAYOUT_RECONCILIATION_WORKFLOW,
            ReconcilePayoutInput(payout_id),
            id=reconciliation_workflow_id(payout_id),
            task_queue=settings.task_queue,
            result_type=ReconcilePayoutResult,
        )
    assert result == ReconcilePayoutResult(
        payout_id=payout_id, currency="USD", amount=1912, matched=2, all_matched=True, postings_created=1
    )
    assert reconciliation_workflow_id(payout_id) == f"reconcile-payout:{payout_id}"
    assert await postings(sessions, "payout", ledger.PAYOUT) == 1


# --- the API ---------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def api(sessions, settings, temporal_env) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, temporal_client=temporal_env.client)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        headers = bearer(settings)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost", headers=headers) as client:
            yield client


async def test_the_api_lists_shows_and_exports_reconciliations(
    sessions, psp: StripePsp, emulator: RunningEmulator, shop: Shop, api: httpx.AsyncClient
):
    payouts = []
    for amount in (2000, 1050, 500):
        await shop.paid_and_recorded(amount)
        payouts.append(payout_now(emulator))
        await reconcile(sessions, psp, payouts[-1])
    await shop.record(amount=700, charge_id="ch_never_paid_out", fee=None)
    await shop.paid_and_recorded(1200)
    payouts.append(payout_now(emulator))
    await reconcile(sessions, psp, payouts[-1])

    seen, cursor = [], None
    while True:
        answer = await api.get(
            "/v1/reconciliation/payouts", params={"limit": 2, **({"cursor": cursor} if cursor else {})}
        )
        assert answer.status_code == 200, answer.text
        page = answer.json()
        seen += [row["payout_id"] for row in page["data"]]
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
    assert seen == payouts
    unmatched = (await api.get("/v1/reconciliation/payouts", params={"all_matched": "false"})).json()["data"]
    assert [row["payout_id"] for row in unmatched] == [payouts[-1]]
    assert unmatched[0]["missing_psp"] == 1 and unmatched[0]["amount"] == 1135

    detail = (await api.get(f"/v1/reconciliation/payouts/{payouts[0]}")).json()
    assert (detail["amount"], detail["matched"], detail["all_matched"]) == (1912, 2, True)
    assert [(i["type"], i["outcome"], i["psp_amount"], i["our_fee"]) for i in detail["items"]] == [
        ("charge", "matched", 2000, 88),
        ("payout", "matched", -1912, 0),
    ]

    exported = await api.get(f"/v1/reconciliation/payouts/{payouts[-1]}/export.csv")
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [(r["type"], r["outcome"], r["psp_amount"], r["our_amount"]) for r in rows] == [
        ("charge", "matched", "1200", "1200"),
        ("payout", "matched", "-1135", "-1135"),
        ("charge", "missing_psp", "", "700"),
    ]
    assert list(rows[0]) == list(reconciliation.REPORT_COLUMNS)

    for path in ("/v1/reconciliation/payouts/po_nothing", "/v1/reconciliation/payouts/po_nothing/export.csv"):
        missing = await api.get(path)
        assert missing.status_code == 404
        (error,) = missing.json()["errors"]
        assert (error["type"], error["field"], error["in"]) == ("not_found", "payout_id", "path")
        assert "po_nothing" in error["message"]
    bad = await api.get("/v1/reconciliation/payouts", params={"cursor": "nonsense"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "cursor"


async def test_the_adapter_reads_a_payout_and_pages_through_its_transactions(
    psp: StripePsp, emulator: RunningEmulator, shop: Shop
):
    """More transactions than one list page (100): every one comes back, once."""
    charges = set()
    for _ in range(102):
        intent, _fee = await shop.pay(500)  # fee 45, net 455 each
        charges.add(intent.latest_charge)
    payout_id = payout_now(emulator)
    payout = await psp.retrieve_payout(payout_id)
    assert (payout.amount, payout.currency, payout.status) == (102 * 455, "USD", "paid")
    assert payout.created <= payout.arrival_date and payout.balance_transaction is not None
    txns = await psp.list_payout_balance_transactions(payout_id)
    assert len(txns) == 103 and len({t.id for t in txns}) == 103
    assert {t.source for t in txns if t.type == "charge"} == charges
    assert {(t.amount, t.fee, t.net, t.currency) for t in txns if t.type == "charge"} == {(500, 45, 455, "USD")}
    (own,) = [t for t in txns if t.type == "payout"]
    assert (own.id, own.source, own.amount, own.net) == (payout.balance_transaction, payout_id, -46410, -46410)
    assert (await psp.balance()).total("USD") == 0
    with pytest.raises(Bug):
        await psp.retrieve_payout("po_unknown")


async def test_two_reconciliations_of_one_payout_at_once_store_one_result_and_post_once(
    sessions, psp: StripePsp, emulator: RunningEmulator, shop: Shop
):
    await shop.paid_and_recorded(2000)
    await shop.record(amount=700, charge_id="ch_never_paid_out", fee=None)
    payout_id = payout_now(emulator)
    first, second = await asyncio.gather(reconcile(sessions, psp, payout_id), reconcile(sessions, psp, payout_id))
    assert first.postings_created + second.postings_created == 1
    assert dataclasses.replace(first.report, reconciled_at=second.report.reconciled_at) == second.report
    assert await postings(sessions, "payout", ledger.PAYOUT) == 1
    async with sessions() as s:
        stored = await reconciliation.get_report(s, payout_id)
    assert [i.outcome for i in stored.items] == [M.matched, M.matched, M.missing_psp]


async def test_the_workflow_retries_a_psp_outage_and_fails_at_once_on_an_unknown_payout(
    sessions, psp: StripePsp, emulator: RunningEmulator, shop: Shop, temporal_env, settings, activities
):
    await shop.paid_and_recorded(1050)
    payout_id = payout_now(emulator)
    emulator.knob("failures", mode="500", count=2, method="GET", path="/v1/payouts")
    recon = ReconciliationActivities(sessions, psp)
    async with build_worker(temporal_env.client, settings, activities, reconciliation=recon):
        result = await temporal_env.client.execute_workflow(
            PAYOUT_RECONCILIATION_WORKFLOW,
            ReconcilePayoutInput(payout_id),
            id=reconciliation_workflow_id(payout_id),
            task_queue=settings.task_queue,
            result_type=ReconcilePayoutResult,
        )
        assert (result.amount, result.matched, result.all_matched) == (990, 2, True)
        assert emulator.stats()["injected_failures"] == 2
        handle = await temporal_env.client.start_workflow(
            PAYOUT_RECONCILIATION_WORKFLOW,
            ReconcilePayoutInput("po_unknown"),
            id=reconciliation_workflow_id("po_unknown"),
            task_queue=settings.task_queue,
        )
        with pytest.raises(WorkflowFailureError) as failed:
            await handle.result()
    cause = failed.value.cause
    assert isinstance(cause, ActivityError) and isinstance(cause.cause, ApplicationError)
    assert cause.cause.type == ERR_PSP_BUG and cause.cause.non_retryable
    assert cause.retry_state == RetryState.NON_RETRYABLE_FAILURE
