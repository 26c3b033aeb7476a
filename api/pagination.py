"""One list envelope with keyset cursor pagination for every list route.

``{"data": [...], "has_more": bool, "next_cursor": str | null}``. Rows come in creation order
(``created_at``, then ``id``); ``next_cursor`` is an opaque token of the last row, and the next
page holds the rows after it. Rows added while a client walks the list appear at the end, so a
walk returns each row exactly once (an offset would skip or repeat rows).
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Generic, Protocol, TypeVar

from fastapi import Depends, Query
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from sqlalchemy import tuple_
from sqlmodel import col
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import SelectOfScalar

T = TypeVar("T")
MAX_LIMIT = 500


class Page(BaseModel, Generic[T]):
    data: list[T]
    has_more: bool = Field(description="True when rows follow this page")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page")


@dataclass(frozen=True)
class PageParams:
    limit: int
    cursor: str | None


def _page_params(
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Rows per page")] = 50,
    cursor: Annotated[
        str | None, Query(max_length=200, description="`next_cursor` of the previous page; omit for the first")
    ] = None,
) -> PageParams:
    return PageParams(limit, cursor)


PageQuery = Annotated[PageParams, Depends(_page_params)]


class Keyed(Protocol):
    id: uuid.UUID
    created_at: datetime


Row = TypeVar("Row", bound=Keyed)


def encode_cursor(row: Keyed) -> str:
    raw = json.dumps([row.created_at.isoformat(), str(row.id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        created, ident = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        instant = datetime.fromisoformat(created)
        if instant.tzinfo is None:
            raise ValueError("naive")
        return instant, uuid.UUID(ident)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise RequestValidationError(
            [{"loc": ("query", "cursor"), "msg": "is not a cursor this API gave out", "type": "cursor_invalid"}]
        ) from None


P = TypeVar("P", bound=BaseModel)


@dataclass(frozen=True)
class Fetched(Generic[Row]):
    rows: list[Row]
    has_more: bool
    next_cursor: str | None

    def page(self, public: Callable[[Row], P]) -> Page[P]:
        return Page[P](data=[public(row) for row in self.rows], has_more=self.has_more, next_cursor=self.next_cursor)


async def fetch_page(session: AsyncSession, query: SelectOfScalar[Row], model: Any, params: PageParams) -> Fetched[Row]:
    """One page of ``query`` (rows of ``model``) in creation order, after ``params.cursor``."""
    created, ident = col(model.created_at), col(model.id)
    if params.cursor is not None:
        after = decode_cursor(params.cursor)
        query = query.where(tuple_(created, ident) > tuple_(*after))
    rows = list((await session.exec(query.order_by(created, ident).limit(params.limit + 1))).all())
    has_more = len(rows) > params.limit
    rows = rows[: params.limit]
    return Fetched(rows, has_more, encode_cursor(rows[-1]) if has_more else None)
