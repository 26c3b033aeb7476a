"""The one settings object. Nothing else in the project reads ``os.environ``."""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHROMIUM = "/usr/lib/chromium/chromium-headless-shell"


class Environment(StrEnum):
    local = "local"
    test = "test"
    staging = "staging"  # like production for secrets and keys: no placeholders, no generated keys
    production = "production"

    @property
    def generates_secrets(self) -> bool:
        """Whether this environment may run on placeholder secrets and a signing key made on the spot."""
        return self in (Environment.local, Environment.test)


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
# Values that are never a real secret: refused outside local/test (compared case-insensitively, trimmed).
PLACEHOLDER_SECRETS = frozenset(
    {"", "change-me", "changeme", "change_me", "dev-secret", "secret", "password", "placeholder", "todo", "xxx"}
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore")

    environment: Environment = Environment.local
    data_dir: Path = Field(default=PROJECT_ROOT / ".data", description="Embedded PostgreSQL, Temporal and PDFs")

    database_url: str | None = Field(
        default=None,
        description="PostgreSQL URL; unset means the embedded server under DATA_DIR",
    )
    migration_database_url: str | None = Field(
        default=None,
        description="PostgreSQL URL of the login that owns the tables and runs the migrations; unset: DATABASE_URL",
    )
    database_pool_size: int = 10
    database_replica_url: str | None = Field(
        default=None,
        description="A streaming replica for the reports (ledger, reconciliation, audit); unset: the primary",
    )

    temporal_address: str | None = Field(
        default=None, description="host:port of Temporal; unset means the dev server started by `make up`"
    )
    temporal_namespace: str = "default"
    temporal_ui_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s]+$",
        description="Base URL of the Temporal Web UI, where the operator console links workflows (make up: its own)",
    )
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
    billing_run_concurrency: int = Field(
        default=10, ge=1, le=200, description="Subscriptions a billing run invoices at once (split between its batches)"
    )
    billing_run_batch_size: int = Field(default=20, ge=1, le=500, description="Subscriptions per batch activity")
    billing_run_batches_in_flight: int = Field(default=2, ge=1, le=50, description="Batch activities a run has running")
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
    # Documents (docs/operations.md "Documents"): files under DOCUMENTS_DIR, or objects of an S3
    # bucket (AWS or S3-compatible at S3_ENDPOINT_URL) handed out as presigned URLs.
    documents_backend: Literal["local", "s3"] = "local"
    s3_bucket: str | None = Field(default=None, description="The documents bucket (DOCUMENTS_BACKEND=s3)")
    s3_prefix: str = Field(default="", description="Key prefix inside the bucket")
    s3_endpoint_url: str | None = Field(default=None, description="An S3-compatible server; unset: AWS S3")
    s3_region: str | None = None
    documents_url_ttl: int = Field(default=300, ge=10, le=7 * 86400, description="Seconds a presigned URL works")
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
    # Signed meter webhooks (docs/security.md "Signed meter webhooks").
    meter_webhook_tolerance: int = Field(
        default=300, ge=10, le=3600, description="Seconds a meter gateway's signature time may be from ours"
    )
    meter_gateway_rotation_overlap: int = Field(
        default=86400, ge=0, le=30 * 86400, description="Seconds a rotated gateway secret is still accepted"
    )
    # PSP event processing (docs/payments.md "Webhook processing"): a Schedule sweeps events the
    # API stored but could not hand to Temporal.
    notices_sweep_schedule_id: str = "notices-sweep"
    notices_sweep_interval: int = Field(
        default=300, ge=10, description="Seconds between two sweeps of notices still pending (email or webhook)"
    )
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
    # ... and an optional signed webhook per tenant (services/notice_webhooks.py).
    notice_webhook_timeout: float = Field(
        default=10.0, gt=0, le=120, description="Seconds one webhook delivery may take (resolving, connecting, answer)"
    )

    # Identity and tokens (docs/security.md): ES256 access tokens signed with the current key of
    # AUTH_KEYS_DIR (or the one key of AUTH_SIGNING_KEY_PEM / AUTH_SIGNING_KEY_FILE), opaque refresh tokens.
    auth_issuer: str = Field(default="roomly-billing", min_length=1, description="iss of every access token")
    auth_audience: str = Field(default="roomly-billing-api", min_length=1, description="aud of every access token")
    auth_access_ttl: int = Field(default=600, ge=30, le=86400, description="Seconds an access token is valid")
    auth_refresh_ttl: int = Field(
        default=30 * 86400, ge=60, description="Seconds a refresh token is valid (each refresh issues a new one)"
    )
    auth_keys_dir: Path | None = Field(
        default=None, description="PEM signing keys and manifest.json; default DATA_DIR/keys"
    )
    auth_signing_key_pem: SecretStr | None = Field(
        default=None, description="One EC P-256 private key (PEM) instead of AUTH_KEYS_DIR"
    )
    auth_signing_key_file: Path | None = Field(
        default=None, description="A mounted file holding one EC P-256 private key (PEM) instead of AUTH_KEYS_DIR"
    )
    auth_revocation_cache_seconds: float = Field(
        default=5.0, ge=0, le=300, description="How long a process trusts that a session is not revoked"
    )
    auth_rate_limit: str = Field(
        default="10/60",
        pattern=r"^[1-9]\d{0,6}/[1-9]\d{0,6}$",
        description="Attempts per window (count/seconds) on the token and refresh routes, per account and per address",
    )

    feature_flags_file: Path | None = Field(
        default=None, description="JSON file of feature flags (core/flags.py); FLAG_<NAME> variables override it"
    )

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_workers: int = Field(
        default=1, ge=1, le=64, description="API processes (uvicorn --workers); /metrics is per process"
    )
    api_max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, description="Larger request bodies get 413")
    # Browsers (docs/security.md "Browsers"): the Host names the API answers to (others get 400,
    # which defeats DNS rebinding), and the web origins allowed to call it cross-origin.
    api_allowed_hosts: str = Field(
        default="localhost,127.0.0.1,[::1]",
        min_length=1,
        description="Comma-separated Host names the API answers (a leading *. allows subdomains)",
    )
    api_cors_origins: str = Field(
        default="", description="Comma-separated origins (scheme://host[:port]) allowed cross-origin; empty: none"
    )

    @property
    def allowed_hosts(self) -> list[str]:
        return [h.strip() for h in self.api_allowed_hosts.split(",") if h.strip()]

    @property
    def cors_origins(self) -> list[str]:
        return [o.strip().rstrip("/") for o in self.api_cors_origins.split(",") if o.strip()]

    # Metrics (docs/operations.md "Metrics and alerts"): the API serves /metrics on its own port; the worker
    # on WORKER_METRICS_PORT, where the Temporal SDK's metrics (served by its core on a loopback port) are
    # folded into ours.
    worker_metrics_host: str = Field(default="0.0.0.0", description="Where the worker's /metrics listens")
    worker_metrics_port: int = Field(default=9464, ge=0, le=65535, description="0: a free port, logged at start")
    temporal_sdk_metrics_address: str | None = Field(
        default=None,
        pattern=r"^[^:]+:\d{1,5}$",
        description="host:port of the SDK's own endpoint (read by the worker); unset: a free loopback port",
    )
    metrics_refresh_interval: float = Field(
        default=30.0, ge=1, le=3600, description="Seconds between two refreshes of the worker's database gauges"
    )
    psp_events_backlog_age: int = Field(
        default=300, ge=0, description="A PSP event still received after this many seconds counts as backlog"
    )
    usage_silence_after: int = Field(
        default=86400, ge=60, description="A reporting tenant with no usage event for this many seconds is silent"
    )
    usage_reporting_lookback: int = Field(
        default=7 * 86400, ge=3600, description="A tenant with a usage event within this many seconds reports"
    )

    # usage_events is partitioned by month (docs/usage-partitions.md): partitions made ahead by the worker
    # at start and by a daily Schedule, and whole months dropped after USAGE_RETENTION_MONTHS (if set).
    usage_partitions_ahead: int = Field(
        default=3, ge=0, le=36, description="Months of usage partitions made ahead of the current one"
    )
    usage_retention_months: int | None = Field(
        default=None,
        ge=1,
        le=1200,
        description="Drop usage months older than this many whole months (never one not invoiced yet); unset: keep all",
    )
    usage_partitions_schedule_id: str = "usage-partitions-daily"
    usage_partitions_interval: int = Field(
        default=86400, ge=60, description="Seconds between two runs of the usage partition maintenance"
    )

    log_level: str = "INFO"
    log_format: LogFormat = LogFormat.auto
    otel_traces_exporter: TraceExporter = TraceExporter.none
    otel_exporter_otlp_endpoint: str = "http://127.0.0.1:4318/v1/traces"
    otel_service_name: str = "billing"

    @model_validator(mode="after")
    def _s3_needs_a_bucket(self) -> Settings:
        if self.documents_backend == "s3" and not self.s3_bucket:
            raise ValueError("DOCUMENTS_BACKEND=s3 needs S3_BUCKET")
        return self

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
    def _no_placeholder_secrets_outside_local(self) -> Settings:
        """Outside local/test a secret left at its local default or a placeholder value refuses to start."""
        if self.environment.generates_secrets:
            return self
        bad = []
        for name in _PSP_SECRETS:
            value = getattr(self, name)
            if value == type(self).model_fields[name].default or _is_placeholder(value):
                bad.append(name)
        for name in ("smtp_password", "auth_signing_key_pem"):
            value = getattr(self, name)
            if value is not None and _is_placeholder(value):
                bad.append(name)
        if bad:
            names = ", ".join(n.upper() for n in bad)
            raise ValueError(f"{names}: a placeholder secret is refused when ENVIRONMENT={self.environment.value}")
        return self

    @model_validator(mode="after")
    def _one_source_of_signing_keys(self) -> Settings:
        if self.auth_signing_key_pem is not None and self.auth_signing_key_file is not None:
            raise ValueError("set AUTH_SIGNING_KEY_PEM or AUTH_SIGNING_KEY_FILE, not both")
        return self

    @model_validator(mode="after")
    def _credit_notes_have_their_own_prefix(self) -> Settings:
        # Both count in invoice_number_counters: one prefix would interleave the two sequences.
        if self.credit_note_number_prefix == self.invoice_number_prefix:
            raise ValueError("CREDIT_NOTE_NUMBER_PREFIX must differ from INVOICE_NUMBER_PREFIX")
        return self

    @property
    def migration_url(self) -> str | None:
        """Where migrations run: MIGRATION_DATABASE_URL, else DATABASE_URL (None: the embedded server)."""
        return self.migration_database_url or self.database_url

    @property
    def documents_root(self) -> Path:
        return self.documents_dir or self.data_dir / "documents"

    @property
    def auth_keys_root(self) -> Path:
        return self.auth_keys_dir or self.data_dir / "keys"

    @property
    def auth_rate_limit_count(self) -> int:
        return int(self.auth_rate_limit.split("/")[0])

    @property
    def auth_rate_limit_window(self) -> int:
        """Seconds of one rate-limit window."""
        return int(self.auth_rate_limit.split("/")[1])

    @property
    def smtp_target(self) -> str:
        """The SMTP server's host: SMTP_HOST, or the loopback address of the local sink."""
        return self.smtp_host or "127.0.0.1"

    @property
    def temporal_target(self) -> str:
        return self.temporal_address or "127.0.0.1:7233"


def _is_placeholder(value: str | SecretStr) -> bool:
    text = value.get_secret_value() if isinstance(value, SecretStr) else value
    return text.strip().lower() in PLACEHOLDER_SECRETS


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
