"""E-mail through the lab's SMTP relay (`[notifications] smtp_*`).

PINK never talks to a recipient's mail server itself: the operator names a
relay (usually the institute's), which the user cannot choose, so an
address is only ever an address, never a host to connect to. STARTTLS is on
by default; a login's password is read from a file, never from the config.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
from email.message import EmailMessage
from email.utils import make_msgid

from pink.notifications import HEADER_DELIVERY
from pink.webhooks import Outcome, Watchdog


def enabled(config) -> bool:
    """Whether this cluster sends e-mail (`config` is `[notifications]`)."""
    return bool(config.smtp_host)


def sender(config) -> str:
    return config.smtp_from or f"pink@{socket.getfqdn()}"


def send(config, to: str, subject: str, text: str, delivery: str) -> Outcome:
    """Hand one message to the relay; refused recipients and relay errors are a failed try.

    The whole exchange has the webhooks' deadline (`connect_timeout + read_timeout`)."""
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = sender(config), to, subject
    message["Message-ID"] = make_msgid(idstring=delivery)
    message[HEADER_DELIVERY] = delivery
    message.set_content(text)
    deadline = config.connect_timeout + config.read_timeout
    try:
        with Watchdog(deadline) as watchdog, \
                smtplib.SMTP(config.smtp_host, config.smtp_port, timeout=config.connect_timeout) as smtp:
            watchdog.watch(smtp.sock)
            smtp.sock.settimeout(config.read_timeout)
            if config.smtp_starttls:
                smtp.starttls(context=ssl.create_default_context())
                watchdog.watch(smtp.sock)
            if config.smtp_user:
                smtp.login(config.smtp_user, _password(config.smtp_password_file))
            smtp.send_message(message)
    except smtplib.SMTPResponseException as exc:
        return Outcome(False, status=exc.smtp_code, error=f"SMTP {exc.smtp_code}: {_text(exc.smtp_error)}")
    except (smtplib.SMTPException, OSError) as exc:
        return Outcome(False, error=f"{type(exc).__name__}: {exc}"[:500])
    return Outcome(True, status=250)


def _password(path: str) -> str:
    if not path:
        return ""
    with open(path, encoding="utf-8") as fh:
        return fh.read().strip()


def _text(error) -> str:
    return (error.decode("utf-8", "replace") if isinstance(error, bytes) else str(error))[:300]
