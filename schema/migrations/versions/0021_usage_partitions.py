"""usage_events partitioned by month, its keys in usage_event_keys, retention

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-12 09:00:00

- ``usage_events`` becomes a table partitioned by RANGE on ``occurred_at``, one partition per UTC
  month (``usage_events_2026_12``) and a DEFAULT partition (``usage_events_default``) for events of
  months without one. Its primary key is (id, occurred_at); ids keep coming from one identity,
  continued from the old table's sequence (the late-usage watermark compares them).
- ``usage_event_keys`` (tenant, idempotency key) -> event: a partitioned table's unique index must
  contain the partition key, so the old ``uq_usage_tenant_key`` could only say "once per month".
  Ingestion claims the key here and inserts the event in one statement.
- ``usage_retention``: how far back usage is kept once retention dropped months (none: everything).
- ``usage_partitions_ensure(first_month, months)`` and ``usage_partitions_retire(cutoff)``: SECURITY
  DEFINER functions owned by the migrating role (the app's role owns nothing and cannot create or
  drop a table), with a fixed search_path, executable by billing_app in the operator's scope only.
  Creating a month moves its rows out of the default partition first; retiring drops whole months
  before the cutoff but never one holding usage not invoiced yet.
- Partitions are not the app's to read: no privileges for billing_app, row-level security enabled
  with no policy; every query goes through ``usage_events`` and its policy.

The existing rows are copied into the partitions (a partition for every month that has events, and
the current month plus three ahead), their keys into ``usage_event_keys``. Downgrade copies them back
into one table with ``uq_usage_tenant_key``. docs/usage-partitions.md explains the design.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLE = "billing_app"
# The advisory lock (class, key 0) partition maintenance takes exclusively and ingestion shared
# (services/usage_fence.py PARTITIONS_LOCK_CLASS: the same number).
PARTITIONS_LOCK_CLASS = 0x5553504D  # "USPM"
MONTHS_AHEAD = 3  # the migration's own; the worker applies USAGE_PARTITIONS_AHEAD when it starts
COLUMNS = "id, tenant_id, meter_id, quantity, occurred_at, idempotency_key, source, properties, received_at"
TENANT_RULE = "public.app_is_operator() OR tenant_id = public.app_tenant_id()"

OPERATOR_ONLY = """
    IF NOT public.app_is_operator() THEN
        RAISE EXCEPTION 'usage partitions are kept in the operator''s scope'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
"""

# Months [first_month, first_month + months] (UTC), those not retired; returns the partitions made.
# A month made while the default partition holds some of its rows gets them moved in first (in this
# transaction, ingestion held off by the advisory lock), so ATTACH finds the default clean.
ENSURE = f"""
CREATE FUNCTION public.usage_partitions_ensure(first_month timestamptz, months integer)
RETURNS SETOF text LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET lock_timeout = '10s'
AS $$
DECLARE
    lo timestamptz;
    hi timestamptz;
    part text;
    horizon timestamptz;
    locked boolean := false;
