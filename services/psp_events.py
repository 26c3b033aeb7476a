"""Webhook intake from the PSP: verify, then store each event once (``psp_events``).

The rule, in order:

1. The ``Stripe-Signature`` header must sign exactly the raw body under ``STRIPE_WEBHOOK_SECRET``
   with a timestamp at most 300 s old (``adapters.psp.verify_event``, i.e.
   ``stripe.Webhook.construct_event``). Anything else is :class:`SignatureRejected` and nothing
   is read from or written to the database.
2. A verified event is inserted by its id with ``ON CONFLICT DO NOTHING``: a delivery of an id
   already stored (a PSP retry, a duplicate, a replay within the tolerance) writes nothing and
   reports ``duplicate``.
3. Types we will act on (:data:`HANDLED_TYPES`) are stored ``received``; every other type is
   stored ``ignored``. Both are acknowledged (a 4xx would make the PSP disable the endpoint).

Processing a ``received`` event is decided here too (:func:`decide`, reads only) and recorded once
(:func:`mark`: ``received`` -> ``processed`` / ``ignored``); acting on the decision (signalling the
invoice's collection workflow, starting reconciliation) is ``activities/psp_events.py``'s. See
``docs/payments.md`` "Webhook processing".
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import func, update
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from adapters.psp import InvalidSignature, verify_event
from core import metrics
from schema.models import Invoice, PaymentAttempt, PspEvent, PspEventStatus, utcnow
from services.errors import NotFound, ServiceError

HANDLED_TYPES = frozenset(
    {"payment_intent.succeeded", "payment_intent.payment_failed", "charge.refunded", "payout.paid"}
)
SIGNATURE_HEADER = "Stripe-Signature"


class SignatureRejected(ServiceError):
    """The request is not a verified PSP event (missing, malformed, wrong or stale signature)."""

    default_kind = "invalid_signature"

    def __init__(self, message: str) -> None:
        super().__init__(SIGNATURE_HEADER, message)


@dataclass(frozen=True)
class Intake:
    event_id: str
    type: str
    status: PspEventStatus
    duplicate: bool  # already stored by an earlier delivery; nothing was written


def status_for(event_type: str) -> PspEventStatus:
    return PspEventStatus.received if event_type in HANDLED_TYPES else PspEventStatus.ignored


async def record(session: AsyncSession, payload: bytes, signature: str | None, secret: str) -> Intake:
    """Verify ``payload`` against ``signature`` and store the event once; commits."""
    try:
        event = verify_event(payload, signature, secret)
    except InvalidSignature as refused:
        metrics.PSP_WEBHOOKS_REFUSED.inc()
        raise SignatureRejected(str(refused)) from None
    status = status_for(event.type)
    received_at = utcnow()
    statement = (
        insert(PspEvent)
        .values(
            id=event.id,
            type=event.type,
            created=event.created,
            payload=event.payload,
            received_at=received_at,
            status=status,
            object_id=event.object_id,
        )
        .on_conflict_do_nothing(index_elements=["id"])
        .returning(col(PspEvent.id))
    )
    connection = await session.connection()
    inserted = (await connection.execute(statement)).scalar_one_or_none()
    type_label = event.type if event.type in HANDLED_TYPES else "other"
    if inserted is not None:
        lag = max((received_at - event.created).total_seconds(), 0.0)
        metrics.on_commit(session, lambda: _count_received(type_label, False, lag))
        await session.commit()
        return Intake(event.id, event.type, status, duplicate=False)
    stored = (await session.exec(select(PspEvent.status).where(col(PspEvent.id) == event.id))).one()
    metrics.on_commit(session, lambda: _count_received(type_label, True, None))
    await session.commit()
    return Intake(event.id, event.type, PspEventStatus(stored), duplicate=True)


def _count_received(type_label: str, duplicate: bool, lag: float | None) -> None:
    """A verified delivery by type (ours, or ``other``); the PSP's lag of a first delivery."""
    metrics.PSP_WEBHOOKS.labels(type_label, "true" if duplicate else "false").inc()
    if lag is not None:
        metrics.PSP_WEBHOOK_LAG.observe(lag)


# --- processing: decide what a stored event means, then mark it once ---------------------------


class Action(StrEnum):
    signal_collection = "signal_collection"  # payment_intent.*: wake the invoice's collection workflow
    record_refund = "record_refund"  # charge.refunded: the credit-notes hook records it
    reconcile_payout = "reconcile_payout"  # payout.paid: start the payout's reconciliation
    ignore = "ignore"  # an object this system never created, or a type it does not handle
    done = "done"  # already processed or ignored: nothing to do (a second run)


@dataclass(frozen=True)
class Decision:
    """What processing the stored event ``event_id`` means; pure data (no Temporal types)."""

    action: Action
    event_id: str
    event_type: str
    object_id: str | None = None  # pi_..., ch_..., po_...
    invoice_id: uuid.UUID | None = None  # signal_collection: the invoice whose collection owns the intent
    tenant_id: uuid.UUID | None = None  # signal_collection: for log context
    reason: str | None = None  # ignore: why
    payload: dict[str, Any] | None = field(default=None, repr=False)  # record_refund: the event as sent


