"""The invoice as a document, end to end: a billing run on the time-skipping Temporal server with
real PostgreSQL and Chromium, then the PDF (read with pypdf) and GET /v1/invoices/{id}."""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime

import pytest
import pytest_asyncio
from pypdf import PdfReader
from sqlmodel import col, select
from temporalio.testing import ActivityEnvironment

from activities.billing import BillingActivities
from adapters.storage import LocalDocumentStore
from core.settings import Settings
from schema.models import Invoice, Room
from services.invoicing import InvoiceTerms
from tests import factories
from tests.test_api_support import api_client
from tests.test_billing_workflows import start_run
from worker import build_worker
from workflows.contracts import CreateInvoiceInput, FinalizeInvoiceInput, RenderInvoicePdfInput, invoice_workflow_id

pytestmark = pytest.mark.db

START = datetime(2026, 1, 10, 9, tzinfo=UTC)
FEB_10_BERLIN = datetime(2026, 2, 9, 23, tzinfo=UTC)  # local midnight of Feb 10 (CET, UTC+1): boundary 1
MOVED_AT = datetime(2026, 2, 12, 10, tzinfo=UTC)  # after boundary 1, registered before it is billed
ISSUED = datetime(2026, 2, 15, 23, 30, tzinfo=UTC)  # Feb 16, 00:30 in Berlin
TERMS = InvoiceTerms("Roomly Rooms GmbH", "Musterstraße 1\n10115 Berlin", "DE123456789", "RB", 14)


@pytest_asyncio.fixture
async def api(sessions, settings, temporal_env):
    async with api_client(settings, temporal_env.client) as client:
        yield client


def pdf_text(data: bytes) -> str:
    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(data)).pages)


async def test_the_document_shows_the_room_at_the_boundary_the_issuer_and_local_dates(
    temporal_env, sessions, renderer, settings, api, record_history
):
    cat = await factories.catalog(sessions)
    sub = await factories.subscriber(sessions, cat, START, name="Lena Berger", timezone="Europe/Berlin")
    async with sessions() as s:
        suite = Room(code="S-7", name="Suite 7", plan_id=cat.plan.id)
        s.add(suite)
        await s.commit()
    moved = await api.post(
        f"/v1/subscriptions/{sub.id}/move-room", json={"room_id": str(suite.id), "effective_at": MOVED_AT.isoformat()}
    )
    assert moved.status_code == 200, moved.text
    store = LocalDocumentStore(settings.documents_root)
    activities = BillingActivities(sessions, renderer, store, TERMS, clock=lambda: ISSUED)

    async with build_worker(temporal_env.client, settings, activities):
        progress = await (await start_run(temporal_env, settings)).result()
        child = temporal_env.client.get_workflow_handle(invoice_workflow_id(sub.id, FEB_10_BERLIN))
        await record_history(child, "invoice_cycle_number_at_finalization_current")
    assert progress.invoices_created == 2 and progress.failed == 0

    async with sessions() as s:
        invoice = (await s.exec(select(Invoice).where(col(Invoice.period_start) == FEB_10_BERLIN))).one()
    assert invoice.number == "RB-000002" and invoice.pdf_location is not None
    text = pdf_text(await store.get(invoice.pdf_location))
    assert "Room of Lena Berger" in text and "Suite 7" not in text  # in force at Feb 10, not today's room
    assert "Standard room" in text
    for issuer in ("Roomly Rooms GmbH", "Musterstraße 1", "10115 Berlin", "DE123456789"):
        assert issuer in text
    assert "RB-000002" in text
    assert "Feb 16, 2026" in text  # issued 23:30 UTC on Feb 15 is Feb 16 in Berlin
    assert "Mar 2, 2026 (net 14)" in text  # due 14 local days later
    assert "Feb 10, 2026 \u2013 Mar 9, 2026" in text  # billing period in local dates
    assert "Dates in Europe/Berlin" in text

    detail = (await api.get(f"/v1/invoices/{invoice.id}")).json()
    assert {k: detail[k] for k in ("number", "status", "room_name", "plan_name", "timezone")} == {
        "number": "RB-000002",
        "status": "open",
        "room_name": "Room of Lena Berger",
        "plan_name": "Standard room",
        "timezone": "Europe/Berlin",
    }
    assert (detail["issuer_name"], detail["issuer_address"], detail["issuer_tax_id"]) == (
        "Roomly Rooms GmbH",
        "Musterstraße 1\n10115 Berlin",
        "DE123456789",
    )
    assert datetime.fromisoformat(detail["issued_at"]) == ISSUED
    assert datetime.fromisoformat(detail["due_at"]) == datetime(2026, 3, 1, 23, 30, tzinfo=UTC)  # Mar 2, 00:30 CET
    assert detail["pdf_url"] == f"/v1/invoices/{invoice.id}/pdf"

    subscription = (await api.get(f"/v1/subscriptions/{sub.id}")).json()
    assert uuid.UUID(subscription["room_id"]) == suite.id  # the subscription's room today is the suite


