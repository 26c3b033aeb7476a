"""Rate limits of the token and refresh routes, kept in PostgreSQL so every API replica counts
into the same windows (``auth_throttle``).

A fixed window per key: the first attempt opens a window of ``window`` seconds; each attempt in it
adds one; the attempt over ``limit`` is refused with the seconds left in the window. One statement
counts every key of an attempt (an account and an address) and returns their counts, committed in
its own transaction, so a refused or failed login still counts. Keys are written in sorted order,
so two attempts sharing keys never deadlock. About one attempt in ``PRUNE_ONE_IN`` also deletes the
windows that are over, which keeps the table as small as the keys seen within one window.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.types import String
from sqlmodel.ext.asyncio.session import AsyncSession

from schema.db import execute_sql
from services.errors import TooManyAttempts

PRUNE_ONE_IN = 100
MAX_KEY_LENGTH = 400

_HIT = text(
    """
    INSERT INTO auth_throttle (key, window_start, hits)
    SELECT k, :now, 1 FROM unnest(:keys) AS k ORDER BY k
    ON CONFLICT (key) DO UPDATE
       SET window_start = CASE WHEN auth_throttle.window_start <= :opened_before
                               THEN EXCLUDED.window_start ELSE auth_throttle.window_start END,
           hits = CASE WHEN auth_throttle.window_start <= :opened_before THEN 1 ELSE auth_throttle.hits + 1 END
    RETURNING key, window_start, hits
    """
).bindparams(bindparam("keys", type_=ARRAY(String())))
_PRUNE = text("DELETE FROM auth_throttle WHERE window_start <= :opened_before")


def throttle_key(kind: str, value: str) -> str:
    """``account:ada@example.com``, ``address:127.0.0.1``: bounded, so a long value cannot grow the table."""
    return f"{kind}:{value}"[:MAX_KEY_LENGTH]


async def hit(session: AsyncSession, keys: Iterable[str], *, limit: int, window: int, now: datetime) -> None:
    """Count one attempt on each of ``keys``; :class:`TooManyAttempts` when any is over ``limit``
    in its window (``retry_after``: the seconds until the latest such window ends, at least 1)."""
    unique = sorted(set(keys))
    if not unique:
        return
    opened_before = now - timedelta(seconds=window)
    rows = (await execute_sql(session, _HIT, {"keys": unique, "now": now, "opened_before": opened_before})).all()
    if secrets.randbelow(PRUNE_ONE_IN) == 0:
        await execute_sql(session, _PRUNE, {"opened_before": opened_before})
    await session.commit()
    over = [row.window_start for row in rows if row.hits > limit]
    if over:
        ends = max(over) + timedelta(seconds=window)
        raise TooManyAttempts(max(1, math.ceil((ends - now).total_seconds())))
