"""``Idempotency-Key`` on every POST: a retried request is answered with the first response.

- The first request with a key runs and its response (status, body, content type, location)
  is stored; the same key with the same request (method, path, query, body) within
  ``IDEMPOTENCY_TTL`` gets that response again, marked ``Idempotent-Replayed: true``.
- The same key with another request: 422 naming the header; the first response stays.
- Two requests with one key at once: the second waits for the first and replays it, so the
  work is done once (409 if the first is still running after ``WAIT``).
- A 5xx is not stored: the request may be retried with the same key and runs again. A record
  whose request never finished (its process died) is taken over after ``LEASE``.
- Keys are scoped by the caller's credentials (a hash of the Authorization header), so two
  callers never share a key. A POST without the header is not affected.
- PSP webhooks (``/v1/webhooks/``) are not handled here: each event is stored once by its own
  id (``services/psp_events.py``), whatever headers come with it. Nor are the token routes
  (``/v1/auth/``): their responses hold credentials, which are never stored.
- The records are read and written in the caller's own scope (``schema.scope.caller_scope``): the
  row-level security policy of ``idempotency_records`` shows a transaction only the records of the
  credentials hash it set, so no request (nor a hand-written query in one) reads another caller's
  stored responses.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from datetime import timedelta
from typing import Any

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ErrorItem, error_json
from schema.db import execute_sql
from schema.scope import caller_scope

HEADER = "idempotency-key"
REPLAYED_HEADER = "idempotent-replayed"
IDEMPOTENCY_TTL = timedelta(hours=24)
LEASE = timedelta(seconds=60)
WAIT = timedelta(seconds=10)
_KEY = re.compile(r"[\x21-\x7e]{1,255}")  # printable ASCII, no spaces
_KEPT_HEADERS = ("content-type", "location")
_EXEMPT_PREFIXES = ("/v1/webhooks/", "/v1/auth/")  # deduplicated by event id; tokens are never stored

log = structlog.stdlib.get_logger("api")

# Claim the key: a new record, or one expired or abandoned (taken over). Returns a row only if claimed.
_CLAIM = text(
    """
    INSERT INTO idempotency_records (id, scope, key, fingerprint, method, path, created_at, locked_at)
    VALUES (gen_random_uuid(), :scope, :key, :fingerprint, :method, :path, now(), now())
    ON CONFLICT (scope, key) DO UPDATE
       SET fingerprint = EXCLUDED.fingerprint, method = EXCLUDED.method, path = EXCLUDED.path,
           response_status = NULL, response_headers = NULL, response_body = NULL,
           created_at = now(), locked_at = now()
     WHERE idempotency_records.created_at < now() - CAST(:ttl AS interval)
        OR (idempotency_records.response_status IS NULL
            AND idempotency_records.locked_at < now() - CAST(:lease AS interval))
    RETURNING id
    """
)
_EXISTING = text(
    "SELECT fingerprint, method, path, response_status, response_headers, response_body"
    " FROM idempotency_records WHERE scope = :scope AND key = :key"
)
_STORE = text(
    "UPDATE idempotency_records SET response_status = :status, response_headers = CAST(:headers AS jsonb),"
    " response_body = :body WHERE id = :id"
)
_RELEASE = text("DELETE FROM idempotency_records WHERE id = :id")


class IdempotencyMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].startswith(_EXEMPT_PREFIXES):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        key = headers.get(HEADER)
        if key is None:
            await self.app(scope, receive, send)
            return
        if not _KEY.fullmatch(key):
            await _json(send, 422, _header_error("must be 1 to 255 printable ASCII characters without spaces"))
            return
        body = await _read_body(receive)
        caller = hashlib.sha256(headers.get("authorization", "").encode()).hexdigest()
        query = scope.get("query_string", b"")
        fingerprint = _fingerprint(scope["path"], query, headers.get("content-type", ""), body)
        sessions: async_sessionmaker[AsyncSession] = scope["app"].state.sessionmaker
        params = {"scope": caller, "key": key, "fingerprint": fingerprint, "method": "POST", "path": scope["path"]}

        deadline = asyncio.get_running_loop().time() + WAIT.total_seconds()
        while True:
            with caller_scope(caller):
                async with sessions() as session:
                    claimed = await execute_sql(session, _CLAIM, {**params, "ttl": IDEMPOTENCY_TTL, "lease": LEASE})
                    record_id = claimed.scalar_one_or_none()
                    existing = None if record_id else (await execute_sql(session, _EXISTING, params)).first()
                    await session.commit()
            if record_id is not None:
                await self._first(scope, body, send, sessions, record_id, caller)
                return
            if existing is None:  # released between the two statements (its request failed): try again
                continue
            if existing.fingerprint != fingerprint:
                await _json(
                    send, 422, _header_error(f"was used for another request ({existing.method} {existing.path})")
                )
                return
            if existing.response_status is not None:
                await _replay(send, existing.response_status, existing.response_headers or {}, existing.response_body)
                return
            if asyncio.get_running_loop().time() > deadline:
                await _json(send, 409, _header_error("a request with this key is still in progress", "conflict"))
                return
            await asyncio.sleep(0.05)

    async def _first(
        self,
        scope: Scope,
        body: bytes,
        send: Send,
        sessions: async_sessionmaker[AsyncSession],
        record_id: Any,
        caller: str,
    ) -> None:
        """Run the request and keep its response (unless a 5xx, or it failed: then release the key)."""
        start: Message = {}
        chunks: list[bytes] = []

        async def replay_body() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
            await send(message)

        status = 500
        try:
            await self.app(scope, replay_body, capture)
            status = start.get("status", 500)
        finally:
            with caller_scope(caller):
                async with sessions() as session:
                    if status >= 500:
                        await execute_sql(session, _RELEASE, {"id": record_id})
                    else:
                        kept = {
                            name.decode("latin-1"): value.decode("latin-1")
                            for name, value in start.get("headers", [])
                            if name.decode("latin-1").lower() in _KEPT_HEADERS
                        }
                        kept_body = b"".join(chunks)
                        stored = {"id": record_id, "status": status, "headers": json.dumps(kept), "body": kept_body}
                        await execute_sql(session, _STORE, stored)
                    await session.commit()


def _fingerprint(path: str, query: bytes, content_type: str, body: bytes) -> str:
    """What makes two requests "the same": method, path, query and body. A multipart body is
    compared without its boundary, which a client draws anew for every send of the same upload."""
    media, _, params = content_type.partition(";")
    if media.strip().lower() == "multipart/form-data":
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.lower() == "boundary" and value.strip('"'):
                body = body.replace(value.strip('"').encode("latin-1"), b"BOUNDARY")
    return hashlib.sha256(b"\n".join([b"POST", path.encode(), query, body])).hexdigest()


def _header_error(message: str, kind: str = "idempotency_key") -> dict[str, Any]:
    return error_json([ErrorItem(type=kind, message=message, field="Idempotency-Key", in_="header")])


async def _read_body(receive: Receive) -> bytes:
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(parts)


async def _json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await _replay(send, status, {"content-type": "application/json"}, body, replayed=False)


async def _replay(
    send: Send, status: int, headers: dict[str, str], body: bytes | None, *, replayed: bool = True
) -> None:
    raw = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
    raw.append((b"content-length", str(len(body or b"")).encode()))
    if replayed:
        raw.append((REPLAYED_HEADER.encode(), b"true"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body or b""})
