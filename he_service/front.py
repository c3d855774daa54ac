"""The HTTP front of ``he-service serve``: waitress's event-loop channels, in every serving mode.

One event loop per process reads every connection (waitress's asyncore channels) and hands a
request to a worker thread only once its headers and body are complete, so a slow or idle
socket never holds a thread. On top of waitress this module adds what the service needs:

- Limits before work: when the headers are in, the app decides (``he_service.app.admit``, no
  I/O) the route's body limit and whether the caller's token is known. A declared length over
  the limit, a chunked body that grows past it, or an unauthenticated body larger than
  ``NO_BODY_BYTES`` is answered at once by the app (413 or 401, JSON as always) without its
  body; the answer says ``Connection: close`` and the connection is closed cleanly (write side
  first, then a short bounded drain, so the client reads the answer instead of a reset).
- Deadlines: headers must arrive within ``read_timeout`` seconds of the connection being ready
  for a request (an idle keep-alive connection is closed after as long); a body gets
  ``read_timeout`` seconds plus one second per ``MIN_BODY_RATE`` bytes received (Apache's
  mod_reqtimeout rule); an answer the client does not read for ``read_timeout`` is dropped.
- A bounded number of connections per process; at the bound the oldest connection that is
  waiting for a request (idle, or trickling headers) is closed to admit the new one, so idle
  sockets cannot lock clients out.

``serve`` uses it directly with ``--workers 1``; with more workers gunicorn keeps process
management (restarts, signals, graceful stop) and each worker runs this loop on the listening
sockets gunicorn shares (``he_service.cli``).
"""

from __future__ import annotations

import functools
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import BaseWSGIServer, TcpWSGIServer
from waitress.task import WSGITask

from he_service.app import NO_BODY_BYTES, REFUSED_BODY, Admission, admit

if TYPE_CHECKING:
    from flask import Flask

__all__ = ["MIN_BODY_RATE", "Front", "FrontSettings"]

log = logging.getLogger("he_service.front")

RECV_BYTES = 256 << 10  # bytes one read of a socket takes at most
MIN_BODY_RATE = 16 << 10  # bytes per second a body must keep up after its first read_timeout
# Closing a socket with unread input makes the kernel send a reset, and the client may lose
# the answer it has not read yet. So the write side is shut first and input is drained for a
# while, bounded in time and bytes.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1 << 20
_LINGER_READ = 64 << 10

Policy = Callable[[str, str, str, str | None], Admission]


@dataclass(frozen=True)
class FrontSettings:
    """How the front treats connections; ``he-service serve`` options set them."""

    threads: int = 4
    connection_limit: int = 1000  # open connections per process
    read_timeout: float = 30.0  # seconds (see the module docstring)
    max_header_bytes: int = 64 << 10
    max_body_bytes: int = 512 << 20  # outer bound; each route's own limit applies first


class _Parser(HTTPRequestParser):
    """A request parser that asks the app for the route's limits once the headers are in."""

    refused: str | None = None  # REFUSED_BODY's value: the body is not read
    body_rcv: Any

    def __init__(self, adj: Adjustments, *, policy: Policy) -> None:
        super().__init__(adj)
        self._policy = policy
        self.started = time.time()
        self.body_started = 0.0
        self.body_limit = NO_BODY_BYTES

    def parse_header(self, header_plus: bytes) -> None:
        super().parse_header(header_plus)
        self.body_started = time.time()
        path = "/" + self.path.lstrip("/")  # as waitress passes PATH_INFO to the app
        try:
            admission = self._policy(
                self.command, path, self.query, self.headers.get("AUTHORIZATION")
            )
        except Exception:  # a bug here must not stop the loop: take the smallest limits
            log.exception("cannot decide the limits of %s %s", self.command, path[:200])
            admission = Admission(NO_BODY_BYTES, authorized=False)
        self.body_limit = admission.body_limit
        if not self.chunked and self.content_length > admission.body_limit:
            self._refuse("too_large")
        elif not admission.authorized and (self.chunked or self.content_length > NO_BODY_BYTES):
            self._refuse("unauthenticated")

    def received(self, data: bytes) -> int:
        if self.completed:
            return 0
        consumed: int = super().received(data)
        if (
            not self.completed
            and self.chunked
            and self.body_rcv is not None
            and self.body_rcv.__len__() > self.body_limit
        ):
            self._refuse("too_large")
        if self.refused is not None:
            # The rest is the unread body: it must never be parsed as a next request.
            return len(data)
        return consumed

    def _refuse(self, reason: str) -> None:
        self.refused = reason
        if self.body_rcv is not None:
            self.body_rcv.getbuf().close()
            self.body_rcv = None
        self.content_length = 0
        self.expect_continue = False  # no "100 Continue": the answer comes now
        self.completed = True


