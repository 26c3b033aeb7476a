"""The audit log: every write a principal makes, recorded in the same transaction as the write.

Who acts is an :class:`Actor` in a context variable, set for each API request by the route
dependency (``api/auth.py``) and for nothing else: the worker's own writes (billing runs, the
ledger) are the system's, traced by their workflows and, for money, by the ledger itself.

While an actor is set, every row an ORM session inserts, updates or deletes gains an
:class:`~schema.models.AuditEntry` row, inserted in the same flush (``before``/``after`` hold the changed
columns, secrets redacted), so a write without its audit row cannot commit. Writes that change no
row of ours themselves — a workflow Update, a billing run started, a batch of usage written with
one statement — call :func:`record` with what they did.
"""

from __future__ import annotations

import contextvars
import enum
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import event, insert, inspect
from sqlalchemy.orm import Session, UOWTransaction
from sqlmodel import SQLModel
from sqlmodel.ext.asyncio.session import AsyncSession

from schema.models import AuditEntry, utcnow

# Columns never copied into the log, whatever the table.
REDACTED = frozenset(
    {"password_hash", "secret_hash", "token_hash", "secret", "previous_secret", "notice_webhook_secret"}
)
# Tables whose rows are bookkeeping of a request, not business state.
NOT_AUDITED = frozenset({"audit_log", "idempotency_records", "meter_webhook_nonces", "auth_throttle"})


@dataclass(frozen=True)
class Actor:
    subject: str
    kind: str  # user | client | gateway | anonymous
    roles: tuple[str, ...] = ()
    address: str | None = None
    request_id: str | None = None


_actor: contextvars.ContextVar[Actor | None] = contextvars.ContextVar("audit_actor", default=None)


def set_actor(actor: Actor | None) -> contextvars.Token[Actor | None]:
    return _actor.set(actor)


@contextmanager
def acting(actor: Actor) -> Iterator[None]:
    """Writes inside are audited as ``actor``'s."""
    token = _actor.set(actor)
    try:
        yield
    finally:
        _actor.reset(token)


def _plain(value: object) -> object:
    """A JSON-ready form of a column value (exact: decimals as strings)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, uuid.UUID | Decimal):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


def _shown(column: str, value: object) -> object:
    return "[redacted]" if column in REDACTED and value is not None else _plain(value)


def _entry(
    actor: Actor, action: str, entity: str, entity_id: str | None, tenant_id: object, **changes: Any
) -> dict[str, Any]:
    """An audit row, as the values of its INSERT."""
    return {
        "at": utcnow(),
        "actor": actor.subject,
        "actor_kind": actor.kind,
        "roles": list(actor.roles),
        "action": action,
        "entity": entity,
        "entity_id": entity_id,
        "tenant_id": tenant_id if isinstance(tenant_id, uuid.UUID) else None,
        "before": changes.get("before"),
        "after": changes.get("after"),
        "address": actor.address,
        "request_id": actor.request_id,
    }


PENDING = "audit_pending"
AUDIT_TABLE = SQLModel.metadata.tables["audit_log"]


def _write(session: Session) -> None:
    """INSERT the entries waiting on ``session``, in its transaction, without RETURNING: a caller
    may add entries it may not read back (row-level security shows the log to operators only)."""
    rows = session.info.pop(PENDING, [])
    if rows:
        session.connection().execute(insert(AUDIT_TABLE).values(rows))  # multi-VALUES: no implicit RETURNING


def _identity(obj: object) -> str | None:
    """The row's primary key; a new row's is known before its insert (our keys are made in
    Python), except a server-generated one, which stays unnamed (None)."""
    state = inspect(obj)
    key = state.identity or tuple(getattr(obj, column.key, None) for column in state.mapper.primary_key)
    if not key or any(part is None for part in key):
        return None
    return "/".join(str(part) for part in key)


def _tenant_of(obj: object, table: str) -> object:
    return getattr(obj, "id", None) if table == "tenants" else getattr(obj, "tenant_id", None)


def _columns(obj: object) -> dict[str, object]:
    state = inspect(obj)
    return {attr.key: _shown(attr.key, getattr(obj, attr.key)) for attr in state.mapper.column_attrs}


def _changes(obj: object) -> tuple[dict[str, object], dict[str, object]]:
    before: dict[str, object] = {}
    after: dict[str, object] = {}
    state = inspect(obj)
    for attr in state.mapper.column_attrs:
        history = state.attrs[attr.key].history
        if not history.has_changes():
            continue
        old = history.deleted[0] if history.deleted else None
        new = history.added[0] if history.added else None
        if old == new:
            continue
        before[attr.key] = _shown(attr.key, old)
        after[attr.key] = _shown(attr.key, new)
    return before, after


def _audit_flush(session: Session, _flush: UOWTransaction, _instances: object) -> None:
    actor = _actor.get()
    if actor is None:
        return
    entries: list[dict[str, Any]] = session.info.setdefault(PENDING, [])
    for obj in list(session.new):
        table = _table(obj)
        if table is not None:
            entries.append(_entry(actor, "create", table, _identity(obj), _tenant_of(obj, table), after=_columns(obj)))
    for obj in list(session.dirty):
        table = _table(obj)
        if table is None or not session.is_modified(obj, include_collections=False):
            continue
        before, after = _changes(obj)
        if after:
            entries.append(
                _entry(actor, "update", table, _identity(obj), _tenant_of(obj, table), before=before, after=after)
            )
    for obj in list(session.deleted):
        table = _table(obj)
        if table is not None:
            entries.append(_entry(actor, "delete", table, _identity(obj), _tenant_of(obj, table), before=_columns(obj)))
    _write(session)


def _before_commit(session: Session) -> None:
    _write(session)  # entries of :func:`record` in a transaction the ORM did not flush


def _table(obj: object) -> str | None:
    if isinstance(obj, AuditEntry) or not isinstance(obj, SQLModel):
        return None
    name = getattr(obj, "__tablename__", None)
    if not isinstance(name, str) or name in NOT_AUDITED:
        return None
    return name


def record(
    session: AsyncSession,
    action: str,
    entity: str,
    entity_id: object = None,
    *,
    tenant_id: uuid.UUID | None = None,
    before: Mapping[str, object] | None = None,
    after: Mapping[str, object] | None = None,
) -> None:
    """An entry for a write the ORM hook cannot see, written at the session's next flush or commit
    (with the caller's transaction). Nothing when no actor is set (the system's own work)."""
    actor = _actor.get()
    if actor is None:
        return
    entry = _entry(
        actor,
        action,
        entity,
        None if entity_id is None else str(entity_id),
        tenant_id,
        before=None if before is None else {k: _shown(k, v) for k, v in before.items()},
        after=None if after is None else {k: _shown(k, v) for k, v in after.items()},
    )
    session.info.setdefault(PENDING, []).append(entry)


def install() -> None:
    """Hook every ORM session (idempotent)."""
    if not event.contains(Session, "before_flush", _audit_flush):
        event.listen(Session, "before_flush", _audit_flush)
        event.listen(Session, "before_commit", _before_commit)


install()
