"""Dunning: the campaign's rule (pure), the database side (campaigns, what is outstanding,
suspension that keeps what was paid for, resumption), and the workflow on time-skipping Temporal."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from sqlmodel import col, select
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from activities.collection import CollectionActivities
from activities.dunning import DunningActivities
from activities.notices import NoticeActivities
from adapters.mail import SmtpMailSender
from adapters.psp import StripePsp
from adapters.storage import LocalDocumentStore
from adapters.webhooks import HttpWebhookSender
from billing.dunning import Campaign, DunningStage, stage_after_failures
from core.temporal import data_converter
from schema.models import (
    DunningCampaign,
    DunningEvent,
    Invoice,
    Notice,
    PaymentMethodKind,
    Subscription,
    SubscriptionStatus,
    Tenant,
)
from services import dunning, invoicing, payments
from services.invoicing import InvoiceTerms
from tests import factories
from tests.conftest import VENV_BIN
from tests.psp_support import RunningEmulator, running_emulator
from tests.test_api_support import api_client
from tests.test_collection import save_card
from tests.test_notices import smtp  # noqa: F401  (a fixture: a real aiosmtpd server)
from worker import build_worker
from workflows.contracts import (
    COLLECTION_PAY_UPDATE,
    COLLECTION_PSP_SIGNAL,
    COLLECTION_RECORD_PAYMENT_UPDATE,
    COLLECTION_WORKFLOW,
    DUNNING_PAUSE_UPDATE,
    DUNNING_RESUME_UPDATE,
    DUNNING_RETRY_NOW_UPDATE,
    DUNNING_SKIP_STEP_UPDATE,
    DUNNING_STATE_QUERY,
    ERR_DUNNING_REFUSED,
    AttemptView,
    CollectionInput,
    DunningAction,
    DunningState,
    PayRequest,
    PspSignal,
    RecordPaymentRequest,
    collection_workflow_id,
    dunning_workflow_id,
)

BASE = datetime(2026, 1, 1, tzinfo=UTC)
TERMS = InvoiceTerms("Roomly Rooms GmbH", "Musterstraße 1", "DE123456789")

H = timedelta(hours=1)


def test_the_default_campaign_escalates_reminder_warning_final_then_suspends():
    campaign = Campaign("default")
    assert [stage_after_failures(n, campaign.retries) for n in (1, 2, 3, 4)] == [
        DunningStage.reminder,
        DunningStage.warning,
        DunningStage.final_notice,
        DunningStage.suspended,
    ]
    first = datetime(2026, 3, 1, 9, tzinfo=UTC)
    assert [campaign.retry_at(first, n) for n in (1, 2, 3)] == [
        datetime(2026, 3, 1, 10, tzinfo=UTC),
        datetime(2026, 3, 2, 9, tzinfo=UTC),
        datetime(2026, 3, 4, 9, tzinfo=UTC),
    ]


def test_a_one_retry_campaign_gives_the_final_notice_at_once():
    assert [stage_after_failures(n, 1) for n in (1, 2)] == [DunningStage.final_notice, DunningStage.suspended]
    with pytest.raises(ValueError):
        stage_after_failures(0, 3)


def test_what_a_campaign_chases():
    campaign = Campaign("c", (H, 2 * H), min_overdue=500)
    assert not campaign.chases(0) and not campaign.chases(499) and campaign.chases(500)
    assert not Campaign("x", excluded=True).chases(10_000)
    for bad in [(), (2 * H, H), (timedelta(0),), (-H,)]:
        with pytest.raises(ValueError):
            Campaign("bad", bad)
    with pytest.raises(ValueError):
        Campaign("bad", min_overdue=-1)


# --- The database side --------------------------------------------------------------------


async def _invoice(sessions, sub: Subscription, total: int, day: int, *, status: str = "open") -> Invoice:
    """A finalized invoice of ``total`` for the period starting ``day`` days after BASE, due 14 days later."""
    start = BASE + timedelta(days=day)
    async with sessions() as s:
        invoice = Invoice(
            tenant_id=sub.tenant_id, subscription_id=sub.id, period_start=start, period_end=start + timedelta(days=30),
            currency="USD", subtotal=total, total=total, workflow_id=f"wf-{uuid.uuid4()}", timezone="UTC",
        )  # fmt: skip
        s.add(invoice)
        await s.flush()
        s.add(factories.base_fee_line(invoice.id, total))
        await s.commit()
        await invoicing.finalize_in_transaction(s, invoice.id, TERMS, start)
        await s.commit()
        if status == "paid":
            await payments.record_offline_payment(
                s, invoice.id, uuid.uuid4(), amount=total, method=PaymentMethodKind.bank_transfer, reference=None,
                actor="test", reason=None, at=start,
            )  # fmt: skip
        found: Invoice | None = await s.get(Invoice, invoice.id, populate_existing=True)
    assert found is not None
    return found


@pytest.mark.db
async def test_campaigns_resolve_tenant_then_plan_then_default(sessions):
    cat = await factories.catalog(sessions)
    ada = await factories.subscriber(sessions, cat, BASE, name="Ada")
    async with sessions() as s:
        assert (await dunning.campaign_for(s, ada.tenant_id)).retry_delays == (H, 24 * H, 72 * H)
        s.add(DunningCampaign(code=f"plan-{cat.plan.id}", name="Plan", retry_delays=[60, 120], plan_id=cat.plan.id))
        await s.commit()
        assert (await dunning.campaign_for(s, ada.tenant_id)).retry_delays == (
            timedelta(minutes=1),
            2 * timedelta(minutes=1),
        )
        s.add(DunningCampaign(code=f"tenant-{ada.tenant_id}", name="VIP", retry_delays=[60], tenant_id=ada.tenant_id,
                              excluded=True))  # fmt: skip
        await s.commit()
        mine = await dunning.campaign_for(s, ada.tenant_id)
    assert mine.excluded and not mine.chases(10**6)


@pytest.mark.db
async def test_outstanding_is_failed_or_past_due_and_suspension_keeps_the_paid_period(sessions):
    cat = await factories.catalog(sessions)
    sub = await factories.subscriber(sessions, cat, BASE, name="Grace")
    paid = await _invoice(sessions, sub, 65000, 0, status="paid")  # Jan 1 .. Jan 31, paid
    late = await _invoice(sessions, sub, 65000, 31)  # issued Feb 1, due Feb 15
    assert late.due_at == datetime(2026, 2, 15, tzinfo=UTC)
    async with sessions() as s:
        assert (await dunning.outstanding(s, sub.tenant_id, datetime(2026, 2, 10, tzinfo=UTC))).invoices == ()
        owed = await dunning.outstanding(s, sub.tenant_id, datetime(2026, 2, 16, tzinfo=UTC))
    assert [(i.number, i.amount_due) for i in owed.invoices] == [(late.number, 65000)] and owed.total == 65000

    async with sessions() as s:
        assert await dunning.suspend(s, sub.tenant_id, "k:suspend", datetime(2026, 2, 16, tzinfo=UTC))
        assert not await dunning.suspend(s, sub.tenant_id, "k:suspend-again", datetime(2026, 2, 16, tzinfo=UTC))
        row = await s.get(Subscription, sub.id, populate_existing=True)
        assert row is not None and row.status == SubscriptionStatus.suspended
        # Usable until the end of what was paid (Jan 31), not after.
        assert paid.period_end == datetime(2026, 1, 31, tzinfo=UTC)
        assert await dunning.usable(s, row, datetime(2026, 1, 30, tzinfo=UTC))
        assert not await dunning.usable(s, row, datetime(2026, 2, 16, tzinfo=UTC))
        assert not await dunning.resume_if_settled(s, sub.tenant_id, "k:resume", datetime(2026, 2, 16, tzinfo=UTC))
        await payments.record_offline_payment(
            s, late.id, uuid.uuid4(), amount=65000, method=PaymentMethodKind.bank_transfer, reference="T",
            actor="ops", reason=None, at=datetime(2026, 2, 17, tzinfo=UTC),
        )  # fmt: skip
        assert await dunning.resume_if_settled(s, sub.tenant_id, "k:resume", datetime(2026, 2, 17, tzinfo=UTC))
        row = await s.get(Subscription, sub.id, populate_existing=True)
        events = (await s.exec(select(DunningEvent.kind).where(DunningEvent.tenant_id == sub.tenant_id))).all()
    assert row is not None and row.status == SubscriptionStatus.active and row.suspended_at is None
    assert sorted(events) == ["resumed", "suspended"]


# --- The workflow on time-skipping Temporal, with the emulator's declining card ----------------


@pytest.fixture(scope="module")
def emulator() -> Iterator[RunningEmulator]:
    with running_emulator() as running:
        yield running


@pytest_asyncio.fixture
async def env() -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping server of each test's own (~0.1 s to start): dunning sleeps for days, and a
    campaign a test leaves waiting on a retry timer would otherwise stop a later test's server from
    skipping time (its timer fires with no worker left to run it)."""
    started = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(VENV_BIN / "temporal-test-server"), data_converter=data_converter
    )
    try:
        yield started
    finally:
        await started.shutdown()


