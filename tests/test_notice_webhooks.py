"""The optional signed webhook of notices, against real components: PostgreSQL, the API in-process, a real
HTTP receiver (http.server on a loopback port, TLS too) that checks every signature with
``verify_signature``, a real SMTP server (aiosmtpd), and Temporal's time-skipping server for retries."""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import SecretStr
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.billing import BillingActivities
from activities.notices import NoticeActivities
from activities.renewals import RenewalActivities
from adapters.signing_keys import new_private_key
from adapters.storage import LocalDocumentStore
from adapters.webhooks import (
    HttpWebhookSender,
    OutgoingWebhook,
    SignatureError,
    WebhookRejected,
    WebhookTransient,
    signature_header,
    verify_signature,
)
from core.settings import Environment
from devstack.services import free_port
from schema.models import Interval as PlanInterval
from schema.models import Notice, NoticeWebhookStatus, Tenant
from services import notice_webhooks
from services.errors import InvalidInput
from services.notices import NoticeKind
from tests import factories
from tests.test_api_support import api_client
from tests.test_notices import REFUSED, _enqueue, _invoice_with_pdf, _sender, smtp  # noqa: F401  (smtp: a fixture)
from tests.test_renewals import _renewing
from worker import build_worker
from workflows.contracts import (
    ERR_MAIL_REJECTED,
    ERR_MAIL_TRANSIENT,
    ERR_WEBHOOK_REJECTED,
    ERR_WEBHOOK_TRANSIENT,
    RENEWAL_REMINDERS_WORKFLOW,
    RenewalRemindersResult,
    SendNoticeInput,
    SendPendingNoticesInput,
)

pytestmark = pytest.mark.db

HOOK_PATH = "/hooks/roomly?source=billing"


class Killed(BaseException):
    """A worker dying mid-activity (not an Exception: nothing of ours handles it)."""


