"""The emulator's HTTP face: Stripe's ``/v1`` subset and the ``/_emulator`` test knobs.

Every ``/v1`` request goes through one pipeline: Bearer auth (any ``sk_test_`` key), form
decoding, an injected failure if one is armed, the idempotency check (keys are scoped to the
API key; same key and same parameters replay the first answer byte for byte with
``Idempotent-Replayed: true``; other parameters get 400 ``idempotency_error``), the handler,
and Stripe's headers (``Request-Id``, ``Stripe-Version`` echoed, ``Idempotency-Key``).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from devstack.psp import forms
from devstack.psp.errors import StripeError, invalid
from devstack.psp.forms import Params
from devstack.psp.state import API_VERSION, EVENT_TYPES, Context, EmulatorState, Obj, Saved, new_id
from devstack.psp.webhooks import WebhookDispatcher

LIST_PARAMS = {"limit", "starting_after", "ending_before", "expand"}

Handler = Callable[[EmulatorState, re.Match[str], Params, Context], Obj]


def _retrieve(getter: Callable[[EmulatorState, str], Obj]) -> Handler:
    def handler(state: EmulatorState, match: re.Match[str], params: Params, ctx: Context) -> Obj:
        forms.check_known(params, {"expand"})
        return getter(state, match.group(1))

    return handler


def _listing(kind: str, url: str, filters: dict[str, str]) -> Handler:
    """A list endpoint whose query ``filters`` (param -> field) must equal the object's field."""

    def handler(state: EmulatorState, match: re.Match[str], params: Params, ctx: Context) -> Obj:
        forms.check_known(params, LIST_PARAMS | set(filters))
        wanted = {name: forms.optional_str(params, p) for p, name in filters.items()}
        wanted = {k: v for k, v in wanted.items() if v is not None}
        return state.list_objects(kind, url, params, lambda o: all(o.get(k) == v for k, v in wanted.items()))

    return handler


def _customer_payment_methods(state: EmulatorState, match: re.Match[str], params: Params, ctx: Context) -> Obj:
    forms.check_known(params, LIST_PARAMS | {"type"})
    customer = state.get_customer(match.group(1))["id"]
    return state.list_objects(
        "payment_method", f"/v1/customers/{customer}/payment_methods", params, lambda o: o["customer"] == customer
    )


def _balance(state: EmulatorState, match: re.Match[str], params: Params, ctx: Context) -> Obj:
    forms.check_known(params, {"expand"})
    return state.balance()


ROUTES: list[tuple[str, re.Pattern[str], Handler]] = [
    (m, re.compile(p), h)
    for m, p, h in [
        ("POST", r"/v1/customers", lambda s, m, p, c: s.create_customer(p, c)),
        ("GET", r"/v1/customers", _listing("customer", "/v1/customers", {"email": "email"})),
        ("GET", r"/v1/customers/(cus_\w+)/payment_methods", _customer_payment_methods),
        ("GET", r"/v1/customers/([^/]+)", _retrieve(EmulatorState.get_customer)),
        ("POST", r"/v1/customers/([^/]+)", lambda s, m, p, c: s.update_customer(m.group(1), p, c)),
        ("POST", r"/v1/payment_methods/([^/]+)/attach", lambda s, m, p, c: s.attach_payment_method(m.group(1), p, c)),
        ("POST", r"/v1/payment_methods/([^/]+)/detach", lambda s, m, p, c: s.detach_payment_method(m.group(1), p, c)),
        (
            "GET",
            r"/v1/payment_methods",
            _listing("payment_method", "/v1/payment_methods", {"customer": "customer", "type": "type"}),
        ),
        ("GET", r"/v1/payment_methods/([^/]+)", _retrieve(EmulatorState.get_payment_method)),
        ("POST", r"/v1/payment_intents", lambda s, m, p, c: s.create_payment_intent(p, c)),
        (
            "GET",
            r"/v1/payment_intents",
            _listing("payment_intent", "/v1/payment_intents", {"customer": "customer"}),
        ),
        ("GET", r"/v1/payment_intents/search", lambda s, m, p, c: s.search_payment_intents(p)),
        ("GET", r"/v1/payment_intents/([^/]+)", _retrieve(EmulatorState.get_payment_intent)),
        ("POST", r"/v1/payment_intents/([^/]+)/confirm", lambda s, m, p, c: s.confirm_payment_intent(m.group(1), p, c)),
        ("POST", r"/v1/payment_intents/([^/]+)/cancel", lambda s, m, p, c: s.cancel_payment_intent(m.group(1), p, c)),
        (
            "GET",
            r"/v1/charges",
            _listing("charge", "/v1/charges", {"customer": "customer", "payment_intent": "payment_intent"}),
        ),
        ("GET", r"/v1/charges/([^/]+)", _retrieve(EmulatorState.get_charge)),
        ("POST", r"/v1/refunds", lambda s, m, p, c: s.create_refund(p, c)),
        (
            "GET",
            r"/v1/refunds",
            _listing("refund", "/v1/refunds", {"charge": "charge", "payment_intent": "payment_intent"}),
        ),
        ("GET", r"/v1/refunds/([^/]+)", _retrieve(EmulatorState.get_refund)),
        ("GET", r"/v1/balance", _balance),
        ("GET", r"/v1/balance_transactions", lambda s, m, p, c: s.list_balance_transactions(p)),
        ("GET", r"/v1/balance_transactions/([^/]+)", _retrieve(EmulatorState.get_balance_transaction)),
        ("GET", r"/v1/payouts", _listing("payout", "/v1/payouts", {"status": "status"})),
        ("GET", r"/v1/payouts/([^/]+)", _retrieve(EmulatorState.get_payout)),
        ("GET", r"/v1/events", _listing("event", "/v1/events", {"type": "type"})),
        ("GET", r"/v1/events/([^/]+)", _retrieve(lambda s, i: s._get("event", i, "event", "id"))),
    ]
]