async def _notices(sessions, tenant_id: uuid.UUID) -> list[str]:
    async with sessions() as s:
        rows = await s.exec(select(Notice.kind).where(Notice.tenant_id == tenant_id).order_by(col(Notice.created_at)))
        return [str(kind) for kind in rows.all()]


async def _state(handle: WorkflowHandle[Any, Any]) -> DunningState:
    state: DunningState = await handle.query(DUNNING_STATE_QUERY, result_type=DunningState)
    return state


async def _until(probe: Any, what: str, within: float = 20) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


DECLINING = "pm_card_chargeCustomerFail"  # attaches, then every charge declines (generic_decline)


@dataclass
class Declined:
    sub: Subscription
    invoice: Invoice
    collecting: WorkflowHandle[Any, Any]
    dunning: WorkflowHandle[Any, DunningState]
    psp: StripePsp


@asynccontextmanager
async def declined(
    sessions,
    settings,
    env,
    activities,
    renderer,
    emulator,
    smtp_port: int,
    card: str | None = "pm_card_chargeCustomerFail",
) -> AsyncIterator[Declined]:
    """A tenant whose card declined once (every charge of ``pm_card_chargeCustomerFail`` declines;
    ``card=None``: no card, the invoice past due), its collection and dunning (in reminder) running."""
    emulator.knob("reset")
    async with StripePsp("sk_test_dunning", api_base=emulator.url, timeout=5) as psp:
        sub = await factories.subscriber(sessions, await factories.catalog(sessions), BASE, name="Marcus")
        if card is not None:
            await save_card(sessions, psp, sub.tenant_id, card)
        invoice = await _invoice(sessions, sub, 65000, 0)  # due Jan 15: past due now
        store = LocalDocumentStore(settings.documents_root)
        collection = CollectionActivities(
            sessions, psp, renderer, store, client=env.client, task_queue=settings.task_queue
        )
        dunning_acts = DunningActivities(sessions, env.client, task_queue=settings.task_queue)
        mail = NoticeActivities(
            sessions,
            SmtpMailSender("127.0.0.1", smtp_port, "billing@roomly.test"),
            store,
            HttpWebhookSender(timeout=5, allow_private=True),
        )
        async with build_worker(
            env.client, settings, activities, collection=collection, extra_activities=[*dunning_acts.all(), *mail.all()]
        ):
            collecting = await env.client.start_workflow(
                COLLECTION_WORKFLOW,
                CollectionInput(invoice.id, tenant_id=sub.tenant_id, confirm_wait=timedelta(seconds=1)),
                id=collection_workflow_id(invoice.id),
                task_queue=settings.task_queue,
            )
            handle = env.client.get_workflow_handle(dunning_workflow_id(sub.tenant_id), result_type=DunningState)

            async def reminded() -> bool:
                return "dunning_reminder" in await _notices(sessions, sub.tenant_id)

            await _until(reminded, "the reminder")
            yield Declined(sub, invoice, collecting, handle, psp)


