"""The console's dunning page against a real ``Dunning`` workflow (time-skipping Temporal, the PSP
emulator's declining card, aiosmtpd for the notices): who is in which stage; a validator's refusal
shown as a message on the page; pause; write off (``mark_uncollectible``); then mark paid (the
collection's ``record_payment`` Update) ending the dunning. The set-up is tests/test_dunning.py's ``declined``."""

from __future__ import annotations

import re

import httpx
import pytest

from api.main import create_app
from core.principal import Role
from schema.models import Invoice, InvoiceStatus
from tests.test_dunning import declined, emulator, env  # noqa: F401  (fixtures)
from tests.test_notices import smtp  # noqa: F401  (a fixture: a real aiosmtpd server)
from tests.web_support import csrf_of, sign_in, user
from workflows.contracts import DUNNING_STATE_QUERY, DunningState

pytestmark = pytest.mark.db


async def test_the_dunning_page_shows_the_stage_a_refusal_and_the_actions_end_it(
    sessions,
    settings,
    env,  # noqa: F811
    activities,
    renderer,
    emulator,  # noqa: F811
    smtp,  # noqa: F811
):
    email = await user(sessions, Role.operator_admin, None)
    async with declined(sessions, settings, env, activities, renderer, emulator, smtp[1]) as case:
        tenant = str(case.sub.tenant_id)
        app = create_app(settings, temporal_client=env.client)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=30) as client:
                assert (await sign_in(client, "console", email)).status_code == 303
                page = await client.get("/console/dunning")
                assert page.status_code == 200, page.text
                row = page.text.split(f'data-tenant="{tenant}"', 1)[1].split("</tr>", 1)[0]
                assert "status-reminder" in row and f'data-invoice="{case.invoice.id}"' in row
                assert "$650.00" in row  # what is outstanding
                token = csrf_of(page.text)

                # Not paused: resume is refused by the workflow's validator, shown on the page.
                refused = await client.post(f"/console/dunning/{tenant}/resume", data={"csrf_token": token})
                assert refused.status_code == 409
                message = re.search(r'<li data-field="status">(.*?)</li>', refused.text, re.S)
                assert message and "paused" in message.group(1), refused.text

                paused = await client.post(
                    f"/console/dunning/{tenant}/pause", data={"csrf_token": token, "reason": "tenant called"}
                )
                assert paused.status_code == 303, paused.text
                shown = await client.get(paused.headers["location"])
                assert "pause sent: stage reminder" in shown.text
                state = await case.dunning.query(DUNNING_STATE_QUERY, result_type=DunningState)
                assert state.paused and state.actions[-1].endswith("tenant called")

                # Written off (the collection's mark_uncollectible Update): still owed, still chased.
                write_off = f"/console/invoices/{case.invoice.id}/write-off"
                written = await client.post(write_off, data={"csrf_token": token})
                assert written.status_code == 303, written.text
                assert "written off" in (await client.get(written.headers["location"])).text
                async with sessions() as s:
                    invoice = await s.get(Invoice, case.invoice.id)
                assert invoice is not None and invoice.status == InvoiceStatus.uncollectible

                # The tenant paid by bank transfer: mark paid records what is due; dunning ends.
                await client.post(f"/console/dunning/{tenant}/resume", data={"csrf_token": token})
                marked = await client.post(
                    f"/console/invoices/{case.invoice.id}/mark-paid", data={"csrf_token": token, "reference": "TX-9"}
                )
                assert marked.status_code == 303, marked.text
                assert (await case.dunning.result()).stage == "resolved"
                after = await client.get("/console/dunning")
                assert f'data-tenant="{tenant}"' not in after.text
                paid_twice = await client.post(
                    f"/console/invoices/{case.invoice.id}/mark-paid", data={"csrf_token": token, "reference": "TX-9"}
                )
                assert paid_twice.status_code == 409 and 'id="refused"' in paid_twice.text  # paid: nothing due
