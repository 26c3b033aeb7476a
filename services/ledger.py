"""The double-entry ledger: postings of business events, each once, each balanced.

An entry's ``amount`` is in minor units, **debit positive, credit negative**; a posting's
entries sum to zero per currency. The database holds the same rules again (migration 0008):
it refuses UPDATE and DELETE of postings and entries, refuses entries added to a posting by a
later transaction, and checks at commit that every posting balances.

:func:`post` writes in the caller's transaction and never commits, so a posting commits (or
rolls back) with the change it records; the invoice's finalization is one example. The
postings per event and the accounts are described in ``docs/ledger.md``.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import CursorResult, Executable, func, tuple_
from sqlalchemy import select as core_select
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import SelectOfScalar

from billing.money import UnknownCurrencyError, check_currency
from billing.pricing import LineKind
from schema.models import (
    CreditNote,
    CreditNoteLine,
    Invoice,
    InvoiceLine,
    LedgerAccount,
    LedgerAccountKind,
    LedgerEntry,
    LedgerPosting,
    utcnow,
)
from services.errors import Conflict, InvalidInput, NotFound

MAX_BIGINT = 2**63 - 1


@dataclass(frozen=True)
class Account:
    """An account by its code and currency; written to ``ledger_accounts`` on first use."""

    code: str
    name: str
    kind: LedgerAccountKind
    currency: str
    tenant_id: uuid.UUID | None = None


def receivable(tenant_id: uuid.UUID, currency: str) -> Account:
    return Account(f"receivable:{tenant_id}", "Accounts receivable", LedgerAccountKind.asset, currency, tenant_id)


def tenant_credit(tenant_id: uuid.UUID, currency: str) -> Account:
    return Account(f"tenant_credit:{tenant_id}", "Tenant credit", LedgerAccountKind.liability, currency, tenant_id)


def revenue_rent(currency: str) -> Account:
    return Account("revenue:rent", "Rent revenue", LedgerAccountKind.revenue, currency)


def revenue_usage(currency: str) -> Account:
    return Account("revenue:usage", "Usage revenue", LedgerAccountKind.revenue, currency)


def discounts(currency: str) -> Account:
    return Account("discounts", "Discounts (contra revenue)", LedgerAccountKind.contra, currency)


def psp_clearing(currency: str) -> Account:
    return Account("psp_clearing", "PSP clearing", LedgerAccountKind.asset, currency)


def psp_fees(currency: str) -> Account:
    return Account("psp_fees", "PSP fees", LedgerAccountKind.expense, currency)


def bank(currency: str) -> Account:
    return Account("bank", "Bank", LedgerAccountKind.asset, currency)


def bad_debt(currency: str) -> Account:
    return Account("bad_debt", "Bad debt", LedgerAccountKind.expense, currency)


@dataclass(frozen=True)
class Line:
    account: Account
    amount: int  # minor units: debit positive, credit negative


def debit(account: Account, amount: int) -> Line:
    return Line(account, amount)


def credit(account: Account, amount: int) -> Line:
    return Line(account, -amount)


@dataclass(frozen=True)
class PostedEntry:
    account: str  # the account's code
    currency: str
    amount: int


@dataclass(frozen=True)
class Posted:
    posting_id: uuid.UUID
    source_type: str
    source_id: str
    kind: str
    created: bool  # False: the posting existed (a replayed event or a retried call); nothing was added
    entries: tuple[PostedEntry, ...]  # one per account and currency, by code


def _net(lines: Iterable[Line]) -> dict[Account, int]:
    """The lines summed per account, without the accounts that net to zero; checked to balance."""
    net: dict[Account, int] = defaultdict(int)
    by_key: dict[tuple[str, str], Account] = {}
    for i, line in enumerate(lines):
        field = f"lines[{i}]"
        if isinstance(line.amount, bool) or not isinstance(line.amount, int):
            raise InvalidInput(f"{field}.amount", "must be an integer of minor units")
        try:
            currency = check_currency(line.account.currency)
        except UnknownCurrencyError as err:
            raise InvalidInput(f"{field}.account.currency", str(err)) from None
        if currency != line.account.currency:
            raise InvalidInput(f"{field}.account.currency", "must be an upper-case ISO 4217 code")
        key = (line.account.code, currency)
        if by_key.setdefault(key, line.account) != line.account:
            raise InvalidInput(f"{field}.account", f"account {line.account.code} is named with two definitions")
        net[line.account] += line.amount
    per_currency: dict[str, int] = defaultdict(int)
    for account, amount in net.items():
        if abs(amount) > MAX_BIGINT:
            raise InvalidInput("lines", f"account {account.code} moves more than a BIGINT holds")
        per_currency[account.currency] += amount
    if off := [f"{total} {currency}" for currency, total in sorted(per_currency.items()) if total != 0]:
        raise InvalidInput("lines", f"the posting does not balance: its lines sum to {', '.join(off)}")
    return {account: amount for account, amount in net.items() if amount != 0}


def _posted_entries(net: dict[tuple[str, str], int]) -> tuple[PostedEntry, ...]:
    return tuple(PostedEntry(code, currency, amount) for (code, currency), amount in sorted(net.items()))


async def _core(session: AsyncSession, statement: Executable) -> CursorResult[Any]:
    """A Core statement (an INSERT ... ON CONFLICT) on the session's connection, in its transaction."""
    connection = await session.connection()
    return await connection.execute(statement)


