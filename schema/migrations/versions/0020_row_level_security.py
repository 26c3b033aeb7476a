"""row-level security: the app's role billing_app, scope functions, a policy on every table

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-08 09:00:00

- ``billing_app`` (NOLOGIN, no superuser, no BYPASSRLS), created unless it exists (roles belong to
  the server, not the database: another database may have made it); the API's and the worker's
  logins are its members. It may read and write every table (but write ``alembic_version``),
  use every sequence and function, and gets the same on what later migrations create (default
  privileges of the migrating role). It owns nothing: it cannot disable a trigger or truncate.
- ``app_tenant_id()``, ``app_is_operator()``, ``app_caller()``: the transaction's scope, which
  ``schema.db`` sessions set at the start of every transaction (``schema/scope.py``).
- Every table ENABLEs and FORCEs row-level security (so the owner is subject to it too; only a
  superuser or a BYPASSRLS role is not), with one policy kind per table; ``docs/security.md``
  "Row-level security" lists them and ``tests/test_rls.py`` holds the database to that list.
- In a tenant's scope a promo code may only count a redemption (a trigger): subscribing with a code
  claims one, and nothing else of the shared catalog is the tenant's to change.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLE = "billing_app"

# tenant_id names the tenant (NULL on ledger_accounts / ledger_postings: platform rows, operators only).
TENANT_OWNED = (
    "subscriptions",
    "usage_events",
    "invoices",
    "payment_attempts",
    "credit_notes",
    "dunning_events",
    "notices",
    "ledger_accounts",
    "ledger_postings",
)
# A row is visible when its parent row is: the EXISTS reads the parent through the parent's own policy.
CHILDREN = {
    "invoice_lines": ("invoices", "invoice_id"),
    "credit_note_lines": ("credit_notes", "credit_note_id"),
    "refunds": ("credit_notes", "credit_note_id"),
    "room_assignments": ("subscriptions", "subscription_id"),
    "subscription_promos": ("subscriptions", "subscription_id"),
    "ledger_entries": ("ledger_postings", "posting_id"),
}
# Read in any scope, written by operators (promo_codes: a tenant may also count a redemption).
CATALOG = ("meters", "plans", "plan_charges", "rooms", "promo_codes")
OPERATOR_ONLY = (
    "psp_events",
    "payout_reconciliations",
    "payout_reconciliation_items",
    "invoice_number_counters",
    # Accounts, refresh tokens and login limits: the API reads them on its own behalf (operator
    # scope) before any caller is known; meter gateways and their nonces likewise.
    "users",
    "service_clients",
    "refresh_tokens",
    "auth_throttle",
    "meter_gateways",
    "meter_webhook_nonces",
)

ALL_TABLES = (
    "tenants",
    *TENANT_OWNED,
    *CHILDREN,
    *CATALOG,
    *OPERATOR_ONLY,
    "dunning_campaigns",
    "idempotency_records",
    "audit_log",
)

CREATE_ROLE = """
DO $$
DECLARE
    existing record;
BEGIN
    SELECT rolsuper, rolbypassrls INTO existing FROM pg_catalog.pg_roles WHERE rolname = 'billing_app';
    IF NOT FOUND THEN
        BEGIN
            CREATE ROLE billing_app NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- a migration of another database on this server created it meanwhile
        END;
    ELSIF existing.rolsuper OR existing.rolbypassrls THEN
        RAISE EXCEPTION 'role billing_app exists as a superuser or with BYPASSRLS: row-level security would not apply'
            USING ERRCODE = 'invalid_role_specification';
    END IF;
