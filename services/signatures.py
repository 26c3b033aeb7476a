"""HMAC-SHA256 signatures of webhook bodies, in one format for every webhook we send or receive.

The header is ``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">``; several ``v1``
values may be given (a sender signing with two secrets during a rotation). A signature is good
when one ``v1`` matches one of the secrets (compared in constant time) and ``t`` is within the
tolerance of now, either way. Signing the timestamp with the body is what makes a captured
request useless after the tolerance; inside it, the receiver's nonce check refuses a replay.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

SCHEME = "v1"


class SignatureRejected(Exception):
    """Why a signature is refused; ``kind`` is a stable word for the API's error ``type``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class Verified:
    timestamp: int
    signature: str  # the v1 value that matched: a nonce for replay protection


def new_secret() -> str:
    """A fresh shared secret (256 bits, URL-safe)."""
    return "whsec_" + secrets.token_urlsafe(32)


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, at: datetime) -> str:
    """The header value for ``body`` sent at ``at``."""
    timestamp = int(at.timestamp())
    return f"t={timestamp},{SCHEME}={_mac(secret, timestamp, body)}"


def _parse(header: str) -> tuple[int, list[str]]:
    timestamp: int | None = None
    values: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            if not value.isdigit() or len(value) > 12:
                raise SignatureRejected("signature_malformed", "the signature's t= is not a unix time")
            timestamp = int(value)
        elif key == SCHEME:
            values.append(value)
    if timestamp is None or not values:
        raise SignatureRejected("signature_malformed", f"the signature must read t=<unix time>,{SCHEME}=<hex>")
    return timestamp, values


def verify(header: str | None, body: bytes, secrets_: Sequence[str], now: datetime, tolerance: timedelta) -> Verified:
    """The signature of ``body`` checked against ``secrets_``; raises :class:`SignatureRejected`."""
    if not header:
        raise SignatureRejected("signature_missing", "the request is not signed")
    timestamp, values = _parse(header)
    if abs(now.timestamp() - timestamp) > tolerance.total_seconds():
        raise SignatureRejected(
            "signature_stale", f"the signature's time is more than {int(tolerance.total_seconds())} s from now"
        )
    for secret in secrets_:
        expected = _mac(secret, timestamp, body)
        for value in values:
            if hmac.compare_digest(expected, value):
                return Verified(timestamp, value)
    raise SignatureRejected("signature_invalid", "the signature does not match the body")
