"""The notice sender: one activity per notice, and a sweep of every pending one (``docs/notices.md``).

What "once" means here. ``send_notice`` locks the notice's row (``SELECT ... FOR UPDATE SKIP
LOCKED``), skips it if it is sent already, renders it, hands it to the SMTP server and, right
after the server accepted it, marks it sent and commits, in that same transaction:

- a retry after that commit (the activity's completion lost, a worker that died after it, the
  sweep finding it) sends nothing: it finds the notice ``sent``;
- two senders at once (the workflow's activity and the sweep) never both send: the second finds
  the row locked and retries later (``NoticeBusy``);
- the window left is between the server's ``250 OK`` to DATA and our COMMIT: a worker killed
  there, or a database lost there, leaves the notice pending and a retry sends it again. SMTP has
  no way to ask a server whether it already has a message, so this window cannot be closed by
  us; the second copy carries the same ``Message-ID`` (``<notice-{id}@roomly.local>``), by which
  mail stores and clients that deduplicate (many do, per mailbox) drop it.

A 5xx refusal of the recipient or the message marks the notice ``failed`` (non-retryable
``MailRejected``); anything else (the server unreachable, 4xx, our login refused) is retried by
Temporal (``MailTransient``) with the notice still pending and its attempt and error recorded.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime

import structlog
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.billing import _utcnow, heartbeating
from adapters.mail import MailRejected, MailSender, MailTransient
from adapters.storage import DocumentStore
from services import notices
from services.errors import NotFound, ServiceError
from workflows.contracts import (
    ACT_SEND_NOTICE,
    ACT_SEND_PENDING_NOTICES,
    ERR_MAIL_REJECTED,
    ERR_MAIL_TRANSIENT,
    ERR_NOTICE_BUSY,
    ERR_NOTICE_NOT_FOUND,
    SendNoticeInput,
    SendNoticeResult,
    SendPendingNoticesInput,
    SendPendingNoticesResult,
)

log = structlog.get_logger(__name__)


class NoticeBusy(Exception):
    """Another sender holds the notice's row right now."""


class NoticeActivities:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        sender: MailSender,
        store: DocumentStore,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._sessions = sessions
        self._sender = sender
        self._store = store
        self._clock = clock

    def all(self) -> list[Callable[..., object]]:
        return [self.send_notice, self.send_pending_notices]

    async def send(self, notice_id: uuid.UUID) -> SendNoticeResult:
        """Send one notice at most once (see the module's docstring); raises the adapter's errors."""
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

    @activity.defn(name=ACT_SEND_NOTICE)
    async def send_notice(self, data: SendNoticeInput) -> SendNoticeResult:
        async with heartbeating():
            try:
                return await self.send(data.notice_id)
            except NoticeBusy as err:
                raise ApplicationError(str(err), type=ERR_NOTICE_BUSY) from err
            except MailTransient as err:
                raise ApplicationError(str(err), type=ERR_MAIL_TRANSIENT) from err
            except MailRejected as err:
                raise ApplicationError(str(err), type=ERR_MAIL_REJECTED, non_retryable=True) from err
            except NotFound as err:
                raise ApplicationError(str(err), err.field, type=ERR_NOTICE_NOT_FOUND, non_retryable=True) from err
            except ServiceError as err:
                raise ApplicationError(str(err), err.field, type=type(err).__name__, non_retryable=True) from err

    @activity.defn(name=ACT_SEND_PENDING_NOTICES)
    async def send_pending_notices(self, data: SendPendingNoticesInput) -> SendPendingNoticesResult:
        """Every pending notice (up to ``limit``, oldest first) sent once; a failure stops none of the others."""
        result = SendPendingNoticesResult()
        async with heartbeating():
            async with self._sessions() as session:
                ids = await notices.pending(session, data.limit)
            for notice_id in ids:
                try:
                    sent = await self.send(notice_id)
                except MailRejected:
                    result.failed += 1
                except (MailTransient, NoticeBusy) as err:
                    log.warning("notice left pending", notice_id=str(notice_id), error=str(err))
                    result.retry_later += 1
                else:
                    result.sent += int(sent.sent_now)
        return result
