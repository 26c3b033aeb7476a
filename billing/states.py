"""The two state machines of collection: the invoice's and the payment attempt's.

Pure: the allowed transitions as data, one function that decides a requested change. The
database holds the same tables again in its triggers (migrations 0004 and 0010), and
``tests/test_states.py`` checks that both agree for every pair of states.

Invoice (Stripe's lifecycle)::

    draft -> open -> paid | void | uncollectible;   uncollectible -> paid | void

Payment attempt::

    initiated -> processing -> succeeded | failed
    initiated | processing -> unknown -> processing | succeeded | failed
    succeeded -> partially_refunded -> refunded     (succeeded -> refunded at once too)

A terminal state stays terminal; asking for the state a row is already in is a no-op (the
webhook that arrives twice, the activity that is retried). ``amount_due = total - amount_paid
- amount_credited`` is the one formula of what is left to collect.
"""

from __future__ import annotations

from enum import StrEnum


class InvoiceStatus(StrEnum):
    """Stripe's lifecycle. Only a draft can change; a finalized invoice only moves on by status."""

    draft = "draft"  # lines written, no number yet
    open = "open"  # finalized: numbered, issued, due; the document never changes again
    paid = "paid"
    void = "void"
    uncollectible = "uncollectible"


class AttemptStatus(StrEnum):
    initiated = "initiated"  # our row exists; the PSP has not been asked yet (or its answer is not stored)
    processing = "processing"  # the PSP accepted the payment; its outcome comes by webhook or lookup
    succeeded = "succeeded"
    failed = "failed"  # declined (with its decline code) or refused
    unknown = "unknown"  # the PSP call timed out or its answer was lost: look it up before anything else
    partially_refunded = "partially_refunded"
    refunded = "refunded"


INVOICE_TRANSITIONS: dict[InvoiceStatus, frozenset[InvoiceStatus]] = {
    InvoiceStatus.draft: frozenset({InvoiceStatus.open}),
    InvoiceStatus.open: frozenset({InvoiceStatus.paid, InvoiceStatus.void, InvoiceStatus.uncollectible}),
    InvoiceStatus.uncollectible: frozenset({InvoiceStatus.paid, InvoiceStatus.void}),
    InvoiceStatus.paid: frozenset(),
    InvoiceStatus.void: frozenset(),
}

ATTEMPT_TRANSITIONS: dict[AttemptStatus, frozenset[AttemptStatus]] = {
    AttemptStatus.initiated: frozenset(
        {AttemptStatus.processing, AttemptStatus.succeeded, AttemptStatus.failed, AttemptStatus.unknown}
    ),
    AttemptStatus.processing: frozenset({AttemptStatus.succeeded, AttemptStatus.failed, AttemptStatus.unknown}),
    AttemptStatus.unknown: frozenset({AttemptStatus.processing, AttemptStatus.succeeded, AttemptStatus.failed}),
    AttemptStatus.succeeded: frozenset({AttemptStatus.partially_refunded, AttemptStatus.refunded}),
    AttemptStatus.partially_refunded: frozenset({AttemptStatus.refunded}),
    AttemptStatus.failed: frozenset(),
    AttemptStatus.refunded: frozenset(),
}

# An attempt in one of these holds the invoice: no second attempt may start (a partial unique
# index says the same in the database).
IN_FLIGHT = frozenset({AttemptStatus.initiated, AttemptStatus.processing, AttemptStatus.unknown})
# Attempts whose money was captured (some of it may have been refunded since).
CAPTURED = frozenset({AttemptStatus.succeeded, AttemptStatus.partially_refunded, AttemptStatus.refunded})
# Invoices that can still be paid.
COLLECTABLE = frozenset({InvoiceStatus.open, InvoiceStatus.uncollectible})


class IllegalTransition(ValueError):
    def __init__(self, machine: str, current: str, wanted: str) -> None:
        super().__init__(f"{machine} cannot go from {current} to {wanted}")
        self.current = current
        self.wanted = wanted


def invoice_transition(current: InvoiceStatus, wanted: InvoiceStatus) -> bool:
    """True: a change to make; False: already there (a no-op). Else :class:`IllegalTransition`."""
    if current == wanted:
        return False
    if wanted not in INVOICE_TRANSITIONS[current]:
        raise IllegalTransition("an invoice", current.value, wanted.value)
    return True


def attempt_transition(current: AttemptStatus, wanted: AttemptStatus) -> bool:
    """True: a change to make; False: already there (a no-op). Else :class:`IllegalTransition`."""
    if current == wanted:
        return False
    if wanted not in ATTEMPT_TRANSITIONS[current]:
        raise IllegalTransition("a payment attempt", current.value, wanted.value)
    return True


def is_terminal(status: AttemptStatus) -> bool:
    return not ATTEMPT_TRANSITIONS[status]


def amount_due(total: int, amount_paid: int, amount_credited: int) -> int:
    """What is left to collect on an invoice, in minor units."""
    return total - amount_paid - amount_credited


def refund_status(amount: int, amount_refunded: int) -> AttemptStatus:
    """The status of a succeeded attempt after ``amount_refunded`` of its ``amount`` went back."""
    if amount_refunded <= 0:
        return AttemptStatus.succeeded
    return AttemptStatus.refunded if amount_refunded >= amount else AttemptStatus.partially_refunded
