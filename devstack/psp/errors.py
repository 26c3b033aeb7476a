"""Stripe's error shape: ``{"error": {"type", "code", "message", "param", "decline_code", ...}}``."""

from __future__ import annotations

from typing import Any

DOCS = "https://stripe.com/docs/error-codes"


class StripeError(Exception):
    """An API error answered in Stripe's shape.

    ``validation`` marks errors raised before an endpoint began executing (bad or missing
    parameters): Stripe saves no idempotent result for those, so a corrected retry with the
    same key runs. Every other error is saved and replayed like a success.
    """

    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        validation: bool = False,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.code = code
        self.param = param
        self.validation = validation
        self.extra = extra

    def with_code(self, code: str) -> StripeError:
        self.code = code
        return self

    def with_validation(self) -> StripeError:
        self.validation = True
        return self

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.code is not None:
            error["code"] = self.code
            error["doc_url"] = f"{DOCS}#{self.code.replace('_', '-')}"
        if self.param is not None:
            error["param"] = self.param
        error.update(self.extra)
        return {"error": error}


def resource_missing(kind: str, object_id: str, param: str) -> StripeError:
    return StripeError(
        404, "invalid_request_error", f"No such {kind}: '{object_id}'", code="resource_missing", param=param
    )


def invalid(message: str, param: str | None = None, code: str | None = None, **extra: Any) -> StripeError:
    return StripeError(400, "invalid_request_error", message, param=param, code=code, **extra)