class _Task(WSGITask):
    """A WSGI task that tells the app about a refused body and closes the connection after."""

    def get_environment(self) -> dict[str, Any]:
        environ: dict[str, Any] = super().get_environment()
        refused = getattr(self.request, "refused", None)
        if refused is not None:
            environ[REFUSED_BODY] = refused
        return environ

    def build_response_header(self) -> bytes:
        if getattr(self.request, "refused", None) is not None:
            self.channel.linger = True
            if not self.close_on_finish:
                self.set_close_on_finish()  # says "Connection: close" to the client
        header: bytes = super().build_response_header()
        return header


class _Channel(HTTPChannel):
    """A connection with deadlines, and a clean close after a refused body."""

    task_class = _Task
    linger = False  # close by shutting the write side first, then draining a little
    linger_until: float | None = None
    lingered = 0
    evicted = False

    def __init__(self, server: _Server, sock: socket.socket, addr: Any, adj: Any, map: Any) -> None:
        super().__init__(server, sock, addr, adj, map)
        self.parser_class = functools.partial(_Parser, policy=server.policy)

    def readable(self) -> bool:
        if self.linger_until is not None:
            return True
        return bool(super().readable())

    def writable(self) -> bool:
        if self.linger_until is not None:
            return False
        return bool(super().writable())

    def handle_read(self) -> None:
        if self.linger_until is None:
            super().handle_read()
            return
        try:
            data = self.recv(_LINGER_READ)  # b"" at the end (and then closed already)
        except OSError:
            data = b""
        self.lingered += len(data)
        if self.lingered > LINGER_BYTES and self.socket is not None:
            HTTPChannel.handle_close(self)

    def handle_close(self) -> None:
        if self.linger and self.linger_until is None and self.connected:
            try:
                self.socket.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            else:
                self.linger_until = time.monotonic() + LINGER_SECONDS
                self.will_close = False
                return
        super().handle_close()

    def waiting_since(self) -> float | None:
        """Return when this connection began waiting for a request, if it is doing nothing else."""
        if self.requests or self.total_outbufs_len or self.linger_until is not None:
            return None
        request = self.request
        if request is None:
            return float(self.last_activity)
        if not request.headers_finished:
            return float(request.started)
        return None

    def expired(self, now: float, timeout: float) -> bool:
        """Return whether a deadline of this connection has passed (``now``: ``time.time()``)."""
        if self.linger_until is not None:
            return time.monotonic() > self.linger_until
        if self.requests:
            return False  # a worker thread has its request; its answer is on the way
        if self.total_outbufs_len:
            return bool(now - self.last_activity > timeout)  # an answer nobody reads
        request = self.request
        if request is None:
            return bool(now - self.last_activity > timeout)  # idle
        if not request.headers_finished:
            return bool(now - request.started > timeout)
        allowed = timeout + request.body_bytes_received / MIN_BODY_RATE
        return bool(now - request.body_started > allowed)


class _Server(TcpWSGIServer):
    """A listening socket whose channels are ``_Channel`` and whose upkeep runs every second."""

    channel_class = _Channel

    def __init__(self, *args: Any, policy: Policy, read_timeout: float, **kwargs: Any) -> None:
        self.policy = policy
        self.read_timeout = read_timeout
        super().__init__(*args, **kwargs)

    def readable(self) -> bool:
        if self.accepting and len(self._map) >= self.adj.connection_limit:
            self._evict_one()
        return bool(super().readable())

    def _evict_one(self) -> None:
        """Close the connection that has waited longest for a request, to admit a new one."""
        channels = [c for c in self.active_channels.values() if isinstance(c, _Channel)]
        if any(c.evicted for c in channels):
            return  # one at a time: the loop removes it before the next accept
        waiting = [(since, c) for c in channels if (since := c.waiting_since()) is not None]
        if waiting:
            _, oldest = min(waiting, key=lambda pair: pair[0])
            oldest.evicted = oldest.will_close = True

    def maintenance(self, now: float) -> None:
        for channel in list(self.active_channels.values()):
            if not isinstance(channel, _Channel) or not channel.expired(now, self.read_timeout):
                continue
            if channel.linger_until is not None:
                HTTPChannel.handle_close(channel)
            else:
                channel.will_close = True  # the loop closes it (handle_write -> handle_close)


