"""Signed webhooks out, behind :class:`WebhookSender`: the signature scheme, where we may connect,
and one POST over httpx whose outcome is decided once, here.

The signature (``docs/notices.md`` "Webhooks"): ``Roomly-Signature: t=<unix seconds>,v1=<hex>``
where ``<hex>`` is HMAC-SHA256, keyed with the secret's UTF-8 bytes, of ``"<t>."`` followed by the
raw body. :func:`signature_header` makes it, :func:`verify_signature` checks it (receivers, and
signed webhooks we receive, use it).

Where we may connect: a URL's host is resolved here, every address it resolves to must be public
(:func:`is_public_address`) unless private addresses are allowed (local and test), and the request
goes to the address that was checked (the ``Host`` header and TLS server name stay the URL's
host), so a name that resolves elsewhere a moment later cannot redirect it (DNS rebinding).

Outcomes: a 2xx is delivered. :class:`WebhookRejected` (refused for good, sending again would be
refused again): a 4xx other than 408 and 429, a redirect (never followed: it could lead anywhere),
a destination that is not a public address. :class:`WebhookTransient` (worth retrying): a 5xx, 408,
429, a timeout (the whole delivery, resolution included, is bounded by ``timeout``), a connection
or name-resolution error.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import secrets
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

import httpx

from core.settings import Environment, Settings

SIGNATURE_HEADER = "Roomly-Signature"
ID_HEADER = "Roomly-Notice-Id"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_SECONDS = 300
SECRET_PREFIX = "roomly_whsec_"  # noqa: S105 (a prefix, not a secret)
USER_AGENT = "Roomly-Billing-Webhooks/1"
_RETRYABLE_4XX = (408, 429)
_ERROR_BODY_BYTES = 200  # how much of a refusal's body is kept in the error

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# --- the signature ------------------------------------------------------------------------------


class SignatureError(ValueError):
    """The signature header is missing, malformed, too old or too new, or signs something else;
    ``kind`` says which (``signature_missing``, ``signature_malformed``, ``signature_stale``,
    ``signature_invalid``), for an API's error ``type``."""

    def __init__(self, message: str, kind: str = "signature_invalid") -> None:
        super().__init__(message)
        self.kind = kind


