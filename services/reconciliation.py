"""Payout reconciliation: the one home of the rule (``docs/reconciliation.md``).

:func:`reconcile_payout` takes one PSP payout and its balance transactions and matches each to
our records:

- a ``charge`` (or ``payment``) transaction to the ``payment_attempts`` row with that
  ``psp_charge_id``: ``matched`` when the attempt is captured (succeeded, partially refunded or
  refunded), in the same currency, of the same amount and, when we know it, the same fee;
  ``amount_mismatch`` when a captured attempt differs in amount, fee or currency (the message
  says both); ``missing_ours`` when no attempt has the charge, or the one that has it is not
  captured;
- a ``refund`` (or ``payment_refund``) transaction to our ledger's refund posting keyed
  (``refund``, the PSP refund id ``re_...``, ``refund``): its PSP-clearing credit is our amount;
  no posting is ``missing_ours``;
- the ``payout`` transaction to the payout itself: it must move exactly the payout's amount and
  the negated sum of the nets of the payout's other transactions;
- any other type (adjustment, ...) is ``missing_ours``: we record none.

``missing_psp`` lists our captured attempts the PSP never paid out: in the payout's currency,
succeeded at or before the payout was created, whose charge is in no balance transaction of any
reconciled payout (this one included), and for which the PSP reports no **pending** balance
transaction (a pending one will come in a later payout). An attempt without a charge id is
always such a case.

In the same transaction it posts the payout (bank Dr / psp_clearing Cr) once, when the PSP says
it is ``paid``, and the PSP fee of every matched charge whose fee posting is missing (keyed
``payment``, the attempt id, ``psp_fee`` like the capture's). Postings are idempotent on their
key, so reconciling again posts nothing new.

Reconciling a payout again replaces its stored result in one transaction, with its row locked
first: a payout has exactly one stored result, the latest run's (the same when nothing changed).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import delete, func, update
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from adapters.psp import BalanceTransaction, Payout, Psp
from billing.states import CAPTURED
from schema.models import (
    LedgerAccount,
    LedgerEntry,
    LedgerPosting,
    PaymentAttempt,
    PayoutReconciliation,
    PayoutReconciliationItem,
    ReconciliationOutcome,
    utcnow,
)
from services import ledger
from services.errors import InvalidInput, NotFound

CHARGE_TYPES = frozenset({"charge", "payment"})
REFUND_TYPES = frozenset({"refund", "payment_refund"})
PAYOUT_TYPE = "payout"


@dataclass(frozen=True)
class ReportItem:
    position: int
    outcome: ReconciliationOutcome
    type: str
    balance_transaction_id: str | None
    source_id: str | None
    psp_amount: int | None
    psp_fee: int | None
    psp_net: int | None
    our_amount: int | None
    our_fee: int | None
    payment_attempt_id: uuid.UUID | None
    message: str


@dataclass(frozen=True)
class PayoutReport:
    """A payout's stored reconciliation (what :func:`get_report` reads back)."""

    payout_id: str
    currency: str
    amount: int
    payout_status: str
    arrival_date: datetime
    payout_created: datetime
    matched: int
    missing_ours: int
    missing_psp: int
    amount_mismatch: int
    all_matched: bool
    clearing_balance: int | None
    psp_balance: int | None
    created_at: datetime
    reconciled_at: datetime
    items: tuple[ReportItem, ...] = field(default=())


@dataclass(frozen=True)
class Reconciled:
    report: PayoutReport
    postings_created: int  # postings this run wrote (0 when reconciling again)


# --- matching (pure) ------------------------------------------------------------------------


@dataclass(frozen=True)
class RefundRecord:
    """Our record of a refund: the ledger posting keyed by the PSP refund id."""

    refund_id: str
    currency: str
    amount: int  # positive: what left PSP clearing


def _item(
    outcome: ReconciliationOutcome,
    txn: BalanceTransaction | None,
    message: str,
    *,
    type_: str | None = None,
    source_id: str | None = None,
    our_amount: int | None = None,
    our_fee: int | None = None,
    attempt: PaymentAttempt | None = None,
) -> ReportItem:
    return ReportItem(
        position=0,
        outcome=outcome,
        type=type_ or (txn.type if txn else "charge"),
        balance_transaction_id=txn.id if txn else None,
        source_id=source_id if txn is None else txn.source,
        psp_amount=txn.amount if txn else None,
        psp_fee=txn.fee if txn else None,
        psp_net=txn.net if txn else None,
        our_amount=our_amount,
        our_fee=our_fee,
        payment_attempt_id=attempt.id if attempt else None,
        message=message[:500],
    )


