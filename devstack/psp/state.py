"""The emulator's account: objects in memory, Stripe's state machines over them, and its events.

Everything here is synchronous and runs under one lock, so a request's check-then-change
(an idempotency lookup, a refund against the unrefunded amount) is atomic even when
requests arrive together. Objects are stored in Stripe's JSON shapes (the fields of
``stripe/openapi``'s ``fixtures3.json`` that this subset fills); responses and event
payloads are deep copies taken at the moment they are produced.
"""

from __future__ import annotations

import copy
import re
import secrets
import string
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

from billing.money import round_minor
from devstack.psp import forms
from devstack.psp.errors import StripeError, invalid, resource_missing
from devstack.psp.forms import Params

API_VERSION = "2026-10-28.endive"
"""The version the pinned SDK (stripe 16.1.0) sends; events carry it."""

FEE_PERCENT = Decimal("0.029")
FEE_FIXED = 30
MINIMUM_CHARGE = 50
ZERO_DECIMAL = {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof"}

Obj = dict[str, Any]


@dataclass(frozen=True)
class TestCard:
    brand: str
    last4: str
    attachable: bool = True
    code: str | None = None
    decline_code: str | None = None
    message: str | None = None
    funding: str = "credit"


GENERIC = "Your card was declined."
TEST_CARDS: dict[str, TestCard] = {
    "pm_card_visa": TestCard("visa", "4242"),
    "pm_card_visa_debit": TestCard("visa", "5556", funding="debit"),
    "pm_card_mastercard": TestCard("mastercard", "4444"),
    # Stripe refuses to attach the cards that decline; they decline when charged directly.
    "pm_card_chargeDeclined": TestCard("visa", "0002", False, "card_declined", "generic_decline", GENERIC),
    "pm_card_chargeDeclinedInsufficientFunds": TestCard(
        "visa", "9995", False, "card_declined", "insufficient_funds", "Your card has insufficient funds."
    ),
    "pm_card_chargeDeclinedLostCard": TestCard("visa", "9987", False, "card_declined", "lost_card", GENERIC),
    "pm_card_chargeDeclinedExpiredCard": TestCard(
        "visa", "0069", False, "expired_card", "expired_card", "Your card has expired."
    ),
    # Attaches to a customer, then every charge declines: a saved card that stops working.
    "pm_card_chargeCustomerFail": TestCard("visa", "0341", True, "card_declined", "generic_decline", GENERIC),
}

EVENT_TYPES = (
    "payment_intent.created",
    "payment_intent.succeeded",
    "payment_intent.payment_failed",
    "payment_intent.canceled",
    "charge.succeeded",
    "charge.failed",
    "charge.refunded",
    "refund.created",
    "payout.created",
    "payout.paid",
)

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str) -> str:
    return f"{prefix}_{''.join(secrets.choice(_ALPHABET) for _ in range(24))}"


def stripe_fee(amount: int) -> int:
    """Stripe's standard card fee, 2.9% + 30 minor units, rounded by our one rounding rule."""
    return round_minor(Decimal(amount) * FEE_PERCENT) + FEE_FIXED


class EventSink(Protocol):
    def accepts(self, event_type: str) -> int:
        """How many endpoints will be sent this type (the event's ``pending_webhooks``)."""

    def publish(self, event: Obj) -> None: ...


class _NoWebhooks:
    def accepts(self, event_type: str) -> int:
        return 0

    def publish(self, event: Obj) -> None:
        return None


@dataclass
class Context:
    """What a handler knows about its request (events carry it as ``request``)."""

    request_id: str
    idempotency_key: str | None = None


@dataclass
class Saved:
    """A response kept for an idempotency key."""

    fingerprint: tuple[str, str, str]
    status: int
    body: bytes
    request_id: str


@dataclass
class Counters:
    requests: int = 0
    idempotent_replays: int = 0
    injected_failures: int = 0


