"""A tenant's optional signed webhook for notices (``docs/notices.md`` "Webhooks").

A tenant may name one URL (:func:`configure`) to which every notice written from then on is also
posted as JSON (:func:`body`), signed with a shared HMAC secret generated here and shown once; a
new :func:`configure` rotates the secret, :func:`clear` removes both. Which URLs are accepted is
decided by :func:`check_url`.

Each notice carries the webhook's delivery apart from its email's (``webhook_status``:
``none`` / ``pending`` / ``sent`` / ``failed``, attempts, last error, when delivered): the sender
(``activities/notices.py``) locks the notice, reads the tenant's webhook as it is at delivery time
(:func:`target`: a rotated secret signs, a changed URL is used, a cleared webhook is ``none``),
posts, and right after the receiver's 2xx marks it sent (:func:`mark_delivered`) and commits.
"""

from __future__ import annotations

import ipaddress
import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import update
from sqlmodel import col
from sqlmodel.ext.asyncio.session import AsyncSession

from adapters.webhooks import is_public_address, new_signing_secret, resolve
from core import metrics
from schema.models import Notice, NoticeWebhookStatus, Tenant
from services.errors import InvalidInput, NotFound
from services.notices import how_to_pay_line, total_due

__all__ = [
    "NoticeWebhook",
    "Target",
    "body",
    "check_url",
    "clear",
    "configure",
    "mark_delivered",
    "mark_failed",
    "mark_none",
    "record_attempt",
    "target",
]

MAX_URL_LENGTH = 2048
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")  # ASCII without spaces or controls (IDNs in punycode)
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_TOP_LABEL = re.compile(r"^[a-z]")  # a name whose last label is numeric would be read as an IPv4 address
_LOCAL_NAMES = ("localhost", "localhost.localdomain")


@dataclass(frozen=True)
class NoticeWebhook:
    url: str
    secret: str  # shown once, when set


@dataclass(frozen=True)
class Target:
    url: str
    secret: str


def _refuse(message: str) -> InvalidInput:
    return InvalidInput("url", message)


