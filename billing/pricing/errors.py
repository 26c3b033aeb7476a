"""Typed errors of the pricing engine. Each names the field at fault, so an API can answer 422 with it."""

from __future__ import annotations


class PricingError(ValueError):
    """Base of every error the pricing engine raises on bad input."""


class FieldError(PricingError):
    """A value is invalid; ``field`` is its path, e.g. ``tiers[2].up_to``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def within(self, prefix: str) -> FieldError:
        """The same error, with its field path nested under ``prefix`` (``charges[0]`` + ``price.unit_amount``)."""
        path = f"{prefix}{self.field}" if self.field.startswith("[") else f"{prefix}.{self.field}"
        return type(self)(path, self.message)


class IncompatibleMoveError(FieldError):
    """A room move to a plan of another currency or cadence."""


class PromoNotRedeemableError(FieldError):
    """A promo code past its expiry or out of redemptions, or for another currency."""
