"""The PSP (Stripe) behind a small interface, over the real ``stripe`` SDK.

:class:`Psp` is what callers use; :class:`StripePsp` implements it with ``stripe.StripeClient``
(pointed at ``STRIPE_API_BASE`` when set, e.g. the local emulator in ``devstack/psp``).

Every mutating call takes an idempotency ``key`` that the caller builds from our row ids
(``invoice:{id}:attempt:{n}``); a retry must pass the same key. The SDK never retries by itself
(``max_network_retries=0``): each failure is decided once, here, as one of

- :class:`Declined` — the card was declined (``decline_code``); the attempt failed, do not retry it;
- :class:`Transient` — rate limit, connection error, 5xx: retry with the SAME key;
- :class:`Unknown` — a mutating call timed out after it was sent: it may have happened. Look the
  PaymentIntent up (:meth:`Psp.find_payment_intent`) before anything else;
- :class:`Bug` — invalid request, authentication, idempotency-key misuse: not retryable, loud.

Webhook signatures are verified here too (:func:`verify_event`), so the SDK is used in one place.
See ``docs/payments.md``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

import httpx
import stripe
from stripe.params import (
    BalanceTransactionListParams,
    CustomerCreateParams,
    PaymentIntentCreateParams,
    RefundCreateParams,
)

from core.settings import Settings

T = TypeVar("T")

WEBHOOK_TOLERANCE_SECONDS = 300
_LIST_PAGE = 100


# --- outcomes -------------------------------------------------------------------------------


class PspError(Exception):
    """A PSP call that did not succeed, decided once (one of the subclasses)."""

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id


class Declined(PspError):
    """The card was declined: the attempt failed with ``decline_code`` (``generic_decline``,
    ``insufficient_funds``, ``lost_card``, ``expired_card``, ...). Not retryable as is."""

    def __init__(
        self,
        decline_code: str,
        message: str,
        *,
        payment_intent_id: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, request_id=request_id)
        self.decline_code = decline_code
        self.payment_intent_id = payment_intent_id


class Transient(PspError):
    """Rate limit, connection error or 5xx: nothing is known to have happened; retry with the same key."""


class Unknown(PspError):
    """A mutating call timed out after it was sent: it may or may not have happened. Look it up first."""


class Bug(PspError):
    """Our request is wrong (invalid parameters, bad credentials, a key reused for another request).
    ``code`` is the PSP's error code when it gave one (``resource_missing``, ...)."""

    def __init__(self, message: str, *, request_id: str | None = None, code: str | None = None) -> None:
        super().__init__(message, request_id=request_id)
        self.code = code


# --- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaymentIntent:
    id: str
    status: str  # succeeded, processing, requires_payment_method, requires_action, canceled, ...
    amount: int
    amount_received: int
    currency: str
    customer: str | None
    metadata: dict[str, str]
    latest_charge: str | None
    decline_code: str | None = None  # of the last failed confirmation, if any


@dataclass(frozen=True)
class Refund:
    id: str
    status: str
    amount: int
    currency: str
    payment_intent: str | None
    charge: str | None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Payout:
    """A payout to our bank. ``currency`` is upper-case ISO 4217 here (the PSP's is lower-case)."""

    id: str  # po_...
    amount: int  # minor units, positive
    currency: str
    status: str  # pending, in_transit, paid, failed, canceled
    arrival_date: datetime
    created: datetime
    balance_transaction: str | None = None  # its own ``payout`` balance transaction


@dataclass(frozen=True)
class BalanceTransaction:
    """One movement of the PSP balance; ``currency`` upper-case. ``amount`` and ``net`` are signed
    (a refund or payout is negative), ``fee`` is what the PSP kept (``net = amount - fee``)."""

    id: str  # txn_...
    type: str  # charge, refund, payout, adjustment, ...
    amount: int
    fee: int
    net: int
    currency: str
    source: str | None  # ch_..., re_..., po_...
    status: str  # pending, available
    created: datetime