async def _account_ids(session: AsyncSession, accounts: Sequence[Account]) -> dict[Account, uuid.UUID]:
    """Each account's id, inserting the ones not there yet (in code order, so writers never deadlock).
    Accounts are made once and read ever after: they are looked up first, and only missing ones written."""
    if not accounts:
        return {}
    ordered = sorted(accounts, key=lambda a: (a.code, a.currency))
    stored = await _stored_accounts(session, ordered)
    if missing := [a for a in ordered if (a.code, a.currency) not in stored]:
        now = utcnow()
        await _core(
            session,
            insert(LedgerAccount)
            .values(
                [
                    {
                        "id": uuid.uuid4(),
                        "code": a.code,
                        "name": a.name,
                        "kind": a.kind,
                        "tenant_id": a.tenant_id,
                        "currency": a.currency,
                        "created_at": now,
                    }
                    for a in missing
                ]
            )
            .on_conflict_do_nothing(index_elements=["code", "currency"]),
        )
        stored |= await _stored_accounts(session, missing)
    ids: dict[Account, uuid.UUID] = {}
    for account in ordered:
        row = stored[(account.code, account.currency)]
        if (row.kind, row.tenant_id) != (account.kind, account.tenant_id):
            raise Conflict("account", f"account {account.code} exists as {row.kind.value} of tenant {row.tenant_id}")
        ids[account] = row.id
    return ids


async def _stored_accounts(session: AsyncSession, accounts: Sequence[Account]) -> dict[tuple[str, str], LedgerAccount]:
    keys = [(a.code, a.currency) for a in accounts]
    rows = (
        await session.exec(
            select(LedgerAccount).where(tuple_(col(LedgerAccount.code), col(LedgerAccount.currency)).in_(keys))
        )
    ).all()
    return {(row.code, row.currency): row for row in rows}


async def _existing(session: AsyncSession, source_type: str, source_id: str, kind: str) -> Posted | None:
    posting = (
        await session.exec(
            select(LedgerPosting).where(
                LedgerPosting.source_type == source_type,
                LedgerPosting.source_id == source_id,
                LedgerPosting.kind == kind,
            )
        )
    ).first()
    if posting is None:
        return None
    rows = (
        await session.exec(
            select(LedgerAccount.code, LedgerEntry.currency, func.sum(LedgerEntry.amount))
            .join(LedgerAccount, col(LedgerAccount.id) == LedgerEntry.account_id)
            .where(LedgerEntry.posting_id == posting.id)
            .group_by(col(LedgerAccount.code), col(LedgerEntry.currency))
        )
    ).all()
    net = {(code, currency): int(amount) for code, currency, amount in rows}
    return Posted(posting.id, source_type, source_id, kind, created=False, entries=_posted_entries(net))