async def walk_to_warning(env: WorkflowEnvironment, handle: WorkflowHandle[Any, DunningState]) -> None:
    await env.sleep(timedelta(hours=1, minutes=1))

    async def warned() -> bool:
        return (await _state(handle)).stage == "warning"

    await _until(warned, "the first retry")


async def walk_to_suspension(env: WorkflowEnvironment, handle: WorkflowHandle[Any, DunningState]) -> DunningState:
    """Skip to each retry (1 h, 24 h and 72 h after the first failure) and see its stage reached."""
    for stage, hours in (("warning", 1), ("final_notice", 23), ("suspended", 48)):  # at +1 h, +24 h, +72 h
        await env.sleep(timedelta(hours=hours, minutes=1))

        async def reached(stage: str = stage) -> bool:
            return (await _state(handle)).stage == stage

        await _until(reached, stage)
    return await _state(handle)


async def test_fail_1h_fail_24h_fail_72h_fail_suspended_then_paid_and_resumed(
    record_history,
    sessions,
    settings,
    env,
    activities,
    renderer,
    emulator,
    smtp,  # noqa: F811
):
    collector, smtp_port = smtp
    async with declined(sessions, settings, env, activities, renderer, emulator, smtp_port) as case:
        sub, invoice, handle = case.sub, case.invoice, case.dunning
        state = await _state(handle)
        assert (state.stage, state.failures, state.retries) == ("reminder", 1, 3) and state.next_attempt_at
        # 1 h, 24 h and 72 h after the first failure: three retries, each declined, each escalating.
        state = await walk_to_suspension(env, handle)
        assert state.failures == 4 and state.next_attempt_at is None
        assert [a.decline_code for a in state.attempts] == ["generic_decline"] * 4
        assert emulator.charges(status="failed", **{"metadata.invoice_id": str(invoice.id)}) == 4
        async with sessions() as s:
            suspended = await s.get(Subscription, sub.id, populate_existing=True)
            tenant = await s.get(Tenant, sub.tenant_id)
        assert suspended is not None and suspended.status == SubscriptionStatus.suspended and tenant is not None

        # The tenant saves a working card and pays in the portal: dunning ends, the subscription resumes.
        await save_card(sessions, case.psp, sub.tenant_id, "pm_card_visa")
        await case.collecting.execute_update(COLLECTION_PAY_UPDATE, PayRequest(actor="marcus"), result_type=AttemptView)
        final = await handle.result()
        await record_history(handle, "dunning_suspended_resumed")
        await record_history(case.collecting, "invoice_collection_dunning")  # with the collection-dunning patch
    assert final.stage == "resolved"
    assert await _notices(sessions, sub.tenant_id) == [
        "dunning_reminder",
        "dunning_warning",
        "dunning_final",
        "subscription_suspended",
        "subscription_resumed",
    ]
    assert emulator.charges(status="succeeded", **{"metadata.invoice_id": str(invoice.id)}) == 1
    # Received by a real SMTP server, in order, each once, naming the amount overdue.
    assert [m["X-Roomly-Notice"] for m in collector.messages] == [
        "dunning_reminder",
        "dunning_warning",
        "dunning_final",
        "subscription_suspended",
        "subscription_resumed",
    ]
    first = collector.messages[0]
    assert first["To"] == tenant.email and "$650.00" in first.get_body(preferencelist=("plain",)).get_content()
    async with sessions() as s:
        resumed = await s.get(Subscription, sub.id, populate_existing=True)
    assert resumed is not None and resumed.status == SubscriptionStatus.active


