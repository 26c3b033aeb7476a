"""The ledger, read-only: entries (cursor pages), balances per account, a streamed CSV export.

Postings are written by the services that record money events (``services.ledger``); nothing
here writes.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse

from api.auth import OPERATORS, allow
from api.deps import ReportSessionDep, ReportSessionmakerDep
from api.errors import error_responses
from api.middleware import bind_tenant
from api.pagination import Page, PageQuery, fetch_page
from api.routing import DecimalJSONRoute
from api.schemas import LedgerBalancePublic, LedgerEntryPublic
from schema.models import LedgerAccount, LedgerEntry
from services import ledger
from services.inputs import UtcDatetime

router = APIRouter(prefix="/ledger", tags=["ledger"], route_class=DecimalJSONRoute)

AccountCode = Annotated[
    str | None, Query(min_length=1, max_length=100, description="An account code, e.g. revenue:rent")
]


@router.get("/entries", dependencies=[allow(OPERATORS)])
async def list_entries(
    session: ReportSessionDep,
    paging: PageQuery,
    account: AccountCode = None,
    tenant_id: Annotated[uuid.UUID | None, Query(description="Entries of the tenant's postings")] = None,
    source_type: Annotated[str | None, Query(min_length=1, max_length=32, description="e.g. invoice")] = None,
    source_id: Annotated[str | None, Query(min_length=1, max_length=200, description="e.g. an invoice id")] = None,
    currency: Annotated[str | None, Query(pattern="^[A-Z]{3}$")] = None,
) -> Page[LedgerEntryPublic]:
    """Ledger entries in the order they were written, filtered by account, tenant and posting source."""
    if tenant_id is not None:
        bind_tenant(tenant_id)
    where = ledger.EntryFilter(account, tenant_id, source_type, source_id, currency)
    page = await fetch_page(session, ledger.entries_query(where), LedgerEntry, paging)
    accounts, postings = await ledger.accounts_and_postings(session, page.rows)

    def public(entry: LedgerEntry) -> LedgerEntryPublic:
        a, p = accounts[entry.account_id], postings[entry.posting_id]
        return LedgerEntryPublic(
            id=entry.id,
            posting_id=p.id,
            source_type=p.source_type,
            source_id=p.source_id,
            posting_kind=p.kind,
            description=p.description,
            account=a.code,
            account_kind=a.kind,
            account_tenant_id=a.tenant_id,
            currency=entry.currency,
            amount=entry.amount,
            posted_at=entry.posted_at,
            created_at=entry.created_at,
        )

    return page.page(public)


@router.get("/balances", dependencies=[allow(OPERATORS)])
async def list_balances(
    session: ReportSessionDep,
    paging: PageQuery,
    account: AccountCode = None,
    tenant_id: Annotated[uuid.UUID | None, Query(description="Only the tenant's own accounts")] = None,
) -> Page[LedgerBalancePublic]:
    """Debits, credits and balance of each account (one per code and currency), in creation order."""
    if tenant_id is not None:
        bind_tenant(tenant_id)
    page = await fetch_page(session, ledger.accounts_query(tenant_id, account), LedgerAccount, paging)
    sums = await ledger.balances(session, [a.id for a in page.rows])

    def public(a: LedgerAccount) -> LedgerBalancePublic:
        b = sums[a.id]
        return LedgerBalancePublic(
            account_id=a.id,
            account=a.code,
            name=a.name,
            kind=a.kind,
            tenant_id=a.tenant_id,
            currency=a.currency,
            debits=b.debits,
            credits=b.credits,
            balance=b.balance,
        )

    return page.page(public)


@router.get(
    "/export.csv",
    dependencies=[allow(OPERATORS)],
    response_class=StreamingResponse,
    responses={
        status.HTTP_200_OK: {
            "content": {"text/csv": {"schema": {"type": "string"}}},
            "description": "One row per entry posted in [from, to), oldest first; amounts in minor units",
        },
        **error_responses(422),
    },
)
async def export_csv(
    sessions: ReportSessionmakerDep,
    start: Annotated[UtcDatetime, Query(alias="from", description="RFC 3339; entries posted at or after")],
    end: Annotated[UtcDatetime, Query(alias="to", description="RFC 3339; entries posted before")],
) -> StreamingResponse:
    """The entries posted in [from, to) as CSV, streamed from a server-side cursor."""
    if end <= start:
        raise RequestValidationError([{"loc": ("query", "to"), "msg": "must be after from", "type": "value_error"}])

    async def rows() -> AsyncIterator[str]:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(ledger.EXPORT_COLUMNS)
        async with sessions() as session:
            async for n, row in _numbered(ledger.export_rows(session, start, end)):
                writer.writerow(row)
                if n % 500 == 0:
                    yield buffer.getvalue()
                    buffer.seek(0)
                    buffer.truncate()
        yield buffer.getvalue()

    filename = f"ledger-{start:%Y%m%dT%H%M%SZ}-{end:%Y%m%dT%H%M%SZ}.csv"
    return StreamingResponse(
        rows(), media_type="text/csv", headers={"Content-Disposition": f'attachment; filename="{filename}"'}
    )


async def _numbered(rows: AsyncIterator[tuple[str, ...]]) -> AsyncIterator[tuple[int, tuple[str, ...]]]:
    n = 0
    async for row in rows:
        n += 1
        yield n, row
