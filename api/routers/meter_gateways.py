"""Meter gateways over HTTP (operators): register one, list them, rotate a secret, disable one.
The rules (secrets, the rotation overlap) live in :mod:`services.meter_gateways`."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from fastapi import APIRouter, status
from pydantic import BaseModel, Field

from api.auth import ADMINS, allow
from api.deps import SessionDep, SettingsDep
from api.errors import error_responses
from api.routing import DecimalJSONRoute
from schema.models import MeterGateway
from services import meter_gateways

router = APIRouter(prefix="/meter-gateways", tags=["meter gateways"], route_class=DecimalJSONRoute)


class MeterGatewayCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    tenant_id: uuid.UUID | None = Field(default=None, description="Bind the gateway to one tenant's usage")


class MeterGatewayPublic(BaseModel):
    id: uuid.UUID
    name: str
    tenant_id: uuid.UUID | None
    created_at: datetime
    disabled_at: datetime | None
    previous_secret_valid_until: datetime | None


class MeterGatewaySecret(MeterGatewayPublic):
    secret: str = Field(description="The HMAC-SHA256 key; shown only now")


def public(gateway: MeterGateway) -> MeterGatewayPublic:
    return MeterGatewayPublic(
        id=gateway.id,
        name=gateway.name,
        tenant_id=gateway.tenant_id,
        created_at=gateway.created_at,
        disabled_at=gateway.disabled_at,
        previous_secret_valid_until=gateway.previous_valid_until,
    )


def with_secret(made: meter_gateways.GatewayWithSecret) -> MeterGatewaySecret:
    return MeterGatewaySecret(**public(made.gateway).model_dump(), secret=made.secret)


@router.post("", dependencies=[allow(ADMINS)], status_code=status.HTTP_201_CREATED, responses=error_responses(422))
async def create_meter_gateway(body: MeterGatewayCreate, session: SessionDep) -> MeterGatewaySecret:
    """Register a gateway; its signing secret is in this answer only."""
    return with_secret(await meter_gateways.create(session, body.name, body.tenant_id))


@router.get("", dependencies=[allow(ADMINS)])
async def list_meter_gateways(session: SessionDep) -> list[MeterGatewayPublic]:
    return [public(gateway) for gateway in await meter_gateways.listing(session)]


@router.post("/{gateway_id}/rotate-secret", dependencies=[allow(ADMINS)], responses=error_responses(404))
async def rotate_meter_gateway_secret(
    gateway_id: uuid.UUID, session: SessionDep, settings: SettingsDep
) -> MeterGatewaySecret:
    """A new secret, in this answer only; the old one is accepted for METER_GATEWAY_ROTATION_OVERLAP."""
    overlap = timedelta(seconds=settings.meter_gateway_rotation_overlap)
    return with_secret(await meter_gateways.rotate(session, gateway_id, overlap))


@router.post("/{gateway_id}/disable", dependencies=[allow(ADMINS)], responses=error_responses(404))
async def disable_meter_gateway(gateway_id: uuid.UUID, session: SessionDep) -> MeterGatewayPublic:
    return public(await meter_gateways.disable(session, gateway_id))
