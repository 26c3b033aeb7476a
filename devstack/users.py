"""Users and service clients, from the command line and for `make up` (docs/security.md "Accounts").

    .venv/bin/python -m devstack.users create-user --email ada@example.com --role operator_admin
    .venv/bin/python -m devstack.users create-user --email ten@example.com --role tenant_admin --tenant-id UUID
    .venv/bin/python -m devstack.users create-client --client-id gateway-1 --name "Meter gateway 1" --role operator

The password is read from standard input with ``--password-stdin`` (never from the command line,
where other users of the machine could see it), else generated and printed once; a client's secret
is always generated and printed once. ``--replace`` gives an existing account the new password or
secret, role and tenant instead of failing. Needs ``DATABASE_URL``. Exit 0 on success, 1 when the
input is refused (the message names the field), 2 for a usage error.

:func:`ensure_demo_accounts` and :func:`ensure_demo_tenant_admin` are what `make up` runs: a demo
operator (``operator_admin``), a meter-gateway client and an admin of the demo tenant (once the demo
data made it), with fixed passwords in the local environment and fresh random ones anywhere else;
they return the logins to print. :class:`TokenLogin` lets an httpx client call the API with one.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import uuid
from collections.abc import Generator, Sequence
from dataclasses import dataclass

import httpx
from sqlmodel import select

from core.principal import Role
from core.settings import Environment, Settings, get_settings
from schema.db import make_engine, make_sessionmaker
from schema.models import Tenant
from schema.scope import OPERATOR
from services import auth
from services.errors import ServiceError

DEMO_OPERATOR_EMAIL = "operator@roomly.local"
DEMO_GATEWAY_CLIENT = "demo-meter-gateway"
# Fixed so a developer can log in after every `make up`; only ever used when ENVIRONMENT=local.
LOCAL_PASSWORDS = {
    "operator": "operator-demo-password",
    "tenant": "tenant-demo-password",
    "gateway": "meter-gateway-demo-secret",
}


@dataclass(frozen=True)
class Login:
    what: str  # "operator", "tenant admin (Lena Hoffmann)", "meter gateway client"
    name: str  # the email or client_id
    secret: str
    grant: str  # password | client_credentials


def _secret(settings: Settings, which: str) -> str:
    if settings.environment is Environment.local:
        return LOCAL_PASSWORDS[which]
    return secrets.token_urlsafe(18)


async def ensure_demo_accounts(database_url: str, settings: Settings) -> list[Login]:
    """Create (or reset) the demo operator and the demo meter-gateway client."""
    engine = make_engine(database_url, pool_size=1)
    try:
        async with make_sessionmaker(engine, scope=OPERATOR)() as session:
            operator = _secret(settings, "operator")
            await auth.create_user(
                session, email=DEMO_OPERATOR_EMAIL, password=operator, role=Role.operator_admin, replace=True
            )
            _, secret = await auth.create_client(
                session, client_id=DEMO_GATEWAY_CLIENT, name="Demo meter gateway", role=Role.meter_gateway,
                secret=_secret(settings, "gateway"), replace=True,
            )  # fmt: skip
    finally:
        await engine.dispose()
    return [
        Login("operator (operator_admin)", DEMO_OPERATOR_EMAIL, operator, "password"),
        Login("meter gateway client (meter_gateway)", DEMO_GATEWAY_CLIENT, secret, "client_credentials"),
    ]


async def ensure_demo_tenant_admin(database_url: str, settings: Settings, tenant_email: str) -> Login | None:
    """Create (or reset) a tenant_admin of the tenant with ``tenant_email`` (the demo data's), who
    logs in with that email; None when there is no such tenant."""
    engine = make_engine(database_url, pool_size=1)
    try:
        async with make_sessionmaker(engine, scope=OPERATOR)() as session:
            tenant = (await session.exec(select(Tenant).where(Tenant.email == tenant_email))).first()
            if tenant is None:
                return None
            password = _secret(settings, "tenant")
            user = await auth.create_user(
                session, email=tenant.email, password=password, role=Role.tenant_admin, tenant_id=tenant.id,
                replace=True,
            )  # fmt: skip
            return Login(f"tenant admin of {tenant.name}", user.email, password, "password")
    finally:
        await engine.dispose()


class TokenLogin(httpx.Auth):
    """httpx authentication with a login of ours: fetches an access token from ``/v1/auth/token``
    before the first request and again when a request is answered 401 (the token expired)."""

    requires_response_body = True

    def __init__(self, login: Login) -> None:
        if login.grant == "password":
            self._form = {"grant_type": "password", "username": login.name, "password": login.secret}
        else:
            self._form = {"grant_type": "client_credentials", "client_id": login.name, "client_secret": login.secret}
        self._token: str | None = None

    def _token_request(self, request: httpx.Request) -> httpx.Request:
        return httpx.Request("POST", request.url.copy_with(path="/v1/auth/token", query=None), data=self._form)

    def _take(self, response: httpx.Response) -> str:
        if response.status_code != 200:
            raise RuntimeError(f"login failed: {response.status_code} {response.text[:200]}")
        token: str = response.json()["access_token"]
        return token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        # httpx runs this flow for async clients too, reading each response first (requires_response_body).
        if self._token is None:
            self._token = self._take((yield self._token_request(request)))
        request.headers["Authorization"] = f"Bearer {self._token}"
        response = yield request
        if response.status_code == 401:
            self._token = self._take((yield self._token_request(request)))
            request.headers["Authorization"] = f"Bearer {self._token}"
            yield request


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    assert settings.database_url is not None
    engine = make_engine(settings.database_url, pool_size=1)
    tenant_id = uuid.UUID(args.tenant_id) if args.tenant_id else None
    try:
        async with make_sessionmaker(engine, scope=OPERATOR)() as session:
            if args.command == "create-user":
                generated = not args.password_stdin
                password = secrets.token_urlsafe(18) if generated else sys.stdin.readline().rstrip("\n")
                user = await auth.create_user(
                    session, email=args.email, password=password, role=Role(args.role), tenant_id=tenant_id,
                    replace=args.replace,
                )  # fmt: skip
                print(f"user {user.email} ({user.role.value}) id {user.id}")
                if generated:
                    print(f"password: {password}")
            else:
                client, secret = await auth.create_client(
                    session, client_id=args.client_id, name=args.name, role=Role(args.role), tenant_id=tenant_id,
                    replace=args.replace,
                )  # fmt: skip
                print(f"client {client.client_id} ({client.role.value})")
                print(f"client_secret: {secret}")
    except ServiceError as exc:
        print(f"{exc.field}: {exc.message}" if exc.field else exc.message, file=sys.stderr)
        return 1
    finally:
        await engine.dispose()
    return 0


def main(argv: Sequence[str] | None = None, *, settings: Settings | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.users", description="Create users and service clients.")
    commands = parser.add_subparsers(dest="command", required=True)
    roles = [r.value for r in Role]
    user = commands.add_parser("create-user", help="a person who logs in with email and password")
    user.add_argument("--email", required=True)
    user.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    client = commands.add_parser("create-client", help="a machine caller with client credentials")
    client.add_argument("--client-id", required=True)
    client.add_argument("--name", required=True)
    for sub in (user, client):
        sub.add_argument("--role", required=True, choices=roles)
        sub.add_argument("--tenant-id", help="the tenant of a tenant_admin or tenant_member")
        sub.add_argument("--replace", action="store_true", help="reset an existing account instead of failing")
    args = parser.parse_args(argv)
    settings = settings or get_settings()
    if settings.database_url is None:
        print("DATABASE_URL must be set (the database the API uses)", file=sys.stderr)
        return 2
    if args.tenant_id:
        try:
            uuid.UUID(args.tenant_id)
        except ValueError:
            print("tenant_id: must be a UUID", file=sys.stderr)
            return 1
    return asyncio.run(_run(args, settings))


if __name__ == "__main__":
    sys.exit(main())
