"""PSP webhooks: the router reads the raw body and the signature header and hands both to
:mod:`services.psp_events`, where the rule lives. Outside the authenticated tree: the signature
is the caller's credential."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Request, status
from pydantic import BaseModel

from api.deps import SessionDep, SettingsDep
from api.errors import ApiError, error_responses
from services import psp_events

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


class WebhookAck(BaseModel):
    event_id: str
    type: str
    status: Literal["received", "processed", "ignored"]
    duplicate: bool


@router.post(
    "/stripe",
    responses=error_responses(400),
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "A Stripe event, exactly as signed",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    },
)
async def stripe_webhook(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    stripe_signature: Annotated[str | None, Header(description="t=<unix time>,v1=<HMAC-SHA256>")] = None,
) -> WebhookAck:
    """A Stripe event, verified and stored once: 200 for a new, duplicate or unhandled event;
    400 for a missing, wrong or stale signature (nothing stored)."""
    payload = await request.body()
    try:
        intake = await psp_events.record(session, payload, stripe_signature, settings.stripe_webhook_secret)
    except psp_events.SignatureRejected as refused:
        raise ApiError(status.HTTP_400_BAD_REQUEST, refused.kind, refused.message, refused.field, "header") from None
    return WebhookAck(
        event_id=intake.event_id, type=intake.type, status=intake.status.value, duplicate=intake.duplicate
    )
