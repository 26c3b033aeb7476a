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

Processing ``received`` events (signalling the invoice's workflow, recording refunds, starting
payout reconciliation) is not done here yet; events keep the PSP's ``created`` time so a
processor can order them however they arrived. See ``docs/payments.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from adapters.psp import InvalidSignature, verify_event
from schema.models import PspEvent, PspEventStatus, utcnow
from services.errors import ServiceError

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
        raise SignatureRejected(str(refused)) from None
    status = status_for(event.type)
    statement = (
        insert(PspEvent)
        .values(
            id=event.id,
            type=event.type,
            created=event.created,
            payload=event.payload,
            received_at=utcnow(),
            status=status,
            object_id=event.object_id,
        )
        .on_conflict_do_nothing(index_elements=["id"])
        .returning(col(PspEvent.id))
    )
    connection = await session.connection()
    inserted = (await connection.execute(statement)).scalar_one_or_none()
    if inserted is not None:
        await session.commit()
        return Intake(event.id, event.type, status, duplicate=False)
    stored = (await session.exec(select(PspEvent.status).where(col(PspEvent.id) == event.id))).one()
    await session.commit()
    return Intake(event.id, event.type, PspEventStatus(stored), duplicate=True)
