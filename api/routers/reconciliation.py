"""Payout reconciliations, read-only: the list, one payout's summary and items, its CSV.

The reconciliation itself is written by the ``PayoutReconciliation`` workflow
(``services.reconciliation``); nothing here writes.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import tuple_
from sqlmodel import col, select

from api.auth import OPERATORS, allow
from api.deps import ReportSessionDep
from api.errors import error_responses, not_found
from api.pagination import Page, PageQuery
from api.routing import DecimalJSONRoute
from schema.models import PayoutReconciliation, ReconciliationOutcome
from services import reconciliation
from services.errors import NotFound

router = APIRouter(prefix="/reconciliation", tags=["reconciliation"], route_class=DecimalJSONRoute)

PayoutId = Annotated[str, Path(min_length=4, max_length=255, pattern=r"^po_[A-Za-z0-9_]+$", description="po_...")]


class ReconciliationItemPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    position: int
    outcome: ReconciliationOutcome
    type: str = Field(description="charge, refund, payout, adjustment, ...")
    balance_transaction_id: str | None = Field(description="The PSP's txn_...; null for missing_psp")
    source_id: str | None = Field(description="ch_..., re_..., po_...")
    psp_amount: int | None = Field(description="Minor units, signed as the PSP reports it")
    psp_fee: int | None
    psp_net: int | None
    our_amount: int | None = Field(description="Our record's amount, in the PSP's sign convention")
    our_fee: int | None
    payment_attempt_id: uuid.UUID | None
    message: str


class PayoutReconciliationPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    payout_id: str
    currency: str
    amount: int = Field(description="What the PSP paid out, minor units")
    payout_status: str
    arrival_date: datetime
    payout_created: datetime
    matched: int
    missing_ours: int
    missing_psp: int
    amount_mismatch: int
    all_matched: bool
    clearing_balance: int | None = Field(description="Our psp_clearing balance in the currency, at the run")
    psp_balance: int | None = Field(description="The PSP's pending + available balance, at the run")
    created_at: datetime
    reconciled_at: datetime


class PayoutReconciliationDetail(PayoutReconciliationPublic):
    items: list[ReconciliationItemPublic]


def _cursor(row: PayoutReconciliation) -> str:
    raw = json.dumps([row.created_at.isoformat(), row.payout_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _after(cursor: str) -> tuple[datetime, str]:
    try:
        created, payout_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        instant = datetime.fromisoformat(created)
        if instant.tzinfo is None or not isinstance(payout_id, str):
            raise ValueError("not ours")
        return instant, payout_id
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise RequestValidationError(
            [{"loc": ("query", "cursor"), "msg": "is not a cursor this API gave out", "type": "cursor_invalid"}]
        ) from None


@router.get("/payouts", dependencies=[allow(OPERATORS)])
async def list_payout_reconciliations(
    session: ReportSessionDep,
    paging: PageQuery,
    currency: Annotated[str | None, Query(pattern="^[A-Z]{3}$")] = None,
    all_matched: Annotated[bool | None, Query(description="Only payouts that matched fully (or not)")] = None,
) -> Page[PayoutReconciliationPublic]:
    """Reconciled payouts in the order they were first reconciled (cursor pages), without items."""
    query = select(PayoutReconciliation)
    if currency is not None:
        query = query.where(PayoutReconciliation.currency == currency)
    if all_matched is not None:
        query = query.where(PayoutReconciliation.all_matched == all_matched)
    key = tuple_(col(PayoutReconciliation.created_at), col(PayoutReconciliation.payout_id))
    if paging.cursor is not None:
        query = query.where(key > tuple_(*_after(paging.cursor)))
    query = query.order_by(col(PayoutReconciliation.created_at), col(PayoutReconciliation.payout_id))
    rows = list((await session.exec(query.limit(paging.limit + 1))).all())
    has_more = len(rows) > paging.limit
    rows = rows[: paging.limit]
    return Page[PayoutReconciliationPublic](
        data=[PayoutReconciliationPublic.model_validate(row) for row in rows],
        has_more=has_more,
        next_cursor=_cursor(rows[-1]) if has_more else None,
    )


async def _report(session: ReportSessionDep, payout_id: str) -> reconciliation.PayoutReport:
    try:
        return await reconciliation.get_report(session, payout_id)
    except NotFound:
        raise not_found("payout reconciliation", payout_id, field="payout_id") from None


@router.get("/payouts/{payout_id}", dependencies=[allow(OPERATORS)], responses=error_responses(404))
async def get_payout_reconciliation(payout_id: PayoutId, session: ReportSessionDep) -> PayoutReconciliationDetail:
    """A payout's reconciliation: its summary and every item in report order."""
    return PayoutReconciliationDetail.model_validate(await _report(session, payout_id))


@router.get(
    "/payouts/{payout_id}/export.csv",
    dependencies=[allow(OPERATORS)],
    response_class=StreamingResponse,
    responses={
        status.HTTP_200_OK: {
            "content": {"text/csv": {"schema": {"type": "string"}}},
            "description": "One row per item of the payout's reconciliation, in report order; minor units",
        },
        **error_responses(404),
    },
)
async def export_payout_reconciliation(payout_id: PayoutId, session: ReportSessionDep) -> StreamingResponse:
    """The payout's items as CSV (columns ``services.reconciliation.REPORT_COLUMNS``), in chunks of 500 rows."""
    report = await _report(session, payout_id)

    async def rows() -> AsyncIterator[str]:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(reconciliation.REPORT_COLUMNS)
        for n, row in enumerate(reconciliation.report_rows(report), start=1):
            writer.writerow(row)
            if n % 500 == 0:
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
        yield buffer.getvalue()

    return StreamingResponse(
        rows(),
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="reconciliation-{payout_id}.csv"'},
    )