async def post(
    session: AsyncSession,
    source_type: str,
    source_id: str,
    kind: str,
    description: str,
    lines: Iterable[Line],
    *,
    posted_at: datetime | None = None,
    tenant_id: uuid.UUID | None = None,
) -> Posted:
    """Post ``lines`` once for the key (source_type, source_id, kind), in the caller's transaction.

    Lines on one account are summed and accounts that net to zero get no entry. The lines must
    balance per currency (else :class:`InvalidInput`). When a posting with that key exists it is
    returned and nothing is added; if its entries differ from ``lines`` that is a
    :class:`Conflict` (one event cannot mean two things). Concurrent calls with one key write
    one posting: the later ones wait on the unique key and then return the first one's.
    """
    for field, value, limit in (("source_type", source_type, 32), ("source_id", source_id, 200), ("kind", kind, 32)):
        if not value or len(value) > limit:
            raise InvalidInput(field, f"must be 1 to {limit} characters")
    net = _net(lines)
    wanted = _posted_entries({(a.code, a.currency): amount for a, amount in net.items()})
    ids = await _account_ids(session, list(net))
    at = posted_at or utcnow()
    posting_id = uuid.uuid4()
    inserted = (
        await _core(
            session,
            insert(LedgerPosting)
            .values(
                id=posting_id,
                source_type=source_type,
                source_id=source_id,
                kind=kind,
                description=description[:300],
                tenant_id=tenant_id,
                posted_at=at,
                created_at=utcnow(),
                created_xact=0,  # stamped by the database with the writing transaction
            )
            .on_conflict_do_nothing(index_elements=["source_type", "source_id", "kind"])
            .returning(col(LedgerPosting.id)),
        )
    ).first()
    if inserted is None:
        existing = await _existing(session, source_type, source_id, kind)
        if existing is None:  # cannot happen: the conflicting row is committed and visible to this statement
            raise Conflict("source_id", f"posting {source_type}:{source_id}:{kind} could not be read back")
        if existing.entries != wanted:
            raise Conflict("source_id", f"{source_type} {source_id} was posted as {kind} with other entries")
        return existing
    if net:
        now = utcnow()
        await _core(
            session,
            insert(LedgerEntry).values(
                [
                    {
                        "id": uuid.uuid4(),
                        "posting_id": posting_id,
                        "account_id": ids[account],
                        "amount": amount,
                        "currency": account.currency,
                        "posted_at": at,
                        "created_at": now,
                    }
                    for account, amount in sorted(net.items(), key=lambda item: (item[0].code, item[0].currency))
                ]
            ),
        )
    return Posted(posting_id, source_type, source_id, kind, created=True, entries=wanted)


# --- Postings per event -------------------------------------------------------------------

INVOICE_FINALIZED = "invoice_finalized"
PAYMENT_CAPTURED = "payment_captured"
PSP_FEE = "psp_fee"
PAYOUT = "payout"
REFUND = "refund"
WRITE_OFF = "write_off"
PAYMENT_RECEIVED = "payment_received"  # money received out of band (a bank transfer an operator records)
WRITE_OFF_RECOVERED = "write_off_recovered"  # a payment on an invoice written off: the write-off undone by it
INVOICE_VOIDED = "invoice_voided"  # the finalization (and a write-off) reversed
OVERPAYMENT = "overpayment"  # a payment beyond what its invoice still needed, kept as tenant credit
CREDIT_NOTE = "credit_note"


def invoice_lines(tenant_id: uuid.UUID, currency: str, total: int, lines: Iterable[tuple[str, int]]) -> list[Line]:
    """The finalization of an invoice: (kind, amount) of each invoice line, and its total.

    The receivable is debited by the total; every line is booked with the opposite sign on the
    account of its kind: charges credit revenue, a discount (negative) debits discounts, credit
    applied (negative) debits the tenant's credit, credit carried (positive) credits it. The
    lines sum to the total, so the posting balances to the minor unit.
    """
    out = [debit(receivable(tenant_id, currency), total)]
    for i, (kind, amount) in enumerate(lines):
        match kind:
            case LineKind.base_fee | LineKind.proration:
                account = revenue_rent(currency)
            case LineKind.usage | LineKind.usage_adjustment:
                account = revenue_usage(currency)
            case LineKind.discount:
                account = discounts(currency)
            case LineKind.credit_applied | LineKind.credit_carried:
                account = tenant_credit(tenant_id, currency)
            case _:
                raise InvalidInput(f"lines[{i}].kind", f"no ledger account for invoice lines of kind {kind!r}")
        out.append(Line(account, -amount))
    return out