def match_charge(txn: BalanceTransaction, attempt: PaymentAttempt | None) -> ReportItem:
    """A charge balance transaction against the attempt that has its charge id (or none)."""
    if attempt is None:
        return _item(ReconciliationOutcome.missing_ours, txn, f"no payment of ours has charge {txn.source}")
    if attempt.status not in CAPTURED:
        return _item(
            ReconciliationOutcome.missing_ours,
            txn,
            f"payment {attempt.id} has charge {txn.source} but is {attempt.status.value}, not captured",
            our_amount=attempt.amount,
            our_fee=attempt.psp_fee,
            attempt=attempt,
        )
    differences = []
    if attempt.currency != txn.currency:
        differences.append(f"currency: ours {attempt.currency}, PSP {txn.currency}")
    if attempt.amount != txn.amount:
        differences.append(f"amount: ours {attempt.amount}, PSP {txn.amount}")
    if attempt.psp_fee is not None and attempt.psp_fee != txn.fee:
        differences.append(f"fee: ours {attempt.psp_fee}, PSP {txn.fee}")
    outcome = ReconciliationOutcome.amount_mismatch if differences else ReconciliationOutcome.matched
    message = "; ".join(differences) if differences else f"payment {attempt.id}"
    return _item(outcome, txn, message, our_amount=attempt.amount, our_fee=attempt.psp_fee, attempt=attempt)


def match_refund(txn: BalanceTransaction, refund: RefundRecord | None) -> ReportItem:
    """A refund balance transaction (negative) against our refund posting (positive amount)."""
    if refund is None:
        return _item(ReconciliationOutcome.missing_ours, txn, f"no refund posting of ours for {txn.source}")
    differences = []
    if refund.currency != txn.currency:
        differences.append(f"currency: ours {refund.currency}, PSP {txn.currency}")
    if -refund.amount != txn.amount:
        differences.append(f"amount: ours {-refund.amount}, PSP {txn.amount}")
    outcome = ReconciliationOutcome.amount_mismatch if differences else ReconciliationOutcome.matched
    message = "; ".join(differences) if differences else f"refund {refund.refund_id}"
    return _item(outcome, txn, message, our_amount=-refund.amount, our_fee=0)


def match_payout(txn: BalanceTransaction, payout: Payout, others_net: int) -> ReportItem:
    """The payout's own transaction: it moves -payout.amount, and that is what the others net to."""
    if txn.source != payout.id:
        return _item(ReconciliationOutcome.missing_ours, txn, f"a payout transaction of another payout {txn.source}")
    differences = []
    if txn.amount != -payout.amount:
        differences.append(f"amount: payout {-payout.amount}, PSP transaction {txn.amount}")
    if txn.amount != -others_net:
        differences.append(f"the payout's transactions net {others_net}, it moves {-txn.amount}")
    outcome = ReconciliationOutcome.amount_mismatch if differences else ReconciliationOutcome.matched
    message = "; ".join(differences) if differences else f"payout {payout.id}"
    return _item(outcome, txn, message, our_amount=-others_net, our_fee=0)


def missing_at_psp(attempt: PaymentAttempt, why: str) -> ReportItem:
    return _item(
        ReconciliationOutcome.missing_psp,
        None,
        f"payment {attempt.id} succeeded at {attempt.succeeded_at:%Y-%m-%dT%H:%M:%SZ}; {why}",
        type_="charge",
        source_id=attempt.psp_charge_id,
        our_amount=attempt.amount,
        our_fee=attempt.psp_fee,
        attempt=attempt,
    )


def _ordered(txns: Sequence[BalanceTransaction]) -> list[BalanceTransaction]:
    """Oldest first (the PSP lists newest first; ties in its one-second ``created`` keep the PSP's
    order), the payout's own transaction last."""
    return sorted(reversed(txns), key=lambda t: (t.type == PAYOUT_TYPE, t.created))


