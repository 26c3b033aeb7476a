"""Every router of the API, gathered once: ``/healthz``, the authenticated ``/v1`` tree, and the
PSP's webhooks (``/v1/webhooks``), authenticated by their signature instead of a principal.
Every v1 route runs in its caller's row-level security scope (``api.deps.request_scope``)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from api.deps import current_principal, request_scope
from api.routers import (
    billing_runs,
    credit_notes,
    dunning,
    health,
    invoices,
    ledger,
    meters,
    plans,
    promo_codes,
    reconciliation,
    rooms,
    subscriptions,
    tenants,
    usage,
    webhooks,
)

health_router = health.router

v1_router = APIRouter(prefix="/v1", dependencies=[Depends(current_principal), Depends(request_scope)])
for _module in (
    tenants,
    meters,
    plans,
    rooms,
    promo_codes,
    subscriptions,
    usage,
    billing_runs,
    invoices,
    credit_notes,
    dunning,
    ledger,
    reconciliation,
):
    v1_router.include_router(_module.router)

webhooks_router = APIRouter(prefix="/v1")
webhooks_router.include_router(webhooks.router)