@dataclass(frozen=True)
class PspBalance:
    """The PSP balance per upper-case currency: ``available`` (can be paid out) and ``pending``."""

    available: dict[str, int]
    pending: dict[str, int]

    def total(self, currency: str) -> int:
        """Pending plus available in ``currency`` (0 when the PSP reports none)."""
        return self.available.get(currency, 0) + self.pending.get(currency, 0)


@dataclass(frozen=True)
class VerifiedEvent:
    """A webhook event whose signature was checked: the parsed body and what we index it by."""

    id: str
    type: str
    created: datetime
    object_id: str | None
    payload: dict[str, Any] = field(repr=False)


class InvalidSignature(Exception):
    """A webhook whose ``Stripe-Signature`` is missing, malformed, wrong, or too old; or a body that
    is not a Stripe event."""


# --- the interface --------------------------------------------------------------------------


class Psp(Protocol):
    async def ensure_customer(
        self, tenant_id: str, *, name: str, email: str | None, key: str, customer_id: str | None = None
    ) -> str:
        """The PSP customer of ``tenant_id`` (metadata ``tenant_id``): ``customer_id`` if it is that
        tenant's, else one created under ``key``. The caller keeps the id."""
        ...

    async def attach_default_payment_method(self, customer_id: str, payment_method: str, *, key: str) -> str:
        """Attach ``payment_method`` (an id or a test token) and make it the default; its ``pm_`` id."""
        ...

    async def create_payment(
        self,
        *,
        amount: int,
        currency: str,
        customer_id: str,
        payment_method: str,
        invoice_id: str,
        attempt: int,
        key: str,
    ) -> PaymentIntent:
        """Create and confirm an off-session PaymentIntent (metadata ``invoice_id``, ``attempt``)."""
        ...

    async def retrieve_payment_intent(self, payment_intent_id: str) -> PaymentIntent: ...

    async def find_payment_intent(self, customer_id: str, *, invoice_id: str, attempt: int) -> PaymentIntent | None:
        """The PaymentIntent of (invoice, attempt), found by listing the customer's intents (not by
        search, whose index lags); None when the PSP has none."""
        ...

    async def list_refunds(self, charge_id: str) -> list[Refund]:
        """Every refund of a charge (a ``charge.refunded`` event does not list them)."""
        ...

    async def charge_fee(self, charge_id: str) -> int | None:
        """The fee the PSP kept on a charge (its balance transaction), None while it has none."""
        ...

    async def refund(
        self, payment_intent_id: str, *, amount: int | None, key: str, metadata: Mapping[str, str] | None = None
    ) -> Refund:
        """Refund ``amount`` (default: what is left) of a succeeded PaymentIntent."""
        ...

    async def retrieve_payout(self, payout_id: str) -> Payout: ...

    async def list_payout_balance_transactions(self, payout_id: str) -> list[BalanceTransaction]:
        """Every balance transaction the payout paid out, and its own ``payout`` one (every page)."""
        ...

    async def list_source_balance_transactions(self, source_id: str) -> list[BalanceTransaction]:
        """The balance transactions of one source (a charge ``ch_...``, a refund ``re_...``)."""
        ...

    async def balance(self) -> PspBalance: ...


# --- the Stripe implementation ---------------------------------------------------------------


