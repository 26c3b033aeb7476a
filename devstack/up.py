"""`make up`: the whole stack on one machine, supervised.

    .venv/bin/python -m devstack.up [--no-demo]

PostgreSQL (embedded unless DATABASE_URL), migrations, the Temporal dev server (unless
TEMPORAL_ADDRESS) with our custom search attributes registered, the worker and the API as
child processes in their own process groups; then the demo accounts (an operator, a meter-gateway
client, and once the demo tenant exists its admin: printed with their passwords at the end), demo
data through the HTTP API (as the demo operator, with a bearer token) and a billing run as of now.
A child that exits stops everything (exit 1); Ctrl-C or SIGTERM stops the children in reverse
order and the embedded database (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import structlog
from temporalio.client import Client

from billing.money import format_money
from core.observability import configure_logging
from core.settings import PROJECT_ROOT, Settings, get_settings
from devstack import demo
from devstack.child import Child, emit
from devstack.search_attributes import ensure_search_attributes
from devstack.services import (
    ServiceError,
    api_base_url,
    child_environment,
    ensure_demo_login,
    migrate,
    redact_url,
    start_api,
    start_embedded_database,
    start_mail_sink,
    start_psp_emulator,
    start_temporal_dev_server,
    start_worker,
    wait_for_http,
    wait_for_port,
    wait_for_temporal,
    worker_metrics_url,
)
from devstack.users import DEMO_OPERATOR_EMAIL, Login, TokenLogin, ensure_demo_accounts, ensure_demo_tenant_admin

DEMO_DUNNING_DELAYS = "60,120,180"  # make up's default campaign: retries 1, 2 and 3 minutes after a failure
log = structlog.get_logger("devstack")

T = TypeVar("T")

EMBEDDED_TEMPORAL_IP = "127.0.0.1"
EMBEDDED_TEMPORAL_PORT = 7233
EMBEDDED_TEMPORAL_UI_PORT = 8233
STOP_TIMEOUT = 15.0


class Shutdown(Exception):
    """Leave the startup sequence: a signal (code 0) or a child that died (code 1)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Supervisor:
    """Owns what was started, in order, and stops it in reverse order."""

    def __init__(self, stop_timeout: float = STOP_TIMEOUT) -> None:
        self.stop_timeout = stop_timeout
        self.children: list[Child] = []
        self._resources: list[tuple[str, Callable[[], object]]] = []
        self._stop = asyncio.Event()
        self._signal: str | None = None

    def request_stop(self, sig: signal.Signals) -> None:
        if self._signal is None:
            log.info("stop requested", signal=sig.name)
        else:
            log.warning("already stopping; waiting for children", signal=sig.name)
        self._signal = sig.name
        self._stop.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop, sig)

    def add_child(self, child: Child) -> Child:
        self.children.append(child)
        self._resources.append((child.name, lambda: child.stop(self.stop_timeout)))
        return child

    def add_stopper(self, name: str, stop: Callable[[], object]) -> None:
        self._resources.append((name, stop))

    def reason_to_stop(self) -> Shutdown | None:
        if self._signal is not None:
            return Shutdown(0, f"received {self._signal}")
        for child in self.children:
            code = child.poll()
            if code is not None:
                log.error("child exited unexpectedly", child=child.name, pid=child.pid, returncode=code)
                return Shutdown(1, f"{child.name} exited with code {code}")
        return None

    def check(self) -> None:
        """Raise :class:`Shutdown` if a signal arrived or a child died."""
        reason = self.reason_to_stop()
        if reason is not None:
            raise reason

    async def watch(self, interval: float = 0.5) -> Shutdown:
        """Wait until a signal arrives or a child exits."""
        while True:
            reason = self.reason_to_stop()
            if reason is not None:
                return reason
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), interval)

    async def guard(self, aw: Awaitable[T]) -> T:
        """Await ``aw`` unless a signal or a dead child interrupts it first (then raise Shutdown)."""
        task: asyncio.Future[T] = asyncio.ensure_future(aw)
        watcher = asyncio.create_task(self.watch(interval=0.2))
        try:
            racers: set[asyncio.Future[Any]] = {task, watcher}
            done, _ = await asyncio.wait(racers, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                with suppress(asyncio.CancelledError, Exception):
                    await task
            watcher.cancel()
            with suppress(asyncio.CancelledError):
                await watcher
        if task in done:
            return task.result()
        raise watcher.result()

    async def shutdown(self) -> None:
        while self._resources:
            name, stop = self._resources.pop()
            log.info("stopping", service=name)
            try:
                result = await asyncio.to_thread(stop)
            except Exception:
                log.exception("stop failed", service=name)
            else:
                if isinstance(result, int):
                    log.info("stopped", service=name, returncode=result)
                else:
                    log.info("stopped", service=name)


@dataclass
class Stack:
    settings: Settings  # with database_url and temporal_address filled in
    database_url: str
    temporal_address: str
    temporal_ui: str | None  # only when we run the dev server
    api_url: str
    psp_url: str | None  # only when we run the emulator
    mail_folder: Path | None = None  # only when we run the mail sink
    worker_metrics_url: str | None = None  # the worker's /metrics (Prometheus text, with the Temporal SDK's)


async def start_stack(settings: Settings, sup: Supervisor, *, project_root: Path = PROJECT_ROOT) -> Stack:
    """Bring the services up in order, registering each with ``sup`` as soon as it runs."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)

    if settings.database_url is None:
        owner_url, stop_database = await start_embedded_database(settings)
        sup.add_stopper("postgres", stop_database)
        sup.check()
        await migrate(owner_url)  # as the embedded server's superuser, who owns what it creates
        # The API and the worker log in as a member of billing_app, not as the embedded superuser.
        database_url = await ensure_demo_login(owner_url)
    else:
        database_url = settings.database_url
        log.info("using DATABASE_URL", url=redact_url(database_url))
        sup.check()
        migration_url = settings.migration_url or database_url
        if migration_url != database_url:
            log.info("migrating with MIGRATION_DATABASE_URL", url=redact_url(migration_url))
        await migrate(migration_url)
    sup.check()

    temporal: Child | None = None
    temporal_ui: str | None = None
    if settings.temporal_address is None:
        temporal_address = f"{EMBEDDED_TEMPORAL_IP}:{EMBEDDED_TEMPORAL_PORT}"
        temporal = sup.add_child(
            start_temporal_dev_server(
                settings, ip=EMBEDDED_TEMPORAL_IP, port=EMBEDDED_TEMPORAL_PORT, ui_port=EMBEDDED_TEMPORAL_UI_PORT
            )
        )
        temporal_ui = f"http://{EMBEDDED_TEMPORAL_IP}:{EMBEDDED_TEMPORAL_UI_PORT}"
    else:
        temporal_address = settings.temporal_address
    psp_url: str | None = None
    if settings.stripe_api_base is None:
        psp, psp_url = start_psp_emulator(settings, cwd=project_root)
        sup.add_child(psp)
        await sup.guard(wait_for_http(f"{psp_url}/_emulator/health", child=psp))
        log.info("psp emulator ready", url=psp_url)
    mail_folder: Path | None = None
    smtp_host = settings.smtp_host
    if smtp_host is None:
        mail, mail_folder = start_mail_sink(settings, cwd=project_root)
        sup.add_child(mail)
        smtp_host = "127.0.0.1"
        await sup.guard(wait_for_port(smtp_host, settings.smtp_port, child=mail))
        log.info("mail sink ready", port=settings.smtp_port, folder=str(mail_folder))
    update: dict[str, object] = {
        "database_url": database_url,
        "temporal_address": temporal_address,
        "smtp_host": smtp_host,
    }
    if "dunning_retry_delays" not in settings.model_fields_set:  # the demo walks through dunning in minutes
        update["dunning_retry_delays"] = DEMO_DUNNING_DELAYS
    if "worker_metrics_host" not in settings.model_fields_set:  # this machine's Prometheus, if any, is local
        update["worker_metrics_host"] = "127.0.0.1"
    if temporal_ui is not None and settings.temporal_ui_url is None:  # the console links workflows there
        update["temporal_ui_url"] = temporal_ui
    effective = settings.model_copy(update={**update, "stripe_api_base": psp_url or settings.stripe_api_base})
    client = await sup.guard(wait_for_temporal(effective, child=temporal))
    log.info("temporal ready", address=temporal_address, namespace=effective.temporal_namespace)
    await register_search_attributes(client, effective, external=settings.temporal_address is not None)

    env = child_environment(effective, database_url=database_url, temporal_address=temporal_address)
    worker = sup.add_child(start_worker(env, cwd=project_root, settings=effective))
    api = sup.add_child(start_api(effective, env, cwd=project_root))
    api_url = api_base_url(effective)
    await sup.guard(wait_for_http(f"{api_url}/healthz", child=api))
    log.info("api ready", url=api_url)
    metrics_url = worker_metrics_url(effective)
    await sup.guard(wait_for_http(metrics_url, child=worker))
    log.info("worker ready", metrics=metrics_url)
    return Stack(effective, database_url, temporal_address, temporal_ui, api_url, psp_url, mail_folder, metrics_url)


async def register_search_attributes(client: Client, settings: Settings, *, external: bool) -> None:
    """The custom search attributes (TenantId, InvoiceId, DunningStage, ...) on the namespace, for the
    Web UI's filters. Our dev server must take them; a server of yours (TEMPORAL_ADDRESS) may refuse
    (Temporal Cloud adds them through its own API): then a warning, and the stack goes on."""
    try:
        added = await ensure_search_attributes(client, settings.temporal_namespace)
    except Exception as err:
        if not external:
            raise
        log.warning("search attributes not registered", namespace=settings.temporal_namespace, error=str(err))
        return
    log.info("search attributes registered", namespace=settings.temporal_namespace, added=added)


def _progress_line(progress: dict[str, Any]) -> str:
    keys = ("pages", "periods_found", "invoices_created", "invoices_existing", "failed", "in_flight")
    parts = [f"{k}={progress.get(k, 0)}" for k in keys]
    return "billing run: " + " ".join(parts) + (" done" if progress.get("done") else "")


async def demo_and_billing(stack: Stack, now: datetime, login: Login) -> None:
    """Seed the demo data (idempotent) as ``login``, bill everything due as of ``now``, print the invoices."""
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60.0, auth=TokenLogin(login)) as client:
        summary = await demo.seed(client, now)
        emit(summary.line())
        for rejection in summary.rejections:
            log.warning("demo usage rejected", detail=rejection)
        outcome = await demo.run_billing(client, now, on_progress=lambda p: emit(_progress_line(p)))
        failures = outcome.progress.get("failures") or []
        log.info(
            "billing run finished",
            workflow_id=outcome.workflow_id,
            status=outcome.status,
            seconds=round(outcome.seconds, 1),
        )
        for failure in failures:
            log.warning("billing run failure", detail=failure)
        invoices, payments = await demo.wait_for_collection(client)
        names = await demo.tenant_names(client)
        reports = await demo.pay_out_and_reconcile(client, stack.psp_url) if stack.psp_url else []
        balances = await demo.ledger_lines(client, names)
    emit("")
    emit(demo.invoice_table(invoices, names, payments) if invoices else "no invoices yet")
    emit(f"invoice PDFs: {stack.settings.documents_root}")
    for report in reports:
        emit(
            f"payout {report['payout_id']}: {format_money(int(report['amount']), str(report['currency']))}"
            f" reconciled, matched {report['matched']}, missing ours {report['missing_ours']},"
            f" missing at the PSP {report['missing_psp']}, amount mismatches {report['amount_mismatch']}"
            f"  ({stack.api_url}/v1/reconciliation/payouts/{report['payout_id']}/export.csv)"
        )
    for line in dunning_lines(stack, invoices, payments, names):
        emit(line)
    emit("ledger balances (debits - credits):")
    for line in balances:
        emit(line)
    emit(f"ledger: {stack.api_url}/v1/ledger/entries, /v1/ledger/balances, /v1/ledger/export.csv?from=...&to=...")


def dunning_lines(
    stack: Stack, invoices: Sequence[dict[str, Any]], payments: dict[str, Any], names: dict[str, str]
) -> list[str]:
    """Where to watch the tenants whose card declined walk through dunning, and how they can pay."""
    declined: dict[str, list[str]] = {}
    for inv in invoices:
        attempts = payments.get(str(inv["id"])) or []
        if inv["status"] == "open" and attempts and attempts[-1]["status"] == "failed":
            declined.setdefault(str(inv["tenant_id"]), []).append(str(inv["id"]))
    lines = []
    delays = ", ".join(f"+{int(s) // 60} min" for s in stack.settings.dunning_retry_delays.split(","))
    for tenant_id, invoice_ids in declined.items():
        api = stack.api_url
        lines += [
            f"dunning: {names.get(tenant_id, tenant_id)}'s card declined: retries at {delays} after the failure,"
            " then suspension",
            f"  state: GET {api}/v1/tenants/{tenant_id}/dunning   (Temporal UI: DunningStage = 'final_notice', ...)",
            f"  notices: {stack.mail_folder or 'your SMTP server'}",
            f'  to pay: POST {api}/v1/tenants/{tenant_id}/payment-method {{"payment_method": "pm_card_visa"}},'
            f" then POST {api}/v1/invoices/<id>/pay for {', '.join(invoice_ids)}",
        ]
    return lines


# Prints access_token from the token route's JSON answer (python3 is there wherever `make up` runs; jq may not be).
_PICK_ACCESS = """python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])'"""


