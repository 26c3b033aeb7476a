"""Access tokens: short-lived JWTs signed ES256 by the current key, verified in one function.

Header ``{"alg": "ES256", "kid": <key thumbprint>, "typ": "at+jwt"}``; claims ``iss``, ``aud``,
``sub`` (a user's id, a client's client_id), ``kind`` (``user`` | ``client``), ``roles``,
``tenant_id`` (null for operator roles), ``sid`` (the refresh-token family of a user's login; null
for clients), ``iat``, ``exp``, ``jti``.

:func:`verify_access_token` is the only way a token becomes a :class:`~core.principal.Principal`.
It accepts only the algorithm of the key its ``kid`` names, so ``alg: none``, an HMAC algorithm
(say HS256 "signed" with the public key as the secret) or a key we never had are refused before
any signature is checked; then signature, ``aud``, ``iss``, expiry and every claim's shape.
Revocation (``sid``) is checked by the caller with ``services.auth.is_session_revoked``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import jwt

from adapters.signing_keys import KeySet
from core.principal import Principal, PrincipalKind, Role
from core.settings import Settings
from services.errors import InvalidToken

TOKEN_TYPE = "at+jwt"  # noqa: S105 (RFC 9068: an access token, not an ID token or anything else signed by us)
REQUIRED_CLAIMS = ("iss", "aud", "sub", "kind", "roles", "iat", "exp", "jti")
MAX_TOKEN_LENGTH = 8192
CLOCK_SKEW = timedelta(seconds=60)  # an iat this far ahead of our clock is still believed


@dataclass(frozen=True)
class AccessToken:
    token: str
    expires_in: int
    jti: str


def issue_access_token(
    keys: KeySet,
    settings: Settings,
    *,
    subject: str,
    kind: PrincipalKind,
    role: Role,
    tenant_id: uuid.UUID | None,
    session_id: uuid.UUID | None,
    now: datetime,
) -> AccessToken:
    """A token for ``subject`` signed with the current key, valid ``AUTH_ACCESS_TTL`` seconds from ``now``."""
    key = keys.current
    issued = int(now.timestamp())
    jti = uuid.uuid4().hex
    claims: dict[str, Any] = {
        "iss": settings.auth_issuer,
        "aud": settings.auth_audience,
        "sub": subject,
        "kind": kind,
        "roles": [role.value],
        "tenant_id": None if tenant_id is None else str(tenant_id),
        "sid": None if session_id is None else str(session_id),
        "iat": issued,
        "exp": issued + settings.auth_access_ttl,
        "jti": jti,
    }
    token = jwt.encode(claims, key.private_key, algorithm=key.algorithm, headers={"kid": key.kid, "typ": TOKEN_TYPE})
    return AccessToken(token, settings.auth_access_ttl, jti)


def _uuid_claim(claims: dict[str, Any], name: str) -> uuid.UUID | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidToken(f"claim {name} must be a UUID string")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidToken(f"claim {name} must be a UUID string") from None


def verify_access_token(token: str, keys: KeySet, settings: Settings, *, now: datetime) -> Principal:
    """The principal of a valid access token; :class:`~services.errors.InvalidToken` for anything else."""
    if not token or len(token) > MAX_TOKEN_LENGTH:
        raise InvalidToken("malformed token")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise InvalidToken("malformed token") from None
    kid = header.get("kid")
    key = keys.find(kid, now, settings.auth_access_ttl) if isinstance(kid, str) else None
    if key is None:
        raise InvalidToken("unknown signing key")
    if header.get("alg") != key.algorithm:
        raise InvalidToken(f"algorithm not allowed for this key (only {key.algorithm})")
    if header.get("typ") != TOKEN_TYPE:
        raise InvalidToken(f"not an access token (typ must be {TOKEN_TYPE})")
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key.public_key,
            algorithms=[key.algorithm],
            audience=settings.auth_audience,
            issuer=settings.auth_issuer,
            # Times are checked below against our clock (tests drive it); the rest by PyJWT.
            options={"require": list(REQUIRED_CLAIMS), "verify_exp": False, "verify_iat": False, "verify_nbf": False},
        )
    except jwt.InvalidSignatureError:
        raise InvalidToken("bad signature") from None
    except jwt.PyJWTError as exc:
        raise InvalidToken(f"invalid token: {exc}") from None
    exp, iat = claims["exp"], claims["iat"]
    if not isinstance(exp, int) or isinstance(exp, bool) or not isinstance(iat, int) or isinstance(iat, bool):
        raise InvalidToken("claims exp and iat must be integers")
    if now.timestamp() >= exp:
        raise InvalidToken("token expired")
    if iat > (now + CLOCK_SKEW).timestamp() or iat >= exp:
        raise InvalidToken("token issued in the future")
    return _principal(claims)


def _principal(claims: dict[str, Any]) -> Principal:
    subject, kind, roles = claims["sub"], claims["kind"], claims["roles"]
    if not isinstance(subject, str) or not subject:
        raise InvalidToken("claim sub must be a non-empty string")
    if kind not in ("user", "client"):
        raise InvalidToken("claim kind must be user or client")
    known = {r.value for r in Role}
    if not isinstance(roles, list) or not roles or not all(isinstance(r, str) and r in known for r in roles):
        raise InvalidToken("claim roles must list known roles")
    tenant_id = _uuid_claim(claims, "tenant_id")
    session_id = _uuid_claim(claims, "sid")
    optional = all(Role(r).tenant_optional for r in roles)
    if not optional and any(Role(r).is_tenant_role for r in roles) != (tenant_id is not None):
        raise InvalidToken("claim tenant_id must be set exactly for tenant roles")
    if (kind == "user") != (session_id is not None):
        raise InvalidToken("claim sid must be set exactly for users")
    return Principal(subject=subject, kind=kind, roles=frozenset(roles), tenant_id=tenant_id, session_id=session_id)
