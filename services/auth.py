"""Identity: users and service clients, logins, refresh-token rotation, logout and revocation.

- Passwords and client secrets are argon2id hashes (argon2-cffi's RFC 9106 low-memory profile:
  64 MiB, 3 passes, 4 lanes). A login for an unknown account verifies against a dummy hash of the
  same cost, so it takes as long as a wrong password, and both answer the same 401.
- A password login starts a *family* of refresh tokens (the access tokens' ``sid``). A refresh
  marks the presented token used and issues the next one in the family, under the row's lock; a
  token presented again after it was used (a stolen copy, or the loser of two concurrent
  refreshes) revokes the whole family, and with it every access token whose ``sid`` it is.
- Logout revokes the family. :func:`is_session_revoked` answers for an access token's ``sid``,
  with a per-process :class:`RevocationCache` so not every request reads the database.
- Client-credentials logins get an access token only (no refresh token, no ``sid``).

Refresh tokens are 256-bit random strings; only their sha256 is stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import text, update
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from adapters.signing_keys import KeySet
from core.principal import Role
from core.settings import Settings
from schema.db import execute_sql
from schema.models import RefreshToken, ServiceClient, Tenant, User
from services.errors import Conflict, InvalidInput, NotFound, Unauthenticated, conflict_on_unique
from services.tokens import AccessToken, issue_access_token

PASSWORD_MIN_LENGTH = 12
PASSWORD_MAX_LENGTH = 256  # argon2 hashes any length; a bound keeps a login request cheap to refuse
CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{2,99}")
EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
BAD_LOGIN = "invalid username or password"
BAD_CLIENT = "invalid client credentials"
BAD_REFRESH = "refresh token is invalid, expired or revoked"
REUSED_REFRESH = "refresh token was already used; its session is revoked"

_hasher = PasswordHasher()  # argon2id, RFC 9106 low-memory profile


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    """A hash of the same cost as real ones, verified when the account does not exist."""
    return _hasher.hash(secrets.token_urlsafe(16))


def hash_secret(secret: str) -> str:
    return _hasher.hash(secret)


def _verify(stored: str, secret: str) -> bool:
    try:
        return _hasher.verify(stored, secret)
    except (VerificationError, InvalidHashError):
        return False


async def verify_secret(stored: str | None, secret: str) -> bool:
    """Whether ``secret`` matches ``stored`` (None: an unknown account, checked against the dummy
    hash for the same time, always False). In a thread: argon2 takes tens of milliseconds."""
    ok = await asyncio.to_thread(_verify, stored or _dummy_hash(), secret)
    return ok and stored is not None


def normalize_email(email: str) -> str:
    return email.strip().lower()


def _check_role(role: Role, tenant_id: uuid.UUID | None) -> None:
    if role.tenant_optional:
        return
    if role.is_tenant_role and tenant_id is None:
        raise InvalidInput("tenant_id", f"role {role.value} needs a tenant")
    if not role.is_tenant_role and tenant_id is not None:
        raise InvalidInput("tenant_id", f"role {role.value} belongs to no tenant")


def check_password(password: str) -> None:
    if not PASSWORD_MIN_LENGTH <= len(password) <= PASSWORD_MAX_LENGTH:
        raise InvalidInput("password", f"must be {PASSWORD_MIN_LENGTH} to {PASSWORD_MAX_LENGTH} characters")


async def _check_tenant(session: AsyncSession, tenant_id: uuid.UUID | None) -> None:
    if tenant_id is not None and await session.get(Tenant, tenant_id) is None:
        raise NotFound("tenant_id", f"tenant {tenant_id} not found")


async def create_user(
    session: AsyncSession,
    *,
    email: str,
    password: str,
    role: Role,
    tenant_id: uuid.UUID | None = None,
    replace: bool = False,
) -> User:
    """A user with a hashed password. ``replace``: an existing user of that email gets this
    password, role and tenant (and is enabled again) instead of a 409."""
    address = normalize_email(email)
    if not EMAIL.fullmatch(address) or len(address) > 320:
        raise InvalidInput("email", "must be an email address")
    check_password(password)
    if role.clients_only:
        raise InvalidInput("role", f"role {role.value} is for service clients only")
    _check_role(role, tenant_id)
    await _check_tenant(session, tenant_id)
    password_hash = await asyncio.to_thread(hash_secret, password)
    user = (await session.exec(select(User).where(User.email == address).with_for_update())).first()
    if user is not None and not replace:
        raise Conflict("email", f"a user with email {address} exists")
    if user is None:
        user = User(email=address, password_hash=password_hash, role=role, tenant_id=tenant_id)
    else:
        user.password_hash, user.role, user.tenant_id, user.disabled_at = password_hash, role, tenant_id, None
    session.add(user)
    async with conflict_on_unique(session, "email", f"a user with email {address} exists"):
        await session.commit()
    return user


async def create_client(
    session: AsyncSession,
    *,
    client_id: str,
    name: str,
    role: Role,
    tenant_id: uuid.UUID | None = None,
    secret: str | None = None,
    replace: bool = False,
) -> tuple[ServiceClient, str]:
    """A service client and its secret in clear (generated unless given; shown once, stored hashed).
    ``replace``: an existing client of that id gets this secret, name, role and tenant."""
    if not CLIENT_ID.fullmatch(client_id):
        raise InvalidInput("client_id", "3 to 100 of A-Z a-z 0-9 . _ : - (starting with a letter or digit)")
    if not name.strip() or len(name) > 200:
        raise InvalidInput("name", "must be 1 to 200 characters")
    secret = secret if secret is not None else secrets.token_urlsafe(32)
    if not PASSWORD_MIN_LENGTH <= len(secret) <= PASSWORD_MAX_LENGTH:
        raise InvalidInput("secret", f"must be {PASSWORD_MIN_LENGTH} to {PASSWORD_MAX_LENGTH} characters")
    _check_role(role, tenant_id)
    await _check_tenant(session, tenant_id)
    secret_hash = await asyncio.to_thread(hash_secret, secret)
    query = select(ServiceClient).where(ServiceClient.client_id == client_id).with_for_update()
    client = (await session.exec(query)).first()
    if client is not None and not replace:
        raise Conflict("client_id", f"a client {client_id} exists")
    if client is None:
        client = ServiceClient(client_id=client_id, secret_hash=secret_hash, name=name, role=role, tenant_id=tenant_id)
    else:
        client.secret_hash, client.name, client.role, client.tenant_id = secret_hash, name, role, tenant_id
        client.disabled_at = None
    session.add(client)
    async with conflict_on_unique(session, "client_id", f"a client {client_id} exists"):
        await session.commit()
    return client, secret


@dataclass(frozen=True)
class Tokens:
    access: AccessToken
    refresh_token: str | None  # None for client credentials


def _refresh_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _new_refresh(
    session: AsyncSession,
    settings: Settings,
    family_id: uuid.UUID,
    user_id: uuid.UUID,
    now: datetime,
    parent: uuid.UUID | None,
) -> str:
    token = secrets.token_urlsafe(32)
    session.add(
        RefreshToken(
            family_id=family_id,
            token_hash=_refresh_hash(token),
            subject_kind="user",
            subject_id=user_id,
            parent_id=parent,
            issued_at=now,
            expires_at=now + timedelta(seconds=settings.auth_refresh_ttl),
        )
    )
    return token


def _user_access(keys: KeySet, settings: Settings, user: User, family_id: uuid.UUID, now: datetime) -> AccessToken:
    return issue_access_token(
        keys, settings, subject=str(user.id), kind="user", role=user.role,
        tenant_id=user.tenant_id, session_id=family_id, now=now,
    )  # fmt: skip


async def login_password(
    session: AsyncSession, keys: KeySet, settings: Settings, *, username: str, password: str, now: datetime
) -> Tokens:
    """An access token and the first refresh token of a new family, for a user's email and password."""
    user = (await session.exec(select(User).where(User.email == normalize_email(username)))).first()
    ok = await verify_secret(user.password_hash if user is not None else None, password)
    if user is None or not ok or user.disabled_at is not None:
        raise Unauthenticated(None, BAD_LOGIN, kind="invalid_credentials")
    if _hasher.check_needs_rehash(user.password_hash):  # the cost parameters were raised since
        user.password_hash = await asyncio.to_thread(hash_secret, password)
        session.add(user)
    family_id = uuid.uuid4()
    refresh = _new_refresh(session, settings, family_id, user.id, now, parent=None)
    await session.commit()
    return Tokens(_user_access(keys, settings, user, family_id, now), refresh)


