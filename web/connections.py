"""How long a client may stall: every TLS connection pink-web accepts reads
and writes with a timeout.

Each request being read or answered holds one of a web process's threads.
Gunicorn waits for a connection's first bytes without a thread, but once a
client has begun (a TLS handshake, headers, a body) it reads the rest with
blocking reads, and writes an answer with blocking sends: a client that sends
half a request and stops, or stops reading a download, would hold the thread
for as long as it keeps the connection open. A few hundred such connections
(a slowloris, or a lab's flaky Wi-Fi) would take a node away from everyone.

Gunicorn makes the connection blocking (`setblocking(True)`, no timeout) in
several places, and Python's TLS layer retries a read that the kernel timed
out (SO_RCVTIMEO) for ever, so the bound has to live in the TLS socket
itself: gunicorn's `ssl_context` hook gives every context a socket class
whose blocking mode is a timeout of STALL_SECONDS, handshake included. A
read or write that waits that long fails, gunicorn closes the connection
and the thread is free. Like nginx's `client_body_timeout` and
`send_timeout`, it bounds each read and each write (an answer is written in
slices of WRITE_SLICE), not a whole request: an upload or download that
keeps moving faster than a slice per STALL_SECONDS is never cut. PINK serves HTTPS only, so
every connection is a TLS one.
"""

from __future__ import annotations

import ssl

STALL_SECONDS = 30  # a client that sends or reads nothing for this long is dropped
WRITE_SLICE = 64 * 2**10  # bytes of an answer written under one deadline (a reader slower than ~2 KB/s is dropped)


class StallBoundedSocket(ssl.SSLSocket):
    """A server-side TLS socket whose blocking mode waits at most STALL_SECONDS."""

    @classmethod
    def _create(cls, sock, *args, **kwargs):
        sock.settimeout(STALL_SECONDS)  # the handshake runs with the plain socket's timeout
        return super()._create(sock, *args, **kwargs)

    def sendall(self, data, flags: int = 0) -> None:
        """Write in slices, each under its own deadline: TLS gives one write
        call one deadline for the whole buffer (an 8 MiB log at once would
        need 280 KB/s)."""
        with memoryview(data) as view, view.cast("B") as octets:
            for start in range(0, len(octets), WRITE_SLICE):
                super().sendall(octets[start:start + WRITE_SLICE], flags)

    def setblocking(self, flag: bool) -> None:
        if flag:
            self.settimeout(STALL_SECONDS)
        else:
            super().setblocking(False)


def ssl_context(config, default_ssl_context_factory) -> ssl.SSLContext:
    """gunicorn's `ssl_context` hook: its own context, with stall-bounded sockets."""
    context = default_ssl_context_factory()
    context.sslsocket_class = StallBoundedSocket
    return context
