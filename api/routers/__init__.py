"""Every router of the API, gathered once: ``/healthz``, ``/metrics``, the authenticated ``/v1`` tree, the PSP's
webhooks (``/v1/webhooks``), authenticated by their signature instead of a principal, and the token
routes (``/v1/auth``, where credentials are exchanged for tokens) with ``/.well-known/jwks.json``.
Every v1 route runs in its caller's row-level security scope (``api.auth.allow``)."""

from __future__ import annotations

from fastapi import APIRouter

from api.routers import (
    audit,
    auth,
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

# Each route declares its roles with api.auth.allow (test_route_matrix.py holds every route to it).
v1_router = APIRouter(prefix="/v1")
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
    audit,
):
    v1_router.include_router(_module.router)

webhooks_router = APIRouter(prefix="/v1")
webhooks_router.include_router(webhooks.router)

auth_router = auth.router
jwks_router = auth.jwks_router
