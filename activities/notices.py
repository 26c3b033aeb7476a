"""The notice sender: one activity per notice, and a sweep of every pending one (``docs/notices.md``).

A notice goes out by email and, when its tenant has one, by a signed webhook: two deliveries, each
with its own state on the notice and each done once. ``send_notice`` tries both on every attempt
(one failing stops neither the other nor itself being retried): a delivery already done is
skipped, so a retry redoes only what is still pending.

What "once" means here. Each delivery locks the notice's row (``SELECT ... FOR UPDATE SKIP
LOCKED``), skips it if it is done already, sends and, right after the other side accepted it,
marks it done and commits, in that same transaction:

- a retry after that commit (the activity's completion lost, a worker that died after it, the
  sweep finding it) sends nothing: it finds the delivery done;
- two senders at once (the workflow's activity and the sweep) never both send: the second finds
  the row locked and retries later (``NoticeBusy``);
- the window left is between the other side's acceptance (SMTP's ``250 OK`` to DATA, the
  receiver's 2xx) and our COMMIT: a worker killed there, or a database lost there, leaves the
  delivery pending and a retry sends it again. Neither SMTP nor a receiver can be asked whether it
  already has it, so this window cannot be closed by us; the second copy carries the same
  ``Message-ID`` (``<notice-{id}@roomly.local>``) or the same ``Roomly-Notice-Id``, by which
  receivers drop it.

Email: a 5xx refusal of the recipient or the message marks it ``failed`` (non-retryable
``MailRejected``); anything else (the server unreachable, 4xx, our login refused) is retried by
Temporal (``MailTransient``) with the email still pending and its attempt and error recorded.
Webhook: a 4xx other than 408/429, a redirect or an address that is not allowed marks it ``failed``
(``WebhookRejected``); a 5xx, 408, 429, a timeout or the receiver unreachable is retried
(``WebhookTransient``). When both fail at once, the activity is retried if either is worth it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import structlog
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.billing import _utcnow, heartbeating
from adapters.mail import MailError, MailRejected, MailSender, MailTransient
from adapters.storage import DocumentStore
from adapters.webhooks import OutgoingWebhook, WebhookError, WebhookRejected, WebhookSender, WebhookTransient
from services import notice_webhooks, notices
from services.errors import NotFound, ServiceError
from workflows.contracts import (
    ACT_SEND_NOTICE,
    ACT_SEND_PENDING_NOTICES,
    ERR_MAIL_REJECTED,
    ERR_MAIL_TRANSIENT,
    ERR_NOTICE_BUSY,
    ERR_NOTICE_NOT_FOUND,
    ERR_WEBHOOK_REJECTED,
    ERR_WEBHOOK_TRANSIENT,
    SendNoticeInput,
    SendNoticeResult,
    SendPendingNoticesInput,
    SendPendingNoticesResult,
)

log = structlog.get_logger(__name__)


class NoticeBusy(Exception):
    """Another sender holds the notice's row right now."""


# A failure of one delivery, by what it means for the activity: retried, or failed for good.
_TRANSIENT: dict[type[Exception], str] = {
    NoticeBusy: ERR_NOTICE_BUSY,
    MailTransient: ERR_MAIL_TRANSIENT,
    WebhookTransient: ERR_WEBHOOK_TRANSIENT,
}
_FOR_GOOD: dict[type[Exception], str] = {MailRejected: ERR_MAIL_REJECTED, WebhookRejected: ERR_WEBHOOK_REJECTED}
Failure = NoticeBusy | MailError | WebhookError


@dataclass(frozen=True)
class WebhookOutcome:
    status: str  # notices.NoticeWebhookStatus: none, sent or failed (pending only while it is being sent)
    delivered_now: bool = False


@dataclass
class Sent:
    """One pass over a notice's two deliveries: what each came to, and what failed this time."""

    email: SendNoticeResult
    failures: list[Failure]

    def error(self) -> ApplicationError:
        """The activity's failure: retryable if any failure is worth retrying, else for good."""
        message = "; ".join(str(f) for f in self.failures)
        for failure in self.failures:
            if type(failure) in _TRANSIENT:
                return ApplicationError(message, type=_TRANSIENT[type(failure)])
        return ApplicationError(message, type=_FOR_GOOD[type(self.failures[0])], non_retryable=True)