# --- reading our side -------------------------------------------------------------------------


async def _attempts_by_charge(session: AsyncSession, charge_ids: Sequence[str]) -> dict[str, PaymentAttempt]:
    if not charge_ids:
        return {}
    rows = (await session.exec(select(PaymentAttempt).where(col(PaymentAttempt.psp_charge_id).in_(charge_ids)))).all()
    return {row.psp_charge_id: row for row in rows if row.psp_charge_id is not None}


async def _refund_records(session: AsyncSession, refund_ids: Sequence[str]) -> dict[str, RefundRecord]:
    """Our refund postings (source ``refund``, kind ``refund``) by PSP refund id: their PSP-clearing credit."""
    if not refund_ids:
        return {}
    rows = (
        await session.exec(
            select(LedgerPosting.source_id, LedgerEntry.currency, func.sum(LedgerEntry.amount))
            .join(LedgerEntry, col(LedgerEntry.posting_id) == LedgerPosting.id)
            .join(LedgerAccount, col(LedgerAccount.id) == LedgerEntry.account_id)
            .where(
                LedgerPosting.source_type == "refund",
                LedgerPosting.kind == ledger.REFUND,
                col(LedgerPosting.source_id).in_(refund_ids),
                LedgerAccount.code == "psp_clearing",
            )
            .group_by(col(LedgerPosting.source_id), col(LedgerEntry.currency))
        )
    ).all()
    return {source: RefundRecord(source, currency, -int(total)) for source, currency, total in rows}


async def _candidates(session: AsyncSession, payout: Payout, charges_here: set[str]) -> list[PaymentAttempt]:
    """Our captured attempts the PSP should have paid out by this payout and no reconciled payout did."""
    reported = select(PayoutReconciliationItem.source_id).where(
        col(PayoutReconciliationItem.balance_transaction_id).is_not(None),
        col(PayoutReconciliationItem.source_id).is_not(None),
        PayoutReconciliationItem.payout_id != payout.id,
    )
    query = (
        select(PaymentAttempt)
        .where(
            col(PaymentAttempt.status).in_(list(CAPTURED)),
            PaymentAttempt.currency == payout.currency,
            col(PaymentAttempt.succeeded_at) <= payout.created,
            col(PaymentAttempt.psp_charge_id).is_(None) | col(PaymentAttempt.psp_charge_id).not_in(reported),
        )
        .order_by(col(PaymentAttempt.succeeded_at), col(PaymentAttempt.id))
    )
    rows = (await session.exec(query)).all()
    return [row for row in rows if row.psp_charge_id is None or row.psp_charge_id not in charges_here]


async def _fee_postings(session: AsyncSession, payment_ids: Sequence[str]) -> set[str]:
    """Which of these payments already have their PSP fee posting (one query, not one per payment)."""
    if not payment_ids:
        return set()
    rows = await session.exec(
        select(LedgerPosting.source_id).where(
            LedgerPosting.source_type == "payment",
            LedgerPosting.kind == ledger.PSP_FEE,
            col(LedgerPosting.source_id).in_(payment_ids),
        )
    )
    return set(rows.all())


async def clearing_balance(session: AsyncSession, currency: str) -> int:
    """The ``psp_clearing`` account's balance (debits - credits) in ``currency``; 0 without entries."""
    total = (
        await session.exec(
            select(func.coalesce(func.sum(LedgerEntry.amount), 0))
            .join(LedgerAccount, col(LedgerAccount.id) == LedgerEntry.account_id)
            .where(LedgerAccount.code == "psp_clearing", LedgerAccount.currency == currency)
        )
    ).one()
    return int(total)


# --- the rule -------------------------------------------------------------------------------