async def test_a_bank_transfer_between_retries_ends_dunning_with_no_further_attempt(
    sessions,
    settings,
    env,
    activities,
    renderer,
    emulator,
    smtp,  # noqa: F811
):
    async with declined(sessions, settings, env, activities, renderer, emulator, smtp[1]) as case:
        await case.collecting.execute_update(
            COLLECTION_RECORD_PAYMENT_UPDATE,
            RecordPaymentRequest(65000, "bank_transfer", reference="SEPA-9", actor="ops@roomly"),
            result_type=AttemptView,
        )
        final = await case.dunning.result()
    assert final.stage == "resolved" and final.failures == 1
    assert emulator.charges(**{"metadata.invoice_id": str(case.invoice.id)}) == 1  # the first, declined; no retry
    assert await _notices(sessions, case.sub.tenant_id) == ["dunning_reminder"]


async def test_operator_updates_and_their_refusals_then_cancel_stops_the_retries(
    sessions,
    settings,
    env,
    activities,
    renderer,
    emulator,
    smtp,  # noqa: F811
):
    async with declined(sessions, settings, env, activities, renderer, emulator, smtp[1]) as case:
        ops = DunningAction(actor="ops@roomly", reason="tenant called")
        paused = await case.dunning.execute_update(DUNNING_PAUSE_UPDATE, ops, result_type=DunningState)
        assert paused.paused
        for refused in (DUNNING_PAUSE_UPDATE, DUNNING_RETRY_NOW_UPDATE, DUNNING_SKIP_STEP_UPDATE):
            with pytest.raises(WorkflowUpdateFailedError) as err:
                await case.dunning.execute_update(refused, ops, result_type=DunningState)
            assert isinstance(err.value.cause, ApplicationError) and err.value.cause.type == ERR_DUNNING_REFUSED
        await env.sleep(timedelta(hours=2))  # paused: the 1 h retry does not come
        assert (await _state(case.dunning)).failures == 1
        assert emulator.charges(**{"metadata.invoice_id": str(case.invoice.id)}) == 1
        await case.dunning.execute_update(DUNNING_RESUME_UPDATE, ops, result_type=DunningState)
        await case.dunning.execute_update(DUNNING_RETRY_NOW_UPDATE, ops, result_type=DunningState)

        async def warned() -> bool:
            return (await _state(case.dunning)).stage == "warning"

        await _until(warned, "the retry asked for now")
        assert emulator.charges(**{"metadata.invoice_id": str(case.invoice.id)}) == 2
        await case.dunning.execute_update(DUNNING_SKIP_STEP_UPDATE, ops, result_type=DunningState)

        async def final_notice() -> bool:
            return (await _state(case.dunning)).stage == "final_notice"

        await _until(final_notice, "the skipped step")
        assert emulator.charges(**{"metadata.invoice_id": str(case.invoice.id)}) == 2  # skipped: no charge
        # The tenant cancels: the last retry never comes; the invoice stays collectable.
        async with sessions() as s:  # canceled now (the lifecycle's own rules: test_lifecycle.py)
            row = await s.get(Subscription, case.sub.id)
            assert row is not None
            row.status = SubscriptionStatus.canceled
            row.canceled_at = row.ends_at = BASE + timedelta(days=5)
            s.add(row)
            await s.commit()
        await env.sleep(timedelta(hours=80))
        final = await case.dunning.result()
    assert final.stage == "final_notice" and final.next_attempt_at is None
    assert emulator.charges(**{"metadata.invoice_id": str(case.invoice.id)}) == 2
    assert [a.split(":")[0] for a in final.actions] == [
        "paused by ops@roomly",
        "resumed by ops@roomly",
        "retry_now by ops@roomly",
        "skip_step by ops@roomly",
    ]
    async with sessions() as s:
        kinds = (await s.exec(select(DunningEvent.kind).where(DunningEvent.tenant_id == case.sub.tenant_id))).all()
        still = await s.get(Invoice, case.invoice.id)
    assert {"paused", "resumed", "retry_now", "skip_step", "stopped_canceled"} <= set(kinds)
    assert still is not None and still.status == "open"


