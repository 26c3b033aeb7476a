"""Every router of the API, gathered once: ``/healthz``, ``/metrics``, the authenticated ``/v1`` tree, and the
PSP's webhooks (``/v1/webhooks``), authenticated by their signature instead of a principal."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from api.deps import audited_principal
from api.routers import (
    billing_runs,
    credit_notes,
    dunning,
    health,
    invoices,
    ledger,
    meter_gateways,
    meters,
    metrics,
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
metrics_router = metrics.router

v1_router = APIRouter(prefix="/v1", dependencies=[Depends(audited_principal)])
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
    meter_gateways,
):
    v1_router.include_router(_module.router)

webhooks_router = APIRouter(prefix="/v1")
webhooks_router.include_router(webhooks.router)