def login_lines(stack: Stack, logins: Sequence[Login]) -> list[str]:
    """The demo logins, and how to get a token with the first one and call the API with it."""
    lines = ["Logins (docs/security.md):"]
    for login in logins:
        kind = "password" if login.grant == "password" else "client secret"
        lines.append(f"  {login.what}: {login.name}   {kind} {login.secret}")
    if logins:
        first = logins[0]
        lines += [
            "Get a token and call the API:",
            f"  TOKEN=$(curl -s {stack.api_url}/v1/auth/token -d grant_type=password"
            f" --data-urlencode username={first.name} --data-urlencode password={first.secret} | {_PICK_ACCESS})",
            f'  curl -s {stack.api_url}/v1/auth/me -H "Authorization: Bearer $TOKEN"',
        ]
    tenants = [login for login in logins if login.grant == "password" and login.what.startswith("tenant")]
    for login in tenants:
        lines += [
            f'Tenant portal (README "Tenant portal"): {stack.api_url}/portal/login',
            f"  sign in as {login.what}: {login.name}   password {login.secret}",
        ]
    return lines


def console_lines(stack: Stack, logins: Sequence[Login]) -> list[str]:
    """The operator console's address and the demo operator's sign-in (the first login)."""
    operator = next((login for login in logins if login.name == DEMO_OPERATOR_EMAIL), None)
    if operator is None:
        return []
    return [
        f'Operator console (README "Operator console"): {stack.api_url}/console/login',
        f"  sign in as {operator.what}: {operator.name}   password {operator.secret}",
    ]


