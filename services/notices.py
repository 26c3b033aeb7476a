"""Notices: emails to tenants through an outbox (``docs/notices.md``).

:func:`enqueue` writes one ``notices`` row in the caller's transaction, with the state change it
tells about (it never commits), unique by its business ``key``: enqueueing the same key again
returns the first row's id and adds nothing. The sender (``activities/notices.py``) then renders
it (:func:`render`: Jinja2 templates ``templates/notices/<kind>.txt.j2`` and ``.html.j2``, the
invoices' PDFs attached) and marks it sent (:func:`mark_sent`) right after the mail server
accepted it; :func:`pending` lists what is left for a sweep. A tenant with a webhook also gets
the notice posted there, signed (``services/notice_webhooks.py``): its state is the notice's too.

The context is JSON the caller gives and the templates show: money as integer minor units with
``currency`` (shown with :func:`billing.money.format_money`), dates as ISO strings. Per kind,
:data:`REQUIRED` names what must be there; :func:`enqueue` refuses a context without it, so a
notice that could not be rendered is never written. Invoices: ``invoices`` is a list of
``{"id", "number", "amount_due", "due_date"}``; ``how_to_pay`` is an optional line (by default:
``POST /v1/invoices/{id}/pay`` with the saved card, or a bank transfer quoting the invoice number).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from babel.dates import format_date
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from sqlalchemy import func, update
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from adapters.mail import MailAttachment, OutgoingMail
from adapters.storage import DocumentStore
from billing.money import check_currency, format_money
from core import metrics
from schema.models import Invoice, Notice, NoticeKind, NoticeStatus, NoticeWebhookStatus, Tenant
from services.errors import InvalidInput, NotFound

__all__ = [
    "REQUIRED",
    "NoticeKind",
    "NoticeStatus",
    "NoticeWebhookStatus",
    "RenderedNotice",
    "enqueue",
    "get",
    "how_to_pay_line",
    "lock_for_sending",
    "mark_failed",
    "mark_sent",
    "message_id_for",
    "pending",
    "record_attempt",
    "render",
    "total_due",
]

MESSAGE_ID_DOMAIN = "roomly.local"
_LOCALE = "en_US"
_INVOICE_KINDS = (
    NoticeKind.payment_failed,
    NoticeKind.dunning_reminder,
    NoticeKind.dunning_warning,
    NoticeKind.dunning_final,
    NoticeKind.subscription_suspended,
)

# What each kind's context must hold (besides what is optional in its templates).
REQUIRED: dict[NoticeKind, tuple[str, ...]] = {
    NoticeKind.payment_failed: ("currency", "invoices"),
    NoticeKind.dunning_reminder: ("currency", "invoices"),
    NoticeKind.dunning_warning: ("currency", "invoices", "suspend_on"),
    NoticeKind.dunning_final: ("currency", "invoices", "suspend_on"),
    NoticeKind.subscription_suspended: ("currency", "invoices", "suspended_on", "room_name"),
    NoticeKind.subscription_resumed: ("resumed_on", "room_name"),
    NoticeKind.renewal_reminder: ("currency", "amount", "renews_on", "plan_name", "room_name"),
    NoticeKind.payment_receipt: ("currency", "amount", "paid_on", "invoice_number"),
}
_DATES = ("suspend_on", "suspended_on", "resumed_on", "renews_on", "paid_on", "retry_on")
_AMOUNTS = ("amount",)
_INVOICE_FIELDS = ("id", "number", "amount_due", "due_date")

SUBJECTS: dict[NoticeKind, str] = {
    NoticeKind.payment_failed: "Payment failed: {{ total_due }} still due",
    NoticeKind.dunning_reminder: "Reminder: {{ total_due }} is overdue",
    NoticeKind.dunning_warning: "Second notice: {{ total_due }} overdue, service suspended on {{ suspend_on }}",
    NoticeKind.dunning_final: "FINAL NOTICE: pay {{ total_due }} before {{ suspend_on }}",
    NoticeKind.subscription_suspended: "Your subscription for {{ room_name }} is suspended",
    NoticeKind.subscription_resumed: "Your subscription for {{ room_name }} is active again",
    NoticeKind.renewal_reminder: "Your {{ plan_name }} plan renews on {{ renews_on }}",
    NoticeKind.payment_receipt: "Payment received: {{ amount }} for invoice {{ invoice_number }}",
}

_env = Environment(
    loader=FileSystemLoader(Path(__file__).with_name("templates") / "notices"),
    autoescape=select_autoescape(enabled_extensions=("html.j2",), default_for_string=False, default=False),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


def message_id_for(notice_id: uuid.UUID) -> str:
    """The notice's ``Message-ID``: the same on every send, so a mail system can drop a duplicate."""
    return f"<notice-{notice_id}@{MESSAGE_ID_DOMAIN}>"