async def post_invoice_finalized(session: AsyncSession, invoice_id: uuid.UUID, posted_at: datetime) -> Posted:
    """The finalization posting of an invoice, from its stored lines (once; see :func:`invoice_lines`)."""
    invoice = (
        await session.exec(select(Invoice).where(Invoice.id == invoice_id).execution_options(populate_existing=True))
    ).first()
    if invoice is None:
        raise NotFound("invoice_id", f"invoice {invoice_id} not found")
    rows = (
        await session.exec(
            select(InvoiceLine.kind, InvoiceLine.amount)
            .where(InvoiceLine.invoice_id == invoice_id)
            .order_by(col(InvoiceLine.position))
        )
    ).all()
    if (lines_sum := sum(amount for _, amount in rows)) != invoice.total:
        raise InvalidInput("total", f"invoice {invoice_id}: its lines sum to {lines_sum}, its total is {invoice.total}")
    return await post(
        session,
        "invoice",
        str(invoice_id),
        INVOICE_FINALIZED,
        f"Invoice {invoice.number or invoice_id} finalized",
        invoice_lines(invoice.tenant_id, invoice.currency, invoice.total, rows),
        posted_at=posted_at,
        tenant_id=invoice.tenant_id,
    )


def _positive(field: str, amount: int) -> None:
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise InvalidInput(field, "must be a positive integer of minor units")


async def _transfer(
    session: AsyncSession,
    source_type: str,
    source_id: str,
    kind: str,
    description: str,
    debited: Account,
    credited: Account,
    amount: int,
    posted_at: datetime,
    *,
    tenant_id: uuid.UUID | None = None,
    field: str = "amount",
) -> Posted:
    """One positive ``amount`` moved from ``credited`` to ``debited``: the shape of every money
    movement's posting (all but an invoice's finalization, a credit note and a reversal)."""
    _positive(field, amount)
    lines = [debit(debited, amount), credit(credited, amount)]
    return await post(
        session, source_type, source_id, kind, description, lines, posted_at=posted_at, tenant_id=tenant_id
    )


async def post_payment_captured(
    session: AsyncSession,
    payment_id: str,
    tenant_id: uuid.UUID,
    currency: str,
    amount: int,
    posted_at: datetime,
    *,
    description: str = "Payment captured",
) -> Posted:
    """The PSP captured a tenant's payment: PSP clearing debited, the tenant's receivable credited."""
    return await _transfer(
        session,
        "payment",
        payment_id,
        PAYMENT_CAPTURED,
        description,
        psp_clearing(currency),
        receivable(tenant_id, currency),
        amount,
        posted_at,
        tenant_id=tenant_id,
    )


async def post_psp_fee(
    session: AsyncSession,
    payment_id: str,
    currency: str,
    fee: int,
    posted_at: datetime,
    *,
    tenant_id: uuid.UUID | None = None,
    description: str = "PSP fee",
) -> Posted:
    """The PSP kept its fee on a payment: PSP fees debited, PSP clearing credited."""
    return await _transfer(
        session,
        "payment",
        payment_id,
        PSP_FEE,
        description,
        psp_fees(currency),
        psp_clearing(currency),
        fee,
        posted_at,
        tenant_id=tenant_id,
        field="fee",
    )


async def post_payout(
    session: AsyncSession,
    payout_id: str,
    currency: str,
    amount: int,
    posted_at: datetime,
    *,
    description: str = "Payout",
) -> Posted:
    """The PSP paid out to our bank: bank debited, PSP clearing credited."""
    return await _transfer(
        session, "payout", payout_id, PAYOUT, description, bank(currency), psp_clearing(currency), amount, posted_at
    )


