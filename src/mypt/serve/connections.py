"""The server's connections: how many may be open, and how long a request may take to arrive.

uvicorn closes a keep-alive connection that stays idle, but not one whose request is still
arriving: a client that sends half its headers, or half its body, keeps its connection (a file
descriptor) for ever, and enough of them leave none for anyone else. `GuardedH11` (uvicorn's
h11 protocol) adds the two limits it lacks:

- a request must arrive whole, headers and body, within `request_timeout` seconds of its first
  byte (of the connection's opening, for a new connection); otherwise the client gets 408 and
  the connection is closed. The response may take as long as it takes (a long stream);
- at most `max_connections` are open at once: a connection beyond them gets 503 with
  Retry-After straight away and is closed within a second, so descriptors stay bounded.

`uvicorn_config` is the uvicorn.Config that `mypt serve` (and its tests) run the app with, and
`reserve_descriptors` makes sure the process may open that many files.
"""

from __future__ import annotations

import asyncio
import http
import json
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from mypt.errors import MyPTError
from mypt.serve.protocol import APIError

SPARE_DESCRIPTORS = 128  # files the server keeps beside its connections (checkpoints, logs, the listening socket)
REFUSED_LINGER = 1.0  # seconds a refused connection stays to take its request (an early close would reset it)
WAITING_FOR_CLIENT = (h11.IDLE, h11.SEND_BODY)  # the client's side of a request still arriving


class GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a request timeout and a cap on open connections."""

    max_connections: ClassVar[int]  # set by uvicorn_config
    request_timeout: ClassVar[float]  # seconds

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._timer: asyncio.TimerHandle | None = None
        self._refused = len(self.connections) > self.max_connections
        if self._refused:
            self._answer(APIError(503, f"The server has {self.max_connections} connections open, as many as it "
                                  "takes (--max_connections); retry after 1 s", type="server_error",
                                  code="too_many_connections", headers={"Retry-After": "1"}))
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self._timer = self.loop.call_later(REFUSED_LINGER, self.transport.close)
        else:
            self._arm()

    def data_received(self, data: bytes) -> None:
        if self._refused:  # its request is read and dropped until the client or the linger closes it
            return
        if self._timer is None and self.conn.their_state in WAITING_FOR_CLIENT:
            self._arm()  # the first byte of a request
        super().data_received(data)
        if self.conn.their_state not in WAITING_FOR_CLIENT:
            self._disarm()  # the request arrived whole (or the connection ended)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._timer = self.loop.call_later(self.request_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        answering = self.cycle is not None and self.conn.their_state is h11.SEND_BODY and self.cycle.response_started
        if not answering:  # a response can still be sent
            self._answer(APIError(408, f"The request did not arrive whole within {self.request_timeout:g} s "
                                  "(--request_timeout); send it at once", code="request_timeout"))
        self.transport.close()

    def _answer(self, error: APIError) -> None:
        """Write `error` as a whole response that closes the connection (h11 is bypassed: the
        request may be half-read or not begun)."""
        body = json.dumps(error.body()).encode()
        head = [f"HTTP/1.1 {error.status} {http.HTTPStatus(error.status).phrase}", "content-type: application/json",
                f"content-length: {len(body)}", "connection: close",
                *(f"{name.lower()}: {value}" for name, value in error.headers.items())]
        self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)


def uvicorn_config(app: Any, *, max_connections: int, request_timeout: float,
                   log_level: str = "info") -> uvicorn.Config:
    """The uvicorn settings the server runs with: GuardedH11 with these limits."""
    protocol = type("GuardedH11", (GuardedH11,), {"max_connections": max_connections,
                                                  "request_timeout": request_timeout})
    return uvicorn.Config(app, http=protocol, log_level=log_level, timeout_graceful_shutdown=5)


def reserve_descriptors(max_connections: int) -> None:
    """Make sure this process may open max_connections sockets and its own files: the soft limit
    (ulimit -n) is raised as far as the hard one allows, and beyond that the flag is refused."""
    try:
        import resource
    except ImportError:  # not a Unix: no such limit to check
        return
    need = max_connections + SPARE_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise MyPTError(f"--max_connections {max_connections}: this process may open at most {hard} files "
                        f"(ulimit -Hn) and the server keeps {SPARE_DESCRIPTORS} for itself; give --max_connections "
                        f"{max(1, hard - SPARE_DESCRIPTORS)} or less, or raise the limit")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
