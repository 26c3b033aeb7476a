"""Promo codes: percent or fixed amount off, for one, N or every invoice; redeemed on subscriptions."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, status
from sqlmodel import select

from api.auth import OPERATORS, allow
from api.deps import SessionDep
from api.errors import get_or_404
from api.pagination import Page, PageQuery, fetch_page
from api.pricing import engine_promo
from api.routing import DecimalJSONRoute
from api.schemas import PromoCodeCreate, PromoCodePublic
from schema.models import PromoCode
from services import catalog

router = APIRouter(prefix="/promo-codes", tags=["promo codes"], route_class=DecimalJSONRoute)


@router.post(
    "",
    dependencies=[allow(OPERATORS)],
    status_code=status.HTTP_201_CREATED,
    responses={
        status.HTTP_409_CONFLICT: {"description": "A promo code with this code exists"},
        status.HTTP_422_UNPROCESSABLE_CONTENT: {"description": "Invalid field"},
    },
)
async def create_promo_code(body: PromoCodeCreate, session: SessionDep) -> PromoCodePublic:
    return PromoCodePublic.model_validate(await catalog.create_promo_code(session, engine_promo(body)))


@router.get("", dependencies=[allow(OPERATORS)])
async def list_promo_codes(session: SessionDep, paging: PageQuery) -> Page[PromoCodePublic]:
    """Promo codes, oldest first."""
    return (await fetch_page(session, select(PromoCode), PromoCode, paging)).page(PromoCodePublic.model_validate)


@router.get(
    "/{promo_code_id}",
    dependencies=[allow(OPERATORS)],
    responses={status.HTTP_404_NOT_FOUND: {"description": "Unknown promo code"}},
)
async def get_promo_code(promo_code_id: uuid.UUID, session: SessionDep) -> PromoCodePublic:
    promo = await get_or_404(session, PromoCode, promo_code_id, "promo code")
    return PromoCodePublic.model_validate(promo)