async def test_the_api_shows_dunning_and_refuses_what_does_not_fit(
    sessions,
    settings,
    env,
    activities,
    renderer,
    emulator,
    smtp,  # noqa: F811
):
    async with declined(sessions, settings, env, activities, renderer, emulator, smtp[1]) as case:
        async with api_client(settings, env.client) as api:
            shown = await api.get(f"/v1/tenants/{case.sub.tenant_id}/dunning")
            assert shown.status_code == 200, shown.text
            body = shown.json()
            assert (body["stage"], body["failures"], body["amount_overdue"], body["paused"]) == (
                "reminder",
                1,
                65000,
                False,
            )
            assert [a["decline_code"] for a in body["attempts"]] == ["generic_decline"]
            refused = await api.post(f"/v1/tenants/{case.sub.tenant_id}/dunning/resume", json={"reason": "x"})
            assert refused.status_code == 409 and refused.json()["errors"][0]["field"] == "status"
            paused = await api.post(f"/v1/tenants/{case.sub.tenant_id}/dunning/pause", json={"reason": "on holiday"})
            assert paused.status_code == 200 and paused.json()["paused"] is True
            assert paused.json()["actions"] == ["paused by test-operator: on holiday"]
            assert (await api.post(f"/v1/tenants/{case.sub.tenant_id}/dunning/fly")).status_code == 422
            missing = await api.post(f"/v1/tenants/{case.sub.tenant_id}/dunning/extend", json={"reason": "x"})
            assert missing.status_code == 422 and missing.json()["errors"][0]["field"] == "until"
            next_at = datetime.fromisoformat(paused.json()["next_attempt_at"])
            too_early = (next_at - timedelta(minutes=5)).isoformat()
            early = await api.post(f"/v1/tenants/{case.sub.tenant_id}/dunning/extend", json={"until": too_early})
            assert early.status_code == 409, early.text
            later = (next_at + timedelta(days=7)).isoformat()
            extended = await api.post(
                f"/v1/tenants/{case.sub.tenant_id}/dunning/extend", json={"until": later, "reason": "agreed"}
            )
            assert extended.status_code == 200, extended.text
            assert datetime.fromisoformat(extended.json()["next_attempt_at"]) == next_at + timedelta(days=7)
            nobody = await api.get(f"/v1/tenants/{uuid.uuid4()}/dunning")
            assert nobody.status_code == 404
            await case.dunning.execute_update(DUNNING_RESUME_UPDATE, DunningAction("ops"), result_type=DunningState)
            await case.collecting.execute_update(
                COLLECTION_RECORD_PAYMENT_UPDATE, RecordPaymentRequest(65000, "bank_transfer"), result_type=AttemptView
            )
            assert (await case.dunning.result()).stage == "resolved"