async def post_refund(
    session: AsyncSession,
    refund_id: str,
    tenant_id: uuid.UUID,
    currency: str,
    amount: int,
    posted_at: datetime,
    *,
    description: str = "Refund",
) -> Posted:
    """Money paid back to a tenant through the PSP: the tenant's receivable debited, PSP clearing credited.

    The refund moves money only; the credit note that gives the reason (revenue back, the
    receivable credited) is its own posting.
    """
    return await _transfer(
        session,
        "refund",
        refund_id,
        REFUND,
        description,
        receivable(tenant_id, currency),
        psp_clearing(currency),
        amount,
        posted_at,
        tenant_id=tenant_id,
    )


def revenue_account(kind: str | None, currency: str) -> Account:
    """The revenue account a credited invoice line's kind was booked on (rent when unspecified)."""
    match kind:
        case None | LineKind.base_fee | LineKind.proration:
            return revenue_rent(currency)
        case LineKind.usage | LineKind.usage_adjustment:
            return revenue_usage(currency)
    raise InvalidInput("invoice_line_id", f"invoice lines of kind {kind!r} are not revenue and cannot be credited")


def credit_note_lines(
    tenant_id: uuid.UUID, currency: str, amount: int, credit_amount: int, lines: Iterable[tuple[str | None, int]]
) -> list[Line]:
    """A credit note: each line debits the revenue of its invoice line's kind (``None``: rent), the
    tenant's receivable is credited by the whole amount; the part left as tenant credit moves from
    the receivable to the tenant's credit (receivable Dr / tenant_credit Cr)."""
    out = [debit(revenue_account(kind, currency), line_amount) for kind, line_amount in lines]
    out.append(credit(receivable(tenant_id, currency), amount))
    if credit_amount:
        out += [
            debit(receivable(tenant_id, currency), credit_amount),
            credit(tenant_credit(tenant_id, currency), credit_amount),
        ]
    return out


async def post_credit_note(session: AsyncSession, credit_note_id: uuid.UUID) -> Posted:
    """The posting of an issued credit note, from its stored lines (once; see :func:`credit_note_lines`)."""
    note = await session.get(CreditNote, credit_note_id)
    if note is None:
        raise NotFound("credit_note_id", f"credit note {credit_note_id} not found")
    rows = (
        await session.exec(
            select(InvoiceLine.kind, CreditNoteLine.amount)
            .select_from(CreditNoteLine)
            .outerjoin(InvoiceLine, col(InvoiceLine.id) == CreditNoteLine.invoice_line_id)
            .where(CreditNoteLine.credit_note_id == credit_note_id)
            .order_by(col(CreditNoteLine.position))
        )
    ).all()
    if (lines_sum := sum(amount for _, amount in rows)) != note.amount:
        raise InvalidInput(
            "lines", f"credit note {note.number}: its lines sum to {lines_sum}, its amount is {note.amount}"
        )
    return await post(
        session,
        "credit_note",
        str(credit_note_id),
        CREDIT_NOTE,
        f"Credit note {note.number}",
        credit_note_lines(note.tenant_id, note.currency, note.amount, note.credit_amount, rows),
        posted_at=note.issued_at,
        tenant_id=note.tenant_id,
    )


async def post_write_off(
    session: AsyncSession,
    invoice_id: uuid.UUID,
    tenant_id: uuid.UUID,
    currency: str,
    amount: int,
    posted_at: datetime,
    *,
    description: str = "Written off as uncollectible",
) -> Posted:
    """An invoice given up on: bad debt debited, the tenant's receivable credited."""
    return await _transfer(
        session,
        "invoice",
        str(invoice_id),
        WRITE_OFF,
        description,
        bad_debt(currency),
        receivable(tenant_id, currency),
        amount,
        posted_at,
        tenant_id=tenant_id,
    )


