"""The tenant's saved card: its PSP customer and the default payment method charged off-session.

``save_payment_method`` ensures the tenant's PSP customer (key ``tenant:{id}:customer``, kept in
``tenants.psp_customer_id`` as soon as it exists), attaches the method and makes it the default
(key ``tenant:{id}:pm:{token}``), then stores it in ``tenants.default_payment_method``. No database
lock is held across a PSP call; every PSP call is keyed, so a retry of the same request (after a
503) reuses the first result. A card the PSP declines when attaching is an :class:`InvalidInput`
naming ``payment_method`` with the decline code; a PSP that cannot be reached (or did not answer in
time) is :class:`Unavailable` (HTTP 503, retry). See ``docs/payments.md`` "Saved card".
"""

from __future__ import annotations

import uuid

from sqlalchemy import update
from sqlmodel import col
from sqlmodel.ext.asyncio.session import AsyncSession

from adapters.psp import Bug, Declined, Psp, Transient, Unknown
from core import flags
from core.observability import bind_tenant
from schema.models import Tenant
from services.errors import Conflict, InvalidInput, NotFound, Unavailable

FIELD = "payment_method"


def customer_key(tenant_id: uuid.UUID) -> str:
    return f"tenant:{tenant_id}:customer"


def payment_method_key(tenant_id: uuid.UUID, payment_method: str) -> str:
    return f"tenant:{tenant_id}:pm:{payment_method}"


async def save_payment_method(session: AsyncSession, psp: Psp, tenant_id: uuid.UUID, payment_method: str) -> Tenant:
    """Make ``payment_method`` (a ``pm_…`` id or test token) the tenant's default; the tenant after.
    Behind the ``payment-methods.save`` flag (core/flags.py): off, a 404 ``feature_disabled``."""
    if not flags.enabled(flags.PAYMENT_METHODS_SAVE):
        raise NotFound("payment_method", "saving a payment method is not available", "feature_disabled")
    bind_tenant(tenant_id)
    tenant = await session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound("id", f"tenant {tenant_id} not found")
    name, email, known = tenant.name, tenant.email, tenant.psp_customer_id
    await session.commit()  # no transaction is held open across the PSP calls
    try:
        customer = await psp.ensure_customer(
            str(tenant_id), name=name, email=email, key=customer_key(tenant_id), customer_id=known
        )
    except (Transient, Unknown) as error:
        raise Unavailable(None, f"the PSP could not be reached; retry later ({error.message})") from error
    if customer != known:
        # Kept at once (and only if no other request stored one meanwhile): the next call retrieves it.
        stored = await (await session.connection()).execute(
            update(Tenant)
            .where(col(Tenant.id) == tenant_id, col(Tenant.psp_customer_id).is_(None))
            .values(psp_customer_id=customer)
        )
        await session.commit()
        if stored.rowcount != 1:
            current = await session.get(Tenant, tenant_id, populate_existing=True)
            if current is None or current.psp_customer_id != customer:  # the same key gives the same customer
                raise Conflict("psp_customer_id", "this tenant has another PSP customer; retry")
    try:
        attached = await psp.attach_default_payment_method(
            customer, payment_method, key=payment_method_key(tenant_id, payment_method)
        )
    except Declined as declined:
        raise InvalidInput(
            FIELD, f"the card was declined ({declined.decline_code}): {declined.message}", kind="card_declined"
        ) from None
    except Bug as refused:
        if refused.code == "resource_missing":
            raise InvalidInput(FIELD, f"unknown payment method {payment_method!r}", kind="not_found") from None
        raise
    except (Transient, Unknown) as error:
        raise Unavailable(None, f"the PSP could not be reached; retry later ({error.message})") from error
    await (await session.connection()).execute(
        update(Tenant).where(col(Tenant.id) == tenant_id).values(default_payment_method=attached)
    )
    await session.commit()
    refreshed = await session.get(Tenant, tenant_id, populate_existing=True)
    assert refreshed is not None
    return refreshed