BEGIN
    {OPERATOR_ONLY}
    IF months IS NULL OR months < 0 OR months > 120 THEN
        RAISE EXCEPTION 'months must be between 0 and 120, not %', months USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT r.kept_from INTO horizon FROM public.usage_retention r;
    FOR i IN 0..months LOOP
        lo := date_trunc('month', first_month) + make_interval(months => i);
        hi := lo + interval '1 month';
        CONTINUE WHEN horizon IS NOT NULL AND lo < horizon;  -- retired: usage that old is refused
        part := 'usage_events_' || to_char(lo, 'YYYY_MM');
        CONTINUE WHEN to_regclass('public.' || part) IS NOT NULL;
        IF NOT locked THEN
            PERFORM pg_advisory_xact_lock({PARTITIONS_LOCK_CLASS}, 0);
            locked := true;
            CONTINUE WHEN to_regclass('public.' || part) IS NOT NULL;  -- made meanwhile
        END IF;
        EXECUTE format('CREATE TABLE public.%I (LIKE public.usage_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                       part);
        EXECUTE format('WITH moved AS (DELETE FROM public.usage_events_default WHERE occurred_at >= $1'
                       ' AND occurred_at < $2 RETURNING {COLUMNS}) INSERT INTO public.%I ({COLUMNS})'
                       ' SELECT {COLUMNS} FROM moved', part) USING lo, hi;
        -- Proves the bounds, so ATTACH does not scan the new table again.
        EXECUTE format('ALTER TABLE public.%I ADD CONSTRAINT %I CHECK (occurred_at >= %L AND occurred_at < %L)',
                       part, part || '_bounds', lo, hi);
        EXECUTE format('ALTER TABLE public.usage_events ATTACH PARTITION public.%I FOR VALUES FROM (%L) TO (%L)',
                       part, lo, hi);
        EXECUTE format('ALTER TABLE public.%I DROP CONSTRAINT %I', part, part || '_bounds');
        EXECUTE format('ALTER TABLE public.%I ENABLE ROW LEVEL SECURITY', part);
        EXECUTE format('REVOKE ALL ON public.%I FROM PUBLIC, {ROLE}', part);
        RETURN NEXT part;
    END LOOP;
END $$
"""  # noqa: S608 - constants

# Drops every monthly partition that ends at or before the horizon, and the default partition's rows
# before it, with their keys; the horizon is the month of ``cutoff``, moved back to the month of the
# oldest usage not invoiced yet. That usage is (per subscription whose final invoice is not written):
# everything since the end of the period its last invoice settled (its anchor when none did), and the
# periods holding late events numbered above its last invoice's watermark (they are re-rated whole).
RETIRE = f"""
CREATE FUNCTION public.usage_partitions_retire(
    cutoff timestamptz,
    OUT horizon timestamptz,
    OUT dropped_partitions text[],
    OUT deleted_default_rows bigint,
    OUT blocked_since timestamptz,
    OUT blocked_by uuid
) LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET TimeZone = 'UTC'
SET lock_timeout = '10s'
AS $$
DECLARE
    open_since timestamptz;
    open_sub uuid;
    late_since timestamptz;
    late_sub uuid;
    kept timestamptz;
    part record;
BEGIN
    {OPERATOR_ONLY}
    IF cutoff IS NULL THEN
        RAISE EXCEPTION 'cutoff must be given' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM pg_advisory_xact_lock({PARTITIONS_LOCK_CLASS}, 0);  -- no ingestion runs until we commit
    SELECT s.id, coalesce(max(i.settled_end), s.anchor_at) INTO open_sub, open_since
      FROM public.subscriptions s LEFT JOIN public.invoices i ON i.subscription_id = s.id
     WHERE NOT s.final_invoiced
     GROUP BY s.id, s.anchor_at ORDER BY 2, 1 LIMIT 1;
    SELECT s.id, min(i.settled_start) INTO late_sub, late_since
      FROM public.subscriptions s
      JOIN public.invoices latest ON latest.subscription_id = s.id
                                 AND latest.boundary_index = s.next_invoice_index - 1
      JOIN public.usage_events u ON u.tenant_id = s.tenant_id AND u.id > latest.usage_watermark
                                AND u.occurred_at < latest.settled_end
      JOIN public.invoices i ON i.subscription_id = s.id
                            AND u.occurred_at >= i.settled_start AND u.occurred_at < i.settled_end
     WHERE NOT s.final_invoiced
     GROUP BY s.id ORDER BY 2, 1 LIMIT 1;
    IF late_since IS NOT NULL AND (open_since IS NULL OR late_since < open_since) THEN
        open_since := late_since;
        open_sub := late_sub;
    END IF;

    horizon := date_trunc('month', cutoff);
    IF open_since IS NOT NULL AND open_since < horizon THEN
        horizon := date_trunc('month', open_since);
        blocked_since := open_since;
        blocked_by := open_sub;
    END IF;
    SELECT r.kept_from INTO kept FROM public.usage_retention r;
    IF kept IS NOT NULL AND kept >= horizon THEN
        horizon := kept;  -- never moves back: what was dropped is gone
    END IF;

    dropped_partitions := ARRAY[]::text[];
    FOR part IN
        SELECT c.relname, to_timestamp(substr(c.relname, 14), 'YYYY_MM') AS lo
          FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid
         WHERE h.inhparent = 'public.usage_events'::regclass AND c.relname ~ '^usage_events_[0-9]{{4}}_[0-9]{{2}}$'
         ORDER BY 2
    LOOP
        EXIT WHEN part.lo + interval '1 month' > horizon;
        EXECUTE format('DELETE FROM public.usage_event_keys k USING public.%I e'
                       ' WHERE k.tenant_id = e.tenant_id AND k.idempotency_key = e.idempotency_key', part.relname);
        EXECUTE format('DROP TABLE public.%I', part.relname);
        dropped_partitions := dropped_partitions || part.relname::text;
    END LOOP;
    DELETE FROM public.usage_event_keys k USING public.usage_events_default e
     WHERE e.occurred_at < horizon AND k.tenant_id = e.tenant_id AND k.idempotency_key = e.idempotency_key;
    DELETE FROM public.usage_events_default e WHERE e.occurred_at < horizon;
    GET DIAGNOSTICS deleted_default_rows = ROW_COUNT;
    IF kept IS NULL OR horizon > kept THEN
        INSERT INTO public.usage_retention (id, kept_from, updated_at) VALUES (true, horizon, now())
        ON CONFLICT (id) DO UPDATE SET kept_from = EXCLUDED.kept_from, updated_at = EXCLUDED.updated_at;
    END IF;
END $$
"""  # noqa: S608 - constants

FUNCTIONS = ("usage_partitions_ensure(timestamptz, integer)", "usage_partitions_retire(timestamptz)")


def _usage_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("meter_id", sa.Uuid(), nullable=False),
        sa.Column("quantity", sa.Numeric(precision=24, scale=9), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("idempotency_key", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column(
            "source",
            sa.Enum(
                "api",
                "csv",
                "webhook",
                "manual",
                name="ck_usagesource",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("properties", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("quantity >= 0", name="ck_usage_quantity"),
        sa.ForeignKeyConstraint(["meter_id"], ["meters.id"]),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
    ]


def _usage_indexes() -> None:
    op.create_index("ix_usage_tenant_meter_time", "usage_events", ["tenant_id", "meter_id", "occurred_at"])
    op.create_index("ix_usage_tenant_seq", "usage_events", ["tenant_id", "id"])


def _tenant_policy(table: str) -> None:
    op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
    op.execute(f"CREATE POLICY tenant_isolation ON {table} FOR ALL USING ({TENANT_RULE}) WITH CHECK ({TENANT_RULE})")
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {ROLE}")


def _continue_sequence(source_sequence: str) -> None:
    """The new identity goes on from where ``source_sequence`` stopped (ids only ever ascend)."""
    op.execute(
        f"SELECT setval(pg_get_serial_sequence('usage_events', 'id'), last_value, is_called) FROM {source_sequence}"  # noqa: S608
    )


def upgrade() -> None:
    op.execute("ALTER TABLE usage_events RENAME TO usage_events_unpartitioned")
    op.execute("ALTER SEQUENCE usage_events_id_seq RENAME TO usage_events_unpartitioned_id_seq")
    for index in ("usage_events_pkey", "uq_usage_tenant_key", "ix_usage_tenant_meter_time", "ix_usage_tenant_seq"):
        op.execute(f"ALTER INDEX {index} RENAME TO {index}_unpartitioned")

    op.create_table(
        "usage_events",
        *_usage_columns(),
        sa.PrimaryKeyConstraint("id", "occurred_at"),
        postgresql_partition_by="RANGE (occurred_at)",
    )
    _usage_indexes()
    op.execute("CREATE TABLE usage_events_default PARTITION OF usage_events DEFAULT")
    op.execute("ALTER TABLE usage_events_default ENABLE ROW LEVEL SECURITY")
    op.execute(f"REVOKE ALL ON usage_events_default FROM PUBLIC, {ROLE}")
    _tenant_policy("usage_events")

    op.create_table(
        "usage_event_keys",
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("idempotency_key", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("event_id", sa.BigInteger(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "idempotency_key"),
    )
    _tenant_policy("usage_event_keys")

    op.create_table(
        "usage_retention",
        sa.Column("id", sa.Boolean(), nullable=False),
        sa.Column("kept_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("id", name="ck_usage_retention_one_row"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute("ALTER TABLE usage_retention ENABLE ROW LEVEL SECURITY")
    op.execute("ALTER TABLE usage_retention FORCE ROW LEVEL SECURITY")
    op.execute("CREATE POLICY catalog_read ON usage_retention FOR SELECT USING (public.app_tenant_id() IS NOT NULL)")
    op.execute(
        "CREATE POLICY operator_all ON usage_retention FOR ALL "
        "USING (public.app_is_operator()) WITH CHECK (public.app_is_operator())"
    )
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON usage_retention TO {ROLE}")

    op.execute(ENSURE)
    op.execute(RETIRE)
    for function in FUNCTIONS:
        op.execute(f"REVOKE ALL ON FUNCTION public.{function} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION public.{function} TO {ROLE}")

    # A partition for every month that has events, and the current month and the next ones.
    op.execute(
        "SELECT public.usage_partitions_ensure(m, 0) FROM (SELECT DISTINCT date_trunc('month', occurred_at, 'UTC') "
        "AS m FROM usage_events_unpartitioned) months"
    )
    op.execute(f"SELECT public.usage_partitions_ensure(now(), {MONTHS_AHEAD})")
    op.execute(
        f"INSERT INTO usage_events ({COLUMNS}) OVERRIDING SYSTEM VALUE SELECT {COLUMNS} FROM usage_events_unpartitioned"  # noqa: S608
    )
    op.execute(
        "INSERT INTO usage_event_keys (tenant_id, idempotency_key, event_id, occurred_at) "
        "SELECT tenant_id, idempotency_key, id, occurred_at FROM usage_events_unpartitioned"
    )
    _continue_sequence("usage_events_unpartitioned_id_seq")
    op.execute("DROP TABLE usage_events_unpartitioned")


def downgrade() -> None:
    for function in FUNCTIONS:
        op.execute(f"DROP FUNCTION public.{function}")
    op.execute("ALTER TABLE usage_events RENAME TO usage_events_partitioned")
    op.execute("ALTER SEQUENCE usage_events_id_seq RENAME TO usage_events_partitioned_id_seq")
    op.execute("DROP INDEX ix_usage_tenant_meter_time")
    op.execute("DROP INDEX ix_usage_tenant_seq")
    op.execute("ALTER INDEX usage_events_pkey RENAME TO usage_events_partitioned_pkey")

    op.create_table(
        "usage_events",
        *_usage_columns(),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "idempotency_key", name="uq_usage_tenant_key"),
    )
    _usage_indexes()
    _tenant_policy("usage_events")
    op.execute(
        f"INSERT INTO usage_events ({COLUMNS}) OVERRIDING SYSTEM VALUE SELECT {COLUMNS} FROM usage_events_partitioned"  # noqa: S608
    )
    _continue_sequence("usage_events_partitioned_id_seq")
    op.execute("DROP TABLE usage_events_partitioned")  # and its partitions
    op.drop_table("usage_event_keys")
    op.drop_table("usage_retention")