async def reconcile_payout(session: AsyncSession, psp: Psp, payout_id: str) -> Reconciled:
    """Reconcile payout ``payout_id`` and commit its report and postings (one transaction).

    PSP errors (``Transient``, ``Bug``) propagate before anything is written; a payout the PSP
    does not know is its ``Bug`` (404).
    """
    if not payout_id.startswith("po_") or len(payout_id) > 255:
        raise InvalidInput("payout_id", "must be a PSP payout id (po_...)")
    payout = await psp.retrieve_payout(payout_id)
    txns = _ordered(await psp.list_payout_balance_transactions(payout_id))
    now = utcnow()

    # Lock the payout's row (created on first reconciliation): runs of one payout take turns.
    await (await session.connection()).execute(
        insert(PayoutReconciliation)
        .values(
            payout_id=payout.id,
            currency=payout.currency,
            amount=payout.amount,
            payout_status=payout.status,
            arrival_date=payout.arrival_date,
            payout_created=payout.created,
            matched=0,
            missing_ours=0,
            missing_psp=0,
            amount_mismatch=0,
            all_matched=False,
            created_at=now,
            reconciled_at=now,
        )
        .on_conflict_do_nothing(index_elements=["payout_id"])
    )
    await session.exec(
        select(PayoutReconciliation).where(PayoutReconciliation.payout_id == payout.id).with_for_update()
    )

    charge_ids = [t.source for t in txns if t.type in CHARGE_TYPES and t.source]
    refund_ids = [t.source for t in txns if t.type in REFUND_TYPES and t.source]
    attempts = await _attempts_by_charge(session, charge_ids)
    refunds = await _refund_records(session, refund_ids)
    others_net = sum(t.net for t in txns if t.type != PAYOUT_TYPE)

    items: list[ReportItem] = []
    fees: list[tuple[PaymentAttempt, BalanceTransaction]] = []
    for txn in txns:
        if txn.type in CHARGE_TYPES:
            attempt = attempts.get(txn.source or "")
            item = match_charge(txn, attempt)
            if item.outcome == ReconciliationOutcome.matched and attempt is not None:
                fees.append((attempt, txn))
        elif txn.type in REFUND_TYPES:
            item = match_refund(txn, refunds.get(txn.source or ""))
        elif txn.type == PAYOUT_TYPE:
            item = match_payout(txn, payout, others_net)
        else:
            item = _item(ReconciliationOutcome.missing_ours, txn, f"we record no {txn.type} transactions")
        items.append(item)

    for attempt in await _candidates(session, payout, set(charge_ids)):
        if attempt.psp_charge_id is None:
            items.append(missing_at_psp(attempt, "it has no PSP charge id"))
            continue
        at_psp = await psp.list_source_balance_transactions(attempt.psp_charge_id)
        if any(t.status == "pending" for t in at_psp):
            continue  # the PSP holds it as pending: a later payout pays it out
        why = (
            f"its charge {attempt.psp_charge_id} is {at_psp[0].status} at the PSP but in no reconciled payout"
            if at_psp
            else f"the PSP has no balance transaction of charge {attempt.psp_charge_id}"
        )
        items.append(missing_at_psp(attempt, why))

    # Postings: the payout once, and each matched charge's fee (keyed like the capture's).
    created = 0
    if payout.status == "paid":
        posted = await ledger.post_payout(
            session, payout.id, payout.currency, payout.amount, payout.arrival_date, description=f"Payout {payout.id}"
        )
        created += posted.created
    fee_posted = await _fee_postings(session, [str(attempt.id) for attempt, _ in fees])
    for attempt, txn in fees:
        if str(attempt.id) in fee_posted:
            continue  # posted at capture (or by an earlier run); `post` would return it and add nothing
        fee = attempt.psp_fee if attempt.psp_fee is not None else txn.fee
        if fee > 0:
            posted = await ledger.post_psp_fee(
                session,
                str(attempt.id),
                attempt.currency,
                fee,
                attempt.succeeded_at or txn.created,
                tenant_id=attempt.tenant_id,
            )
            created += posted.created

    counts = {outcome: 0 for outcome in ReconciliationOutcome}
    for item in items:
        counts[item.outcome] += 1
    psp_balance = (await psp.balance()).total(payout.currency)
    clearing = await clearing_balance(session, payout.currency)

    connection = await session.connection()
    await connection.execute(
        delete(PayoutReconciliationItem).where(col(PayoutReconciliationItem.payout_id) == payout.id)
    )
    await connection.execute(
        update(PayoutReconciliation)
        .where(col(PayoutReconciliation.payout_id) == payout.id)
        .values(
            currency=payout.currency,
            amount=payout.amount,
            payout_status=payout.status,
            arrival_date=payout.arrival_date,
            payout_created=payout.created,
            matched=counts[ReconciliationOutcome.matched],
            missing_ours=counts[ReconciliationOutcome.missing_ours],
            missing_psp=counts[ReconciliationOutcome.missing_psp],
            amount_mismatch=counts[ReconciliationOutcome.amount_mismatch],
            all_matched=counts[ReconciliationOutcome.matched] == len(items),
            clearing_balance=clearing,
            psp_balance=psp_balance,
            reconciled_at=now,
        )
    )
    if items:
        await connection.execute(
            insert(PayoutReconciliationItem).values(
                [
                    {
                        "payout_id": payout.id,
                        "position": position,
                        "balance_transaction_id": item.balance_transaction_id,
                        "type": item.type[:64],
                        "source_id": item.source_id,
                        "psp_amount": item.psp_amount,
                        "psp_fee": item.psp_fee,
                        "psp_net": item.psp_net,
                        "our_amount": item.our_amount,
                        "our_fee": item.our_fee,
                        "outcome": item.outcome,
                        "payment_attempt_id": item.payment_attempt_id,
                        "message": item.message,
                    }
                    for position, item in enumerate(items)
                ]
            )
        )
    await session.commit()
    return Reconciled(await get_report(session, payout.id), created)