def banner(stack: Stack, notes: Sequence[str] = ()) -> str:
    rows = [
        ("API", f"{stack.api_url}   (docs: {stack.api_url}/docs)"),
        ("Tenant portal", f"{stack.api_url}/portal   (a tenant's users sign in; logins below)"),
        ("Console", f"{stack.api_url}/console   (operators sign in; login below)"),
        ("Temporal", f"{stack.temporal_address}   namespace {stack.settings.temporal_namespace}"),
        ("API metrics", f"{stack.api_url}/metrics"),
    ]
    if stack.worker_metrics_url:
        rows.append(("Worker metrics", f"{stack.worker_metrics_url}   (with the Temporal SDK's)"))
    if stack.temporal_ui:
        rows.append(("Temporal UI", stack.temporal_ui))
    if stack.psp_url:
        rows.append(("PSP emulator", f"{stack.psp_url}   (Stripe API; docs/psp-emulator.md)"))
    if stack.mail_folder:
        sink = f"smtp://127.0.0.1:{stack.settings.smtp_port}   (notices as .eml files in {stack.mail_folder})"
        rows.append(("Mail sink", sink))
    rows += [
        ("Invoice PDFs", str(stack.settings.documents_root)),
        ("Database", redact_url(stack.database_url)),
    ]
    width = max(len(k) for k, _ in rows)
    rule = "-" * 72
    body = "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)
    extra = "".join(f"\n  {note}" for note in notes)
    return f"\n{rule}\n  Billing stack is up\n{body}\n{extra}\n  Ctrl-C to stop\n{rule}"