def _decide(error: stripe.StripeError, *, mutating: bool) -> PspError:
    """The one place a Stripe SDK error becomes an outcome."""
    request_id = error.request_id
    message = error.user_message or str(error) or type(error).__name__
    if isinstance(error, stripe.CardError):
        detail = error.error
        code = (detail.decline_code if detail else None) or error.code or "card_declined"
        intent = detail.payment_intent if detail else None
        return Declined(code, message, payment_intent_id=intent.id if intent else None, request_id=request_id)
    if isinstance(error, stripe.RateLimitError):
        return Transient(f"rate limited: {message}", request_id=request_id)
    if isinstance(error, stripe.APIConnectionError):
        cause = error.__cause__
        sent = isinstance(cause, httpx.ReadTimeout | httpx.WriteTimeout)
        if sent and mutating:
            return Unknown(f"no answer in time; the request may have been carried out: {cause!r}")
        return Transient(f"could not reach the PSP: {cause!r}")
    if isinstance(error, stripe.IdempotencyError) and error.http_status == 409:
        return Transient(f"another request with this key is in progress: {message}", request_id=request_id)
    if isinstance(error, stripe.APIError) or (error.http_status or 0) >= 500:
        return Transient(f"PSP error {error.http_status}: {message}", request_id=request_id)
    return Bug(
        f"{type(error).__name__} ({error.http_status}, {error.code}): {message}", request_id=request_id, code=error.code
    )


def _metadata(metadata: stripe.StripeObject | dict[str, str] | None) -> dict[str, str]:
    raw = metadata.to_dict() if isinstance(metadata, stripe.StripeObject) else metadata or {}
    return {str(k): str(v) for k, v in raw.items()}


def _intent(pi: stripe.PaymentIntent) -> PaymentIntent:
    charge = pi.latest_charge
    last_error = pi.last_payment_error
    return PaymentIntent(
        id=pi.id,
        status=pi.status,
        amount=pi.amount,
        amount_received=pi.amount_received,
        currency=pi.currency,
        customer=pi.customer if isinstance(pi.customer, str) or pi.customer is None else pi.customer.id,
        metadata=_metadata(pi.metadata),
        latest_charge=charge if isinstance(charge, str) or charge is None else charge.id,
        decline_code=(last_error.decline_code or last_error.code) if last_error else None,
    )


def _refund(refund: stripe.Refund) -> Refund:
    intent, charge = refund.payment_intent, refund.charge
    return Refund(
        id=refund.id,
        status=str(refund.status),
        amount=refund.amount,
        currency=refund.currency,
        payment_intent=intent if isinstance(intent, str) or intent is None else intent.id,
        charge=charge if isinstance(charge, str) or charge is None else charge.id,
        metadata=_metadata(refund.metadata),
    )


def _at(timestamp: int) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def _payout(payout: stripe.Payout) -> Payout:
    own = payout.balance_transaction
    return Payout(
        id=payout.id,
        amount=payout.amount,
        currency=payout.currency.upper(),
        status=str(payout.status),
        arrival_date=_at(payout.arrival_date),
        created=_at(payout.created),
        balance_transaction=own if isinstance(own, str) or own is None else own.id,
    )


def _balance_transaction(txn: stripe.BalanceTransaction) -> BalanceTransaction:
    source = txn.source
    return BalanceTransaction(
        id=txn.id,
        type=str(txn.type),
        amount=txn.amount,
        fee=txn.fee,
        net=txn.net,
        currency=txn.currency.upper(),
        source=source if isinstance(source, str) or source is None else source.id,
        status=str(txn.status),
        created=_at(txn.created),
    )