# --- reading the stored result ----------------------------------------------------------------


def _report_item(row: PayoutReconciliationItem) -> ReportItem:
    return ReportItem(
        position=row.position,
        outcome=row.outcome,
        type=row.type,
        balance_transaction_id=row.balance_transaction_id,
        source_id=row.source_id,
        psp_amount=row.psp_amount,
        psp_fee=row.psp_fee,
        psp_net=row.psp_net,
        our_amount=row.our_amount,
        our_fee=row.our_fee,
        payment_attempt_id=row.payment_attempt_id,
        message=row.message,
    )


def summary(row: PayoutReconciliation, items: Iterable[ReportItem] = ()) -> PayoutReport:
    return PayoutReport(
        payout_id=row.payout_id,
        currency=row.currency,
        amount=row.amount,
        payout_status=row.payout_status,
        arrival_date=row.arrival_date,
        payout_created=row.payout_created,
        matched=row.matched,
        missing_ours=row.missing_ours,
        missing_psp=row.missing_psp,
        amount_mismatch=row.amount_mismatch,
        all_matched=row.all_matched,
        clearing_balance=row.clearing_balance,
        psp_balance=row.psp_balance,
        created_at=row.created_at,
        reconciled_at=row.reconciled_at,
        items=tuple(items),
    )


async def get_report(session: AsyncSession, payout_id: str) -> PayoutReport:
    """The stored reconciliation of ``payout_id`` with its items in order; :class:`NotFound` if none."""
    row = (
        await session.exec(
            select(PayoutReconciliation)
            .where(PayoutReconciliation.payout_id == payout_id)
            .execution_options(populate_existing=True)
        )
    ).first()
    if row is None:
        raise NotFound("payout_id", f"payout reconciliation {payout_id} not found")
    items = (
        await session.exec(
            select(PayoutReconciliationItem)
            .where(PayoutReconciliationItem.payout_id == payout_id)
            .order_by(col(PayoutReconciliationItem.position))
        )
    ).all()
    return summary(row, (_report_item(item) for item in items))


REPORT_COLUMNS = (
    "payout_id",
    "position",
    "outcome",
    "type",
    "balance_transaction_id",
    "source_id",
    "currency",
    "psp_amount",
    "psp_fee",
    "psp_net",
    "our_amount",
    "our_fee",
    "payment_attempt_id",
    "message",
)


def report_rows(report: PayoutReport) -> Iterator[tuple[str, ...]]:
    """The report's items as text cells of :data:`REPORT_COLUMNS` (amounts in minor units, signed)."""

    def cell(value: object) -> str:
        return "" if value is None else str(value)

    for item in report.items:
        yield (
            report.payout_id,
            str(item.position),
            item.outcome.value,
            item.type,
            cell(item.balance_transaction_id),
            cell(item.source_id),
            report.currency,
            cell(item.psp_amount),
            cell(item.psp_fee),
            cell(item.psp_net),
            cell(item.our_amount),
            cell(item.our_fee),
            cell(item.payment_attempt_id),
            item.message,
        )
