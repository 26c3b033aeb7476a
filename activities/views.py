"""What collection's activities answer: the service's payment state as the workflows' contracts say it
(shared by the collection activities and the billing batch that starts collection)."""

from __future__ import annotations

from services import payments
from workflows.contracts import AttemptView, CollectionSnapshot, SettleResult


def attempt_view(attempt: payments.Attempt) -> AttemptView:
    return AttemptView(
        attempt_id=attempt.attempt_id,
        number=attempt.number,
        status=attempt.status.value,
        amount=attempt.amount,
        currency=attempt.currency,
        source=attempt.source.value,
        payment_intent_id=attempt.payment_intent_id,
        decline_code=attempt.decline_code,
        message=attempt.message,
    )


def snapshot_view(state: payments.Collection) -> CollectionSnapshot:
    return CollectionSnapshot(
        invoice_id=state.invoice_id,
        status=state.status.value,
        total=state.total,
        amount_paid=state.amount_paid,
        amount_credited=state.amount_credited,
        amount_due=state.amount_due,
        currency=state.currency,
        due_at=state.due_at,
        has_payment_method=state.has_payment_method,
        in_flight=attempt_view(state.in_flight) if state.in_flight else None,
        attempts=state.attempts,
        tenant_id=state.tenant_id,
    )


def settle_view(settled: payments.Settled) -> SettleResult:
    return SettleResult(attempt_view(settled.attempt), snapshot_view(settled.collection), settled.found_at_psp)