async def post_payment_received(
    session: AsyncSession,
    payment_id: str,
    tenant_id: uuid.UUID,
    currency: str,
    amount: int,
    posted_at: datetime,
    *,
    description: str = "Payment received out of band",
) -> Posted:
    """Money received outside the PSP (a bank transfer): bank debited, the tenant's receivable credited."""
    return await _transfer(
        session,
        "payment",
        payment_id,
        PAYMENT_RECEIVED,
        description,
        bank(currency),
        receivable(tenant_id, currency),
        amount,
        posted_at,
        tenant_id=tenant_id,
    )


async def post_write_off_recovered(
    session: AsyncSession,
    payment_id: str,
    tenant_id: uuid.UUID,
    currency: str,
    amount: int,
    posted_at: datetime,
    *,
    description: str = "Written-off invoice paid after all",
) -> Posted:
    """A payment on an invoice written off as uncollectible: the receivable back from bad debt, so the
    payment's own posting settles it (receivable debited, bad debt credited)."""
    return await _transfer(
        session,
        "payment",
        payment_id,
        WRITE_OFF_RECOVERED,
        description,
        receivable(tenant_id, currency),
        bad_debt(currency),
        amount,
        posted_at,
        tenant_id=tenant_id,
    )


async def post_overpayment(
    session: AsyncSession,
    payment_id: str,
    tenant_id: uuid.UUID,
    currency: str,
    amount: int,
    posted_at: datetime,
    *,
    description: str = "Payment beyond what was due, kept as tenant credit",
) -> Posted:
    """What a payment brought beyond its invoice's due amount: the tenant's receivable debited (the
    capture credited it with the whole payment), the tenant's credit credited."""
    return await _transfer(
        session,
        "payment",
        payment_id,
        OVERPAYMENT,
        description,
        receivable(tenant_id, currency),
        tenant_credit(tenant_id, currency),
        amount,
        posted_at,
        tenant_id=tenant_id,
    )


async def post_reversal(
    session: AsyncSession,
    source_type: str,
    source_id: str,
    kinds: Sequence[str],
    kind: str,
    description: str,
    posted_at: datetime,
    *,
    tenant_id: uuid.UUID | None = None,
) -> Posted:
    """One posting (key ``source_type, source_id, kind``) that undoes the postings ``kinds`` of the same
    source: every entry of theirs with the opposite sign. It balances because they did."""
    rows = (
        await session.exec(
            select(LedgerAccount, LedgerEntry.amount)
            .join(LedgerEntry, col(LedgerEntry.account_id) == LedgerAccount.id)
            .join(LedgerPosting, col(LedgerPosting.id) == LedgerEntry.posting_id)
            .where(
                LedgerPosting.source_type == source_type,
                LedgerPosting.source_id == source_id,
                col(LedgerPosting.kind).in_(list(kinds)),
            )
        )
    ).all()
    lines = [Line(Account(a.code, a.name, a.kind, a.currency, a.tenant_id), -int(amount)) for a, amount in rows]
    return await post(
        session, source_type, source_id, kind, description, lines, posted_at=posted_at, tenant_id=tenant_id
    )


# --- Reading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EntryFilter:
    account: str | None = None  # an account code, any currency
    tenant_id: uuid.UUID | None = None  # entries of the tenant's postings
    source_type: str | None = None
    source_id: str | None = None
    currency: str | None = None


def entries_query(where: EntryFilter) -> SelectOfScalar[LedgerEntry]:
    """Entries matching the filter (for a page; ordering is the pager's)."""
    query = select(LedgerEntry)
    if where.account is not None:
        accounts = select(LedgerAccount.id).where(LedgerAccount.code == where.account)
        query = query.where(col(LedgerEntry.account_id).in_(accounts))
    if where.tenant_id is not None or where.source_type is not None or where.source_id is not None:
        postings = select(LedgerPosting.id)
        if where.tenant_id is not None:
            postings = postings.where(LedgerPosting.tenant_id == where.tenant_id)
        if where.source_type is not None:
            postings = postings.where(LedgerPosting.source_type == where.source_type)
        if where.source_id is not None:
            postings = postings.where(LedgerPosting.source_id == where.source_id)
        query = query.where(col(LedgerEntry.posting_id).in_(postings))
    if where.currency is not None:
        query = query.where(LedgerEntry.currency == where.currency)
    return query