async def login_client(
    session: AsyncSession, keys: KeySet, settings: Settings, *, client_id: str, client_secret: str, now: datetime
) -> Tokens:
    """An access token (no refresh token) for a service client's credentials."""
    client = (await session.exec(select(ServiceClient).where(ServiceClient.client_id == client_id))).first()
    ok = await verify_secret(client.secret_hash if client is not None else None, client_secret)
    if client is None or not ok or client.disabled_at is not None:
        raise Unauthenticated(None, BAD_CLIENT, kind="invalid_client")
    access = issue_access_token(
        keys, settings, subject=client.client_id, kind="client", role=client.role,
        tenant_id=client.tenant_id, session_id=None, now=now,
    )  # fmt: skip
    return Tokens(access, None)


async def revoke_family(session: AsyncSession, family_id: uuid.UUID, now: datetime) -> None:
    """Mark every token of the family revoked (in the caller's transaction)."""
    statement = (
        update(RefreshToken)
        .where(col(RefreshToken.family_id) == family_id, col(RefreshToken.revoked_at).is_(None))
        .values(revoked_at=now)
    )
    await (await session.connection()).execute(statement)


async def refresh_subject(session: AsyncSession, refresh_token: str) -> uuid.UUID | None:
    """Whose refresh token this is (unlocked read; for the per-account rate limit), None if unknown."""
    query = select(RefreshToken.subject_id).where(RefreshToken.token_hash == _refresh_hash(refresh_token))
    return (await session.exec(query)).first()