def _receiving(channel: HTTPChannel) -> bool:
    """Return whether a channel is receiving a request whose headers are complete."""
    return channel.request is not None and bool(channel.request.headers_finished)


class Front:
    """Serve a WSGI app on listening sockets with one event loop and a pool of threads."""

    def __init__(
        self,
        app: Flask,
        settings: FrontSettings,
        *,
        sockets: Sequence[socket.socket] = (),
        host: str = "127.0.0.1",
        port: int = 8000,
    ) -> None:
        """Listen on ``sockets`` (gunicorn's, already bound) or else bind ``host:port``."""
        self.map: dict[int, Any] = {}
        self.settings = settings
        options: dict[str, Any] = {
            "threads": settings.threads,
            "connection_limit": settings.connection_limit,
            "channel_timeout": max(1, int(settings.read_timeout)),
            "cleanup_interval": 1,
            "max_request_header_size": settings.max_header_bytes,
            "max_request_body_size": settings.max_body_bytes + 1,  # waitress refuses >= this
            "asyncore_use_poll": True,  # select() stops at 1024 descriptors
            # waitress reads 8 KiB per event: a 200 MB batch body took 25,000 loop turns and
            # about 2 s; 256 KiB reads take it in under 0.2 s (one buffer per read, not kept).
            "recv_bytes": RECV_BYTES,
            "ident": "he-service",
        }
        if sockets:
            options["sockets"] = list(sockets)
        else:
            options.update(host=host, port=port)
        adj = Adjustments(**options)
        policy: Policy = functools.partial(admit, app)
        kwargs: dict[str, Any] = {"policy": policy, "read_timeout": settings.read_timeout}
        self.servers: list[_Server] = []
        listeners: list[tuple[socket.socket | None, Any]] = [
            (sock, (sock.family, sock.type, sock.proto, sock.getsockname())) for sock in adj.sockets
        ] or [(None, info) for info in adj.listen]
        for sock, info in listeners:
            if sock is not None:
                sock.setblocking(False)  # forked by gunicorn's master
            shared = self.servers[0].task_dispatcher if self.servers else None
            server = _Server(app, self.map, True, sock, dispatcher=shared, adj=adj, sockinfo=info,
                             bind_socket=sock is None, **kwargs)  # fmt: skip
            self.servers.append(server)

    @property
    def port(self) -> int:
        """Return the port of the first listening socket."""
        return int(self.servers[0].effective_port)

    def run(
        self,
        stopping: Callable[[], bool],
        graceful_timeout: float,
        tick: Callable[[], None] | None = None,
    ) -> None:
        """Serve until ``stopping()``, then let requests in flight finish (graceful stop).

        Args:
            stopping: polled a few times a second; True stops accepting connections.
            graceful_timeout: seconds open requests get to finish after that.
            tick: called a few times a second (gunicorn's heartbeat).
        """
        try:
            while not stopping():
                wasyncore.loop(timeout=0.2, map=self.map, use_poll=True, count=1)
                if tick is not None:
                    tick()
            # Stop accepting (close the listening sockets), then let open requests finish.
            for channel in list(self.map.values()):
                if isinstance(channel, BaseWSGIServer):
                    wasyncore.dispatcher.close(channel)
            deadline = time.monotonic() + graceful_timeout
            while time.monotonic() < deadline:
                busy = [
                    c
                    for c in self.map.values()
                    if isinstance(c, HTTPChannel)
                    and (
                        c.requests
                        or c.total_outbufs_len
                        or (c.request is not None and c.request.headers_finished)
                    )
                ]
                if not busy:
                    break
                wasyncore.loop(timeout=0.05, map=self.map, use_poll=True, count=1)
                if tick is not None:
                    tick()
            else:
                log.warning("graceful timeout: closing connections with requests in flight")
        finally:
            self.close()

    def close(self) -> None:
        """Stop the worker threads and close every socket."""
        if self.servers:
            self.servers[0].task_dispatcher.shutdown(cancel_pending=True, timeout=1)
        wasyncore.close_all(self.map)
