"""Meter gateways: who may post signed usage to ``/v1/webhooks/meters``, and the check of each delivery.

A delivery is accepted when its gateway exists and is enabled, its ``Roomly-Signature`` (the one
format of our webhooks, ``adapters/webhooks.py``) matches the body under the gateway's secret —
or, for a while after a rotation, the previous one — its time is within the tolerance, and its signature was not seen
before from that gateway (the nonce row is written in the delivery's transaction, so a replay
inside the tolerance is refused and a delivery that wrote nothing can be sent again).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import text
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from adapters.webhooks import SignatureError, check_signature, new_signing_secret
from core import metrics
from schema.db import execute_sql
from schema.models import MeterGateway, Tenant, utcnow
from services.errors import InvalidInput, NotFound

_CLAIM_NONCE = text(
    "INSERT INTO meter_webhook_nonces (gateway_id, nonce, seen_at) VALUES (:gateway, :nonce, :now) "
    "ON CONFLICT DO NOTHING RETURNING nonce"
)
_FORGET_NONCES = text("DELETE FROM meter_webhook_nonces WHERE gateway_id = :gateway AND seen_at < :before")


@dataclass(frozen=True)
class GatewayWithSecret:
    gateway: MeterGateway
    secret: str  # shown once, when made or rotated


async def create(session: AsyncSession, name: str, tenant_id: uuid.UUID | None = None) -> GatewayWithSecret:
    name = name.strip()
    if not name:
        raise InvalidInput("name", "must not be blank")
    if tenant_id is not None and await session.get(Tenant, tenant_id) is None:
        raise InvalidInput("tenant_id", f"tenant {tenant_id} does not exist")
    secret = new_signing_secret()
    gateway = MeterGateway(name=name, tenant_id=tenant_id, secret=secret)
    session.add(gateway)
    await session.commit()
    return GatewayWithSecret(gateway, secret)


async def get(session: AsyncSession, gateway_id: uuid.UUID, *, lock: bool = False) -> MeterGateway:
    """The gateway (row-locked with ``lock``, to change it); NotFound naming ``gateway_id``."""
    gateway = await session.get(MeterGateway, gateway_id, with_for_update=lock)
    if gateway is None:
        raise NotFound("gateway_id", f"meter gateway {gateway_id} not found")
    return gateway


async def listing(session: AsyncSession) -> list[MeterGateway]:
    return list((await session.exec(select(MeterGateway).order_by(col(MeterGateway.created_at)))).all())


async def rotate(session: AsyncSession, gateway_id: uuid.UUID, overlap: timedelta) -> GatewayWithSecret:
    """A new secret; the old one is still accepted for ``overlap`` (time to reconfigure the gateway)."""
    gateway = await get(session, gateway_id, lock=True)
    secret = new_signing_secret()
    gateway.previous_secret = gateway.secret
    gateway.previous_valid_until = utcnow() + overlap
    gateway.secret = secret
    session.add(gateway)
    await session.commit()
    return GatewayWithSecret(gateway, secret)


async def disable(session: AsyncSession, gateway_id: uuid.UUID) -> MeterGateway:
    gateway = await get(session, gateway_id, lock=True)
    if gateway.disabled_at is None:
        gateway.disabled_at = utcnow()
        session.add(gateway)
        await session.commit()
    return gateway


def _secrets(gateway: MeterGateway, now: datetime) -> list[str]:
    accepted = [gateway.secret]
    if gateway.previous_secret and gateway.previous_valid_until and now < gateway.previous_valid_until:
        accepted.append(gateway.previous_secret)
    return accepted


async def authenticate(
    session: AsyncSession,
    gateway_header: str | None,
    signature: str | None,
    body: bytes,
    now: datetime,
    tolerance: timedelta,
) -> MeterGateway:
    """The gateway a delivery comes from, its signature checked and its nonce claimed in the
    session's transaction (commit it with the delivery's writes). Raises :class:`SignatureError`:
    an unknown or disabled gateway reads as a bad signature, so gateway ids cannot be probed. Each
    refusal is counted by its kind (``meter_webhooks_refused_total``)."""
    try:
        return await _authenticate(session, gateway_header, signature, body, now, tolerance)
    except SignatureError as refused:
        metrics.METER_WEBHOOKS_REFUSED.labels(refused.kind).inc()
        raise


async def delivered(session: AsyncSession) -> None:
    """Commit an authenticated delivery (its nonce, and whatever its rows left) and count it accepted."""
    metrics.on_commit(session, metrics.METER_WEBHOOKS_ACCEPTED.inc)
    await session.commit()


async def _authenticate(
    session: AsyncSession,
    gateway_header: str | None,
    signature: str | None,
    body: bytes,
    now: datetime,
    tolerance: timedelta,
) -> MeterGateway:
    try:
        gateway_id = uuid.UUID(gateway_header or "")
    except ValueError:
        raise SignatureError("Roomly-Gateway must be a meter gateway's id", "gateway_unknown") from None
    gateway = await session.get(MeterGateway, gateway_id)
    if gateway is None or gateway.disabled_at is not None:
        raise SignatureError("no signature matches the body", "signature_invalid")
    _, nonce = check_signature(signature, body, _secrets(gateway, now), now.timestamp(), tolerance.total_seconds())
    await execute_sql(session, _FORGET_NONCES, {"gateway": gateway.id, "before": now - 2 * tolerance})
    claimed = await execute_sql(session, _CLAIM_NONCE, {"gateway": gateway.id, "nonce": nonce, "now": now})
    if claimed.first() is None:
        raise SignatureError("this signed delivery was already received", "signature_replayed")
    return gateway
