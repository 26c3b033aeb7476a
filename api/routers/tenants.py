"""Tenants over HTTP: parse, call :mod:`services.tenants` (the currency and time-zone rules live
there), answer."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Response, status
from sqlmodel import col, select

from api.auth import OPERATORS, READERS, TENANT_WRITERS, Caller, allow
from api.deps import PspDep, SessionDep, SettingsDep
from api.errors import error_responses, get_or_404
from api.middleware import bind_tenant
from api.pagination import Page, PageQuery, fetch_page
from api.routing import DecimalJSONRoute
from api.schemas import (
    Address,
    NoticeWebhookSecret,
    NoticeWebhookSet,
    PaymentMethodSave,
    PaymentMethodSaved,
    TenantCreate,
    TenantPublic,
    TenantUpdate,
)
from core.settings import Environment
from schema.models import Tenant, utcnow
from services import notice_webhooks, payment_methods, tenants

router = APIRouter(prefix="/tenants", tags=["tenants"], route_class=DecimalJSONRoute)


def public(tenant: Tenant) -> TenantPublic:
    return TenantPublic(
        id=tenant.id,
        name=tenant.name,
        email=tenant.email,
        currency=tenant.currency,
        timezone=tenant.timezone,
        locale=tenant.locale,
        address=Address(**address) if (address := tenants.address_of(tenant)) is not None else None,
        timezone_effective_at=tenant.timezone_effective_at,
        created_at=tenant.created_at,
        psp_customer_id=tenant.psp_customer_id,
        default_payment_method=tenant.default_payment_method,
        notice_webhook_url=tenant.notice_webhook_url,
    )


@router.post("", dependencies=[allow(OPERATORS)], status_code=status.HTTP_201_CREATED)
async def create_tenant(body: TenantCreate, session: SessionDep) -> TenantPublic:
    fields = body.model_dump(exclude={"address"})
    address = body.address.model_dump() if body.address is not None else None
    return public(await tenants.create(session, **fields, address=address))


@router.get("")
async def list_tenants(
    session: SessionDep,
    paging: PageQuery,
    caller: Annotated[Caller, allow(READERS)],
) -> Page[TenantPublic]:
    """Tenants, oldest first (a tenant's caller sees its own)."""
    query = select(Tenant)
    if (own := caller.tenant_filter(None)) is not None:
        query = query.where(col(Tenant.id) == own)
    return (await fetch_page(session, query, Tenant, paging)).page(public)


@router.get(
    "/{tenant_id}",
    dependencies=[allow(READERS)],
    responses={status.HTTP_404_NOT_FOUND: {"description": "Unknown tenant"}},
)
async def get_tenant(tenant_id: uuid.UUID, session: SessionDep) -> TenantPublic:
    bind_tenant(tenant_id)
    tenant = await get_or_404(session, Tenant, tenant_id, "tenant")
    return public(tenant)


@router.patch(
    "/{tenant_id}",
    dependencies=[allow(TENANT_WRITERS)],
    responses={
        status.HTTP_404_NOT_FOUND: {"description": "Unknown tenant"},
        status.HTTP_422_UNPROCESSABLE_CONTENT: {"description": "An invalid field, or a currency change"},
    },
)
async def update_tenant(tenant_id: uuid.UUID, body: TenantUpdate, session: SessionDep) -> TenantPublic:
    """Change name, email, billing address (replaced whole) or time zone; only the fields sent change."""
    sent = {name: getattr(body, name) for name in body.model_fields_set}
    if isinstance(sent.get("address"), Address):
        sent["address"] = sent["address"].model_dump()
    return public(await tenants.update(session, tenant_id, sent, utcnow()))


@router.post(
    "/{tenant_id}/payment-method", dependencies=[allow(TENANT_WRITERS)], responses=error_responses(404, 409, 422, 503)
)
async def save_payment_method(
    tenant_id: uuid.UUID, body: PaymentMethodSave, session: SessionDep, psp: PspDep
) -> PaymentMethodSaved:
    """Save the tenant's card: its PSP customer is made once, the method attached and made the
    default (charged off-session from then on). 422 naming ``payment_method`` for a card the PSP
    declines (the decline code in the message) or does not know; 503 with Retry-After when the PSP
    cannot be reached (retrying the same request is safe)."""
    bind_tenant(tenant_id)
    tenant = await payment_methods.save_payment_method(session, psp, tenant_id, body.payment_method)
    assert tenant.psp_customer_id is not None and tenant.default_payment_method is not None
    return PaymentMethodSaved(
        psp_customer_id=tenant.psp_customer_id, default_payment_method=tenant.default_payment_method
    )


@router.put("/{tenant_id}/notice-webhook", dependencies=[allow(TENANT_WRITERS)], responses=error_responses(404, 422))
async def set_notice_webhook(
    tenant_id: uuid.UUID, body: NoticeWebhookSet, session: SessionDep, settings: SettingsDep, response: Response
) -> NoticeWebhookSecret:
    """Post the tenant's notices to ``url`` too, signed (``Roomly-Signature``; docs/notices.md
    "Webhooks"). Answers the signing secret, shown this once; another PUT rotates it. 422 naming
    ``url`` for a URL notices may not go to (https only and public addresses only in production)."""
    bind_tenant(tenant_id)
    production = settings.environment is Environment.production
    hook = await notice_webhooks.configure(session, tenant_id, body.url, production=production)
    response.headers["Cache-Control"] = "no-store"
    return NoticeWebhookSecret(url=hook.url, secret=hook.secret)


@router.delete(
    "/{tenant_id}/notice-webhook",
    dependencies=[allow(TENANT_WRITERS)],
    status_code=status.HTTP_204_NO_CONTENT,
    responses=error_responses(404),
)
async def clear_notice_webhook(tenant_id: uuid.UUID, session: SessionDep) -> None:
    """Email only from now on: the URL and its secret are removed (notices not yet posted are not)."""
    bind_tenant(tenant_id)
    await notice_webhooks.clear(session, tenant_id)