class StripePsp:
    """:class:`Psp` over ``stripe.StripeClient`` with an async httpx transport; close it with
    :meth:`aclose` (or ``async with``)."""

    def __init__(self, api_key: str, *, api_base: str | None = None, timeout: float = 30.0) -> None:
        self._http = stripe.HTTPXClient(timeout=timeout)
        options: dict[str, Any] = {"base_addresses": {"api": api_base}} if api_base else {}
        self._client = stripe.StripeClient(api_key, http_client=self._http, max_network_retries=0, **options)

    @classmethod
    def from_settings(cls, settings: Settings) -> StripePsp:
        return cls(settings.stripe_api_key, api_base=settings.stripe_api_base, timeout=settings.stripe_timeout)

    async def aclose(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @staticmethod
    async def _call(request: Callable[[], Awaitable[T]], *, mutating: bool) -> T:
        try:
            return await request()
        except stripe.StripeError as error:
            raise _decide(error, mutating=mutating) from error

    async def ensure_customer(
        self, tenant_id: str, *, name: str, email: str | None, key: str, customer_id: str | None = None
    ) -> str:
        v1 = self._client.v1
        if customer_id is not None:
            known = await self._call(lambda: v1.customers.retrieve_async(customer_id), mutating=False)
            if _metadata(known.metadata).get("tenant_id") != tenant_id:
                raise Bug(f"customer {customer_id} does not belong to tenant {tenant_id}")
            return known.id
        params: CustomerCreateParams = {"name": name, "metadata": {"tenant_id": tenant_id}}
        if email:
            params["email"] = email
        created = await self._call(
            lambda: v1.customers.create_async(params=params, options={"idempotency_key": key}), mutating=True
        )
        return created.id

    async def attach_default_payment_method(self, customer_id: str, payment_method: str, *, key: str) -> str:
        v1 = self._client.v1
        attached = await self._call(
            lambda: v1.payment_methods.attach_async(
                payment_method, params={"customer": customer_id}, options={"idempotency_key": f"{key}:attach"}
            ),
            mutating=True,
        )
        await self._call(
            lambda: v1.customers.update_async(
                customer_id,
                params={"invoice_settings": {"default_payment_method": attached.id}},
                options={"idempotency_key": f"{key}:default"},
            ),
            mutating=True,
        )
        return attached.id

    async def create_payment(
        self,
        *,
        amount: int,
        currency: str,
        customer_id: str,
        payment_method: str,
        invoice_id: str,
        attempt: int,
        key: str,
    ) -> PaymentIntent:
        params: PaymentIntentCreateParams = {
            "amount": amount,
            "currency": currency.lower(),
            "customer": customer_id,
            "payment_method": payment_method,
            "confirm": True,
            "off_session": True,
            "metadata": {"invoice_id": invoice_id, "attempt": str(attempt)},
        }
        v1 = self._client.v1
        created = await self._call(
            lambda: v1.payment_intents.create_async(params=params, options={"idempotency_key": key}), mutating=True
        )
        return _intent(created)

    async def retrieve_payment_intent(self, payment_intent_id: str) -> PaymentIntent:
        v1 = self._client.v1
        return _intent(await self._call(lambda: v1.payment_intents.retrieve_async(payment_intent_id), mutating=False))

    async def find_payment_intent(self, customer_id: str, *, invoice_id: str, attempt: int) -> PaymentIntent | None:
        v1 = self._client.v1
        page = await self._call(
            lambda: v1.payment_intents.list_async(params={"customer": customer_id, "limit": _LIST_PAGE}),
            mutating=False,
        )
        wanted = {"invoice_id": invoice_id, "attempt": str(attempt)}
        found: list[PaymentIntent] = []
        try:
            async for pi in page.auto_paging_iter():
                metadata = _metadata(pi.metadata)
                if all(metadata.get(k) == v for k, v in wanted.items()):
                    found.append(_intent(pi))
        except stripe.StripeError as error:
            raise _decide(error, mutating=False) from error
        if len(found) > 1:  # the idempotency key makes this impossible; if it happens, say so loudly
            ids = [p.id for p in found]
            raise Bug(f"{len(ids)} PaymentIntents for invoice {invoice_id} attempt {attempt}: {ids}")
        return found[0] if found else None

    async def list_refunds(self, charge_id: str) -> list[Refund]:
        v1 = self._client.v1
        page = await self._call(
            lambda: v1.refunds.list_async(params={"charge": charge_id, "limit": _LIST_PAGE}), mutating=False
        )
        try:
            return [_refund(refund) async for refund in page.auto_paging_iter()]
        except stripe.StripeError as error:
            raise _decide(error, mutating=False) from error

    async def charge_fee(self, charge_id: str) -> int | None:
        v1 = self._client.v1
        charge = await self._call(
            lambda: v1.charges.retrieve_async(charge_id, params={"expand": ["balance_transaction"]}), mutating=False
        )
        transaction = charge.balance_transaction
        if transaction is None or isinstance(transaction, str):
            return None
        return int(transaction.fee)

    async def refund(
        self, payment_intent_id: str, *, amount: int | None, key: str, metadata: Mapping[str, str] | None = None
    ) -> Refund:
        params: RefundCreateParams = {"payment_intent": payment_intent_id}
        if amount is not None:
            params["amount"] = amount
        if metadata:
            params["metadata"] = dict(metadata)
        v1 = self._client.v1
        created = await self._call(
            lambda: v1.refunds.create_async(params=params, options={"idempotency_key": key}), mutating=True
        )
        return _refund(created)

    async def retrieve_payout(self, payout_id: str) -> Payout:
        v1 = self._client.v1
        return _payout(await self._call(lambda: v1.payouts.retrieve_async(payout_id), mutating=False))

    async def _balance_transactions(self, params: BalanceTransactionListParams) -> list[BalanceTransaction]:
        v1 = self._client.v1
        page = await self._call(lambda: v1.balance_transactions.list_async(params=params), mutating=False)
        try:
            return [_balance_transaction(txn) async for txn in page.auto_paging_iter()]
        except stripe.StripeError as error:
            raise _decide(error, mutating=False) from error

    async def list_payout_balance_transactions(self, payout_id: str) -> list[BalanceTransaction]:
        return await self._balance_transactions({"payout": payout_id, "limit": _LIST_PAGE})

    async def list_source_balance_transactions(self, source_id: str) -> list[BalanceTransaction]:
        return await self._balance_transactions({"source": source_id, "limit": _LIST_PAGE})

    async def balance(self) -> PspBalance:
        v1 = self._client.v1
        found = await self._call(lambda: v1.balance.retrieve_async(), mutating=False)
        available: dict[str, int] = defaultdict(int)
        pending: dict[str, int] = defaultdict(int)
        for into, amounts in ((available, found.available), (pending, found.pending)):
            for amount in amounts:
                into[amount.currency.upper()] += amount.amount
        return PspBalance(dict(available), dict(pending))


# --- webhooks -------------------------------------------------------------------------------


def verify_event(
    payload: bytes, signature: str | None, secret: str, *, tolerance: int = WEBHOOK_TOLERANCE_SECONDS
) -> VerifiedEvent:
    """The event in ``payload`` if ``signature`` (the ``Stripe-Signature`` header) signs exactly
    these bytes under ``secret`` within ``tolerance`` seconds and they are an event (an object
    with ``id``, ``type`` and ``created``); else :class:`InvalidSignature`."""
    if not signature:
        raise InvalidSignature("the Stripe-Signature header is missing")
    # The check ``stripe.Webhook.construct_event`` makes first; its parsing after that breaks on a
    # signed body that is JSON but not an object (AttributeError), so the body is parsed here.
    try:
        stripe.WebhookSignature.verify_header(payload.decode("utf-8"), signature, secret, tolerance)
    except stripe.SignatureVerificationError as error:
        raise InvalidSignature(error.user_message or str(error)) from None
    except UnicodeDecodeError:
        raise InvalidSignature("the body is not UTF-8") from None
    try:
        body = json.loads(payload)
    except ValueError:
        raise InvalidSignature("the body is not a JSON event") from None
    if not isinstance(body, dict):
        raise InvalidSignature("the body is not a JSON event")
    event_id, kind, created = body.get("id"), body.get("type"), body.get("created")
    if not (isinstance(event_id, str) and 0 < len(event_id) <= 255 and isinstance(kind, str) and 0 < len(kind) <= 100):
        raise InvalidSignature("the event has no id or type")
    if not isinstance(created, int) or isinstance(created, bool):
        raise InvalidSignature("the event has no created time")
    data = body.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    object_id = obj.get("id") if isinstance(obj, dict) else None
    return VerifiedEvent(
        id=event_id,
        type=kind,
        created=datetime.fromtimestamp(created, UTC),
        object_id=object_id if isinstance(object_id, str) and len(object_id) <= 255 else None,
        payload=body,
    )