def new_signing_secret() -> str:
    """A fresh shared secret: 32 random bytes, URL-safe, with a prefix that says what it is."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def _digest(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signature_header(secret: str, body: bytes, timestamp: int) -> str:
    """The ``Roomly-Signature`` value signing ``body`` at ``timestamp`` (unix seconds)."""
    return f"t={timestamp},{SIGNATURE_VERSION}={_digest(secret, timestamp, body)}"


def check_signature(
    header: str | None, body: bytes, keys: Sequence[str], now: float, tolerance: float = DEFAULT_TOLERANCE_SECONDS
) -> tuple[int, str]:
    """Check that ``header`` (a ``Roomly-Signature`` value) signs exactly ``body`` with one of
    ``keys`` (a secret and, during a rotation, the one before), made no more than ``tolerance``
    seconds before or after ``now`` (unix seconds); its timestamp and the ``v1`` value that
    matched (a receiver's nonce against replays).

    Raises :class:`SignatureError`. Several ``v1`` entries may be given: one matching is enough.
    Compared in constant time; nothing of the body is looked at before this returns.
    """
    if not header:
        raise SignatureError("no signature header", "signature_missing")
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            raise SignatureError("malformed signature header", "signature_malformed")
        if name == "t":
            if not value.isascii() or not value.isdigit() or len(value) > 12:
                raise SignatureError("malformed timestamp", "signature_malformed")
            timestamp = int(value)
        elif name == SIGNATURE_VERSION:
            signatures.append(value)
    if timestamp is None or not signatures:
        raise SignatureError(f"the header needs t= and {SIGNATURE_VERSION}=", "signature_malformed")
    if abs(now - timestamp) > tolerance:
        raise SignatureError(f"timestamp {timestamp} is outside the tolerance of {tolerance:g} s", "signature_stale")
    for key in keys:
        expected = _digest(key, timestamp, body)
        for given in signatures:
            if hmac.compare_digest(expected, given):
                return timestamp, given
    raise SignatureError("no signature matches the body", "signature_invalid")


def verify_signature(
    secret: str, header: str | None, body: bytes, now: float, tolerance: int = DEFAULT_TOLERANCE_SECONDS
) -> int:
    """:func:`check_signature` with one secret; the signature's timestamp."""
    return check_signature(header, body, [secret], now, tolerance)[0]


# --- where we may connect -----------------------------------------------------------------------


def is_public_address(address: IpAddress) -> bool:
    """Globally routable unicast: not loopback, private, link-local, shared, reserved or multicast
    (an IPv4-mapped IPv6 address is judged as the IPv4 address it maps)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


async def resolve(host: str, port: int) -> list[IpAddress]:
    """Every address ``host`` resolves to (an IP literal: itself); ``OSError`` if it resolves to none."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    if not addresses:
        raise OSError(f"{host} resolves to no address")
    return addresses


# --- delivery -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutgoingWebhook:
    url: str
    secret: str
    body: bytes  # JSON, sent as is and signed as is
    idempotency_key: str  # Roomly-Notice-Id: the same on every delivery of one notice


class WebhookError(Exception):
    """Delivering failed; the message says why."""


class WebhookTransient(WebhookError):
    """Worth retrying: a 5xx, 408, 429, a timeout, the receiver or its name unreachable."""


class WebhookRejected(WebhookError):
    """Refused for good: a 4xx other than 408/429, a redirect, a destination that is not allowed."""


class WebhookSender(Protocol):
    async def deliver(self, hook: OutgoingWebhook) -> int:
        """POST ``hook``, signed; the receiver's 2xx status once it accepted it."""
        ...


class HttpWebhookSender:
    """One signed POST per delivery over httpx, to the address that was checked."""

    def __init__(
        self,
        *,
        timeout: float,
        allow_private: bool,
        verify: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._timeout = timeout
        self._allow_private = allow_private
        self._verify = verify if verify is not None else ssl.create_default_context()
        self._clock = clock

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpWebhookSender:
        return cls(
            timeout=settings.notice_webhook_timeout,
            allow_private=settings.environment is not Environment.production,
        )

    async def _address(self, host: str, port: int) -> IpAddress:
        """The address to connect to: every address ``host`` resolves to is checked."""
        addresses = await resolve(host, port)
        if not self._allow_private:
            forbidden = [str(a) for a in addresses if not is_public_address(a)]
            if forbidden:
                raise WebhookRejected(f"{host} resolves to an address that is not public: {', '.join(forbidden)}")
        return addresses[0]

    async def _post(self, hook: OutgoingWebhook) -> int:
        parts = urlsplit(hook.url)
        try:
            given_port = parts.port
        except ValueError:
            given_port = -1
        if parts.scheme not in ("http", "https") or not parts.hostname or given_port == -1:
            raise WebhookRejected(f"not an http(s) URL with a host: {hook.url}")
        port = given_port or (443 if parts.scheme == "https" else 80)
        address = await self._address(parts.hostname, port)
        pinned = f"[{address}]" if address.version == 6 else str(address)
        target = urlunsplit((parts.scheme, f"{pinned}:{port}", parts.path or "/", parts.query, ""))
        host_header = parts.netloc.rpartition("@")[2]
        extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
        timestamp = int(self._clock())
        headers = {
            "Host": host_header,
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            SIGNATURE_HEADER: signature_header(hook.secret, hook.body, timestamp),
            ID_HEADER: hook.idempotency_key,
        }
        async with (
            httpx.AsyncClient(timeout=self._timeout, verify=self._verify, follow_redirects=False) as client,
            client.stream("POST", target, content=hook.body, headers=headers, extensions=extensions) as response,
        ):
            status = response.status_code
            if 200 <= status < 300:
                return status
            said = b""
            async for chunk in response.aiter_raw():
                said += chunk
                if len(said) >= _ERROR_BODY_BYTES:
                    break
        text = said[:_ERROR_BODY_BYTES].decode("utf-8", "replace")
        refusal = f"{hook.url} answered {status}: {text}".strip()
        if 300 <= status < 400:
            raise WebhookRejected(f"{refusal} (redirects are not followed: set the final URL)")
        if 400 <= status < 500 and status not in _RETRYABLE_4XX:
            raise WebhookRejected(refusal)
        raise WebhookTransient(refusal)

    async def deliver(self, hook: OutgoingWebhook) -> int:
        try:
            async with asyncio.timeout(self._timeout):
                return await self._post(hook)
        except WebhookError:
            raise
        except TimeoutError as err:
            raise WebhookTransient(f"{hook.url}: no answer within {self._timeout:g} s") from err
        except (httpx.HTTPError, OSError) as err:  # refused, reset, name not resolved, TLS failed
            raise WebhookTransient(f"{hook.url}: {type(err).__name__}: {err}") from err