class NoticeActivities:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        sender: MailSender,
        store: DocumentStore,
        webhooks: WebhookSender,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._sessions = sessions
        self._sender = sender
        self._store = store
        self._webhooks = webhooks
        self._clock = clock

    def all(self) -> list[Callable[..., object]]:
        return [self.send_notice, self.send_pending_notices]

    async def send_email(self, notice_id: uuid.UUID) -> SendNoticeResult:
        """Email one notice at most once (see the module's docstring); raises the adapter's errors."""
        async with self._sessions() as session:
            notice = await notices.lock_for_sending(session, notice_id)
            if notice is None:
                raise NoticeBusy(f"notice {notice_id} is being sent by another sender")
            if notice.status != notices.NoticeStatus.pending:
                return SendNoticeResult(notice_id, notice.status.value, notice.message_id, sent_now=False)
            rendered = await notices.render(session, notice_id, self._store)
            try:
                await self._sender.send(rendered.mail())
            except MailRejected as err:
                await session.rollback()
                await notices.mark_failed(session, notice_id, str(err))
                raise
            except MailTransient as err:
                await session.rollback()
                await notices.record_attempt(session, notice_id, str(err))
                raise
            # Accepted by the server: commit at once (this also releases the row's lock).
            await notices.mark_sent(session, notice_id, rendered.message_id, self._clock())
        log.info("notice sent", notice_id=str(notice_id), kind=rendered.kind.value, message_id=rendered.message_id)
        return SendNoticeResult(notice_id, notices.NoticeStatus.sent.value, rendered.message_id, sent_now=True)

    async def send_webhook(self, notice_id: uuid.UUID) -> WebhookOutcome:
        """Post one notice to its tenant's webhook at most once (see the module's docstring)."""
        async with self._sessions() as session:
            notice = await notices.lock_for_sending(session, notice_id)
            if notice is None:
                raise NoticeBusy(f"notice {notice_id} is being sent by another sender")
            if notice.webhook_status != notices.NoticeWebhookStatus.pending:
                return WebhookOutcome(notice.webhook_status.value)
            where = await notice_webhooks.target(session, notice)
            if where is None:
                await notice_webhooks.mark_none(session, notice_id, "the tenant cleared its webhook before delivery")
                return WebhookOutcome(notices.NoticeWebhookStatus.none.value)
            hook = OutgoingWebhook(where.url, where.secret, notice_webhooks.body(notice), str(notice_id))
            try:
                await self._webhooks.deliver(hook)
            except WebhookRejected as err:
                await session.rollback()
                await notice_webhooks.mark_failed(session, notice_id, str(err))
                raise
            except WebhookTransient as err:
                await session.rollback()
                await notice_webhooks.record_attempt(session, notice_id, str(err))
                raise
            # The receiver answered 2xx: commit at once (this also releases the row's lock).
            await notice_webhooks.mark_delivered(session, notice_id, self._clock())
        log.info("notice webhook delivered", notice_id=str(notice_id), url=where.url)
        return WebhookOutcome(notices.NoticeWebhookStatus.sent.value, delivered_now=True)

    async def send(self, notice_id: uuid.UUID) -> Sent:
        """Both deliveries of one notice, each tried whatever became of the other."""
        failures: list[Failure] = []
        try:
            email = await self.send_email(notice_id)
        except (NoticeBusy, MailError) as err:
            failures.append(err)
            email = SendNoticeResult(notice_id)
        try:
            hook: WebhookOutcome | None = await self.send_webhook(notice_id)
        except (NoticeBusy, WebhookError) as err:
            failures.append(err)
            hook = None
        if hook is not None:
            email.webhook_status, email.webhook_delivered_now = hook.status, hook.delivered_now
        for failure in failures:
            log.warning("notice delivery failed", notice_id=str(notice_id), error=str(failure))
        return Sent(email, failures)

    @activity.defn(name=ACT_SEND_NOTICE)
    async def send_notice(self, data: SendNoticeInput) -> SendNoticeResult:
        async with heartbeating():
            try:
                sent = await self.send(data.notice_id)
            except NotFound as err:
                raise ApplicationError(str(err), err.field, type=ERR_NOTICE_NOT_FOUND, non_retryable=True) from err
            except ServiceError as err:
                raise ApplicationError(str(err), err.field, type=type(err).__name__, non_retryable=True) from err
            if sent.failures:
                raise sent.error() from sent.failures[0]
            return sent.email

    @activity.defn(name=ACT_SEND_PENDING_NOTICES)
    async def send_pending_notices(self, data: SendPendingNoticesInput) -> SendPendingNoticesResult:
        """Every notice with a delivery pending (up to ``limit``, oldest first) sent once; a failure
        stops none of the others."""
        result = SendPendingNoticesResult()
        async with heartbeating():
            async with self._sessions() as session:
                ids = await notices.pending(session, data.limit)
            for notice_id in ids:
                sent = await self.send(notice_id)
                result.sent += int(sent.email.sent_now)
                result.webhooks_sent += int(sent.email.webhook_delivered_now)
                result.failed += _count(sent.failures, MailRejected)
                result.webhooks_failed += _count(sent.failures, WebhookRejected)
                result.retry_later += int(any(type(f) in _TRANSIENT for f in sent.failures))
        return result


def _count(failures: Sequence[Failure], kind: type[Exception]) -> int:
    return sum(isinstance(f, kind) for f in failures)
