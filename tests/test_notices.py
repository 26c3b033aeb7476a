"""Notices against real components: PostgreSQL, a real SMTP server (aiosmtpd) on a loopback port, the
SMTP adapter over aiosmtplib, the document store; the activity run through Temporal's ActivityEnvironment."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from pypdf import PdfReader, PdfWriter
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment
from temporalio.worker import Worker

from activities.notices import NoticeActivities
from adapters.mail import OutgoingMail, SmtpMailSender
from adapters.storage import LocalDocumentStore
from adapters.webhooks import HttpWebhookSender
from devstack.services import free_port
from schema.models import Invoice, Notice, NoticeStatus, Tenant
from services import invoicing, notices
from services.errors import InvalidInput
from services.notices import NoticeKind
from tests.credit_note_support import finalized_invoice, subscription
from workflows.contracts import (
    ERR_MAIL_REJECTED,
    ERR_MAIL_TRANSIENT,
    NOTICES_SWEEP_WORKFLOW,
    SendNoticeInput,
    SendPendingNoticesInput,
    SendPendingNoticesResult,
)
from workflows.renewals import SweepNoticesWorkflow

pytestmark = pytest.mark.db

SENDER = "Roomly Billing <billing@roomly.test>"
REFUSED = "nobody@refused.test"
HOOKS = HttpWebhookSender(timeout=5, allow_private=True)  # no tenant here has a webhook


class Killed(BaseException):
    """A worker dying mid-activity (not an Exception: nothing of ours handles it)."""


class Collector:
    """An aiosmtpd handler keeping every message it accepted; refuses REFUSED with a 550."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if address == REFUSED:
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        self.messages.append(message_from_bytes(content, policy=policy.default))
        self.envelopes.append((str(envelope.mail_from), list(envelope.rcpt_tos)))
        return "250 Message accepted for delivery"