@dataclass
class Failure:
    """An armed fault for the next ``count`` matching ``/v1`` calls.

    ``mode`` is ``"500"`` (answer 500 ``api_error``) or ``"timeout"`` (hold the answer for
    ``seconds``, longer than the client waits). ``when="before"``: the call is not executed
    (a 500) or executed only after the wait (a timeout); ``when="after"``: the call is
    executed and its idempotent result saved, then the answer is lost.
    """

    mode: str
    count: int
    when: str = "before"
    seconds: float = 5.0
    method: str | None = None
    path: str | None = None

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (self.path is None or path.startswith(self.path))


@dataclass
class Emulator:
    state: EmulatorState
    webhooks: WebhookDispatcher
    failures: list[Failure] = field(default_factory=list)

    def take_failure(self, method: str, path: str) -> Failure | None:
        for failure in self.failures:
            if failure.count > 0 and failure.matches(method, path):
                failure.count -= 1
                self.state.counters.injected_failures += 1
                return failure
        return None


def _json(body: Obj) -> bytes:
    return json.dumps(body, indent=2).encode()


def _auth_error(header: str | None) -> StripeError | None:
    if not header:
        return StripeError(
            401,
            "invalid_request_error",
            "You did not provide an API key. You need to provide your API key in the Authorization header, "
            "using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY').",
        )
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.startswith("sk_test_"):
        shown = f"{key[:8]}{'*' * 12}{key[-4:]}" if len(key) > 12 else key
        return StripeError(401, "invalid_request_error", f"Invalid API Key provided: {shown}", code="api_key_invalid")
    return None


async def api(request: Request) -> Response:
    emulator: Emulator = request.app.state.emulator
    state = emulator.state
    request_id = new_id("req")
    method, path = request.method, request.url.path
    headers = {"Request-Id": request_id, "Stripe-Version": request.headers.get("stripe-version") or API_VERSION}

    def answer(status: int, body: bytes, extra: dict[str, str] | None = None) -> Response:
        return Response(body, status, {**headers, **(extra or {})}, media_type="application/json")

    denied = _auth_error(request.headers.get("authorization"))
    if denied is not None:
        return answer(401, _json(denied.body()), {"WWW-Authenticate": 'Bearer realm="Stripe"'})
    api_key = request.headers["authorization"].partition(" ")[2]
    raw = (await request.body()).decode() if method == "POST" else request.url.query
    key = request.headers.get("idempotency-key") if method == "POST" else None
    if key is not None:
        headers["Idempotency-Key"] = key

    failure = emulator.take_failure(method, path)
    if failure is not None and failure.when == "before":
        if failure.mode == "500":
            return answer(500, _json(_api_error()))
        await asyncio.sleep(failure.seconds)

    status, body, extra = _execute(state, method, path, raw, api_key, key, request_id)

    if failure is not None and failure.when == "after":
        if failure.mode == "500":
            return answer(500, _json(_api_error()))
        await asyncio.sleep(failure.seconds)
    return answer(status, body, extra)


