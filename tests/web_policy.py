"""Who may open each web page: the data of the web route matrix (tests/test_web.py). Pages are not
in the OpenAPI schema, so every ``/portal`` and ``/console`` route of the app must have an entry
here (and every entry a route): a new page without a decision fails the matrix.

Values are the roles allowed (as in tests/route_policy.py), or ``PUBLIC`` (sign-in and sign-out).
"""

from __future__ import annotations

from tests.route_policy import PUBLIC

TENANT_READERS = frozenset({"tenant_admin", "tenant_member"})
TENANT_ADMINS = frozenset({"tenant_admin"})
OPERATORS = frozenset({"operator_admin", "operator"})

WEB_POLICY: dict[str, object] = {
    "GET /portal/login": PUBLIC,
    "POST /portal/login": PUBLIC,
    "POST /portal/logout": PUBLIC,
    "GET /console/login": PUBLIC,
    "POST /console/login": PUBLIC,
    "POST /console/logout": PUBLIC,
    "GET /portal": TENANT_READERS,
    "GET /portal/invoices": TENANT_READERS,
    "GET /portal/invoices/{invoice_id}": TENANT_READERS,
    "GET /portal/invoices/{invoice_id}/pdf": TENANT_READERS,
    "POST /portal/invoices/{invoice_id}/pay": TENANT_ADMINS,
    "GET /portal/invoices/{invoice_id}/payments/{attempt_id}/receipt": TENANT_READERS,
    "GET /portal/credit-notes/{credit_note_id}/pdf": TENANT_READERS,
    "GET /portal/usage": TENANT_READERS,
    "GET /portal/account": TENANT_READERS,
    "POST /portal/account": TENANT_ADMINS,
    "POST /portal/account/payment-method": TENANT_ADMINS,
    # The operator console (web/console.py).
    "GET /console": OPERATORS,
    "GET /console/usage": OPERATORS,
    "POST /console/usage/reading": OPERATORS,
    "POST /console/usage/csv": OPERATORS,
    "GET /console/billing-runs": OPERATORS,
    "POST /console/billing-runs": OPERATORS,
    "GET /console/billing-runs/open": OPERATORS,
    "GET /console/billing-runs/{workflow_id}": OPERATORS,
    "GET /console/billing-runs/{workflow_id}/progress": OPERATORS,
    "GET /console/dunning": OPERATORS,
    "POST /console/dunning/{tenant_id}/{action}": OPERATORS,
    "POST /console/invoices/{invoice_id}/mark-paid": OPERATORS,
    "POST /console/invoices/{invoice_id}/write-off": OPERATORS,
    "GET /console/tenants": OPERATORS,
    "GET /console/rooms": OPERATORS,
    "GET /console/plans": OPERATORS,
    "GET /console/subscriptions": OPERATORS,
    "POST /console/subscriptions/{subscription_id}/move-room": OPERATORS,
    "POST /console/subscriptions/{subscription_id}/change-plan": OPERATORS,
    "POST /console/subscriptions/{subscription_id}/cancel": OPERATORS,
    "GET /console/reports": OPERATORS,
    "GET /console/reports/ledger.csv": OPERATORS,
    "GET /console/reports/reconciliation/{payout_id}.csv": OPERATORS,
}