async def test_an_invoice_past_due_without_a_card_is_chased_too(
    record_history,
    sessions,
    settings,
    env,
    activities,
    renderer,
    emulator,
    smtp,  # noqa: F811
):
    """No saved card, so no payment ever fails: the collection tells dunning when the invoice
    passes its due date, and the campaign runs its course without charging anything."""
    collector, smtp_port = smtp
    async with declined(sessions, settings, env, activities, renderer, emulator, smtp_port, card=None) as case:
        await walk_to_suspension(env, case.dunning)
        await record_history(case.collecting, "invoice_collection_overdue")  # with the collection-overdue patch
    assert emulator.charges() == 0
    assert [m["X-Roomly-Notice"] for m in collector.messages] == [
        "dunning_reminder",
        "dunning_warning",
        "dunning_final",
        "subscription_suspended",
    ]


async def test_duplicate_and_late_psp_events_during_dunning_change_nothing(
    sessions,
    settings,
    env,
    activities,
    renderer,
    emulator,
    smtp,  # noqa: F811
):
    """The declined PaymentIntent's ``payment_intent.payment_failed`` delivered twice, and again late
    after the next retry: the collection settles each from the PSP (already failed) and dunning
    counts no extra failure; no extra charge is made."""
    async with declined(sessions, settings, env, activities, renderer, emulator, smtp[1]) as case:
        async with sessions() as s:
            [first] = await payments.attempts_of(s, case.invoice.id)
        assert first.psp_payment_intent_id is not None
        event = PspSignal("evt_dup", "payment_intent.payment_failed", first.psp_payment_intent_id)
        for _ in range(2):
            await case.collecting.signal(COLLECTION_PSP_SIGNAL, event)
        await walk_to_warning(env, case.dunning)
        await case.collecting.signal(
            COLLECTION_PSP_SIGNAL, PspSignal("evt_late", event.event_type, event.payment_intent_id)
        )
        await asyncio.sleep(1)  # let the collection settle it
        state = await _state(case.dunning)
    assert (state.stage, state.failures) == ("warning", 2)
    assert [a.retry for a in state.attempts] == [0, 1]
    assert emulator.charges(**{"metadata.invoice_id": str(case.invoice.id)}) == 2