def _api_error() -> Obj:
    return StripeError(500, "api_error", "An unknown error occurred (injected by the PSP emulator).").body()


def _execute(
    state: EmulatorState, method: str, path: str, raw: str, api_key: str, key: str | None, request_id: str
) -> tuple[int, bytes, dict[str, str]]:
    """Decode, check the idempotency key, run the handler and save its answer; atomic under the lock."""
    with state.lock:
        state.counters.requests += 1
        try:
            params = forms.decode(raw)
        except StripeError as bad_form:
            return bad_form.status, _json(bad_form.body()), {}
        fingerprint = (method, path, json.dumps(params, sort_keys=True))
        if key is not None:
            saved = state.idempotency.get((api_key, key))
            if saved is not None:
                if saved.fingerprint != fingerprint:
                    mismatch = StripeError(
                        400,
                        "idempotency_error",
                        "Keys for idempotent requests can only be used with the same parameters they were first "
                        f"used with. Try using a key other than '{key}' if you meant to execute a different request.",
                    )
                    return 400, _json(mismatch.body()), {}
                state.counters.idempotent_replays += 1
                return saved.status, saved.body, {"Idempotent-Replayed": "true", "Original-Request": saved.request_id}
        ctx = Context(request_id=request_id, idempotency_key=key)
        try:
            status, body = 200, _json(_dispatch(state, method, path, params, ctx))
        except StripeError as error:
            status, body = error.status, _json(error.body())
            if error.validation:
                return status, body, {}
        if key is not None:
            state.idempotency[(api_key, key)] = Saved(fingerprint, status, body, request_id)
        return status, body, {}


def _dispatch(state: EmulatorState, method: str, path: str, params: Params, ctx: Context) -> Obj:
    for route_method, pattern, handler in ROUTES:
        match = pattern.fullmatch(path)
        if match is not None and route_method == method:
            obj = handler(state, match, params, ctx)
            return state.render(obj, forms.expand_paths(params))
    raise StripeError(
        404,
        "invalid_request_error",
        f"Unrecognized request URL ({method}: {path}). The PSP emulator serves a subset of Stripe's API; "
        "see docs/psp-emulator.md.",
        validation=True,
    )


# -- test knobs (JSON, no auth: a local development tool) ------------------------------------


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    data = json.loads(raw) if raw else {}
    if not isinstance(data, dict):
        raise invalid("The knob expects a JSON object.")
    return data


def _emulator(request: Request) -> Emulator:
    emulator: Emulator = request.app.state.emulator
    return emulator


ACCOUNT_KNOBS = {"reset", "failures", "payouts", "settle"}
WEBHOOK_KNOBS = {"endpoint", "drop", "duplicate", "delay", "stale", "hold", "release", "flush"}