END $$
"""

GRANTS = (
    f"GRANT USAGE ON SCHEMA public TO {ROLE}",
    f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {ROLE}",
    f"REVOKE INSERT, UPDATE, DELETE ON alembic_version FROM {ROLE}",
    f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {ROLE}",
    f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO {ROLE}",
)
DEFAULT_PRIVILEGES = (
    ("SELECT, INSERT, UPDATE, DELETE", "TABLES"),
    ("USAGE, SELECT", "SEQUENCES"),
    ("EXECUTE", "FUNCTIONS"),
)

# SQL-standard bodies (RETURN ...) are parsed here, once: no search_path can change what they call.
# Simple enough to be inlined into the policies, so tenant_id = app_tenant_id() can use an index.
FUNCTIONS = (
    """
    CREATE FUNCTION public.app_tenant_id() RETURNS uuid LANGUAGE sql STABLE PARALLEL SAFE
    RETURN NULLIF(pg_catalog.current_setting('app.tenant_id', true), '')::pg_catalog.uuid
    """,
    """
    CREATE FUNCTION public.app_is_operator() RETURNS boolean LANGUAGE sql STABLE PARALLEL SAFE
    RETURN COALESCE(pg_catalog.current_setting('app.operator', true), '') = 'on'
    """,
    """
    CREATE FUNCTION public.app_caller() RETURNS text LANGUAGE sql STABLE PARALLEL SAFE
    RETURN NULLIF(pg_catalog.current_setting('app.caller', true), '')
    """,
)

# A redemption (services/redemptions.py) is the one change of the catalog a tenant's scope makes.
PROMO_REDEMPTION_ONLY = """
CREATE FUNCTION public.promo_codes_tenant_redemption_only() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog AS $$
BEGIN
    IF public.app_tenant_id() IS NOT NULL
       AND ((to_jsonb(NEW) - 'times_redeemed') IS DISTINCT FROM (to_jsonb(OLD) - 'times_redeemed')
            OR NEW.times_redeemed <> OLD.times_redeemed + 1) THEN
        RAISE EXCEPTION 'promo code %: in a tenant''s scope only a redemption may be counted', OLD.code
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$
"""

OPERATOR = "public.app_is_operator()"
IN_A_SCOPE = "public.app_tenant_id() IS NOT NULL"


def _policy(name: str, table: str, command: str, using: str | None, check: str | None) -> tuple[str, str, str]:
    sql = f"CREATE POLICY {name} ON {table} FOR {command}"
    if using is not None:
        sql += f" USING ({using})"
    if check is not None:
        sql += f" WITH CHECK ({check})"
    return name, table, sql


def _policies() -> list[tuple[str, str, str]]:
    """(name, table, CREATE POLICY ...) of every policy."""
    own = f"{OPERATOR} OR id = public.app_tenant_id()"
    out = [_policy("tenant_isolation", "tenants", "ALL", own, own)]
    for table in TENANT_OWNED:
        rule = f"{OPERATOR} OR tenant_id = public.app_tenant_id()"
        out.append(_policy("tenant_isolation", table, "ALL", rule, rule))
    for table, (parent, key) in CHILDREN.items():
        rule = f"{OPERATOR} OR EXISTS (SELECT 1 FROM {parent} p WHERE p.id = {table}.{key})"  # noqa: S608 - constants
        out.append(_policy("tenant_isolation", table, "ALL", rule, rule))
    for table in CATALOG:
        out.append(_policy("catalog_read", table, "SELECT", IN_A_SCOPE, None))
    out.append(_policy("tenant_counts_redemption", "promo_codes", "UPDATE", IN_A_SCOPE, IN_A_SCOPE))
    shared_or_own = f"tenant_id = public.app_tenant_id() OR (tenant_id IS NULL AND {IN_A_SCOPE})"
    out.append(_policy("campaign_read", "dunning_campaigns", "SELECT", shared_or_own, None))
    for table in (*CATALOG, *OPERATOR_ONLY, "dunning_campaigns"):
        out.append(_policy("operator_all", table, "ALL", OPERATOR, OPERATOR))
    caller = f"{OPERATOR} OR scope = public.app_caller()"
    out.append(_policy("caller_isolation", "idempotency_records", "ALL", caller, caller))
    # Any caller's writes add entries (of its own tenant's rows); only operators read them.
    audited = f"{OPERATOR} OR tenant_id = public.app_tenant_id() OR (tenant_id IS NULL AND {IN_A_SCOPE})"
    out.append(_policy("audit_append", "audit_log", "INSERT", None, audited))
    out.append(_policy("operator_read", "audit_log", "SELECT", OPERATOR, None))
    return out


def upgrade() -> None:
    op.execute(CREATE_ROLE)
    for function in FUNCTIONS:
        op.execute(function)
    op.execute(PROMO_REDEMPTION_ONLY)
    op.execute(
        "CREATE TRIGGER promo_codes_tenant_redemption_only BEFORE UPDATE ON promo_codes "
        "FOR EACH ROW EXECUTE FUNCTION public.promo_codes_tenant_redemption_only()"
    )
    for table in ALL_TABLES:
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
    for _, _, policy in _policies():
        op.execute(policy)
    for grant in GRANTS:
        op.execute(grant)
    for privileges, kind in DEFAULT_PRIVILEGES:
        op.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT {privileges} ON {kind} TO {ROLE}")


def downgrade() -> None:
    """Everything but the role: it belongs to the server, other databases on it (and the logins
    that are its members) may still use it, and DROP ROLE fails while any database grants it anything."""
    for privileges, kind in DEFAULT_PRIVILEGES:
        op.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE {privileges} ON {kind} FROM {ROLE}")
    op.execute(f"REVOKE ALL ON ALL FUNCTIONS IN SCHEMA public FROM {ROLE}")
    op.execute(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {ROLE}")
    op.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {ROLE}")
    op.execute(f"REVOKE USAGE ON SCHEMA public FROM {ROLE}")
    for name, table, _ in _policies():
        op.execute(f"DROP POLICY {name} ON {table}")
    for table in ALL_TABLES:
        op.execute(f"ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY")
    op.execute("DROP TRIGGER promo_codes_tenant_redemption_only ON promo_codes")
    op.execute("DROP FUNCTION public.promo_codes_tenant_redemption_only()")
    for name in ("app_caller", "app_is_operator", "app_tenant_id"):
        op.execute(f"DROP FUNCTION public.{name}()")