def _object_of(payload: dict[str, Any]) -> dict[str, Any]:
    data = payload.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    return obj if isinstance(obj, dict) else {}


def _uuid_or_none(value: object) -> uuid.UUID | None:
    if not isinstance(value, str):
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


async def _invoice_of_intent(
    session: AsyncSession, intent_id: str | None, metadata_invoice: object
) -> tuple[uuid.UUID, uuid.UUID] | None:
    """(invoice id, tenant id) of the PaymentIntent: by its ``metadata.invoice_id`` when that names
    one of our invoices (so an event that arrives before we stored the intent's id still finds it),
    else by the attempt that recorded ``intent_id``; None when it is not ours."""
    named = _uuid_or_none(metadata_invoice)
    if named is not None:
        row = (await session.exec(select(Invoice.id, Invoice.tenant_id).where(col(Invoice.id) == named))).first()
        if row is not None:
            return row[0], row[1]
    if intent_id:
        query = select(PaymentAttempt.invoice_id, PaymentAttempt.tenant_id).where(
            col(PaymentAttempt.psp_payment_intent_id) == intent_id
        )
        attempt = (await session.exec(query)).first()
        if attempt is not None:
            return attempt[0], attempt[1]
    return None


async def decide(session: AsyncSession, event_id: str) -> Decision:
    """What the stored event ``event_id`` asks for (reads only; :class:`NotFound` if not stored).

    - ``payment_intent.succeeded`` / ``payment_intent.payment_failed`` of an intent whose
      ``metadata.invoice_id`` names one of our invoices, or whose id an attempt of ours recorded:
      signal that invoice's collection (which retrieves the intent and decides from the PSP's state,
      so order and duplicates do not matter); any other intent: ignore;
    - ``charge.refunded``: record the refund (charge id in ``object_id``);
    - ``payout.paid``: reconcile the payout (``object_id``);
    - any other type: ignore; an event already ``processed`` or ``ignored``: done.
    """
    event = await session.get(PspEvent, event_id)
    if event is None:
        raise NotFound("event_id", f"PSP event {event_id} not found")
    base = Decision(Action.done, event.id, event.type, event.object_id)
    if event.status is not PspEventStatus.received:
        return base
    obj = _object_of(event.payload)
    if event.type in ("payment_intent.succeeded", "payment_intent.payment_failed"):
        metadata = obj.get("metadata")
        named = metadata.get("invoice_id") if isinstance(metadata, dict) else None
        found = await _invoice_of_intent(session, event.object_id, named)
        if found is None:
            return replace(base, action=Action.ignore, reason="a PaymentIntent this system did not create")
        return replace(base, action=Action.signal_collection, invoice_id=found[0], tenant_id=found[1])
    if event.type == "charge.refunded" and event.object_id:
        return replace(base, action=Action.record_refund, payload=event.payload)
    if event.type == "payout.paid" and event.object_id:
        return replace(base, action=Action.reconcile_payout)
    return replace(base, action=Action.ignore, reason=f"nothing to do for {event.type}")


async def mark(session: AsyncSession, event_id: str, status: PspEventStatus) -> bool:
    """Move the event from ``received`` to ``status`` (``processed`` or ``ignored``) once; commits.
    False when it had already left ``received`` (a second run changes nothing)."""
    if status is PspEventStatus.received:
        raise ValueError("an event is marked processed or ignored, never received again")
    statement = (
        update(PspEvent)
        .where(col(PspEvent.id) == event_id, col(PspEvent.status) == PspEventStatus.received)
        .values(status=status)
        .returning(col(PspEvent.id))
    )
    connection = await session.connection()
    moved = (await connection.execute(statement)).scalar_one_or_none()
    await session.commit()
    return moved is not None


async def received_before(
    session: AsyncSession, cutoff: datetime, *, limit: int, exclude_types: frozenset[str] = frozenset()
) -> list[str]:
    """Ids of events still ``received`` that arrived before ``cutoff``, oldest first (the sweeper's work)."""
    query = (
        select(PspEvent.id)
        .where(col(PspEvent.status) == PspEventStatus.received, col(PspEvent.received_at) < cutoff)
        .order_by(col(PspEvent.created), col(PspEvent.id))
        .limit(limit)
    )
    if exclude_types:
        query = query.where(col(PspEvent.type).not_in(exclude_types))
    return list((await session.exec(query)).all())


@dataclass(frozen=True)
class Backlog:
    count: int  # events still received longer than the age asked for
    oldest_seconds: float  # age of the oldest event still received, 0 when none


async def backlog(session: AsyncSession, now: datetime, older_than: float) -> Backlog:
    """Events still ``received`` (processing lost or behind): one scan of the partial index on them."""
    query = select(func.count(), func.min(PspEvent.received_at)).where(col(PspEvent.status) == PspEventStatus.received)
    late = select(func.count()).where(
        col(PspEvent.status) == PspEventStatus.received,
        col(PspEvent.received_at) < now - timedelta(seconds=older_than),
    )
    _, oldest = (await session.exec(query)).one()
    count = (await session.exec(late)).one()
    return Backlog(count, max((now - oldest).total_seconds(), 0.0) if oldest is not None else 0.0)