async def test_the_old_order_create_render_finalize_still_ends_with_a_numbered_open_invoice(
    sessions, renderer, settings
):
    """What a workflow started before numbering at finalization still does after the deploy: it
    renders a draft (the render finalizes it first), then calls finalize_invoice with the PDF."""
    cat = await factories.catalog(sessions)
    sub = await factories.subscriber(sessions, cat, START, name="Grace Hopper", timezone="Europe/Berlin")
    store = LocalDocumentStore(settings.documents_root)
    activities = BillingActivities(sessions, renderer, store, TERMS, clock=lambda: ISSUED)
    env = ActivityEnvironment()

    created = await env.run(
        activities.create_invoice,
        CreateInvoiceInput(sub.id, 0, datetime(2026, 1, 9, 23, tzinfo=UTC), "invoice:old-order"),
    )
    assert created.number is None and created.status == "draft"
    pdf = await env.run(activities.render_invoice_pdf, RenderInvoicePdfInput(created.invoice_id))
    await env.run(activities.finalize_invoice, FinalizeInvoiceInput(created.invoice_id, pdf.location))
    await env.run(activities.finalize_invoice, FinalizeInvoiceInput(created.invoice_id, pdf.location))  # a retry

    async with sessions() as s:
        invoice = await s.get(Invoice, created.invoice_id)
    assert invoice is not None and invoice.status == "open" and invoice.number == pdf.number == "RB-000001"
    assert invoice.pdf_location == pdf.location and invoice.issued_at == ISSUED
    text = pdf_text(await store.get(pdf.location))
    assert "RB-000001" in text and "Roomly Rooms GmbH" in text and "Dates in Europe/Berlin" in text


def production(**issuer: str) -> Settings:
    psp = {"stripe_api_key": "sk_live_x", "stripe_webhook_secret": "whsec_real"}  # refused too, tests/test_psp.py
    return Settings.model_validate(
        {"environment": "production", "database_url": "postgresql://db/x", "temporal_address": "t:7233"}
        | {"smtp_host": "smtp.example.com", "smtp_from": "billing@example.com"}
        | psp
        | issuer
    )


def test_production_refuses_the_demo_issuer():
    with pytest.raises(ValueError, match="ISSUER_NAME, ISSUER_ADDRESS, ISSUER_TAX_ID must be set") as all_three:
        production()
    with pytest.raises(ValueError, match="ISSUER_TAX_ID must be set") as tax_id:
        production(issuer_name="Roomly Rooms AG", issuer_address="Bahnhofstrasse 1, 8001 Zürich")
    assert "ISSUER_NAME" in str(all_three.value) and "ISSUER_NAME" not in str(tax_id.value)
    real = production(issuer_name="Roomly Rooms AG", issuer_address="Bahnhofstrasse 1", issuer_tax_id="CHE-123.456.789")
    assert real.issuer_tax_id == "CHE-123.456.789"