@dataclass(frozen=True)
class RenderedNotice:
    notice_id: uuid.UUID
    kind: NoticeKind
    message_id: str
    recipient: str
    subject: str
    text: str
    html: str
    attachments: tuple[MailAttachment, ...] = ()

    def mail(self) -> OutgoingMail:
        return OutgoingMail(
            message_id=self.message_id,
            recipient=self.recipient,
            subject=self.subject,
            text=self.text,
            html=self.html,
            attachments=self.attachments,
            headers=(("X-Roomly-Notice", self.kind.value),),
        )


# --- validation ---------------------------------------------------------------------------------


def _iso_date(value: object, field: str) -> date:
    if not isinstance(value, str):
        raise InvalidInput(field, "must be an ISO date string (YYYY-MM-DD)")
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        raise InvalidInput(field, f"{value!r} is not an ISO date (YYYY-MM-DD)") from None


def _minor_units(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(field, "must be an integer amount in minor units")
    return value


def _validate(kind: NoticeKind, context: Mapping[str, Any]) -> None:
    missing = [name for name in REQUIRED[kind] if name not in context]
    if missing:
        raise InvalidInput("context", f"a {kind.value} notice needs {', '.join(missing)}")
    if "currency" in context:
        try:
            check_currency(str(context["currency"]))
        except ValueError as err:
            raise InvalidInput("context.currency", str(err)) from None
    for name in _DATES:
        if name in context:
            _iso_date(context[name], f"context.{name}")
    for name in _AMOUNTS:
        if name in context:
            _minor_units(context[name], f"context.{name}")
    if "invoices" in context:
        invoices = context["invoices"]
        if not isinstance(invoices, list) or (kind in _INVOICE_KINDS and not invoices):
            raise InvalidInput("context.invoices", "must be a non-empty list of invoices")
        for i, item in enumerate(invoices):
            where = f"context.invoices[{i}]"
            if not isinstance(item, dict) or any(f not in item for f in _INVOICE_FIELDS):
                raise InvalidInput(where, f"needs {', '.join(_INVOICE_FIELDS)}")
            _minor_units(item["amount_due"], f"{where}.amount_due")
            _iso_date(item["due_date"], f"{where}.due_date")


# --- the outbox -----------------------------------------------------------------------------------


async def enqueue(
    session: AsyncSession,
    *,
    tenant_id: uuid.UUID,
    kind: NoticeKind,
    key: str,
    context: dict[str, Any],
    invoice_ids: Sequence[uuid.UUID] = (),
) -> uuid.UUID:
    """One notice in the outbox, in the caller's transaction (flushed, never committed); its id.

    ``key`` is the notice's business key: a second enqueue with it returns the first notice's id
    and writes nothing (``INSERT ... ON CONFLICT DO NOTHING``, then read back). The recipient is
    the tenant's email now. ``invoice_ids``: the invoices whose PDFs are attached. The webhook is
    ``pending`` if the tenant has one now, else ``none`` (``services/notice_webhooks.py``).
    """
    kind = NoticeKind(kind)
    if not key or len(key) > 255:
        raise InvalidInput("key", "must be 1 to 255 characters")
    _validate(kind, context)
    tenant = await session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound("tenant_id", f"tenant {tenant_id} not found")
    statement = (
        insert(Notice)
        .values(
            id=uuid.uuid4(),
            tenant_id=tenant_id,
            kind=kind.value,
            key=key,
            context=context,
            invoice_ids=[str(i) for i in invoice_ids],
            recipient=tenant.email,
            status=NoticeStatus.pending.value,
            attempts=0,
            webhook_status=(
                NoticeWebhookStatus.pending if tenant.notice_webhook_url else NoticeWebhookStatus.none
            ).value,
            webhook_attempts=0,
            created_at=func.now(),
        )
        .on_conflict_do_nothing(index_elements=["key"])
        .returning(col(Notice.id))
    )
    inserted: uuid.UUID | None = (await (await session.connection()).execute(statement)).scalar_one_or_none()
    if inserted is not None:
        return inserted
    existing: uuid.UUID = (await session.exec(select(Notice.id).where(col(Notice.key) == key))).one()
    return existing


async def get(session: AsyncSession, notice_id: uuid.UUID) -> Notice:
    notice = await session.get(Notice, notice_id)
    if notice is None:
        raise NotFound("notice_id", f"notice {notice_id} not found")
    return notice


async def lock_for_sending(session: AsyncSession, notice_id: uuid.UUID) -> Notice | None:
    """The notice with its row locked for this transaction; None while another sender holds it.

    The lock is held across the SMTP conversation and released by the commit that marks it sent:
    two senders (a workflow's activity and the sweep) never send one notice at the same time, and
    a sender that dies (its connection gone) releases it.
    """
    query = select(Notice).where(col(Notice.id) == notice_id).with_for_update(skip_locked=True)
    notice = (await session.exec(query)).first()
    if notice is None:
        await get(session, notice_id)  # NotFound if it does not exist at all
    return notice


async def pending(session: AsyncSession, limit: int = 100) -> list[uuid.UUID]:
    """Ids of notices whose email or webhook is still pending, oldest first."""
    query = (
        select(Notice.id)
        .where(
            (col(Notice.status) == NoticeStatus.pending) | (col(Notice.webhook_status) == NoticeWebhookStatus.pending)
        )
        .order_by(col(Notice.created_at), col(Notice.id))
        .limit(limit)
    )
    return list((await session.exec(query)).all())


async def mark_sent(session: AsyncSession, notice_id: uuid.UUID, message_id: str, at: datetime) -> bool:
    """Pending -> sent with the Message-ID the server accepted, and commit; False if it was not pending."""
    result = await (await session.connection()).execute(
        update(Notice)
        .where(col(Notice.id) == notice_id, col(Notice.status) == NoticeStatus.pending)
        .values(
            status=NoticeStatus.sent, message_id=message_id, sent_at=at, attempts=Notice.attempts + 1, last_error=None
        )
    )
    _count(session, result.rowcount, "sent")
    await session.commit()
    return bool(result.rowcount)


def _count(session: AsyncSession, moved: int, outcome: str) -> None:
    """``notices_delivered_total{channel="email"}`` once the row's change commits (none if it was not pending)."""
    if moved:
        metrics.on_commit(session, metrics.NOTICES.labels("email", outcome).inc)


async def record_attempt(session: AsyncSession, notice_id: uuid.UUID, error: str) -> None:
    """A send that failed and will be retried: counted, its error kept; it stays pending. Commits."""
    result = await (await session.connection()).execute(
        update(Notice)
        .where(col(Notice.id) == notice_id, col(Notice.status) == NoticeStatus.pending)
        .values(attempts=Notice.attempts + 1, last_error=error[:1000])
    )
    _count(session, result.rowcount, "retry")
    await session.commit()


async def mark_failed(session: AsyncSession, notice_id: uuid.UUID, error: str) -> None:
    """Pending -> failed: the mail server refused it for good. Commits."""
    result = await (await session.connection()).execute(
        update(Notice)
        .where(col(Notice.id) == notice_id, col(Notice.status) == NoticeStatus.pending)
        .values(status=NoticeStatus.failed, attempts=Notice.attempts + 1, last_error=error[:1000])
    )
    _count(session, result.rowcount, "failed")
    await session.commit()


# --- rendering ----------------------------------------------------------------------------------


def _show_date(value: str) -> str:
    return format_date(date.fromisoformat(value[:10]), format="long", locale=_LOCALE)


def how_to_pay_line(invoice: Mapping[str, Any]) -> str:
    """How to pay one invoice of a context, when the context gives no ``how_to_pay`` of its own."""
    return (
        f"pay with your saved card in the portal or with POST /v1/invoices/{invoice['id']}/pay, "
        f"or by bank transfer quoting the reference {invoice['number']}"
    )


def total_due(context: Mapping[str, Any]) -> int:
    """The total overdue a notice tells about: ``amount_due``, else the sum of its invoices'."""
    return int(context.get("amount_due", sum(int(item["amount_due"]) for item in context.get("invoices", []))))


def view(kind: NoticeKind, context: Mapping[str, Any], tenant_name: str) -> dict[str, Any]:
    """What the templates see: the context with money and dates shown, invoices listed with how to pay."""
    currency = str(context.get("currency", "USD"))

    def money(amount: int) -> str:
        return format_money(amount, currency)

    invoices = [
        {
            "id": str(item["id"]),
            "number": str(item["number"]),
            "amount_due": money(int(item["amount_due"])),
            "due_on": _show_date(str(item["due_date"])),
            "how_to_pay": how_to_pay_line(item),
        }
        for item in context.get("invoices", [])
    ]
    shown: dict[str, Any] = {
        "kind": kind.value,
        "tenant_name": tenant_name,
        "invoices": invoices,
        "total_due": money(total_due(context)),
        "how_to_pay": str(context["how_to_pay"]) if context.get("how_to_pay") else None,
        "failure_reason": context.get("failure_reason"),
        "plan_name": context.get("plan_name"),
        "room_name": context.get("room_name"),
        "invoice_number": context.get("invoice_number"),
        "amount": money(int(context["amount"])) if "amount" in context else None,
    }
    for name in _DATES:
        shown[name] = _show_date(str(context[name])) if context.get(name) else None
    return shown


async def render(session: AsyncSession, notice_id: uuid.UUID, store: DocumentStore) -> RenderedNotice:
    """The notice as an email: subject, text, HTML, and the PDFs of its invoices that have one
    (read from ``store`` by the invoice's ``pdf_location``)."""
    notice = await get(session, notice_id)
    tenant = await session.get(Tenant, notice.tenant_id)
    kind = NoticeKind(notice.kind)
    shown = view(kind, notice.context, tenant.name if tenant is not None else "")
    subject = _env.from_string(SUBJECTS[kind]).render(**shown).strip()
    text = _env.get_template(f"{kind.value}.txt.j2").render(**shown)
    html = _env.get_template(f"{kind.value}.html.j2").render(subject=subject, **shown)
    attachments: list[MailAttachment] = []
    for invoice_id in notice.invoice_ids:
        invoice = await session.get(Invoice, uuid.UUID(invoice_id))
        if invoice is None or invoice.pdf_location is None:
            continue  # no document (yet): the notice names the invoice, nothing to attach
        name = f"{invoice.number or invoice.id}.pdf"
        attachments.append(MailAttachment(name, await store.get(invoice.pdf_location)))
    return RenderedNotice(
        notice_id=notice.id,
        kind=kind,
        message_id=message_id_for(notice.id),
        recipient=notice.recipient,
        subject=subject,
        text=text,
        html=html,
        attachments=tuple(attachments),
    )