async def accounts_and_postings(
    session: AsyncSession, entries: Sequence[LedgerEntry]
) -> tuple[dict[uuid.UUID, LedgerAccount], dict[uuid.UUID, LedgerPosting]]:
    """The accounts and postings of ``entries``, by id (two queries for a page)."""
    account_ids = {e.account_id for e in entries}
    posting_ids = {e.posting_id for e in entries}
    accounts = (await session.exec(select(LedgerAccount).where(col(LedgerAccount.id).in_(account_ids)))).all()
    postings = (await session.exec(select(LedgerPosting).where(col(LedgerPosting.id).in_(posting_ids)))).all()
    return {a.id: a for a in accounts}, {p.id: p for p in postings}


def accounts_query(tenant_id: uuid.UUID | None = None, code: str | None = None) -> SelectOfScalar[LedgerAccount]:
    query = select(LedgerAccount)
    if tenant_id is not None:
        query = query.where(LedgerAccount.tenant_id == tenant_id)
    if code is not None:
        query = query.where(LedgerAccount.code == code)
    return query


@dataclass(frozen=True)
class Balance:
    debits: int  # sum of the positive entries
    credits: int  # sum of the negative entries, as a positive number
    balance: int  # debits - credits

    @classmethod
    def of(cls, debits: int, credits: int) -> Balance:
        return cls(debits, credits, debits - credits)


async def balances(session: AsyncSession, account_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Balance]:
    """Debits, credits and balance of each account (an account's entries are all in its currency)."""
    if not account_ids:
        return {}
    positive = func.coalesce(func.sum(LedgerEntry.amount).filter(col(LedgerEntry.amount) > 0), 0)
    negative = func.coalesce(func.sum(-col(LedgerEntry.amount)).filter(col(LedgerEntry.amount) < 0), 0)
    rows = (
        await session.exec(
            select(LedgerEntry.account_id, positive, negative)
            .where(col(LedgerEntry.account_id).in_(account_ids))
            .group_by(col(LedgerEntry.account_id))
        )
    ).all()
    found = {account_id: Balance.of(int(d), int(c)) for account_id, d, c in rows}
    return {account_id: found.get(account_id, Balance.of(0, 0)) for account_id in account_ids}


EXPORT_COLUMNS = (
    "posted_at",
    "posting_id",
    "source_type",
    "source_id",
    "posting_kind",
    "description",
    "entry_id",
    "account",
    "account_kind",
    "tenant_id",
    "currency",
    "amount",
)


# Where each export column comes from.
_EXPORT_SOURCE = (
    LedgerEntry.posted_at,
    LedgerPosting.id,
    LedgerPosting.source_type,
    LedgerPosting.source_id,
    LedgerPosting.kind,
    LedgerPosting.description,
    LedgerEntry.id,
    LedgerAccount.code,
    LedgerAccount.kind,
    LedgerAccount.tenant_id,
    LedgerEntry.currency,
    LedgerEntry.amount,
)


async def export_rows(
    session: AsyncSession, start: datetime, end: datetime, batch: int = 1000
) -> AsyncIterator[tuple[str, ...]]:
    """Every entry posted in [start, end), oldest first, as text cells of :data:`EXPORT_COLUMNS`.

    Read through a server-side cursor in batches, so an export of any size holds one batch.
    """
    query = (
        core_select(*(col(c) for c in _EXPORT_SOURCE))
        .join(LedgerPosting, col(LedgerPosting.id) == LedgerEntry.posting_id)
        .join(LedgerAccount, col(LedgerAccount.id) == LedgerEntry.account_id)
        .where(col(LedgerEntry.posted_at) >= start, col(LedgerEntry.posted_at) < end)
        .order_by(col(LedgerEntry.posted_at), col(LedgerEntry.posting_id), col(LedgerAccount.code))
        .execution_options(yield_per=batch)
    )
    result = await session.stream(query)
    async for row in result:
        yield tuple(_cell(value) for value in row)


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, StrEnum):
        return value.value
    return str(value)