async def run(settings: Settings, *, seed_data: bool = True, project_root: Path = PROJECT_ROOT) -> int:
    """Start, seed, supervise; returns the process exit code."""
    sup = Supervisor()
    sup.install_signal_handlers()
    code = 0
    try:
        stack = await start_stack(settings, sup, project_root=project_root)
        notes: list[str] = []
        logins = await sup.guard(ensure_demo_accounts(stack.database_url, stack.settings))
        if seed_data:
            try:
                await sup.guard(demo_and_billing(stack, datetime.now(UTC), logins[0]))
                tenant_admin = await sup.guard(
                    ensure_demo_tenant_admin(stack.database_url, stack.settings, demo.TENANTS[0].email)
                )
                if tenant_admin is not None:
                    logins.insert(1, tenant_admin)
            except Shutdown:
                raise
            except Exception:
                log.exception("demo data / billing run failed; the stack keeps running")
                notes.append("Demo data or billing run FAILED: see the log above.")
        notes += login_lines(stack, logins)
        notes += console_lines(stack, logins)
        emit(banner(stack, notes))
        stopped = await sup.watch()
        code = stopped.code
    except Shutdown as stopped:
        code = stopped.code
    except ServiceError as exc:
        log.error("startup failed", error=str(exc))
        code = 1
    except Exception:
        log.exception("startup failed")
        code = 1
    finally:
        await sup.shutdown()
    log.info("stack stopped", exit_code=code)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.up", description="Run the whole billing stack locally.")
    parser.add_argument("--no-demo", action="store_true", help="skip demo data and the billing run")
    args = parser.parse_args(argv)
    settings = get_settings()
    configure_logging(settings)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    return asyncio.run(run(settings, seed_data=not args.no_demo))


if __name__ == "__main__":
    sys.exit(main())
