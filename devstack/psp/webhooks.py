"""Signed webhook delivery to one endpoint, with retries and the faults tests ask for.

Each attempt is signed as Stripe signs it: ``Stripe-Signature: t=<unix>,v1=<hex>`` where
``v1`` is the HMAC-SHA256 of ``f"{t}.{payload}"`` under the endpoint's secret, ``t`` the time
of that attempt. A non-2xx answer, a refused connection or a timeout is retried with
exponential backoff (``retry_base`` * 2**n) up to ``max_attempts``; Stripe retries for three
days, the emulator a bounded number of times.

Faults apply to the next events that are to be delivered, in the order they were asked
for: drop, duplicate (several copies), delay (late), stale (signed with an old timestamp),
and hold/release (held events are delivered one after another in reverse or original order:
out of order).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

Obj = dict[str, Any]


def sign(payload: bytes, secret: str, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


@dataclass
class _Faults:
    drop: int = 0
    duplicate: list[int] = field(default_factory=list)
    delay: list[float] = field(default_factory=list)
    stale: list[int] = field(default_factory=list)
    hold: bool = False
    held: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass
class WebhookDispatcher:
    url: str | None = None
    secret: str | None = None
    enabled_events: tuple[str, ...] = ("*",)
    max_attempts: int = 5
    retry_base: float = 1.0
    timeout: float = 10.0
    on_delivered: Callable[[str], None] = lambda _event_id: None

    def __post_init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._payloads: dict[str, bytes] = {}
        self.deliveries: list[Obj] = []
        self.faults = _Faults()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._client = httpx.AsyncClient(timeout=self.timeout)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._client is not None:
            await self._client.aclose()

    def reset(self) -> None:
        self.faults = _Faults()
        self.deliveries.clear()
        self._payloads.clear()

    def configure(self, url: str | None, secret: str | None, enabled_events: tuple[str, ...] | None) -> None:
        self.url, self.secret = url, secret
        if enabled_events is not None:
            self.enabled_events = enabled_events

    # -- EventSink -----------------------------------------------------------------------

    def accepts(self, event_type: str) -> int:
        if not self.url or not self.secret:
            return 0
        return 1 if "*" in self.enabled_events or event_type in self.enabled_events else 0

    def publish(self, event: Obj) -> None:
        if not self.accepts(event["type"]) or self._loop is None:
            return
        payload = json.dumps(event, indent=2).encode()
        self._payloads[event["id"]] = payload
        self._loop.call_soon_threadsafe(self._route, event["id"], payload)

    # -- routing and faults --------------------------------------------------------------

    def _route(self, event_id: str, payload: bytes) -> None:
        faults = self.faults
        if faults.hold:
            faults.held.append((event_id, payload))
            self._log(event_id, 0, "held")
            return
        if faults.drop > 0:
            faults.drop -= 1
            self._log(event_id, 0, "dropped")
            return
        copies = faults.duplicate.pop(0) if faults.duplicate else 1
        delay = faults.delay.pop(0) if faults.delay else 0.0
        stale = faults.stale.pop(0) if faults.stale else 0
        for _ in range(copies):
            self._spawn(self._deliver(event_id, payload, delay, stale))

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def release(self, order: str) -> int:
        """Deliver the held events one after another: ``reverse`` (newest first) or ``original``."""
        held, self.faults.held, self.faults.hold = self.faults.held, [], False
        if order == "reverse":
            held.reverse()

        async def in_sequence() -> None:
            for event_id, payload in held:
                await self._deliver(event_id, payload, 0.0, 0)

        self._spawn(in_sequence())
        return len(held)

    def resend(self, event_id: str) -> bool:
        payload = self._payloads.get(event_id)
        if payload is None:
            return False
        self._spawn(self._deliver(event_id, payload, 0.0, 0))
        return True

    async def flush(self, within: float) -> bool:
        """Wait until no delivery is in flight (True) or ``within`` seconds passed (False)."""
        deadline = time.monotonic() + within
        while self._tasks:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.wait(set(self._tasks), timeout=remaining)
        return True

    # -- delivery ------------------------------------------------------------------------

    async def _deliver(self, event_id: str, payload: bytes, delay: float, stale: int) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        for attempt in range(1, self.max_attempts + 1):
            url, secret = self.url, self.secret
            if not url or not secret or self._client is None:
                self._log(event_id, attempt, "no endpoint")
                return
            timestamp = int(time.time()) - stale
            headers = {
                "Content-Type": "application/json; charset=utf-8",
                "Stripe-Signature": sign(payload, secret, timestamp),
                "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
            }
            try:
                answer = await self._client.post(url, content=payload, headers=headers)
                status: int | None = answer.status_code
                outcome = "delivered" if 200 <= answer.status_code < 300 else "failed"
            except httpx.HTTPError as exc:
                status, outcome = None, f"failed: {type(exc).__name__}"
            self._log(event_id, attempt, outcome, status)
            if outcome == "delivered":
                self.on_delivered(event_id)
                return
            if attempt < self.max_attempts:
                await asyncio.sleep(self.retry_base * 2 ** (attempt - 1))
        self._log(event_id, self.max_attempts, "gave up")

    def _log(self, event_id: str, attempt: int, outcome: str, status: int | None = None) -> None:
        self.deliveries.append(
            {"event": event_id, "attempt": attempt, "outcome": outcome, "status": status, "at": time.time()}
        )
