"""The one settings object. Nothing else in the project reads ``os.environ``."""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHROMIUM = "/usr/lib/chromium/chromium-headless-shell"


class Environment(StrEnum):
    local = "local"
    test = "test"
    production = "production"


class LogFormat(StrEnum):
    auto = "auto"  # JSON unless stderr is a terminal
    json = "json"
    console = "console"


class TraceExporter(StrEnum):
    none = "none"
    console = "console"
    otlp = "otlp"


_ISSUER_FIELDS = ("issuer_name", "issuer_address", "issuer_tax_id")
_PSP_SECRETS = ("stripe_api_key", "stripe_webhook_secret")
DEFAULT_SMTP_FROM = "Roomly Billing <billing@roomly.local>"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore")

    environment: Environment = Environment.local
    data_dir: Path = Field(default=PROJECT_ROOT / ".data", description="Embedded PostgreSQL, Temporal and PDFs")

    database_url: str | None = Field(
        default=None,
        description="PostgreSQL URL; unset means the embedded server under DATA_DIR",
    )
    database_pool_size: int = 10
    migration_database_url: str | None = Field(
        default=None,
        description="A login that owns the schema, used only by `python -m devstack.migrate`; unset: DATABASE_URL",
    )

    temporal_address: str | None = Field(
        default=None, description="host:port of Temporal; unset means the dev server started by `make up`"
    )
    temporal_namespace: str = "default"
    task_queue: str = "billing"

    billing_schedule_id: str = "billing-run-daily"
    billing_schedule_cron: str = "5 0 * * *"
    # A run missed while Temporal was down is started once when it is back, if it is no older than
    # this (one run bills every boundary due up to its start); the server's minimum is 10 s.
    dunning_retry_delays: str = Field(
        default="3600,86400,259200",
        pattern=r"^\d+(,\d+)*$",
        description="Seconds after the first failed payment of each dunning retry (the default campaign)",
    )
    dunning_min_overdue: int = Field(default=0, ge=0, description="Minor units overdue below which nothing is chased")
    renewal_reminder_days: int = Field(
        default=14, ge=1, le=365, description="Days before an annual plan renews that its reminder goes out"
    )
    renewal_reminders_schedule_id: str = "renewal-reminders-daily"
    renewal_reminders_cron: str = Field(default="0 8 * * *", description="When reminders are looked for (UTC)")
    temporal_search_attributes: bool = Field(
        default=True,
        description="Workflows publish the custom search attributes (registered by make up / the setup Job)",
    )
    billing_schedule_catchup_window: int = Field(
        default=86400, ge=10, description="Seconds a missed billing run may still be caught up (once)"
    )
    billing_run_page_size: int = Field(default=100, ge=1, le=1000)
    billing_run_concurrency: int = Field(default=10, ge=1, le=200)
    billing_run_clock_skew: int = Field(
        default=300, ge=0, description="Seconds a requested as_of may lie ahead of now (clocks disagree a little)"
    )
    billing_run_timeout: int = Field(default=6 * 3600, ge=60, description="Execution timeout of a billing run, s")
    invoice_workflow_timeout: int = Field(default=3600, ge=60, description="Execution timeout of one invoice, s")
    invoice_order_wait: int = Field(
        default=600, ge=1, description="How long an invoice waits for the one at the previous boundary, s"
    )

    chromium_path: str = DEFAULT_CHROMIUM
    pdf_page_pool_size: int = Field(default=3, ge=1, le=8)
    documents_dir: Path | None = Field(
        default=None, description="Where invoice PDFs are stored; default DATA_DIR/documents"
    )

    # The issuer printed on every invoice (snapshotted on the invoice when it is finalized),
    # the prefix of its gap-free invoice numbers (PREFIX-000001) and the payment terms.
    issuer_name: str = Field(default="Roomly Rooms GmbH", min_length=1, max_length=200)
    issuer_address: str = Field(
        default="Musterstra\u00dfe 1, 10115 Berlin, Germany",
        min_length=1,
        max_length=500,
        description="Printed as given; a newline (\\n) starts a new line",
    )
    issuer_tax_id: str = Field(default="DE123456789", min_length=1, max_length=64)
    invoice_number_prefix: str = Field(default="INV", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,15}$")
    credit_note_number_prefix: str = Field(default="CN", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,15}$")
    payment_terms_days: int = Field(default=14, ge=0, le=365, description="Due date: issue date + this many local days")

    # The PSP (Stripe). Unset STRIPE_API_BASE: `make up` runs the local emulator (devstack/psp) on
    # PSP_EMULATOR_PORT and points the stack at it; production sets a real key and leaves it unset.
    stripe_api_base: str | None = Field(default=None, description="Base URL of the Stripe API; unset: Stripe itself")
    stripe_api_key: str = "sk_test_local_emulator"
    stripe_webhook_secret: str = Field(
        default="whsec_local_emulator", min_length=1, description="Signing secret of the webhook endpoint"
    )
    stripe_timeout: float = Field(
        default=30.0, gt=0, le=300, description="Seconds one PSP request may take; then its outcome is unknown"
    )
    payment_confirm_wait: float = Field(
        default=60.0, gt=0, le=86400, description="Seconds collection waits for the PSP's webhook before asking it"
    )
    psp_emulator_port: int = 12111
    # PSP event processing (docs/payments.md "Webhook processing"): a Schedule sweeps events the
    # API stored but could not hand to Temporal.
    psp_events_sweep_schedule_id: str = "psp-events-sweep"
    psp_events_sweep_interval: int = Field(default=60, ge=1, description="Seconds between two sweeps")
    psp_events_sweep_age: int = Field(
        default=30, ge=0, description="A sweep processes events still received this many seconds after arrival"
    )

    # Notices (docs/notices.md): email over SMTP. Unset SMTP_HOST: `make up` runs the local mail
    # sink (devstack/mailsink.py) on SMTP_PORT and points the stack at it; production sets a relay.
    smtp_host: str | None = Field(default=None, description="SMTP server; unset: the local mail sink on loopback")
    smtp_port: int = Field(default=2525, ge=1, le=65535)
    smtp_from: str = Field(default=DEFAULT_SMTP_FROM, min_length=3, max_length=320, description="From of notices")
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_starttls: bool = Field(default=False, description="Require STARTTLS before authenticating and sending")
    smtp_timeout: float = Field(default=30.0, gt=0, le=300, description="Seconds one SMTP conversation may take")

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, description="Larger request bodies get 413")

    log_level: str = "INFO"
    log_format: LogFormat = LogFormat.auto
    otel_traces_exporter: TraceExporter = TraceExporter.none
    otel_exporter_otlp_endpoint: str = "http://127.0.0.1:4318/v1/traces"
    otel_service_name: str = "billing"

    @model_validator(mode="after")
    def _production_needs_external_services(self) -> Settings:
        if self.environment is Environment.production:
            missing = [n for n in ("database_url", "temporal_address") if getattr(self, n) is None]
            if missing:
                raise ValueError(f"{', '.join(m.upper() for m in missing)} must be set when ENVIRONMENT=production")
        return self

    @model_validator(mode="after")
    def _production_needs_a_real_issuer(self) -> Settings:
        if self.environment is Environment.production:
            demo = [n for n in _ISSUER_FIELDS if getattr(self, n) == type(self).model_fields[n].default]
            if demo:
                names = ", ".join(n.upper() for n in demo)
                raise ValueError(f"{names} must be set when ENVIRONMENT=production (the defaults are a demo company)")
        return self

    @model_validator(mode="after")
    def _production_needs_real_psp_secrets(self) -> Settings:
        if self.environment is Environment.production:
            local = [n for n in _PSP_SECRETS if getattr(self, n) == type(self).model_fields[n].default]
            if local:
                names = ", ".join(n.upper() for n in local)
                raise ValueError(f"{names} must be set when ENVIRONMENT=production (the defaults are for the emulator)")
        return self

    @model_validator(mode="after")
    def _production_needs_a_real_mail_server(self) -> Settings:
        if self.environment is Environment.production:
            local = [n for n in ("smtp_host", "smtp_from") if getattr(self, n) == type(self).model_fields[n].default]
            if local:
                names = ", ".join(n.upper() for n in local)
                raise ValueError(f"{names} must be set when ENVIRONMENT=production (the defaults are the local sink)")
        return self

    @model_validator(mode="after")
    def _credit_notes_have_their_own_prefix(self) -> Settings:
        # Both count in invoice_number_counters: one prefix would interleave the two sequences.
        if self.credit_note_number_prefix == self.invoice_number_prefix:
            raise ValueError("CREDIT_NOTE_NUMBER_PREFIX must differ from INVOICE_NUMBER_PREFIX")
        return self

    @property
    def documents_root(self) -> Path:
        return self.documents_dir or self.data_dir / "documents"

    @property
    def smtp_target(self) -> str:
        """The SMTP server's host: SMTP_HOST, or the loopback address of the local sink."""
        return self.smtp_host or "127.0.0.1"

    @property
    def migration_target(self) -> str | None:
        """The URL migrations connect with: MIGRATION_DATABASE_URL, else DATABASE_URL (None: neither is set)."""
        return self.migration_database_url or self.database_url

    @property
    def temporal_target(self) -> str:
        return self.temporal_address or "127.0.0.1:7233"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