async def knob(request: Request) -> Response:
    emulator = _emulator(request)
    state, hooks = emulator.state, emulator.webhooks
    name = request.path_params["name"]
    webhook_knob = request.url.path.startswith("/_emulator/webhooks/")
    if name not in (WEBHOOK_KNOBS if webhook_knob else ACCOUNT_KNOBS):
        return JSONResponse({"error": f"no knob {request.url.path}"}, 404)
    try:
        data = await _body(request)
    except (ValueError, StripeError):
        return JSONResponse({"error": "expected a JSON object"}, 400)
    count = int(data.get("count", 1))
    result: Obj
    if name == "reset":
        state.reset()
        hooks.reset()
        emulator.failures.clear()
        result = {"reset": True}
    elif name == "failures":
        mode = str(data.get("mode", "500"))
        when = str(data.get("when", "before"))
        if mode not in ("500", "timeout") or when not in ("before", "after"):
            return JSONResponse({"error": "mode is 500 or timeout; when is before or after"}, 400)
        failure = Failure(mode, count, when, float(data.get("seconds", 5.0)), data.get("method"), data.get("path"))
        emulator.failures.append(failure)
        result = {"armed": failure.__dict__}
    elif name == "payouts":
        result = {"payouts": state.automatic_payouts()}
    elif name == "settle":
        result = {"settled": state.settle()}
    elif name == "endpoint":
        events = data.get("enabled_events")
        hooks.configure(data.get("url"), data.get("secret"), tuple(events) if events else None)
        result = {"url": hooks.url, "enabled_events": list(hooks.enabled_events)}
    elif name == "drop":
        hooks.faults.drop += count
        result = {"drop": hooks.faults.drop}
    elif name == "duplicate":
        hooks.faults.duplicate.extend([int(data.get("copies", 2))] * count)
        result = {"duplicate": hooks.faults.duplicate}
    elif name == "delay":
        hooks.faults.delay.extend([float(data.get("seconds", 1.0))] * count)
        result = {"delay": hooks.faults.delay}
    elif name == "stale":
        hooks.faults.stale.extend([int(data.get("seconds", 600))] * count)
        result = {"stale": hooks.faults.stale}
    elif name == "hold":
        hooks.faults.hold = True
        result = {"holding": True}
    elif name == "release":
        order = str(data.get("order", "reverse"))
        if order not in ("reverse", "original"):
            return JSONResponse({"error": "order is reverse or original"}, 400)
        result = {"released": hooks.release(order)}
    elif name == "flush":
        result = {"idle": await hooks.flush(float(data.get("within", 10.0)))}
    else:
        return JSONResponse({"error": f"no knob {name}"}, 404)
    return JSONResponse(result)


async def resend(request: Request) -> Response:
    found = _emulator(request).webhooks.resend(request.path_params["event"])
    return JSONResponse({"resent": found}, 200 if found else 404)


async def stats(request: Request) -> Response:
    return JSONResponse(_emulator(request).state.counts())


async def charge_count(request: Request) -> Response:
    query = dict(request.query_params)
    status = query.pop("status", None)
    return JSONResponse({"count": _emulator(request).state.count_charges(status, query)})


async def deliveries(request: Request) -> Response:
    hooks = _emulator(request).webhooks
    return JSONResponse({"deliveries": hooks.deliveries, "held": len(hooks.faults.held)})


async def health(request: Request) -> Response:
    return JSONResponse({"ok": True, "api_version": API_VERSION})


def create_app(
    state: EmulatorState | None = None,
    *,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
    enabled_events: tuple[str, ...] = ("*",),
    max_attempts: int = 5,
    retry_base: float = 1.0,
    delivery_timeout: float = 10.0,
) -> Starlette:
    """The emulator as an ASGI app; serve it with uvicorn (see ``devstack/psp/__main__.py``)."""
    unknown = set(enabled_events) - {"*", *EVENT_TYPES}
    if unknown:
        raise ValueError(f"unknown event types {sorted(unknown)}; the emulator emits {EVENT_TYPES}")
    state = state or EmulatorState()
    webhooks = WebhookDispatcher(
        webhook_url,
        webhook_secret,
        enabled_events,
        max_attempts=max_attempts,
        retry_base=retry_base,
        timeout=delivery_timeout,
        on_delivered=state.webhook_delivered,
    )
    state.sink = webhooks

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await webhooks.start()
        try:
            yield
        finally:
            await webhooks.stop()

    app = Starlette(
        routes=[
            Route("/_emulator/health", health, methods=["GET"]),
            Route("/_emulator/stats", stats, methods=["GET"]),
            Route("/_emulator/charges/count", charge_count, methods=["GET"]),
            Route("/_emulator/webhooks/deliveries", deliveries, methods=["GET"]),
            Route("/_emulator/events/{event}/resend", resend, methods=["POST"]),
            Route("/_emulator/webhooks/{name}", knob, methods=["POST"]),
            Route("/_emulator/{name}", knob, methods=["POST"]),
            Route("/v1/{rest:path}", api, methods=["GET", "POST", "DELETE"]),
        ],
        lifespan=lifespan,
    )
    app.state.emulator = Emulator(state, webhooks)
    return app
