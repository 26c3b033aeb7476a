"""Email out, behind :class:`MailSender`: one message built with the stdlib, sent over SMTP with aiosmtplib.

The message is ``multipart/mixed`` of a ``multipart/alternative`` (plain text, then HTML) and
the PDF attachments; its ``Message-ID`` is the caller's (a notice's is deterministic from its id,
so a message sent twice carries one id and a mail system can drop the second).

SMTP failures are decided once, here: :class:`MailRejected` when the server refused the recipient
or the message for good (a 5xx reply to RCPT or DATA: sending again would be refused again);
:class:`MailTransient` for everything else (the server unreachable or timing out, a 4xx, a
refused login or sender: our configuration, fixed by an operator, after which a retry works).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Protocol

import aiosmtplib

from core.settings import Settings


@dataclass(frozen=True)
class MailAttachment:
    filename: str
    data: bytes
    content_type: str = "application/pdf"


@dataclass(frozen=True)
class OutgoingMail:
    message_id: str  # "<...@...>", as it goes in the header
    recipient: str
    subject: str
    text: str
    html: str
    attachments: Sequence[MailAttachment] = ()
    headers: Sequence[tuple[str, str]] = ()  # extra headers, e.g. ("X-Roomly-Notice", "dunning_final")


class MailError(Exception):
    """Sending failed; the message says why."""


class MailTransient(MailError):
    """Worth retrying: the server was unreachable, busy (4xx) or refused our login or sender."""


class MailRejected(MailError):
    """Refused for good (a 5xx to the recipient or the message): the same message would be refused again."""


class MailSender(Protocol):
    sender: str  # the From address

    async def send(self, mail: OutgoingMail) -> str:
        """Hand ``mail`` to the mail server; returns the server's reply once it accepted it."""
        ...


def build_message(sender: str, mail: OutgoingMail, *, date: datetime | None = None) -> EmailMessage:
    """The MIME message: text and HTML alternatives, then the attachments."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = mail.recipient
    message["Subject"] = mail.subject
    message["Message-ID"] = mail.message_id
    message["Date"] = format_datetime(date or datetime.now(UTC))
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies to a billing robot
    for name, value in mail.headers:
        message[name] = value
    message.set_content(mail.text)
    message.add_alternative(mail.html, subtype="html")
    for attachment in mail.attachments:
        maintype, _, subtype = attachment.content_type.partition("/")
        message.add_attachment(attachment.data, maintype=maintype, subtype=subtype, filename=attachment.filename)
    return message


def _is_permanent(err: aiosmtplib.SMTPResponseException) -> bool:
    return 500 <= err.code < 600


class SmtpMailSender:
    """One SMTP conversation per message (notices are few; no connection is kept between them)."""

    def __init__(
        self,
        host: str,
        port: int,
        sender: str,
        *,
        username: str | None = None,
        password: str | None = None,
        starttls: bool = False,
        timeout: float = 30.0,
    ) -> None:
        self.host = host
        self.port = port
        self.sender = sender
        self._username = username
        self._password = password
        self._starttls = starttls
        self._timeout = timeout

    @classmethod
    def from_settings(cls, settings: Settings) -> SmtpMailSender:
        return cls(
            settings.smtp_target,
            settings.smtp_port,
            settings.smtp_from,
            username=settings.smtp_username,
            password=settings.smtp_password,
            starttls=settings.smtp_starttls,
            timeout=settings.smtp_timeout,
        )

    async def send(self, mail: OutgoingMail) -> str:
        message = build_message(self.sender, mail)
        try:
            _, reply = await aiosmtplib.send(
                message,
                hostname=self.host,
                port=self.port,
                username=self._username,
                password=self._password,
                start_tls=self._starttls,  # False: never upgrade (the local sink speaks plain SMTP)
                timeout=self._timeout,
            )
        except aiosmtplib.SMTPRecipientsRefused as err:
            if all(_is_permanent(r) for r in err.recipients):
                raise MailRejected(f"{mail.recipient} refused: {'; '.join(str(r) for r in err.recipients)}") from err
            raise MailTransient(f"{mail.recipient} refused for now: {err}") from err
        except aiosmtplib.SMTPDataError as err:
            if _is_permanent(err):
                raise MailRejected(f"message refused: {err.code} {err.message}") from err
            raise MailTransient(f"message refused for now: {err.code} {err.message}") from err
        except (aiosmtplib.SMTPException, OSError) as err:  # unreachable, timeout, 4xx, login or sender refused
            raise MailTransient(f"SMTP {self.host}:{self.port}: {type(err).__name__}: {err}") from err
        return reply