# --- a real receiver --------------------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: int | str  # the signature's timestamp, or why it did not verify

    @property
    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 in a thread: keeps every POST, checks its signature with
    ``secret`` (the one the API returned), answers the scripted statuses, then 200."""

    port: int = 0
    scheme: str = "http"
    secret: str | None = None
    answers: list[int] = field(default_factory=list)
    delay: float = 0.0
    requests: list[Received] = field(default_factory=list)

    def url(self, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{HOOK_PATH}"

    def answer(self, path: str, headers: dict[str, str], body: bytes) -> int:
        verified: int | str
        try:
            verified = verify_signature(self.secret or "", headers.get("Roomly-Signature"), body, time.time())
        except SignatureError as err:
            verified = str(err)
        self.requests.append(Received(path, headers, body, verified))
        return self.answers.pop(0) if self.answers else 200


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        status = self.server.receiver.answer(self.path, dict(self.headers.items()), body)
        time.sleep(self.server.receiver.delay)
        said = f"status {status}".encode()
        self.send_response(status)
        if 300 <= status < 400:
            self.send_header("Location", "http://127.0.0.1:1/elsewhere")
        self.send_header("Content-Length", str(len(said)))
        self.end_headers()
        self.wfile.write(said)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with serving(Receiver()) as running:
        yield running


@contextmanager
def serving(receiver: Receiver, tls: ssl.SSLContext | None = None) -> Iterator[Receiver]:
    server = _Server(("127.0.0.1", 0), _Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
        receiver.scheme = "https"
    server.receiver = receiver
    receiver.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


def _hooks(timeout: float = 5.0) -> HttpWebhookSender:
    return HttpWebhookSender(timeout=timeout, allow_private=True)


@pytest_asyncio.fixture
async def api(sessions, settings, temporal_env) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(settings, temporal_env.client) as client:
        yield client


async def _configure(sessions, tenant_id: uuid.UUID, url: str) -> str:
    async with sessions() as s:
        return (await notice_webhooks.configure(s, tenant_id, url, production=False)).secret


async def _row(sessions, notice_id: uuid.UUID) -> Notice:
    async with sessions() as s:
        row: Notice | None = await s.get(Notice, notice_id)
        assert row is not None
        return row


def _acts(sessions, store: LocalDocumentStore, smtp_port: int, hooks: Any = None) -> NoticeActivities:
    return NoticeActivities(sessions, _sender(smtp_port), store, hooks or _hooks())


# --- the signature ------------------------------------------------------------------------------------

SECRET = "roomly_whsec_test"
BODY = b'{"id":"n1"}'
T = 1767225600
# openssl: printf '%s' '1767225600.{"id":"n1"}' | openssl dgst -sha256 -hmac roomly_whsec_test
KNOWN = "f24147515896f7325e9d7a081c8abab1a8c4a1b212e30631dc6d36b09fd839d2"


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body():
    assert signature_header(SECRET, BODY, T) == f"t={T},v1={KNOWN}"
    assert verify_signature(SECRET, f"t={T},v1={KNOWN}", BODY, T + 299) == T
    assert verify_signature(SECRET, f"t={T},v1={'0' * 64},v1={KNOWN}", BODY, T) == T  # one of several matches


@pytest.mark.parametrize(
    ("header", "body", "secret", "now", "why"),
    [
        (None, BODY, SECRET, T, "no signature"),
        ("", BODY, SECRET, T, "no signature"),
        (f"v1={KNOWN}", BODY, SECRET, T, "needs t="),
        (f"t={T}", BODY, SECRET, T, "needs t="),
        (f"t=abc,v1={KNOWN}", BODY, SECRET, T, "malformed timestamp"),
        ("garbage", BODY, SECRET, T, "malformed"),
        (f"t={T},v1={KNOWN}", b'{"id":"n2"}', SECRET, T, "no signature matches"),
        (f"t={T},v1={KNOWN}", BODY, "roomly_whsec_other", T, "no signature matches"),
        (f"t={T + 1},v1={KNOWN}", BODY, SECRET, T, "no signature matches"),  # the timestamp is signed too
        (f"t={T},v1={KNOWN}", BODY, SECRET, T + 301, "outside the tolerance"),  # too old: a replay
        (f"t={T},v1={KNOWN}", BODY, SECRET, T - 301, "outside the tolerance"),  # from the future
    ],
)
def test_verify_signature_refuses(header, body, secret, now, why):
    with pytest.raises(SignatureError, match=why):
        verify_signature(secret, header, body, now)


# --- delivered once, signed ---------------------------------------------------------------------------


async def test_a_notice_is_posted_once_signed_with_the_secret_the_api_returned(
    sessions,
    api,
    receiver,
    tmp_path: Path,
    smtp,  # noqa: F811
):
    collector, smtp_port = smtp
    store = LocalDocumentStore(tmp_path)
    invoice = await _invoice_with_pdf(sessions, store)
    response = await api.put(f"/v1/tenants/{invoice.tenant_id}/notice-webhook", json={"url": receiver.url()})
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    answer = response.json()
    assert answer["url"] == receiver.url() and answer["secret"].startswith("roomly_whsec_")
    shown = await api.get(f"/v1/tenants/{invoice.tenant_id}")
    assert shown.json()["notice_webhook_url"] == receiver.url() and answer["secret"] not in shown.text
    receiver.secret = answer["secret"]

    notice_id = await _enqueue(sessions, invoice, NoticeKind.dunning_final)
    assert (await _row(sessions, notice_id)).webhook_status is NoticeWebhookStatus.pending
    acts = _acts(sessions, store, smtp_port)
    first = await ActivityEnvironment().run(acts.send_notice, SendNoticeInput(notice_id))
    again = await ActivityEnvironment().run(acts.send_notice, SendNoticeInput(notice_id))
    assert (first.sent_now, first.webhook_status, first.webhook_delivered_now) == (True, "sent", True)
    assert (again.sent_now, again.webhook_status, again.webhook_delivered_now) == (False, "sent", False)

    (hook,) = receiver.requests
    assert isinstance(hook.verified, int) and abs(hook.verified - time.time()) < 60, hook.verified
    with pytest.raises(SignatureError):  # the signature is the secret's: another one does not verify it
        verify_signature("roomly_whsec_other", hook.headers["Roomly-Signature"], hook.body, time.time())
    assert hook.path == HOOK_PATH
    assert hook.headers["Roomly-Notice-Id"] == str(notice_id)
    assert hook.headers["Content-Type"] == "application/json"
    sent = hook.json
    assert (sent["object"], sent["id"], sent["kind"], sent["tenant_id"]) == (
        "notice",
        str(notice_id),
        "dunning_final",
        str(invoice.tenant_id),
    )
    assert datetime.fromisoformat(sent["created_at"]) <= datetime.now(UTC)
    assert sent["amount_due"] == 64000 and sent["context"]["currency"] == "USD"
    assert sent["context"]["suspend_on"] == "2026-04-10"
    (item,) = sent["context"]["invoices"]
    assert invoice.due_at is not None
    assert (item["number"], item["amount_due"], item["due_date"]) == (
        invoice.number,
        64000,
        invoice.due_at.date().isoformat(),
    )
    assert f"POST /v1/invoices/{invoice.id}/pay" in item["how_to_pay"] and str(invoice.number) in item["how_to_pay"]

    row = await _row(sessions, notice_id)
    assert row.webhook_status is NoticeWebhookStatus.sent and row.webhook_attempts == 1
    assert row.webhook_delivered_at is not None and row.webhook_last_error is None
    assert len(collector.messages) == 1  # and the email, once


# --- retried by Temporal, failed for good ------------------------------------------------------------------


async def _remind_through_temporal(
    sessions, settings, temporal_env, renderer, smtp_port: int, url: str
) -> tuple[Notice, str]:
    """RenewalReminders (the real workflow and its retry policy) for one annual tenant whose webhook is ``url``."""
    sub = await _renewing(sessions, await factories.catalog(sessions), "Ada", PlanInterval.year, 10)
    secret = await _configure(sessions, sub.tenant_id, url)
    store = LocalDocumentStore(settings.documents_root)
    worker = build_worker(
        temporal_env.client,
        settings,
        BillingActivities(sessions, renderer, store),
        extra_activities=[
            *RenewalActivities(sessions, days=14).all(),
            *NoticeActivities(sessions, _sender(smtp_port), store, _hooks()).all(),
        ],
    )
    async with worker:
        result = await temporal_env.client.execute_workflow(
            RENEWAL_REMINDERS_WORKFLOW,
            id=f"renewals-{uuid.uuid4()}",
            task_queue=settings.task_queue,
            result_type=RenewalRemindersResult,
        )
    (notice_id,) = result.notice_ids
    return await _row(sessions, notice_id), secret


async def test_a_receiver_failing_twice_gets_the_notice_on_the_third_try_with_the_same_id(
    sessions,
    settings,
    temporal_env,
    renderer,
    receiver,
    smtp,  # noqa: F811
):
    collector, smtp_port = smtp
    receiver.answers = [500, 503]
    row, receiver.secret = await _remind_through_temporal(
        sessions, settings, temporal_env, renderer, smtp_port, receiver.url()
    )
    assert len(receiver.requests) == 3
    assert {r.headers["Roomly-Notice-Id"] for r in receiver.requests} == {str(row.id)}
    assert len({r.body for r in receiver.requests}) == 1  # the same body on every try
    for hook in receiver.requests:
        assert verify_signature(receiver.secret, hook.headers["Roomly-Signature"], hook.body, time.time(), 3600)
    assert row.webhook_status is NoticeWebhookStatus.sent and row.webhook_attempts == 3
    assert row.webhook_last_error is None and row.webhook_delivered_at is not None
    assert len(collector.messages) == 1  # the retries sent no second email


async def test_a_receiver_answering_410_fails_the_webhook_for_good_without_retries(
    sessions,
    settings,
    temporal_env,
    renderer,
    receiver,
    smtp,  # noqa: F811
):
    collector, smtp_port = smtp
    receiver.answers = [410]
    row, _ = await _remind_through_temporal(sessions, settings, temporal_env, renderer, smtp_port, receiver.url())
    assert len(receiver.requests) == 1
    assert row.webhook_status is NoticeWebhookStatus.failed and row.webhook_attempts == 1
    assert row.webhook_last_error is not None and "answered 410" in row.webhook_last_error
    assert row.webhook_delivered_at is None
    assert len(collector.messages) == 1


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, None),
        (204, None),
        (301, WebhookRejected),  # never followed
        (400, WebhookRejected),
        (401, WebhookRejected),
        (404, WebhookRejected),
        (410, WebhookRejected),
        (408, WebhookTransient),
        (429, WebhookTransient),
        (500, WebhookTransient),
        (502, WebhookTransient),
        (503, WebhookTransient),
    ],
)
async def test_what_each_answer_means(receiver, status: int, outcome: type[Exception] | None):
    receiver.answers = [status]
    hook = OutgoingWebhook(receiver.url(), SECRET, BODY, "n1")
    if outcome is None:
        assert await _hooks().deliver(hook) == status
    else:
        with pytest.raises(outcome, match=str(status)):
            await _hooks().deliver(hook)
    assert len(receiver.requests) == 1  # one POST, no redirect followed


async def test_a_receiver_that_does_not_answer_in_time_is_retried_later(receiver):
    receiver.delay = 3.0
    started = time.monotonic()
    with pytest.raises(WebhookTransient, match=r"no answer within 0\.5 s"):
        await _hooks(timeout=0.5).deliver(OutgoingWebhook(receiver.url(), SECRET, BODY, "n1"))
    assert time.monotonic() - started < 2.0


# --- email and webhook, each on its own --------------------------------------------------------------------


async def test_without_a_webhook_the_notice_is_emailed_and_its_webhook_is_none(
    sessions,
    receiver,
    tmp_path: Path,
    smtp,  # noqa: F811
):
    collector, smtp_port = smtp
    store = LocalDocumentStore(tmp_path)
    invoice = await _invoice_with_pdf(sessions, store)
    before = await _enqueue(sessions, invoice, NoticeKind.payment_failed)
    result = await ActivityEnvironment().run(_acts(sessions, store, smtp_port).send_notice, SendNoticeInput(before))
    assert (result.status, result.sent_now, result.webhook_status) == ("sent", True, "none")
    # A webhook set later is for the notices written from then on.
    receiver.secret = await _configure(sessions, invoice.tenant_id, receiver.url())
    after = await _enqueue(sessions, invoice, NoticeKind.dunning_reminder)
    swept = await ActivityEnvironment().run(
        _acts(sessions, store, smtp_port).send_pending_notices, SendPendingNoticesInput()
    )
    assert (swept.sent, swept.webhooks_sent, swept.failed, swept.webhooks_failed, swept.retry_later) == (1, 1, 0, 0, 0)
    assert [r.headers["Roomly-Notice-Id"] for r in receiver.requests] == [str(after)]
    assert (await _row(sessions, before)).webhook_status is NoticeWebhookStatus.none
    assert len(collector.messages) == 2


async def test_a_failing_webhook_stops_not_the_email_and_the_retry_posts_only_the_webhook(
    sessions,
    receiver,
    tmp_path: Path,
    smtp,  # noqa: F811
):
    collector, smtp_port = smtp
    store = LocalDocumentStore(tmp_path)
    invoice = await _invoice_with_pdf(sessions, store)
    await _configure(sessions, invoice.tenant_id, f"http://127.0.0.1:{free_port()}/hook")  # nothing listens
    notice_id = await _enqueue(sessions, invoice, NoticeKind.dunning_warning)
    acts = _acts(sessions, store, smtp_port)
    with pytest.raises(ApplicationError) as err:
        await ActivityEnvironment().run(acts.send_notice, SendNoticeInput(notice_id))
    assert err.value.type == ERR_WEBHOOK_TRANSIENT and not err.value.non_retryable
    row = await _row(sessions, notice_id)
    assert row.status.value == "sent" and len(collector.messages) == 1
    assert row.webhook_status is NoticeWebhookStatus.pending and row.webhook_attempts == 1 and row.webhook_last_error

    receiver.secret = await _configure(sessions, invoice.tenant_id, receiver.url())  # the receiver is back
    retried = await ActivityEnvironment().run(acts.send_notice, SendNoticeInput(notice_id))
    assert (retried.sent_now, retried.webhook_delivered_now) == (False, True)
    assert len(collector.messages) == 1 and len(receiver.requests) == 1
    assert isinstance(receiver.requests[0].verified, int)
    row = await _row(sessions, notice_id)
    assert row.webhook_status is NoticeWebhookStatus.sent and row.webhook_attempts == 2


async def test_an_email_refused_for_good_stops_not_the_webhook(
    sessions,
    receiver,
    tmp_path: Path,
    smtp,  # noqa: F811
):
    collector, smtp_port = smtp
    store = LocalDocumentStore(tmp_path)
    invoice = await _invoice_with_pdf(sessions, store)
    receiver.secret = await _configure(sessions, invoice.tenant_id, receiver.url())
    notice_id = await _enqueue(sessions, invoice, NoticeKind.payment_failed)
    async with sessions() as s:
        row = await s.get(Notice, notice_id)
        assert row is not None
        row.recipient = REFUSED
        s.add(row)
        await s.commit()
    with pytest.raises(ApplicationError) as err:
        await ActivityEnvironment().run(_acts(sessions, store, smtp_port).send_notice, SendNoticeInput(notice_id))
    assert err.value.type == ERR_MAIL_REJECTED and err.value.non_retryable
    row = await _row(sessions, notice_id)
    assert row.status.value == "failed" and collector.messages == []
    assert row.webhook_status is NoticeWebhookStatus.sent and len(receiver.requests) == 1


async def test_a_mail_server_down_stops_not_the_webhook_and_the_retry_sends_only_the_email(
    sessions,
    receiver,
    tmp_path: Path,
    smtp,  # noqa: F811
):
    collector, smtp_port = smtp
    store = LocalDocumentStore(tmp_path)
    invoice = await _invoice_with_pdf(sessions, store)
    receiver.secret = await _configure(sessions, invoice.tenant_id, receiver.url())
    notice_id = await _enqueue(sessions, invoice, NoticeKind.dunning_reminder)
    with pytest.raises(ApplicationError) as err:
        await ActivityEnvironment().run(_acts(sessions, store, free_port()).send_notice, SendNoticeInput(notice_id))
    assert err.value.type == ERR_MAIL_TRANSIENT and not err.value.non_retryable
    assert len(receiver.requests) == 1 and (await _row(sessions, notice_id)).status.value == "pending"
    retried = await ActivityEnvironment().run(_acts(sessions, store, smtp_port).send_notice, SendNoticeInput(notice_id))
    assert (retried.sent_now, retried.webhook_status, retried.webhook_delivered_now) == (True, "sent", False)
    assert len(receiver.requests) == 1 and len(collector.messages) == 1


async def test_a_webhook_refused_for_good_is_not_retried_and_the_email_goes(
    sessions,
    receiver,
    tmp_path: Path,
    smtp,  # noqa: F811
):
    collector, smtp_port = smtp
    store = LocalDocumentStore(tmp_path)
    invoice = await _invoice_with_pdf(sessions, store)
    receiver.answers = [404]
    await _configure(sessions, invoice.tenant_id, receiver.url())
    notice_id = await _enqueue(sessions, invoice, NoticeKind.dunning_reminder)
    with pytest.raises(ApplicationError) as err:
        await ActivityEnvironment().run(_acts(sessions, store, smtp_port).send_notice, SendNoticeInput(notice_id))
    assert err.value.type == ERR_WEBHOOK_REJECTED and err.value.non_retryable
    assert len(collector.messages) == 1 and len(receiver.requests) == 1
    row = await _row(sessions, notice_id)
    assert (row.status.value, row.webhook_status) == ("sent", NoticeWebhookStatus.failed)


async def test_both_failing_retries_for_the_one_worth_retrying(sessions, receiver, tmp_path: Path):
    store = LocalDocumentStore(tmp_path)
    invoice = await _invoice_with_pdf(sessions, store)
    receiver.answers = [410]
    await _configure(sessions, invoice.tenant_id, receiver.url())
    notice_id = await _enqueue(sessions, invoice, NoticeKind.dunning_reminder)
    with pytest.raises(ApplicationError) as err:  # the webhook refused for good, the mail server down
        await ActivityEnvironment().run(_acts(sessions, store, free_port()).send_notice, SendNoticeInput(notice_id))
    assert err.value.type == ERR_MAIL_TRANSIENT and not err.value.non_retryable
    assert "410" in str(err.value)
    row = await _row(sessions, notice_id)
    assert (row.status.value, row.webhook_status) == ("pending", NoticeWebhookStatus.failed)


async def test_a_webhook_cleared_before_delivery_posts_nothing(
    sessions,
    api,
    receiver,
    tmp_path: Path,
    smtp,  # noqa: F811
):
    _, smtp_port = smtp
    store = LocalDocumentStore(tmp_path)
    invoice = await _invoice_with_pdf(sessions, store)
    await _configure(sessions, invoice.tenant_id, receiver.url())
    notice_id = await _enqueue(sessions, invoice, NoticeKind.dunning_reminder)
    assert (await api.delete(f"/v1/tenants/{invoice.tenant_id}/notice-webhook")).status_code == 204
    result = await ActivityEnvironment().run(_acts(sessions, store, smtp_port).send_notice, SendNoticeInput(notice_id))
    assert (result.sent_now, result.webhook_status) == (True, "none")
    row = await _row(sessions, notice_id)
    assert row.webhook_last_error is not None and "cleared" in row.webhook_last_error
    assert receiver.requests == []


async def test_the_window_between_the_2xx_and_our_commit_resends_with_the_same_notice_id(
    sessions,
    receiver,
    tmp_path: Path,
    smtp,  # noqa: F811
):
    """The documented limit: a sender that dies after the receiver's 2xx and before our commit
    leaves the webhook pending; the retry posts it again, with the same Roomly-Notice-Id and body."""
    _, smtp_port = smtp
    store = LocalDocumentStore(tmp_path)
    invoice = await _invoice_with_pdf(sessions, store)
    receiver.secret = await _configure(sessions, invoice.tenant_id, receiver.url())
    notice_id = await _enqueue(sessions, invoice, NoticeKind.dunning_reminder)

    class DiesAfterTheAnswer(HttpWebhookSender):
        async def deliver(self, hook: OutgoingWebhook) -> int:
            await super().deliver(hook)
            raise Killed("the worker died after the receiver's 2xx, before our commit")

    with pytest.raises(Killed):
        await _acts(sessions, store, smtp_port, DiesAfterTheAnswer(timeout=5, allow_private=True)).send_webhook(
            notice_id
        )
    assert (await _row(sessions, notice_id)).webhook_status is NoticeWebhookStatus.pending
    await ActivityEnvironment().run(_acts(sessions, store, smtp_port).send_notice, SendNoticeInput(notice_id))
    assert [r.headers["Roomly-Notice-Id"] for r in receiver.requests] == [str(notice_id)] * 2
    assert receiver.requests[0].body == receiver.requests[1].body
    assert (await _row(sessions, notice_id)).webhook_status is NoticeWebhookStatus.sent


async def test_the_sweep_posts_each_pending_webhook_once(
    sessions,
    receiver,
    tmp_path: Path,
    smtp,  # noqa: F811
):
    _, smtp_port = smtp
    store = LocalDocumentStore(tmp_path)
    invoice = await _invoice_with_pdf(sessions, store)
    receiver.secret = await _configure(sessions, invoice.tenant_id, receiver.url())
    ids = [await _enqueue(sessions, invoice, kind) for kind in (NoticeKind.dunning_reminder, NoticeKind.dunning_final)]
    receiver.answers = [503, 410]  # the first notice's webhook: later; the second's: never
    acts = _acts(sessions, store, smtp_port)
    runs = [await ActivityEnvironment().run(acts.send_pending_notices, SendPendingNoticesInput()) for _ in range(3)]
    counts = [(r.sent, r.failed, r.webhooks_sent, r.webhooks_failed, r.retry_later) for r in runs]
    assert counts == [(2, 0, 0, 1, 1), (0, 0, 1, 0, 0), (0, 0, 0, 0, 0)]
    assert [r.headers["Roomly-Notice-Id"] for r in receiver.requests] == [str(ids[0]), str(ids[1]), str(ids[0])]
    statuses = [(await _row(sessions, i)).webhook_status for i in ids]
    assert statuses == [NoticeWebhookStatus.sent, NoticeWebhookStatus.failed]


# --- the API: set, rotate, clear, validate -----------------------------------------------------------------


async def test_put_again_rotates_the_secret_and_delete_clears_the_webhook(
    sessions,
    api,
    receiver,
    tmp_path: Path,
    smtp,  # noqa: F811
):
    _, smtp_port = smtp
    store = LocalDocumentStore(tmp_path)
    invoice = await _invoice_with_pdf(sessions, store)
    path = f"/v1/tenants/{invoice.tenant_id}/notice-webhook"
    first = (await api.put(path, json={"url": receiver.url()})).json()["secret"]
    second = (await api.put(path, json={"url": receiver.url()})).json()["secret"]
    assert first != second and len(second) >= len("roomly_whsec_") + 40
    receiver.secret = second
    notice_id = await _enqueue(sessions, invoice, NoticeKind.dunning_reminder)
    await ActivityEnvironment().run(_acts(sessions, store, smtp_port).send_notice, SendNoticeInput(notice_id))
    (hook,) = receiver.requests
    assert isinstance(hook.verified, int)  # signed with the new secret...
    with pytest.raises(SignatureError):  # ...and no more with the old one
        verify_signature(first, hook.headers["Roomly-Signature"], hook.body, time.time())

    assert (await api.delete(path)).status_code == 204
    assert (await api.delete(path)).status_code == 204  # clearing twice is fine
    assert (await api.get(f"/v1/tenants/{invoice.tenant_id}")).json()["notice_webhook_url"] is None
    async with sessions() as s:
        tenant = await s.get(Tenant, invoice.tenant_id)
        assert tenant is not None and tenant.notice_webhook_secret is None
    later = await _enqueue(sessions, invoice, NoticeKind.dunning_final)
    assert (await _row(sessions, later)).webhook_status is NoticeWebhookStatus.none

    unknown = f"/v1/tenants/{uuid.uuid4()}/notice-webhook"
    assert (await api.put(unknown, json={"url": receiver.url()})).status_code == 404
    assert (await api.delete(unknown)).status_code == 404


@pytest.mark.parametrize(
    "url",
    [
        "ftp://hooks.example.com/roomly",
        "hooks.example.com/roomly",
        "https://",
        "https://user:password@hooks.example.com/",
        "https://hooks.example.com/roomly#fragment",
        "https://hooks example.com/",
        "https://hööks.example.com/",
        "https://-hooks.example.com/",
        "https://hooks..example.com/",
        "https://127.1/",  # a numeric last label reads as IPv4 to some resolvers
        "https://2130706433/",
        "https://0x7f000001/",
        "https://hooks.example.com:99999/",
        "https://hooks.example.com:0/",
        "https://hooks.example.com/" + "a" * 2030,
        "   ",
    ],
)
async def test_urls_that_are_not_http_urls_with_a_host_are_refused_422_naming_url(sessions, api, url: str):
    sub = await factories.subscriber(sessions, await factories.catalog(sessions), datetime.now(UTC))
    response = await api.put(f"/v1/tenants/{sub.tenant_id}/notice-webhook", json={"url": url})
    assert response.status_code == 422, response.text
    (error,) = response.json()["errors"]
    assert error["field"] == "url" and error["in"] == "body"
    async with sessions() as s:
        tenant = await s.get(Tenant, sub.tenant_id)
        assert tenant is not None and tenant.notice_webhook_url is None


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8080/hook", "http://localhost:9000/", "https://[::1]:8443/x", "http://vm/hook"],
)
async def test_local_and_test_environments_accept_http_and_loopback(url: str):
    assert await notice_webhooks.check_url(url, production=False) == url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://hooks.example.com/", "https"),
        ("https://127.0.0.1/", "not a public address"),
        ("https://10.1.2.3/", "not a public address"),
        ("https://172.16.0.1/", "not a public address"),
        ("https://192.168.1.10/", "not a public address"),
        ("https://169.254.169.254/latest/meta-data", "not a public address"),  # the cloud metadata endpoint
        ("https://100.64.0.1/", "not a public address"),
        ("https://0.0.0.0/", "not a public address"),
        ("https://[::1]/", "not a public address"),
        ("https://[fe80::1]/", "not a public address"),
        ("https://[fd00::1]/", "not a public address"),
        ("https://[::ffff:127.0.0.1]/", "not a public address"),
        ("https://224.0.0.1/", "not a public address"),
        ("https://localhost/", "not a public host name"),
        ("https://api.localhost/", "not a public host name"),
        ("https://vm/", "not a public host name"),  # single label: resolved inside (here: to 127.0.0.1)
        ("https://nothing.invalid/", "does not resolve"),
    ],
)
async def test_production_refuses_plain_http_and_addresses_that_are_not_public(url: str, why: str):
    with pytest.raises(InvalidInput, match=why) as err:
        await notice_webhooks.check_url(url, production=True)
    assert err.value.field == "url"


async def test_production_accepts_an_https_url_at_a_public_address():
    url = "https://93.184.215.14:8443/roomly/notices?tenant=42"
    assert await notice_webhooks.check_url(url, production=True) == url


async def test_the_api_in_production_refuses_http_and_loopback_422_naming_url(sessions, settings, temporal_env):
    key = new_private_key().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    production = settings.model_copy(
        update={"environment": Environment.production, "auth_signing_key_pem": SecretStr(key.decode())}
    )
    sub = await factories.subscriber(sessions, await factories.catalog(sessions), datetime.now(UTC))
    async with api_client(production, temporal_env.client) as api:
        for url in ("http://hooks.example.com/", "https://127.0.0.1/hook"):
            response = await api.put(f"/v1/tenants/{sub.tenant_id}/notice-webhook", json={"url": url})
            assert response.status_code == 422 and response.json()["errors"][0]["field"] == "url", response.text


# --- where the sender connects ---------------------------------------------------------------------------------


async def test_the_production_sender_refuses_private_addresses_before_connecting(receiver):
    guarded = HttpWebhookSender(timeout=5, allow_private=False)
    for host in ("127.0.0.1", "localhost"):  # a literal, and a name resolving to loopback
        with pytest.raises(WebhookRejected, match="not public"):
            await guarded.deliver(OutgoingWebhook(receiver.url(host), SECRET, BODY, "n1"))
    assert receiver.requests == []
    # Allowed (local, test): the name is resolved, the checked address connected to, the Host kept.
    assert await _hooks().deliver(OutgoingWebhook(receiver.url("localhost"), SECRET, BODY, "n1")) == 200
    (hook,) = receiver.requests
    assert hook.headers["Host"] == f"localhost:{receiver.port}"


def _certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for the name ``localhost`` only (no IP address in it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


async def test_https_goes_to_the_checked_address_and_verifies_the_urls_host(tmp_path: Path):
    cert_file, key_file = _certificate(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert_file, key_file)
    trusting = ssl.create_default_context(cafile=str(cert_file))
    sender = HttpWebhookSender(timeout=5, allow_private=True, verify=trusting)
    with serving(Receiver(), tls) as receiver:
        # Connected to 127.0.0.1, the certificate checked against "localhost" (the URL's host).
        assert await sender.deliver(OutgoingWebhook(receiver.url("localhost"), SECRET, BODY, "n1")) == 200
        (hook,) = receiver.requests
        assert hook.headers["Host"] == f"localhost:{receiver.port}" and hook.body == BODY
        # The certificate does not name 127.0.0.1: verification is on, so this is refused.
        with pytest.raises(WebhookTransient, match=r"(?i)certificate[ _]verify[ _]failed"):
            await sender.deliver(OutgoingWebhook(receiver.url("127.0.0.1"), SECRET, BODY, "n1"))
        # Without trusting the certificate, nothing is posted either.
        with pytest.raises(WebhookTransient):
            await _hooks().deliver(OutgoingWebhook(receiver.url("localhost"), SECRET, BODY, "n1"))
        assert len(receiver.requests) == 1


async def test_a_notice_about_no_invoice_list_is_posted_with_its_context_as_written(sessions, tmp_path: Path):
    invoice = await _invoice_with_pdf(sessions, LocalDocumentStore(tmp_path))
    notice_id = await _enqueue(sessions, invoice, NoticeKind.payment_receipt)
    sent = json.loads(notice_webhooks.body(await _row(sessions, notice_id)))
    assert "amount_due" not in sent and sent["kind"] == "payment_receipt"
    assert sent["context"] == {
        "currency": "USD",
        "amount": 64000,
        "paid_on": "2026-04-02",
        "invoice_number": "INV-000001",
    }
