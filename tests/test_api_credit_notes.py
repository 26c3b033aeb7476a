"""Credit notes over HTTP: 201 with the split and the workflow started, 409 naming the field, 422
for bad bodies, 404 for unknown ids, the list with its filters and cursor, and the PDF."""

from __future__ import annotations

import uuid

import pytest
import pytest_asyncio

from core.settings import Settings
from schema.models import CreditNote
from tests.credit_note_support import finalized_invoice, pay, subscription
from tests.test_api_support import api_client
from workflows.contracts import CREDIT_NOTE_WORKFLOW, credit_note_workflow_id

pytestmark = pytest.mark.db


@pytest_asyncio.fixture
async def api(sessions, settings, temporal_env):
    async with api_client(settings, temporal_env.client) as client:
        yield client


def field_of(response) -> tuple[str, str | None]:
    error = response.json()["errors"][0]
    return error["type"], error["field"]


async def test_issue_read_list_and_refuse(api, sessions, settings, temporal_env):
    sub = await subscription(sessions)
    invoice_id, (rent_line, usage_line) = await finalized_invoice(sessions, sub)
    draft_id, _ = await finalized_invoice(sessions, sub, finalize=False, start=sub.anchor_at)

    body = {
        "lines": [
            {"description": "Heating out", "amount": 3870, "invoice_line_id": str(rent_line)},
            {"description": "Meter misread", "amount": 1130, "invoice_line_id": str(usage_line)},
        ],
        "reason": "product_unsatisfactory",
        "memo": "Sorry",
    }
    created = await api.post(f"/v1/invoices/{invoice_id}/credit-notes", json=body)
    assert created.status_code == 201, created.text
    note = created.json()
    assert (note["number"], note["amount"], note["pre_payment_amount"], note["refund_amount"]) == (
        "CN-000001",
        5000,
        5000,
        0,
    )
    assert note["invoice_number"] == "INV-000001" and note["actor"] == "test-operator" and note["pdf_url"] is None
    assert [(line["position"], line["amount"]) for line in note["lines"]] == [(1, 3870), (2, 1130)]
    assert note["refunds"] == []
    # Its workflow was started under the note's business key (no worker here: it waits).
    handle = temporal_env.client.get_workflow_handle(credit_note_workflow_id(uuid.UUID(note["id"])))
    description = await handle.describe()
    assert description.workflow_type == CREDIT_NOTE_WORKFLOW
    await handle.terminate()

    # The invoice is paid in full by card; a note of 2000 is refunded.
    await pay(sessions, invoice_id, 59000)
    refunded = await api.post(
        f"/v1/invoices/{invoice_id}/credit-notes",
        json={"lines": [{"description": "Goodwill", "amount": 2000}], "reason": "order_change"},
    )
    assert refunded.status_code == 201, refunded.text
    second = refunded.json()
    assert (second["number"], second["pre_payment_amount"], second["refund_amount"]) == ("CN-000002", 0, 2000)
    assert [(r["amount"], r["status"], r["psp_refund_id"]) for r in second["refunds"]] == [(2000, "pending", None)]
    await temporal_env.client.get_workflow_handle(credit_note_workflow_id(uuid.UUID(second["id"]))).terminate()

    # 409: more than is left of the total (64000 - 7000), a draft, an invoice line beyond its amount.
    too_much = await api.post(
        f"/v1/invoices/{invoice_id}/credit-notes",
        json={"lines": [{"description": "All", "amount": 57001}], "reason": "duplicate"},
    )
    assert too_much.status_code == 409 and field_of(too_much) == ("conflict", "lines")
    drafted = await api.post(
        f"/v1/invoices/{draft_id}/credit-notes",
        json={"lines": [{"description": "x", "amount": 1}], "reason": "duplicate"},
    )
    assert drafted.status_code == 409 and field_of(drafted) == ("conflict", "status")
    line_over = await api.post(
        f"/v1/invoices/{invoice_id}/credit-notes",
        json={
            "lines": [{"description": "x", "amount": 4000, "invoice_line_id": str(usage_line)}],
            "reason": "duplicate",
        },
    )
    assert line_over.status_code == 409 and field_of(line_over) == ("conflict", "lines[0].amount")
    # 422 naming the field; 404 for an unknown invoice.
    for bad, field in (
        ({"lines": [], "reason": "duplicate"}, "lines"),
        ({"lines": [{"description": "x", "amount": 0}], "reason": "duplicate"}, "lines[0].amount"),
        ({"lines": [{"description": "x", "amount": "12"}], "reason": "duplicate"}, "lines[0].amount"),
        ({"lines": [{"description": "", "amount": 1}], "reason": "duplicate"}, "lines[0].description"),
        ({"lines": [{"description": "x\u0000", "amount": 1}], "reason": "duplicate"}, "lines[0].description"),
        ({"lines": [{"description": "x", "amount": 1}], "reason": "goodwill"}, "reason"),
        ({"lines": [{"description": "x", "amount": 2**63}], "reason": "duplicate"}, "lines[0].amount"),
    ):
        answer = await api.post(f"/v1/invoices/{invoice_id}/credit-notes", json=bad)
        assert answer.status_code == 422, (bad, answer.text)
        assert field_of(answer)[1] == field, bad
    unknown = await api.post(
        f"/v1/invoices/{uuid.uuid4()}/credit-notes",
        json={"lines": [{"description": "x", "amount": 1}], "reason": "duplicate"},
    )
    assert unknown.status_code == 404 and field_of(unknown) == ("not_found", "invoice_id")

    # Reading: one note, the list (filters, cursor), the PDF before it is rendered.
    one = await api.get(f"/v1/credit-notes/{note['id']}")
    assert one.status_code == 200 and one.json()["lines"] == note["lines"]
    assert (await api.get(f"/v1/credit-notes/{uuid.uuid4()}")).status_code == 404
    page = (await api.get("/v1/credit-notes", params={"limit": 1})).json()
    assert [n["number"] for n in page["data"]] == ["CN-000001"] and page["has_more"]
    rest = (await api.get("/v1/credit-notes", params={"limit": 1, "cursor": page["next_cursor"]})).json()
    assert [n["number"] for n in rest["data"]] == ["CN-000002"] and not rest["has_more"]
    by_invoice = (await api.get("/v1/credit-notes", params={"invoice_id": str(invoice_id)})).json()
    assert len(by_invoice["data"]) == 2
    assert (await api.get("/v1/credit-notes", params={"tenant_id": str(uuid.uuid4())})).json()["data"] == []
    pending_pdf = await api.get(f"/v1/credit-notes/{note['id']}/pdf")
    assert pending_pdf.status_code == 409 and field_of(pending_pdf) == ("conflict", "pdf")
    assert (await api.get(f"/v1/credit-notes/{uuid.uuid4()}/pdf")).status_code == 404

    # With a stored document attached, the PDF is served.
    path = settings.documents_root / "credit-notes" / "cn.pdf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"%PDF-1.4 test")
    async with sessions() as s:
        row = await s.get(CreditNote, uuid.UUID(note["id"]))
        assert row is not None
        row.pdf_location = "credit-notes/cn.pdf"
        s.add(row)
        await s.commit()
    served = await api.get(f"/v1/credit-notes/{note['id']}/pdf")
    assert served.status_code == 200 and served.content == b"%PDF-1.4 test"
    assert served.headers["content-type"] == "application/pdf"
    assert (await api.get(f"/v1/credit-notes/{note['id']}")).json()["pdf_url"] == f"/v1/credit-notes/{note['id']}/pdf"


def test_credit_notes_and_invoices_are_numbered_apart():
    assert Settings().credit_note_number_prefix == "CN"
    with pytest.raises(ValueError, match="CREDIT_NOTE_NUMBER_PREFIX must differ"):
        Settings(invoice_number_prefix="DOC", credit_note_number_prefix="DOC")
    with pytest.raises(ValueError, match="credit_note_number_prefix"):
        Settings(credit_note_number_prefix="CN 1")