@dataclass
class EmulatorState:
    """One Stripe account in memory.

    ``available_after`` is how long a charge's funds stay ``pending`` before they count
    as ``available`` (0: at once); ``settle()`` makes everything available now.
    """

    available_after: float = 0.0
    clock: Callable[[], float] = time.time
    sink: EventSink = field(default_factory=_NoWebhooks)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.objects: dict[str, dict[str, Obj]] = {}
            self.cards: dict[str, TestCard] = {}
            self.txn_payout: dict[str, str] = {}
            self.idempotency: dict[tuple[str, str], Saved] = {}
            self.counters = Counters()

    # -- storage -------------------------------------------------------------------------

    def _now(self) -> int:
        return int(self.clock())

    def _store(self, obj: Obj) -> Obj:
        self.objects.setdefault(obj["object"], {})[obj["id"]] = obj
        return obj

    def _get(self, kind: str, object_id: str, label: str, param: str) -> Obj:
        found = self.objects.get(kind, {}).get(object_id)
        if found is None:
            raise resource_missing(label, object_id, param)
        return found

    def find(self, object_id: str) -> Obj | None:
        for bucket in self.objects.values():
            if object_id in bucket:
                return bucket[object_id]
        return None

    def render(self, obj: Obj, expand: Iterable[str] = ()) -> Obj:
        """A deep copy of ``obj`` with the ``expand`` paths (``a.b``) replaced by their objects."""
        out = copy.deepcopy(obj)
        for path in expand:
            self._expand(out, path.split("."), path)
        return out

    def _expand(self, node: Obj, parts: list[str], path: str) -> None:
        head, rest = parts[0], parts[1:]
        if head == "data" and node.get("object") in ("list", "search_result") and rest:
            for item in node["data"]:
                self._expand(item, rest, path)
            return
        if head not in node:
            raise invalid(f"This property cannot be expanded ({path}).", "expand")
        value = node[head]
        if isinstance(value, str):
            target = self.find(value)
            if target is None:
                raise invalid(f"This property cannot be expanded ({path}).", "expand")
            value = node[head] = copy.deepcopy(target)
        if rest:
            if not isinstance(value, dict):
                raise invalid(f"This property cannot be expanded ({path}).", "expand")
            self._expand(value, rest, path)

    def list_objects(self, kind: str, url: str, params: Params, keep: Callable[[Obj], bool] = lambda _: True) -> Obj:
        """Stripe's list: newest first, ``limit`` (1-100, default 10), ``starting_after`` / ``ending_before``."""
        limit = forms.integer(params, "limit")
        limit = 10 if limit is None else limit
        if not 1 <= limit <= 100:
            raise invalid(f"This value must be between 1 and 100 (it currently is '{limit}').", "limit")
        items = [o for o in reversed(self.objects.get(kind, {}).values()) if keep(o)]
        after = forms.optional_str(params, "starting_after")
        before = forms.optional_str(params, "ending_before")
        if after is not None and before is not None:
            raise invalid(
                "You may only specify one of these parameters: ending_before, starting_after.", "ending_before"
            )
        ids = [o["id"] for o in items]
        if after is not None:
            if after not in self.objects.get(kind, {}):
                raise resource_missing(kind, after, "starting_after")
            start = ids.index(after) + 1 if after in ids else len(ids)
            page, has_more = items[start : start + limit], len(items) > start + limit
        elif before is not None:
            if before not in self.objects.get(kind, {}):
                raise resource_missing(kind, before, "ending_before")
            end = ids.index(before) if before in ids else 0
            page, has_more = items[max(0, end - limit) : end], end - limit > 0
        else:
            page, has_more = items[:limit], len(items) > limit
        return {"object": "list", "data": copy.deepcopy(page), "has_more": has_more, "url": url}

    # -- events --------------------------------------------------------------------------

    def _event(self, type_: str, obj: Obj, ctx: Context | None, previous: Obj | None = None) -> Obj:
        data: Obj = {"object": copy.deepcopy(obj)}
        if previous is not None:
            data["previous_attributes"] = previous
        event = self._store(
            {
                "id": new_id("evt"),
                "object": "event",
                "api_version": API_VERSION,
                "created": self._now(),
                "data": data,
                "livemode": False,
                "pending_webhooks": self.sink.accepts(type_),
                "request": {
                    "id": ctx.request_id if ctx else None,
                    "idempotency_key": ctx.idempotency_key if ctx else None,
                },
                "type": type_,
            }
        )
        self.sink.publish(copy.deepcopy(event))
        return event

    def webhook_delivered(self, event_id: str) -> None:
        with self.lock:
            event = self.objects.get("event", {}).get(event_id)
            if event is not None and event["pending_webhooks"] > 0:
                event["pending_webhooks"] -= 1

    # -- customers -----------------------------------------------------------------------

    CUSTOMER_PARAMS = {
        "name",
        "email",
        "description",
        "phone",
        "metadata",
        "payment_method",
        "invoice_settings",
        "expand",
    }

    def create_customer(self, params: Params, ctx: Context) -> Obj:
        forms.check_known(params, self.CUSTOMER_PARAMS)
        customer = self._store(
            {
                "id": new_id("cus"),
                "object": "customer",
                "address": None,
                "balance": 0,
                "created": self._now(),
                "currency": None,
                "default_source": None,
                "delinquent": False,
                "description": None,
                "discount": None,
                "email": None,
                "invoice_prefix": secrets.token_hex(4).upper(),
                "invoice_settings": {
                    "custom_fields": None,
                    "default_payment_method": None,
                    "footer": None,
                    "rendering_options": None,
                },
                "livemode": False,
                "metadata": {},
                "name": None,
                "next_invoice_sequence": 1,
                "phone": None,
                "preferred_locales": [],
                "shipping": None,
                "tax_exempt": "none",
                "test_clock": None,
            }
        )
        try:
            payment_method = forms.optional_str(params, "payment_method")
            if payment_method is not None:
                self._attach(payment_method, customer["id"], "payment_method")
            self._update_customer_fields(customer, params)
        except StripeError:
            del self.objects["customer"][customer["id"]]  # nothing half-made stays behind
            raise
        return customer

    def update_customer(self, customer_id: str, params: Params, ctx: Context) -> Obj:
        forms.check_known(params, self.CUSTOMER_PARAMS - {"payment_method"})
        customer = self._get("customer", customer_id, "customer", "id")
        self._update_customer_fields(customer, params)
        return customer

    def _update_customer_fields(self, customer: Obj, params: Params) -> None:
        for name in ("name", "email", "description", "phone"):
            if name in params:
                customer[name] = forms.optional_str(params, name)
        customer["metadata"] = forms.merge_metadata(customer["metadata"], forms.metadata(params))
        settings = params.get("invoice_settings")
        if settings is not None:
            if not isinstance(settings, dict):
                raise invalid("Invalid hash", "invoice_settings")
            forms.check_known(settings, {"default_payment_method"})
            default = forms.optional_str(settings, "default_payment_method")
            if default is not None:
                pm = self._get("payment_method", default, "PaymentMethod", "invoice_settings[default_payment_method]")
                if pm["customer"] != customer["id"]:
                    raise invalid(
                        f"The customer does not have a payment method with the ID {default}. The payment method "
                        "must be attached to the customer.",
                        "invoice_settings[default_payment_method]",
                        "resource_missing",
                    )
            customer["invoice_settings"]["default_payment_method"] = default

    def get_customer(self, customer_id: str) -> Obj:
        return self._get("customer", customer_id, "customer", "id")

    # -- payment methods -----------------------------------------------------------------

    def _payment_method(self, ref: str, param: str) -> Obj:
        """A stored PaymentMethod, or a new one made from a test token (``pm_card_visa``)."""
        stored = self.objects.get("payment_method", {}).get(ref)
        if stored is not None:
            return stored
        card = TEST_CARDS.get(ref)
        if card is None:
            raise resource_missing("PaymentMethod", ref, param)
        pm = self._store(
            {
                "id": new_id("pm"),
                "object": "payment_method",
                "allow_redisplay": "unspecified",
                "billing_details": {
                    "address": {
                        "city": None,
                        "country": None,
                        "line1": None,
                        "line2": None,
                        "postal_code": None,
                        "state": None,
                    },
                    "email": None,
                    "name": None,
                    "phone": None,
                    "tax_id": None,
                },
                "card": {
                    "brand": card.brand,
                    "checks": {"address_line1_check": None, "address_postal_code_check": None, "cvc_check": "pass"},
                    "country": "US",
                    "display_brand": card.brand,
                    "exp_month": 12,
                    "exp_year": time.gmtime(self.clock()).tm_year + 3,
                    "fingerprint": secrets.token_hex(8),
                    "funding": card.funding,
                    "generated_from": None,
                    "last4": card.last4,
                    "networks": {"available": [card.brand], "preferred": None},
                    "regulated_status": "unregulated",
                    "three_d_secure_usage": {"supported": True},
                    "wallet": None,
                },
                "created": self._now(),
                "customer": None,
                "livemode": False,
                "metadata": {},
                "type": "card",
            }
        )
        self.cards[pm["id"]] = card
        return pm

    def _attach(self, ref: str, customer_id: str, param: str) -> Obj:
        self._get("customer", customer_id, "customer", "customer")
        pm = self._payment_method(ref, param)
        card = self.cards[pm["id"]]
        if not card.attachable:
            raise self._card_error(card, None, pm, None)
        if pm["customer"] not in (None, customer_id):
            raise invalid(
                "The payment method you provided has already been attached to a customer.",
                param,
                "payment_method_unexpected_state",
            )
        pm["customer"] = customer_id
        return pm

    def attach_payment_method(self, ref: str, params: Params, ctx: Context) -> Obj:
        forms.check_known(params, {"customer", "expand"})
        return self._attach(ref, forms.required_str(params, "customer"), "payment_method")

    def detach_payment_method(self, pm_id: str, params: Params, ctx: Context) -> Obj:
        forms.check_known(params, {"expand"})
        pm = self._get("payment_method", pm_id, "PaymentMethod", "payment_method")
        if pm["customer"] is None:
            raise invalid(
                "The payment method you provided is not attached to a customer so detachment is impossible.",
                None,
                "payment_method_unexpected_state",
            )
        pm["customer"] = None
        return pm

    def get_payment_method(self, pm_id: str) -> Obj:
        return self._get("payment_method", pm_id, "PaymentMethod", "payment_method")

    # -- payment intents -----------------------------------------------------------------

    PI_PARAMS = {
        "amount",
        "currency",
        "customer",
        "payment_method",
        "payment_method_types",
        "confirm",
        "off_session",
        "metadata",
        "description",
        "receipt_email",
        "statement_descriptor",
        "statement_descriptor_suffix",
        "setup_future_usage",
        "capture_method",
        "expand",
    }

    def create_payment_intent(self, params: Params, ctx: Context) -> Obj:
        forms.check_known(params, self.PI_PARAMS)
        amount = forms.integer(params, "amount", required=True)
        assert amount is not None
        currency = forms.required_str(params, "currency").lower()
        if not re.fullmatch(r"[a-z]{3}", currency):
            raise invalid(f"Invalid currency: {currency}.", "currency")
        if amount < MINIMUM_CHARGE:
            raise invalid(
                f"Amount must be at least {MINIMUM_CHARGE} minor units of {currency}.", "amount", "amount_too_small"
            )
        capture = forms.optional_str(params, "capture_method") or "automatic"
        if capture not in ("automatic", "automatic_async"):
            raise invalid("The emulator only supports capture_method=automatic.", "capture_method")
        confirm = forms.boolean(params, "confirm") or False
        off_session = forms.boolean(params, "off_session")
        if off_session is not None and not confirm:
            raise invalid("You can only pass `off_session` when `confirm=true`.", "off_session")
        customer = forms.optional_str(params, "customer")
        if customer is not None:
            self._get("customer", customer, "customer", "customer")
        pm_ref = forms.optional_str(params, "payment_method")
        pm = self._payment_method(pm_ref, "payment_method") if pm_ref is not None else None
        meta = forms.metadata(params) or {}
        pi_id = new_id("pi")
        pi = self._store(
            {
                "id": pi_id,
                "object": "payment_intent",
                "amount": amount,
                "amount_capturable": 0,
                "amount_details": {"tip": {}},
                "amount_received": 0,
                "application": None,
                "application_fee_amount": None,
                "automatic_payment_methods": None,
                "canceled_at": None,
                "cancellation_reason": None,
                "capture_method": capture,
                "client_secret": f"{pi_id}_secret_{secrets.token_urlsafe(18)}",
                "confirmation_method": "automatic",
                "created": self._now(),
                "currency": currency,
                "customer": customer,
                "description": forms.optional_str(params, "description"),
                "last_payment_error": None,
                "latest_charge": None,
                "livemode": False,
                "metadata": meta,
                "next_action": None,
                "on_behalf_of": None,
                "payment_method": pm["id"] if pm else None,
                "payment_method_configuration_details": None,
                "payment_method_options": {"card": {"request_three_d_secure": "automatic"}},
                "payment_method_types": ["card"],
                "processing": None,
                "receipt_email": forms.optional_str(params, "receipt_email"),
                "review": None,
                "setup_future_usage": forms.optional_str(params, "setup_future_usage"),
                "shipping": None,
                "source": None,
                "statement_descriptor": forms.optional_str(params, "statement_descriptor"),
                "statement_descriptor_suffix": forms.optional_str(params, "statement_descriptor_suffix"),
                "status": "requires_confirmation" if pm else "requires_payment_method",
                "transfer_data": None,
                "transfer_group": None,
            }
        )
        self._event("payment_intent.created", pi, ctx)
        if confirm:
            self._confirm(pi, ctx)
        return pi

    def confirm_payment_intent(self, pi_id: str, params: Params, ctx: Context) -> Obj:
        forms.check_known(params, {"payment_method", "off_session", "expand", "receipt_email"})
        pi = self._get("payment_intent", pi_id, "payment_intent", "intent")
        pm_ref = forms.optional_str(params, "payment_method")
        if pm_ref is not None and pi["status"] in ("requires_payment_method", "requires_confirmation"):
            pi["payment_method"] = self._payment_method(pm_ref, "payment_method")["id"]
            pi["status"] = "requires_confirmation"
        self._confirm(pi, ctx)
        return pi

    def _confirm(self, pi: Obj, ctx: Context) -> None:
        if pi["status"] not in ("requires_payment_method", "requires_confirmation"):
            raise invalid(
                f"You cannot confirm this PaymentIntent because it has a status of {pi['status']}.",
                None,
                "payment_intent_unexpected_state",
                payment_intent=self.render(pi),
            )
        if pi["payment_method"] is None:
            raise invalid(
                "You cannot confirm this PaymentIntent because it's missing a payment method. Update the "
                "PaymentIntent with a payment method and then confirm it again.",
                None,
                "payment_intent_unexpected_state",
                payment_intent=self.render(pi),
            )
        pm = self.objects["payment_method"][pi["payment_method"]]
        if pm["customer"] is not None and pm["customer"] != pi["customer"]:
            raise invalid(
                "The provided PaymentMethod is attached to another Customer (or to one while this "
                "PaymentIntent has none); pass that customer.",
                "payment_method",
            )
        card = self.cards[pm["id"]]
        charge = self._charge(pi, pm, card)
        pi["latest_charge"] = charge["id"]
        if card.decline_code is not None:
            error = self._card_error(card, charge, pm, pi)
            pi["status"] = "requires_payment_method"
            pi["payment_method"] = None
            pi["last_payment_error"] = copy.deepcopy(error.body()["error"])
            error.extra["payment_intent"] = self.render(pi)
            self._event("charge.failed", charge, ctx)
            self._event("payment_intent.payment_failed", pi, ctx)
            raise error
        pi["status"] = "succeeded"
        pi["amount_received"] = pi["amount"]
        pi["last_payment_error"] = None
        self._event("charge.succeeded", charge, ctx)
        self._event("payment_intent.succeeded", pi, ctx)

    def _card_error(self, card: TestCard, charge: Obj | None, pm: Obj, pi: Obj | None) -> StripeError:
        extra: Obj = {"decline_code": card.decline_code, "payment_method": self.render(pm)}
        if charge is not None:
            extra["charge"] = charge["id"]
        if pi is not None:
            extra["payment_intent"] = self.render(pi)
        return StripeError(402, "card_error", card.message or GENERIC, code=card.code, **extra)

    def _charge(self, pi: Obj, pm: Obj, card: TestCard) -> Obj:
        failed = card.decline_code is not None
        charge_id = new_id("ch")
        txn = None if failed else self._balance_transaction(pi["amount"], pi["currency"], charge_id, "charge")
        return self._store(
            {
                "id": charge_id,
                "object": "charge",
                "amount": pi["amount"],
                "amount_captured": 0 if failed else pi["amount"],
                "amount_refunded": 0,
                "application": None,
                "application_fee": None,
                "application_fee_amount": None,
                "balance_transaction": txn["id"] if txn else None,
                "billing_details": copy.deepcopy(pm["billing_details"]),
                "calculated_statement_descriptor": "ROOMLY",
                "captured": not failed,
                "created": self._now(),
                "currency": pi["currency"],
                "customer": pi["customer"],
                "description": pi["description"],
                "disputed": False,
                "failure_balance_transaction": None,
                "failure_code": card.code,
                "failure_message": card.message,
                "fraud_details": {},
                "livemode": False,
                "metadata": dict(pi["metadata"]),
                "on_behalf_of": None,
                "outcome": {
                    "network_status": "declined_by_network" if failed else "approved_by_network",
                    "reason": card.decline_code,
                    "risk_level": "normal",
                    "seller_message": "The bank did not return any further details with this decline."
                    if failed
                    else "Payment complete.",
                    "type": "issuer_declined" if failed else "authorized",
                },
                "paid": not failed,
                "payment_intent": pi["id"],
                "payment_method": pm["id"],
                "payment_method_details": {
                    "card": {
                        "brand": card.brand,
                        "country": "US",
                        "exp_month": pm["card"]["exp_month"],
                        "exp_year": pm["card"]["exp_year"],
                        "fingerprint": pm["card"]["fingerprint"],
                        "funding": card.funding,
                        "last4": card.last4,
                        "network": card.brand,
                    },
                    "type": "card",
                },
                "receipt_email": pi["receipt_email"],
                "receipt_url": None,
                "refunded": False,
                "review": None,
                "shipping": None,
                "source_transfer": None,
                "statement_descriptor": pi["statement_descriptor"],
                "statement_descriptor_suffix": pi["statement_descriptor_suffix"],
                "status": "failed" if failed else "succeeded",
                "transfer_data": None,
                "transfer_group": None,
            }
        )

    def cancel_payment_intent(self, pi_id: str, params: Params, ctx: Context) -> Obj:
        forms.check_known(params, {"cancellation_reason", "expand"})
        pi = self._get("payment_intent", pi_id, "payment_intent", "intent")
        if pi["status"] in ("succeeded", "canceled"):
            raise invalid(
                f"You cannot cancel this PaymentIntent because it has a status of {pi['status']}. Only a "
                "PaymentIntent with one of the following statuses may be canceled: requires_payment_method, "
                "requires_capture, requires_confirmation, requires_action, processing.",
                None,
                "payment_intent_unexpected_state",
                payment_intent=self.render(pi),
            )
        pi["status"] = "canceled"
        pi["canceled_at"] = self._now()
        pi["cancellation_reason"] = forms.optional_str(params, "cancellation_reason")
        self._event("payment_intent.canceled", pi, ctx)
        return pi

    def get_payment_intent(self, pi_id: str) -> Obj:
        return self._get("payment_intent", pi_id, "payment_intent", "intent")

    _CLAUSE = re.compile(
        r"""^(metadata\[(['"])(?P<key>[^'"]+)\2\]|(?P<field>status|customer|currency))\s*:\s*(['"])(?P<value>[^'"]*)\5$"""
    )

    def search_payment_intents(self, params: Params) -> Obj:
        """``GET /v1/payment_intents/search``: ``field:'value'`` clauses joined by ``AND``.

        Fields: ``metadata['key']``, ``status``, ``customer``, ``currency``. Unlike Stripe,
        whose search index lags writes by up to a minute, results here are immediate.
        """
        query = forms.required_str(params, "query")
        clauses: list[tuple[str | None, str | None, str]] = []
        for part in re.split(r"\s+AND\s+", query.strip()):
            match = self._CLAUSE.match(part.strip())
            if match is None:
                raise invalid(f"Invalid query: the emulator cannot parse {part!r}.", "query")
            clauses.append((match.group("key"), match.group("field"), match.group("value")))

        def keep(pi: Obj) -> bool:
            for key, name, value in clauses:
                actual = pi["metadata"].get(key) if key is not None else pi.get(name or "")
                if actual != value:
                    return False
            return True

        limit = forms.integer(params, "limit") or 10
        page = forms.optional_str(params, "page")
        offset = int(page) if page is not None and page.isdigit() else 0
        hits = [pi for pi in reversed(self.objects.get("payment_intent", {}).values()) if keep(pi)]
        chunk = hits[offset : offset + limit]
        more = len(hits) > offset + limit
        return {
            "object": "search_result",
            "data": copy.deepcopy(chunk),
            "has_more": more,
            "next_page": str(offset + limit) if more else None,
            "url": "/v1/payment_intents/search",
        }

    # -- charges, balance transactions, balance ------------------------------------------

    def get_charge(self, charge_id: str) -> Obj:
        return self._get("charge", charge_id, "charge", "id")

    def _balance_transaction(self, amount: int, currency: str, source: str, type_: str) -> Obj:
        fee = stripe_fee(amount) if type_ == "charge" else 0
        now = self._now()
        delay = self.available_after if type_ == "charge" else 0
        return self._store(
            {
                "id": new_id("txn"),
                "object": "balance_transaction",
                "amount": amount,
                "available_on": int(self.clock() + delay),
                "balance_type": "payments",
                "created": now,
                "currency": currency,
                "description": None,
                "exchange_rate": None,
                "fee": fee,
                "fee_details": (
                    [
                        {
                            "amount": fee,
                            "application": None,
                            "currency": currency,
                            "description": "Stripe processing fees",
                            "type": "stripe_fee",
                        }
                    ]
                    if fee
                    else []
                ),
                "net": amount - fee,
                "reporting_category": type_,
                "source": source,
                "status": "pending" if delay > 0 else "available",
                "type": type_,
            }
        )

    def _mature(self) -> None:
        now = self.clock()
        for txn in self.objects.get("balance_transaction", {}).values():
            if txn["status"] == "pending" and txn["available_on"] <= now:
                txn["status"] = "available"

    def settle(self) -> int:
        """Make every pending balance transaction available now; returns how many moved."""
        with self.lock:
            moved = 0
            now = self._now()
            for txn in self.objects.get("balance_transaction", {}).values():
                if txn["status"] == "pending":
                    txn["status"], txn["available_on"] = "available", now
                    moved += 1
            return moved

    def balance(self) -> Obj:
        self._mature()
        sums: dict[str, dict[str, int]] = {}
        for txn in self.objects.get("balance_transaction", {}).values():
            per = sums.setdefault(txn["currency"], {"available": 0, "pending": 0})
            per[txn["status"]] += txn["net"]
        if not sums:
            sums["usd"] = {"available": 0, "pending": 0}

        def entries(kind: str) -> list[Obj]:
            return [
                {"amount": s[kind], "currency": c, "source_types": {"card": s[kind]}} for c, s in sorted(sums.items())
            ]

        return {
            "object": "balance",
            "available": entries("available"),
            "connect_reserved": [{"amount": 0, "currency": c} for c in sorted(sums)],
            "livemode": False,
            "pending": entries("pending"),
        }

    def list_balance_transactions(self, params: Params) -> Obj:
        forms.check_known(
            params, {"payout", "type", "source", "currency", "limit", "starting_after", "ending_before", "expand"}
        )
        self._mature()
        payout = forms.optional_str(params, "payout")
        if payout is not None:
            self._get("payout", payout, "payout", "payout")
        type_ = forms.optional_str(params, "type")
        source = forms.optional_str(params, "source")
        currency = forms.optional_str(params, "currency")

        def keep(txn: Obj) -> bool:
            return (
                (payout is None or self.txn_payout.get(txn["id"]) == payout)
                and (type_ is None or txn["type"] == type_)
                and (source is None or txn["source"] == source)
                and (currency is None or txn["currency"] == currency)
            )

        return self.list_objects("balance_transaction", "/v1/balance_transactions", params, keep)

    def get_balance_transaction(self, txn_id: str) -> Obj:
        self._mature()
        return self._get("balance_transaction", txn_id, "balance transaction", "id")

    # -- refunds -------------------------------------------------------------------------

    def create_refund(self, params: Params, ctx: Context) -> Obj:
        forms.check_known(params, {"charge", "payment_intent", "amount", "reason", "metadata", "expand"})
        charge_id = forms.optional_str(params, "charge")
        pi_id = forms.optional_str(params, "payment_intent")
        if charge_id is None and pi_id is None:
            raise invalid(
                "One of the following params should be provided for this request: payment_intent or charge.", None
            ).with_validation()
        if charge_id is not None:
            charge = self._get("charge", charge_id, "charge", "charge")
        else:
            assert pi_id is not None
            pi = self._get("payment_intent", pi_id, "payment_intent", "payment_intent")
            if pi["status"] != "succeeded" or pi["latest_charge"] is None:
                raise invalid(
                    f"This PaymentIntent ({pi_id}) does not have a successful charge to refund.",
                    "payment_intent",
                    "charge_not_refundable",
                )
            charge = self.objects["charge"][pi["latest_charge"]]
        reason = forms.optional_str(params, "reason")
        if reason is not None and reason not in ("duplicate", "fraudulent", "requested_by_customer"):
            raise invalid("Invalid reason: must be one of duplicate, fraudulent, or requested_by_customer", "reason")
        if charge["status"] != "succeeded":
            raise invalid(
                f"Charge {charge['id']} has not succeeded and cannot be refunded.", "charge", "charge_not_refundable"
            )
        remaining = charge["amount_captured"] - charge["amount_refunded"]
        if remaining <= 0:
            raise invalid(f"Charge {charge['id']} has already been refunded.", "charge", "charge_already_refunded")
        amount = forms.integer(params, "amount")
        amount = remaining if amount is None else amount
        if amount <= 0:
            raise invalid("Invalid positive integer", "amount", "parameter_invalid_integer").with_validation()
        if amount > remaining:
            raise invalid(
                f"Refund amount ({amount}) is greater than unrefunded amount on charge ({remaining})",
                "amount",
                "amount_too_large",
            )
        refund_id = new_id("re")
        txn = self._balance_transaction(-amount, charge["currency"], refund_id, "refund")
        refund = self._store(
            {
                "id": refund_id,
                "object": "refund",
                "amount": amount,
                "balance_transaction": txn["id"],
                "charge": charge["id"],
                "created": self._now(),
                "currency": charge["currency"],
                "destination_details": {"card": {"type": "refund"}, "type": "card"},
                "metadata": forms.metadata(params) or {},
                "payment_intent": charge["payment_intent"],
                "reason": reason,
                "receipt_number": None,
                "source_transfer_reversal": None,
                "status": "succeeded",
                "transfer_reversal": None,
            }
        )
        previous = {"amount_refunded": charge["amount_refunded"], "refunded": charge["refunded"]}
        charge["amount_refunded"] += amount
        charge["refunded"] = charge["amount_refunded"] == charge["amount_captured"]
        self._event("refund.created", refund, ctx)
        self._event("charge.refunded", charge, ctx, previous)
        return refund

    def get_refund(self, refund_id: str) -> Obj:
        return self._get("refund", refund_id, "refund", "id")

    # -- payouts -------------------------------------------------------------------------

    def automatic_payouts(self, ctx: Context | None = None) -> list[Obj]:
        """Pay the available balance of each currency out to the bank, as Stripe's daily payout does.

        Each payout gets a ``payout`` balance transaction; the transactions it pays out are
        listed by ``GET /v1/balance_transactions?payout=po_...`` (with the payout's own).
        """
        with self.lock:
            self._mature()
            per_currency: dict[str, list[Obj]] = {}
            for txn in self.objects.get("balance_transaction", {}).values():
                if txn["status"] == "available" and txn["id"] not in self.txn_payout:
                    per_currency.setdefault(txn["currency"], []).append(txn)
            payouts = []
            for currency, txns in sorted(per_currency.items()):
                amount = sum(t["net"] for t in txns)
                if amount <= 0:
                    continue
                payout_id = new_id("po")
                own = self._balance_transaction(-amount, currency, payout_id, "payout")
                payout = self._store(
                    {
                        "id": payout_id,
                        "object": "payout",
                        "amount": amount,
                        "application_fee": None,
                        "application_fee_amount": None,
                        "arrival_date": self._now(),
                        "automatic": True,
                        "balance_transaction": own["id"],
                        "created": self._now(),
                        "currency": currency,
                        "description": "STRIPE PAYOUT",
                        "destination": "ba_emulator",
                        "failure_balance_transaction": None,
                        "failure_code": None,
                        "failure_message": None,
                        "livemode": False,
                        "metadata": {},
                        "method": "standard",
                        "original_payout": None,
                        "reconciliation_status": "completed",
                        "reversed_by": None,
                        "source_type": "card",
                        "statement_descriptor": None,
                        "status": "in_transit",
                        "type": "bank_account",
                    }
                )
                for txn in [*txns, own]:
                    self.txn_payout[txn["id"]] = payout_id
                self._event("payout.created", payout, ctx)
                payout["status"] = "paid"
                self._event("payout.paid", payout, ctx, {"status": "in_transit"})
                payouts.append(copy.deepcopy(payout))
            return payouts

    def get_payout(self, payout_id: str) -> Obj:
        return self._get("payout", payout_id, "payout", "payout")

    # -- test knobs ----------------------------------------------------------------------

    def count_charges(self, status: str | None, filters: dict[str, str]) -> int:
        """Charges, optionally by ``status``, ``customer``, ``payment_intent`` or ``metadata.<key>``."""
        with self.lock:
            total = 0
            for charge in self.objects.get("charge", {}).values():
                if status is not None and charge["status"] != status:
                    continue
                if all(
                    (charge["metadata"].get(k[len("metadata.") :]) if k.startswith("metadata.") else charge.get(k)) == v
                    for k, v in filters.items()
                ):
                    total += 1
            return total

    def counts(self) -> Obj:
        with self.lock:
            charges = list(self.objects.get("charge", {}).values())
            return {
                "charges": len(charges),
                "charges_succeeded": sum(1 for c in charges if c["status"] == "succeeded"),
                "charges_failed": sum(1 for c in charges if c["status"] == "failed"),
                **{
                    kind + "s": len(self.objects.get(kind, {}))
                    for kind in ("customer", "payment_method", "payment_intent", "refund", "payout", "event")
                },
                "requests": self.counters.requests,
                "idempotent_replays": self.counters.idempotent_replays,
                "injected_failures": self.counters.injected_failures,
            }