@pytest.fixture
def smtp() -> Iterator[tuple[Collector, int]]:
    collector = Collector()
    port = free_port()
    controller = Controller(collector, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield collector, port
    finally:
        controller.stop()


def _sender(port: int) -> SmtpMailSender:
    return SmtpMailSender("127.0.0.1", port, SENDER, timeout=5)


def _pdf() -> bytes:
    writer = PdfWriter()
    writer.add_blank_page(width=200, height=200)
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


async def _invoice_with_pdf(sessions: async_sessionmaker[AsyncSession], store: LocalDocumentStore) -> Invoice:
    sub = await subscription(sessions)
    invoice_id, _ = await finalized_invoice(sessions, sub)
    async with sessions() as s:
        invoice = await s.get(Invoice, invoice_id)
        assert invoice is not None and invoice.number is not None
        location = await store.put(f"invoices/{invoice.tenant_id}/{invoice.number}.pdf", _pdf())
        await invoicing.attach_pdf(s, invoice_id, location)
        await s.refresh(invoice)
        assert invoice.pdf_location == location
        return invoice


def _dunning_context(invoice: Invoice, **extra: Any) -> dict[str, Any]:
    assert invoice.due_at is not None
    return {
        "currency": "USD",
        "invoices": [
            {
                "id": str(invoice.id),
                "number": invoice.number,
                "amount_due": 64000,
                "due_date": invoice.due_at.date().isoformat(),
            }
        ],
        "suspend_on": "2026-04-10",
        "suspended_on": "2026-04-10",
        **extra,
    }


CONTEXTS: dict[NoticeKind, dict[str, Any]] = {
    NoticeKind.subscription_resumed: {"resumed_on": "2026-04-12", "room_name": "Room 1"},
    NoticeKind.renewal_reminder: {
        "currency": "USD",
        "amount": 65000,
        "renews_on": "2026-05-01",
        "plan_name": "Standard room",
        "room_name": "Room 1",
    },
    NoticeKind.payment_receipt: {
        "currency": "USD",
        "amount": 64000,
        "paid_on": "2026-04-02",
        "invoice_number": "INV-000001",
    },
}


async def _enqueue(
    sessions: async_sessionmaker[AsyncSession], invoice: Invoice, kind: NoticeKind, key: str | None = None
) -> uuid.UUID:
    context = CONTEXTS.get(kind) or _dunning_context(invoice, room_name="Room 1")
    async with sessions() as s:
        notice_id = await notices.enqueue(
            s,
            tenant_id=invoice.tenant_id,
            kind=kind,
            key=key or f"test:{kind.value}:{uuid.uuid4().hex[:8]}",
            context=context,
            invoice_ids=[invoice.id] if kind not in CONTEXTS else (),
        )
        await s.commit()
    return notice_id


async def _rows(sessions: async_sessionmaker[AsyncSession]) -> list[Notice]:
    async with sessions() as s:
        return list((await s.exec(select(Notice))).all())


async def test_enqueue_twice_with_one_key_writes_one_row_in_the_callers_transaction(sessions, tmp_path: Path):
    invoice = await _invoice_with_pdf(sessions, LocalDocumentStore(tmp_path))
    key = f"dunning:{invoice.tenant_id}:1:step:1"
    first = await _enqueue(sessions, invoice, NoticeKind.dunning_reminder, key)
    second = await _enqueue(sessions, invoice, NoticeKind.dunning_reminder, key)
    assert first == second
    rows = await _rows(sessions)
    assert len(rows) == 1 and rows[0].status is NoticeStatus.pending and rows[0].attempts == 0
    async with sessions() as s:
        tenant = await s.get(Tenant, invoice.tenant_id)
        assert tenant is not None and rows[0].recipient == tenant.email  # snapshotted
        # The caller's transaction: rolled back, nothing is left.
        await notices.enqueue(
            s,
            tenant_id=invoice.tenant_id,
            kind=NoticeKind.dunning_warning,
            key="rolled-back",
            context=_dunning_context(invoice),
        )
        await s.rollback()
    assert len(await _rows(sessions)) == 1


async def test_enqueue_refuses_a_context_the_templates_cannot_show(sessions, tmp_path: Path):
    invoice = await _invoice_with_pdf(sessions, LocalDocumentStore(tmp_path))
    bad = [
        ({"currency": "USD"}, "context"),  # no invoices
        (_dunning_context(invoice, suspend_on="soon"), "context.suspend_on"),
        (
            {
                **_dunning_context(invoice),
                "invoices": [{"id": "x", "number": "n", "amount_due": 1.5, "due_date": "2026-01-01"}],
            },
            "context.invoices[0].amount_due",
        ),
    ]
    async with sessions() as s:
        for context, field in bad:
            with pytest.raises(InvalidInput) as err:
                await notices.enqueue(
                    s, tenant_id=invoice.tenant_id, kind=NoticeKind.dunning_final, key="k", context=context
                )
            assert err.value.field == field


@pytest.mark.parametrize("kind", list(NoticeKind))
async def test_every_kind_renders_its_facts_in_text_and_html(sessions, tmp_path: Path, kind: NoticeKind):
    store = LocalDocumentStore(tmp_path)
    invoice = await _invoice_with_pdf(sessions, store)
    notice_id = await _enqueue(sessions, invoice, kind)
    async with sessions() as s:
        rendered = await notices.render(s, notice_id, store)
    assert rendered.message_id == f"<notice-{notice_id}@roomly.local>"
    assert rendered.subject and "\n" not in rendered.subject
    for body in (rendered.text, rendered.html):
        if kind in CONTEXTS:
            facts = {
                NoticeKind.subscription_resumed: ["Room 1", "April 12, 2026"],
                NoticeKind.renewal_reminder: ["$650.00", "May 1, 2026", "Standard room"],
                NoticeKind.payment_receipt: ["$640.00", "INV-000001", "April 2, 2026"],
            }[kind]
        else:
            assert invoice.due_at is not None
            due = f"{invoice.due_at:%B} {invoice.due_at.day}, {invoice.due_at.year}"
            facts = ["$640.00", due, str(invoice.number), f"POST /v1/invoices/{invoice.id}/pay", "bank transfer"]
            if kind in (NoticeKind.dunning_warning, NoticeKind.dunning_final):
                facts.append("April 10, 2026")  # the suspension date
        for fact in facts:
            assert fact in body, (kind, fact)
    assert rendered.html.startswith("<!DOCTYPE html>")
    if kind in CONTEXTS:
        assert rendered.attachments == ()
    else:
        (pdf,) = rendered.attachments
        assert pdf.filename == f"{invoice.number}.pdf" and len(PdfReader(io.BytesIO(pdf.data)).pages) == 1


async def test_the_tone_escalates_reminder_warning_final(sessions, tmp_path: Path):
    store = LocalDocumentStore(tmp_path)
    invoice = await _invoice_with_pdf(sessions, store)
    texts = {}
    for kind in (NoticeKind.dunning_reminder, NoticeKind.dunning_warning, NoticeKind.dunning_final):
        async with sessions() as s:
            texts[kind] = await notices.render(s, await _enqueue(sessions, invoice, kind), store)
    assert "friendly reminder" in texts[NoticeKind.dunning_reminder].text
    assert "Second notice" in texts[NoticeKind.dunning_warning].text
    assert "FINAL NOTICE" in texts[NoticeKind.dunning_final].text
    assert texts[NoticeKind.dunning_final].subject.startswith("FINAL NOTICE")


async def test_html_is_escaped(sessions, tmp_path: Path):
    store = LocalDocumentStore(tmp_path)
    invoice = await _invoice_with_pdf(sessions, store)
    async with sessions() as s:
        notice_id = await notices.enqueue(
            s,
            tenant_id=invoice.tenant_id,
            kind=NoticeKind.payment_failed,
            key="escaped",
            context=_dunning_context(invoice, failure_reason="<script>alert(1)</script>"),
        )
        await s.commit()
        rendered = await notices.render(s, notice_id, store)
    assert "<script>" not in rendered.html and "&lt;script&gt;" in rendered.html
    assert "<script>alert(1)</script>" in rendered.text  # plain text is not HTML


async def test_send_delivers_one_message_and_a_rerun_after_the_commit_sends_nothing(sessions, tmp_path: Path, smtp):
    collector, port = smtp
    store = LocalDocumentStore(tmp_path)
    invoice = await _invoice_with_pdf(sessions, store)
    notice_id = await _enqueue(sessions, invoice, NoticeKind.dunning_final)
    acts = NoticeActivities(sessions, _sender(port), store, HOOKS)
    env = ActivityEnvironment()
    first = await env.run(acts.send_notice, SendNoticeInput(notice_id))
    second = await env.run(acts.send_notice, SendNoticeInput(notice_id))
    assert first.sent_now and not second.sent_now
    assert first.message_id == second.message_id == f"<notice-{notice_id}@roomly.local>"
    (message,) = collector.messages
    (row,) = await _rows(sessions)
    assert row.status is NoticeStatus.sent and row.sent_at is not None and row.attempts == 1
    assert message["From"] == SENDER and message["To"] == row.recipient
    assert message["Message-ID"] == row.message_id
    assert message["Subject"].startswith("FINAL NOTICE") and message["X-Roomly-Notice"] == "dunning_final"
    assert collector.envelopes == [("billing@roomly.test", [row.recipient])]
    parts = [part.get_content_type() for part in message.walk()]
    assert parts == ["multipart/mixed", "multipart/alternative", "text/plain", "text/html", "application/pdf"]
    text = message.get_body(("plain",))
    assert text is not None and "$640.00" in text.get_content()
    (attachment,) = list(message.iter_attachments())
    assert attachment.get_filename() == f"{invoice.number}.pdf"
    assert attachment.get_content() == await store.get(str(invoice.pdf_location))


async def test_server_down_is_retryable_and_the_notice_stays_pending(sessions, tmp_path: Path):
    store = LocalDocumentStore(tmp_path)
    invoice = await _invoice_with_pdf(sessions, store)
    notice_id = await _enqueue(sessions, invoice, NoticeKind.payment_failed)
    acts = NoticeActivities(sessions, _sender(free_port()), store, HOOKS)  # nothing listens there
    with pytest.raises(ApplicationError) as err:
        await ActivityEnvironment().run(acts.send_notice, SendNoticeInput(notice_id))
    assert err.value.type == ERR_MAIL_TRANSIENT and not err.value.non_retryable
    (row,) = await _rows(sessions)
    assert row.status is NoticeStatus.pending and row.attempts == 1 and row.last_error and row.message_id is None


async def test_a_refused_recipient_fails_the_notice_for_good(sessions, tmp_path: Path, smtp):
    collector, port = smtp
    store = LocalDocumentStore(tmp_path)
    invoice = await _invoice_with_pdf(sessions, store)
    notice_id = await _enqueue(sessions, invoice, NoticeKind.payment_failed)
    async with sessions() as s:
        row = await s.get(Notice, notice_id)
        assert row is not None
        row.recipient = REFUSED
        s.add(row)
        await s.commit()
    acts = NoticeActivities(sessions, _sender(port), store, HOOKS)
    with pytest.raises(ApplicationError) as err:
        await ActivityEnvironment().run(acts.send_notice, SendNoticeInput(notice_id))
    assert err.value.type == ERR_MAIL_REJECTED and err.value.non_retryable
    (row,) = await _rows(sessions)
    assert row.status is NoticeStatus.failed and "550" in str(row.last_error)
    assert collector.messages == []


async def test_send_pending_notices_sends_each_pending_one_once(sessions, tmp_path: Path, smtp):
    collector, port = smtp
    store = LocalDocumentStore(tmp_path)
    invoice = await _invoice_with_pdf(sessions, store)
    ids = [await _enqueue(sessions, invoice, kind) for kind in NoticeKind]
    acts = NoticeActivities(sessions, _sender(port), store, HOOKS)
    await ActivityEnvironment().run(acts.send_notice, SendNoticeInput(ids[0]))  # one sent already
    env = ActivityEnvironment()
    first = await env.run(acts.send_pending_notices, SendPendingNoticesInput())
    again = await env.run(acts.send_pending_notices, SendPendingNoticesInput())
    assert (first.sent, first.failed, first.retry_later) == (len(ids) - 1, 0, 0)
    assert (again.sent, again.failed, again.retry_later) == (0, 0, 0)
    received = sorted(str(m["Message-ID"]) for m in collector.messages)
    assert received == sorted(notices.message_id_for(i) for i in ids)
    assert {row.status for row in await _rows(sessions)} == {NoticeStatus.sent}


async def test_the_window_between_accept_and_commit_resends_with_the_same_message_id(sessions, tmp_path: Path, smtp):
    """The documented limit: a sender that dies after the server's accept and before our commit
    leaves the notice pending; the retry sends it again, with the same Message-ID."""
    collector, port = smtp
    store = LocalDocumentStore(tmp_path)
    invoice = await _invoice_with_pdf(sessions, store)
    notice_id = await _enqueue(sessions, invoice, NoticeKind.dunning_reminder)

    class DiesAfterAccept(SmtpMailSender):
        async def send(self, mail: OutgoingMail) -> str:
            await super().send(mail)
            raise Killed("the worker died after the server's accept, before our commit")

    with pytest.raises(Killed):
        await NoticeActivities(sessions, DiesAfterAccept("127.0.0.1", port, SENDER), store, HOOKS).send_email(notice_id)
    (row,) = await _rows(sessions)
    assert row.status is NoticeStatus.pending  # the lock went with the rolled-back transaction
    await ActivityEnvironment().run(
        NoticeActivities(sessions, _sender(port), store, HOOKS).send_notice, SendNoticeInput(notice_id)
    )
    assert [m["Message-ID"] for m in collector.messages] == [notices.message_id_for(notice_id)] * 2


async def test_pending_lists_oldest_first_and_mark_sent_is_once(sessions, tmp_path: Path):
    invoice = await _invoice_with_pdf(sessions, LocalDocumentStore(tmp_path))
    a = await _enqueue(sessions, invoice, NoticeKind.dunning_reminder)
    b = await _enqueue(sessions, invoice, NoticeKind.dunning_warning)
    async with sessions() as s:
        assert await notices.pending(s, 10) == [a, b]
        now = datetime.now(UTC)
        assert await notices.mark_sent(s, a, notices.message_id_for(a), now)
        assert not await notices.mark_sent(s, a, notices.message_id_for(a), now)
        assert await notices.pending(s, 10) == [b]


async def test_the_sweep_workflow_sends_what_is_still_pending(sessions, tmp_path: Path, smtp, temporal_env):
    """``SweepNotices`` (run by its Schedule) hands the pending notices to the sender activity."""
    collector, port = smtp
    store = LocalDocumentStore(tmp_path)
    invoice = await _invoice_with_pdf(sessions, store)
    ids = [
        await _enqueue(sessions, invoice, kind)
        for kind in (NoticeKind.dunning_reminder, NoticeKind.subscription_suspended)
    ]
    acts = NoticeActivities(sessions, _sender(port), store, HOOKS)
    queue = f"sweep-{uuid.uuid4().hex[:8]}"
    async with Worker(temporal_env.client, task_queue=queue, workflows=[SweepNoticesWorkflow], activities=acts.all()):
        result = await temporal_env.client.execute_workflow(
            NOTICES_SWEEP_WORKFLOW, id=f"notices-sweep-{queue}", task_queue=queue, result_type=SendPendingNoticesResult
        )
    assert (result.sent, result.failed, result.retry_later) == (2, 0, 0)
    assert sorted(str(m["Message-ID"]) for m in collector.messages) == sorted(notices.message_id_for(i) for i in ids)