def _host_kind(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The host's address if it is an IP literal, None if it is a valid host name; else refused."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels) or not _TOP_LABEL.match(labels[-1]):
        raise _refuse(f"the host {host!r} is neither a host name nor an IP address")
    return None


async def check_url(url: str, *, production: bool) -> str:
    """``url`` if notices may be posted there, else :class:`InvalidInput` naming ``url``.

    Everywhere: http(s) with a host that is a host name (ASCII labels; IDNs in punycode; the last
    label not numeric) or an IP address, a valid port, no credentials, no fragment, at most 2048
    characters. In production also: https only, and the host neither a local name nor an address
    that is not public (loopback, private, link-local, shared, reserved), nor a name resolving to
    one; single-label names (resolved through search domains, inside) are refused too. The sender
    checks the addresses again when it delivers (a name may resolve elsewhere later).
    """
    url = url.strip()
    if not url or len(url) > MAX_URL_LENGTH:
        raise _refuse(f"must be 1 to {MAX_URL_LENGTH} characters")
    if not _PRINTABLE.match(url):
        raise _refuse("must be printable ASCII without spaces (percent-encode the path, punycode the host)")
    parts = urlsplit(url)
    allowed = ("https",) if production else ("http", "https")
    if parts.scheme not in allowed:
        raise _refuse(f"must be an {' or '.join(allowed)} URL")
    if "@" in parts.netloc:
        raise _refuse("must not carry credentials (user:password@)")
    if parts.fragment or url.endswith("#"):
        raise _refuse("must not have a fragment (#...)")
    host = parts.hostname
    if not host:
        raise _refuse("must name a host")
    try:
        port = parts.port
    except ValueError:
        raise _refuse("has an invalid port") from None
    if port == 0:
        raise _refuse("has an invalid port")
    address = _host_kind(host)
    if not production:
        return url
    if address is not None:
        if not is_public_address(address):
            raise _refuse(f"{address} is not a public address")
        return url
    if host in _LOCAL_NAMES or host.endswith(".localhost") or "." not in host:
        raise _refuse(f"{host} is not a public host name")
    try:
        resolved = await resolve(host, port or 443)
    except OSError:
        raise _refuse(f"{host} does not resolve") from None
    private = [str(a) for a in resolved if not is_public_address(a)]
    if private:
        raise _refuse(f"{host} resolves to an address that is not public: {', '.join(private)}")
    return url


def new_secret() -> str:
    return new_signing_secret()


async def _tenant(session: AsyncSession, tenant_id: uuid.UUID) -> Tenant:
    tenant = await session.get(Tenant, tenant_id, with_for_update=True)
    if tenant is None:
        raise NotFound("id", f"tenant {tenant_id} not found")
    return tenant


async def configure(session: AsyncSession, tenant_id: uuid.UUID, url: str, *, production: bool) -> NoticeWebhook:
    """Post the tenant's notices to ``url`` from now on, with a new secret (a rotation if one was
    set: the old one signs nothing more). Commits; the secret is returned here and never again."""
    checked = await check_url(url, production=production)
    tenant = await _tenant(session, tenant_id)
    tenant.notice_webhook_url = checked
    tenant.notice_webhook_secret = new_secret()
    session.add(tenant)
    await session.commit()
    return NoticeWebhook(checked, tenant.notice_webhook_secret)


async def clear(session: AsyncSession, tenant_id: uuid.UUID) -> None:
    """No webhook from now on (notices still pending are not posted). Commits; clearing twice is fine."""
    tenant = await _tenant(session, tenant_id)
    tenant.notice_webhook_url = None
    tenant.notice_webhook_secret = None
    session.add(tenant)
    await session.commit()


async def target(session: AsyncSession, notice: Notice) -> Target | None:
    """Where and with what secret the notice's webhook goes now; None if the tenant has none."""
    tenant = await session.get(Tenant, notice.tenant_id, populate_existing=True)
    if tenant is None or tenant.notice_webhook_url is None or tenant.notice_webhook_secret is None:
        return None
    return Target(tenant.notice_webhook_url, tenant.notice_webhook_secret)


def body(notice: Notice) -> bytes:
    """The JSON posted for ``notice``: the same bytes on every delivery of it.

    ``id`` (also the ``Roomly-Notice-Id`` header), ``kind``, ``tenant_id``, ``created_at`` and the
    notice's ``context`` as written (money in minor units with ``currency``, dates ISO), each
    invoice with its ``how_to_pay`` line; ``amount_due`` (the total) when the notice is about invoices.
    """
    context: dict[str, Any] = dict(notice.context)
    if "invoices" in context:
        given = context.get("how_to_pay")
        context["invoices"] = [
            {**item, "how_to_pay": str(given) if given else how_to_pay_line(item)} for item in context["invoices"]
        ]
    document: dict[str, Any] = {
        "object": "notice",
        "id": str(notice.id),
        "kind": str(notice.kind),
        "tenant_id": str(notice.tenant_id),
        "created_at": notice.created_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "context": context,
    }
    if context.get("invoices"):
        document["amount_due"] = total_due(notice.context)
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


async def _move(session: AsyncSession, notice_id: uuid.UUID, outcome: str | None = None, **values: Any) -> bool:
    """Change the pending delivery and commit; ``outcome`` counts ``notices_delivered_total{channel="webhook"}``."""
    result = await (await session.connection()).execute(
        update(Notice)
        .where(col(Notice.id) == notice_id, col(Notice.webhook_status) == NoticeWebhookStatus.pending)
        .values(**values)
    )
    if outcome is not None and result.rowcount:
        metrics.on_commit(session, metrics.NOTICES.labels("webhook", outcome).inc)
    await session.commit()
    return bool(result.rowcount)


async def mark_delivered(session: AsyncSession, notice_id: uuid.UUID, at: datetime) -> bool:
    """Pending -> sent: the receiver answered 2xx. Commits; False if it was not pending."""
    return await _move(
        session,
        notice_id,
        "sent",
        webhook_status=NoticeWebhookStatus.sent,
        webhook_delivered_at=at,
        webhook_attempts=Notice.webhook_attempts + 1,
        webhook_last_error=None,
    )


async def record_attempt(session: AsyncSession, notice_id: uuid.UUID, error: str) -> None:
    """A delivery that failed and will be retried: counted, its error kept; it stays pending. Commits."""
    await _move(
        session, notice_id, "retry", webhook_attempts=Notice.webhook_attempts + 1, webhook_last_error=error[:1000]
    )


async def mark_failed(session: AsyncSession, notice_id: uuid.UUID, error: str) -> None:
    """Pending -> failed: refused for good. Commits."""
    await _move(
        session,
        notice_id,
        "failed",
        webhook_status=NoticeWebhookStatus.failed,
        webhook_attempts=Notice.webhook_attempts + 1,
        webhook_last_error=error[:1000],
    )


async def mark_none(session: AsyncSession, notice_id: uuid.UUID, why: str) -> None:
    """Pending -> none: the tenant cleared its webhook before the notice was delivered. Commits."""
    await _move(session, notice_id, webhook_status=NoticeWebhookStatus.none, webhook_last_error=why[:1000])
