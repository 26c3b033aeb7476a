"""Who may call each route: the data the route x role x tenant matrix (test_route_matrix.py) is
generated from. Every operation of the OpenAPI schema must have an entry here, so a new route
without a decision fails the matrix test.

Kinds of callers: ``anonymous`` (no token), the four user roles, and ``meter_gateway`` (a service
client that reports usage). A tenant role sees only its own tenant: a path id of another tenant's
row is a 404 naming that path parameter, exactly as for an id that does not exist.
"""

from __future__ import annotations

PUBLIC = "public"  # no token needed: health, token endpoints, JWKS, signed webhooks
OPERATORS = frozenset({"operator_admin", "operator"})
ADMINS = frozenset({"operator_admin"})
TENANT_WRITERS = OPERATORS | {"tenant_admin"}
READERS = TENANT_WRITERS | {"tenant_member"}
INGESTERS = OPERATORS | {"meter_gateway"}
ANYONE = READERS | {"meter_gateway"}  # any valid token

ROLES = ("operator_admin", "operator", "tenant_admin", "tenant_member", "meter_gateway")
TENANT_ROLES = frozenset({"tenant_admin", "tenant_member", "meter_gateway"})

POLICY: dict[str, object] = {
    "GET /healthz": PUBLIC,
    "GET /readyz": PUBLIC,
    "GET /.well-known/jwks.json": PUBLIC,
    "POST /v1/auth/token": PUBLIC,
    "POST /v1/auth/refresh": PUBLIC,
    "POST /v1/auth/logout": PUBLIC,
    "GET /v1/auth/me": ANYONE,
    "POST /v1/webhooks/stripe": PUBLIC,
    "POST /v1/webhooks/meters": PUBLIC,
    "POST /v1/tenants": OPERATORS,
    "GET /v1/tenants": READERS,
    "GET /v1/tenants/{tenant_id}": READERS,
    "PATCH /v1/tenants/{tenant_id}": TENANT_WRITERS,
    "POST /v1/tenants/{tenant_id}/payment-method": TENANT_WRITERS,
    "PUT /v1/tenants/{tenant_id}/notice-webhook": TENANT_WRITERS,
    "DELETE /v1/tenants/{tenant_id}/notice-webhook": TENANT_WRITERS,
    "POST /v1/meters": OPERATORS,
    "GET /v1/meters": READERS,
    "GET /v1/meters/{meter_id}": READERS,
    "POST /v1/plans": OPERATORS,
    "GET /v1/plans": READERS,
    "GET /v1/plans/{plan_id}": READERS,
    "POST /v1/rooms": OPERATORS,
    "GET /v1/rooms": READERS,
    "GET /v1/rooms/{room_id}": READERS,
    "POST /v1/promo-codes": OPERATORS,
    "GET /v1/promo-codes": OPERATORS,
    "GET /v1/promo-codes/{promo_code_id}": OPERATORS,
    "POST /v1/subscriptions": OPERATORS,
    "GET /v1/subscriptions": READERS,
    "GET /v1/subscriptions/{subscription_id}": READERS,
    "POST /v1/subscriptions/{subscription_id}/promo-codes": TENANT_WRITERS,
    "POST /v1/subscriptions/{subscription_id}/move-room": OPERATORS,
    "POST /v1/subscriptions/{subscription_id}/change-plan": OPERATORS,
    "POST /v1/subscriptions/{subscription_id}/cancel": TENANT_WRITERS,
    "DELETE /v1/subscriptions/{subscription_id}/cancel": TENANT_WRITERS,
    "GET /v1/subscriptions/{subscription_id}/upcoming-invoice": READERS,
    "POST /v1/usage": INGESTERS,
    "POST /v1/usage/csv": INGESTERS,
    "POST /v1/usage/events": INGESTERS,
    "POST /v1/billing-runs": OPERATORS,
    "GET /v1/billing-runs/{workflow_id}": OPERATORS,
    "GET /v1/invoices": READERS,
    "GET /v1/invoices/{invoice_id}": READERS,
    "GET /v1/invoices/{invoice_id}/pdf": READERS,
    "POST /v1/invoices/{invoice_id}/pay": TENANT_WRITERS,
    "POST /v1/invoices/{invoice_id}/payments": OPERATORS,
    "GET /v1/invoices/{invoice_id}/payments": READERS,
    "POST /v1/invoices/{invoice_id}/void": OPERATORS,
    "POST /v1/invoices/{invoice_id}/mark-uncollectible": OPERATORS,
    "GET /v1/invoices/{invoice_id}/payments/{attempt_id}/receipt": READERS,
    "POST /v1/invoices/{invoice_id}/credit-notes": OPERATORS,
    "GET /v1/credit-notes": READERS,
    "GET /v1/credit-notes/{credit_note_id}": READERS,
    "GET /v1/credit-notes/{credit_note_id}/pdf": READERS,
    "GET /v1/tenants/{tenant_id}/dunning": READERS,
    "POST /v1/tenants/{tenant_id}/dunning/{action}": OPERATORS,
    "GET /v1/ledger/entries": OPERATORS,
    "GET /v1/ledger/balances": OPERATORS,
    "GET /v1/ledger/export.csv": OPERATORS,
    "GET /v1/reconciliation/payouts": OPERATORS,
    "GET /v1/reconciliation/payouts/{payout_id}": OPERATORS,
    "GET /v1/reconciliation/payouts/{payout_id}/export.csv": OPERATORS,
    "GET /v1/meter-gateways": ADMINS,
    "POST /v1/meter-gateways": ADMINS,
    "POST /v1/meter-gateways/{gateway_id}/rotate-secret": ADMINS,
    "POST /v1/meter-gateways/{gateway_id}/disable": ADMINS,
    "GET /v1/audit": OPERATORS,
}

# Path parameters that name a row owned by a tenant: a tenant caller naming another tenant's
# (or no) row gets 404 naming the parameter.
OWNED_PARAMS = ("tenant_id", "subscription_id", "invoice_id", "credit_note_id")
