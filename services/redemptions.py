"""Redeeming a promo code on a subscription, inside the caller's transaction.

The engine's :func:`~billing.pricing.promos.check_redeemable` decides on what the row says;
the claim is then one conditional UPDATE, so two redemptions racing for the last one cannot
both succeed: the second finds no row to update and is refused like an exhausted code.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import text
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from billing.pricing.errors import PromoNotRedeemableError
from billing.pricing.promos import check_redeemable
from schema.db import execute_sql
from schema.models import PromoCode, Subscription, SubscriptionPromo
from services.errors import Conflict, InvalidInput
from services.mapping import promo_of

_CLAIM = text(
    "UPDATE promo_codes SET times_redeemed = times_redeemed + 1"
    " WHERE id = :id AND (max_redemptions IS NULL OR times_redeemed < max_redemptions)"
)


async def redeem(
    session: AsyncSession,
    subscription: Subscription,
    currency: str,
    code: str,
    *,
    at: datetime,
    redeemed_at: datetime,
    field: str,
) -> SubscriptionPromo:
    """Apply promo ``code`` to ``subscription`` (row locked by the caller), billed in ``currency``.

    Checked at ``at``; the redemption discounts invoices issued from ``redeemed_at`` on.
    Refusals name the body field ``field``: 422 for an unknown or unredeemable code, 409 for
    a code the subscription already has. Nothing is committed here.
    """
    promo = (await session.exec(select(PromoCode).where(col(PromoCode.code) == code))).first()
    if promo is None:
        raise InvalidInput(field, f"promo code {code!r} does not exist", "not_found")
    mine = col(SubscriptionPromo.subscription_id) == subscription.id
    redeemed = (await session.exec(select(col(SubscriptionPromo.promo_code_id)).where(mine))).all()
    if promo.id in redeemed:
        raise Conflict(field, f"promo code {code!r} is already applied to subscription {subscription.id}")
    try:
        check_redeemable(promo_of(promo), at, promo.times_redeemed, currency)
    except PromoNotRedeemableError as exc:
        raise InvalidInput(field, exc.message, "not_redeemable") from None
    claimed = await execute_sql(session, _CLAIM, {"id": promo.id})
    if claimed.rowcount == 0:
        raise InvalidInput(field, f"promo {code!r} has no redemptions left", "not_redeemable")
    redemption = SubscriptionPromo(
        subscription_id=subscription.id, promo_code_id=promo.id, redeemed_at=redeemed_at, position=len(redeemed) + 1
    )
    session.add(redemption)
    return redemption
