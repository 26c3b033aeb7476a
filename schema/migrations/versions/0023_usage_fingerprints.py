"""usage fingerprints: a duplicate is told by its key alone; an event's values never change

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-05 14:00:00

- ``usage_event_keys.fingerprint``: a digest of the event's values (meter, quantity, instant,
  properties) written with the key by the statement that claims it (``services.ingestion``). A
  posted event whose key is taken and whose fingerprint is equal is a duplicate, told by one probe
  of the key's index; a key without one (claimed before this migration) or with another is compared
  value by value, as before.
- An event's values cannot change (a trigger on ``usage_events``: only ``received_at`` may), nor can
  a key row: the fingerprint keeps describing the event it was written with. Retention and
  partition maintenance delete and insert rows, they never update one.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0023"
down_revision: str | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

REFUSE_EVENT_CHANGE = """
CREATE FUNCTION usage_event_values_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.id, NEW.tenant_id, NEW.meter_id, NEW.quantity, NEW.occurred_at, NEW.idempotency_key,
        NEW.properties, NEW.source)
       IS DISTINCT FROM (OLD.id, OLD.tenant_id, OLD.meter_id, OLD.quantity, OLD.occurred_at,
                         OLD.idempotency_key, OLD.properties, OLD.source) THEN
        RAISE EXCEPTION 'usage event % is immutable', OLD.id USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END $$
"""
REFUSE_KEY_CHANGE = """
CREATE FUNCTION usage_event_key_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'usage event key % is immutable', OLD.idempotency_key USING ERRCODE = 'restrict_violation';
END $$
"""


def upgrade() -> None:
    op.add_column("usage_event_keys", sa.Column("fingerprint", sa.LargeBinary(), nullable=True))
    op.execute(REFUSE_EVENT_CHANGE)
    op.execute(REFUSE_KEY_CHANGE)
    op.execute(
        "CREATE TRIGGER usage_events_values_immutable BEFORE UPDATE ON usage_events "
        "FOR EACH ROW EXECUTE FUNCTION usage_event_values_immutable()"
    )
    op.execute(
        "CREATE TRIGGER usage_event_keys_immutable BEFORE UPDATE ON usage_event_keys "
        "FOR EACH ROW EXECUTE FUNCTION usage_event_key_immutable()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER usage_event_keys_immutable ON usage_event_keys")
    op.execute("DROP TRIGGER usage_events_values_immutable ON usage_events")
    op.execute("DROP FUNCTION usage_event_key_immutable()")
    op.execute("DROP FUNCTION usage_event_values_immutable()")
    op.drop_column("usage_event_keys", "fingerprint")
