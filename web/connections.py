"""How long a client may stall: every TLS connection pink-web accepts reads
and writes with a timeout.

pink-web serves a connection as a greenlet (`web/serve.py`), so a client that
sends half a request and stops, or stops reading a download, costs no thread;
but it still holds a socket, a file descriptor and one of a worker's
`worker_connections`, for as long as it keeps the connection open. A few
thousand such connections (a slowloris, or a lab's flaky Wi-Fi) would leave
the node no room for anyone else.

Gunicorn makes every connection blocking (`setblocking(True)`, no timeout),
so the bound lives in the TLS socket itself: gunicorn's `ssl_context` hook
gives every context a socket class whose blocking mode is a timeout of
STALL_SECONDS, handshake included. A read or write that waits that long
fails and gunicorn closes the connection. Like nginx's `client_body_timeout`
and `send_timeout`, it bounds each read and each write (an answer is written
in slices of WRITE_SLICE), not a whole request: an upload or download that
keeps moving faster than a slice per STALL_SECONDS is never cut. PINK serves
HTTPS only, so every connection is a TLS one.

The class is built on whatever TLS socket the context makes: gevent's in a
worker (gunicorn patches `ssl` after the fork, after this module was
imported), the standard library's elsewhere.
"""

from __future__ import annotations

import functools
import ssl

STALL_SECONDS = 30  # a client that sends or reads nothing for this long is dropped
WRITE_SLICE = 64 * 2**10  # bytes of an answer written under one deadline (a reader slower than ~2 KB/s is dropped)


class _StallBounded:
    """Mixed into a server-side TLS socket class: its blocking mode waits at most STALL_SECONDS."""

    @classmethod
    def _create(cls, sock, *args, **kwargs):
        """The standard library's constructor."""
        sock.settimeout(STALL_SECONDS)  # the handshake runs with the plain socket's timeout
        return super()._create(sock, *args, **kwargs)

    def __init__(self, sock=None, *args, **kwargs):
        """gevent's constructor (the standard library's `_create` never calls it)."""
        if sock is not None:
            sock.settimeout(STALL_SECONDS)
        super().__init__(sock, *args, **kwargs)

    def sendall(self, data, flags: int = 0) -> None:
        """Write in slices, each under its own deadline: a write call gets
        one deadline for the whole buffer (an 8 MiB log at once would need 280 KB/s)."""
        with memoryview(data) as view, view.cast("B") as octets:
            for start in range(0, len(octets), WRITE_SLICE):
                super().sendall(octets[start:start + WRITE_SLICE], flags)

    def setblocking(self, flag: bool) -> None:
        if flag:
            self.settimeout(STALL_SECONDS)
        else:
            super().setblocking(False)


@functools.cache
def stall_bounded(socket_class: type) -> type:
    """`socket_class` with the stall bound."""
    return type(f"StallBounded{socket_class.__name__}", (_StallBounded, socket_class), {})


def ssl_context(config, default_ssl_context_factory) -> ssl.SSLContext:
    """gunicorn's `ssl_context` hook: its own context, with stall-bounded sockets."""
    context = default_ssl_context_factory()
    context.sslsocket_class = stall_bounded(context.sslsocket_class or ssl.SSLSocket)
    return context