async def refresh(
    session: AsyncSession, keys: KeySet, settings: Settings, *, refresh_token: str, now: datetime
) -> Tokens:
    """Rotate: the presented token is marked used and the next one of its family issued with a new
    access token. A token already used revokes its family (committed) before the 401."""
    query = select(RefreshToken).where(RefreshToken.token_hash == _refresh_hash(refresh_token))
    row = (await session.exec(query.with_for_update().execution_options(populate_existing=True))).first()
    if row is None or row.revoked_at is not None or row.expires_at <= now:
        raise Unauthenticated("refresh_token", BAD_REFRESH, kind="invalid_grant")
    if row.used_at is not None:
        await revoke_family(session, row.family_id, now)
        await session.commit()
        raise Unauthenticated("refresh_token", REUSED_REFRESH, kind="invalid_grant")
    user = await session.get(User, row.subject_id) if row.subject_kind == "user" else None
    if user is None or user.disabled_at is not None:
        await revoke_family(session, row.family_id, now)
        await session.commit()
        raise Unauthenticated("refresh_token", BAD_REFRESH, kind="invalid_grant")
    row.used_at = now
    session.add(row)
    await session.flush()  # the parent row first: the new token's parent_id refers to it
    token = _new_refresh(session, settings, row.family_id, user.id, now, parent=row.id)
    await session.commit()
    return Tokens(_user_access(keys, settings, user, row.family_id, now), token)


async def logout(session: AsyncSession, *, refresh_token: str, now: datetime) -> None:
    """Revoke the family of ``refresh_token``; an unknown token changes nothing (and says nothing)."""
    query = select(RefreshToken.family_id).where(RefreshToken.token_hash == _refresh_hash(refresh_token))
    family_id = (await session.exec(query)).first()
    if family_id is not None:
        await revoke_family(session, family_id, now)
        await session.commit()


class RevocationCache:
    """Per process: families found revoked (for good) and families found live, trusted for
    ``ttl`` seconds of ``clock`` (monotonic). At most ``max_entries`` of each are kept."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.clock = clock
        self.max_entries = max_entries
        self._live: dict[uuid.UUID, float] = {}
        self._revoked: set[uuid.UUID] = set()

    def lookup(self, session_id: uuid.UUID) -> bool | None:
        """True revoked, False live (checked less than ``ttl`` ago), None: ask the database."""
        if session_id in self._revoked:
            return True
        checked = self._live.get(session_id)
        if checked is not None and self.clock() - checked < self.ttl:
            return False
        return None

    def remember(self, session_id: uuid.UUID, revoked: bool) -> None:
        if revoked:
            if len(self._revoked) >= self.max_entries:
                self._revoked.clear()
            self._revoked.add(session_id)
            self._live.pop(session_id, None)
        else:
            if len(self._live) >= self.max_entries:
                self._live.clear()
            self._live[session_id] = self.clock()


_FAMILY_REVOKED = text("SELECT bool_or(revoked_at IS NOT NULL) FROM refresh_tokens WHERE family_id = :family")


async def is_session_revoked(session: AsyncSession, session_id: uuid.UUID, cache: RevocationCache) -> bool:
    """Whether the login ``session_id`` (an access token's ``sid``) was revoked by logout or by a
    reused refresh token. A family we have no rows of counts as revoked."""
    known = cache.lookup(session_id)
    if known is not None:
        return known
    found = (await execute_sql(session, _FAMILY_REVOKED, {"family": session_id})).scalar()
    revoked = found is None or bool(found)
    cache.remember(session_id, revoked)
    return revoked
