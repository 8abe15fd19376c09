"""Connections of the HTTP server: an idle / header timeout, a cap on open connections, a drain on SIGTERM.

Why code and not only configuration (uvicorn 0.55 as BentoML 1.4 runs it in
``_bentoml_impl.worker.service``; BentoML passes only ``--timeout-keep-alive`` and
``--timeout-graceful-shutdown`` through to ``uvicorn.Config``, both set by :mod:`serving.launch`):

* uvicorn arms its keep-alive timer only after a response (``on_response_complete``) and has no
  header-read timeout: a connection that never sends a byte, or half a request line, stays open for
  ever, and enough of them exhaust the API worker's file descriptors (issue 18, item 4);
* its one connection limit, ``limit_concurrency`` (not passed by BentoML), answers 503 to every new
  request once that many connections are open, idle ones included: a flood of idle connections
  would still shut real clients out;
* on SIGTERM every BentoML worker stops at once: the inference worker would close its connections
  while the API worker still has requests in flight, and the listening socket, also held by
  BentoML's arbiter, keeps queueing new connections that nobody will answer.

Hence, installed by :func:`install` (an entry in uvicorn's protocol table, read by
``uvicorn.Config.load`` after the service module is imported, and :class:`ShutdownHooks`, an ASGI
middleware that acts at lifespan start-up, inside the worker):

* :class:`ConnectionGuard` (API workers only): a connection with no request in progress (nothing
  sent yet, headers incomplete, or an idle keep-alive) is closed after ``idle_timeout_s``; at
  ``max_connections`` open connections the oldest idle one is closed for the new one, and a new
  connection gets 503 only when every open one is busy. ``max_connections`` is capped by the
  worker's RLIMIT_NOFILE less ``FD_RESERVE``, its soft limit first raised as far as needed (up to the
  hard limit). It should stay above the listen backlog (2048): a real client accepted in a burst
  of idle ones is then never the oldest. A websocket upgrade leaves the guard's view idle: it is
  closed after ``idle_timeout_s`` too (the service has no websocket route).
* SIGTERM / SIGINT in an API worker first stops the listening socket (``shutdown(SHUT_RD)`` reaches
  every process holding it: new connections are refused at once), then lets uvicorn drain.
  In any other worker (inference, explanations) the signal is held until no API worker of the same
  arbiter is left, at most ``grace_s``, so requests in flight still get their answers.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import resource
import signal
import socket
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import uvicorn.config
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Base
except ImportError:  # pragma: no cover - httptools is not installed: uvicorn's "auto" is h11 too
    _Base = H11Protocol  # type: ignore[assignment,misc]

log = logging.getLogger("serving")
FD_RESERVE = 256  # descriptors kept for everything that is not a client connection (files, workers, threads)
HANDLED = (signal.SIGTERM, signal.SIGINT)


class ConnectionGuard:
    """Open connections of one worker; idle ones in an ordered map, oldest first."""

    def __init__(self, idle_timeout_s: float, max_connections: int) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections
        self.open: set[Any] = set()
        self.idle: OrderedDict[Any, float] = OrderedDict()
        self._timer: asyncio.TimerHandle | None = None

    def opened(self, conn: Any) -> bool:
        """A new connection: room is made by closing the oldest idle one; False when all are busy."""
        if len(self.open) >= self.max_connections:
            if not self.idle:
                return False
            oldest, _ = self.idle.popitem(last=False)
            self._close(oldest)
        self.open.add(conn)
        self.mark_idle(conn)
        return True

    def mark_idle(self, conn: Any) -> None:
        self.idle[conn] = time.monotonic()
        self.idle.move_to_end(conn)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._period(), self._sweep)

    def busy(self, conn: Any) -> None:
        self.idle.pop(conn, None)

    def closed(self, conn: Any) -> None:
        self.open.discard(conn)
        self.idle.pop(conn, None)

    def _close(self, conn: Any) -> None:
        self.open.discard(conn)
        conn.transport.close()

    def _period(self) -> float:
        return min(1.0, self.idle_timeout_s / 4)

    def _sweep(self) -> None:
        self._timer = None
        limit = time.monotonic() - self.idle_timeout_s
        while self.idle:
            conn, since = next(iter(self.idle.items()))
            if since > limit:
                break
            del self.idle[conn]
            self._close(conn)
        if self.idle:
            self._timer = asyncio.get_running_loop().call_later(self._period(), self._sweep)


GUARD: ConnectionGuard | None = None  # set in an API worker by ShutdownHooks; None elsewhere


def _busy_answer(limit: int) -> bytes:
    body = json.dumps({"error": f"the server has {limit} connections open, all busy: try again shortly"}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class GuardedHTTPProtocol(_Base):  # type: ignore[misc,valid-type]
    """uvicorn's HTTP protocol ("auto": httptools, else h11) reporting to :data:`GUARD`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if GUARD is not None and not GUARD.opened(self):
            transport.write(_busy_answer(GUARD.max_connections))
            transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if GUARD is not None and self.cycle is not None and not self.cycle.response_complete:
            GUARD.busy(self)  # complete headers: the request's own timeouts apply from here

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if GUARD is not None and self in GUARD.open and not self.transport.is_closing():
            GUARD.mark_idle(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if GUARD is not None:
            GUARD.closed(self)
        super().connection_lost(exc)


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (at most the hard limit); the soft limit after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def stop_listening() -> int:
    """Shut down this process's listening TCP sockets (``SHUT_RD`` stops the socket itself, for
    every process holding it): new connections are refused. Linux (``/proc/self/fd``)."""
    n = 0
    for name in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else ():
        try:
            if not stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:  # closed meanwhile (the directory's own descriptor)
            continue
        with sock:
            if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.getsockopt(
                    socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                sock.shutdown(socket.SHUT_RD)
                n += 1
    return n


def _entry_workers_alive(entry: str) -> bool:
    """Whether a sibling process (same arbiter) is a BentoML worker of the service ``entry``."""
    import psutil

    me = psutil.Process()
    parent = me.parent()
    for p in parent.children() if parent else ():
        try:
            args = p.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if p.pid != me.pid and any(a == "--service-name" and b == entry for a, b in zip(args, args[1:])):
            return True
    return False


class ShutdownHooks:
    """ASGI middleware whose only work is at lifespan start-up, in the worker (module docstring)."""

    def __init__(self, app: ASGIApp, entry: str, is_entry: bool, grace_s: float, idle_timeout_s: float = 5,
                 max_connections: int = 4096) -> None:
        self.app = app
        self.entry, self.is_entry, self.grace_s = entry, is_entry, grace_s
        self.idle_timeout_s, self.max_connections = idle_timeout_s, max_connections
        self.installed = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" and not self.installed:
            self.installed = True
            self._install()
        await self.app(scope, receive, send)

    def _install(self) -> None:
        global GUARD
        if self.is_entry:
            soft = raise_fd_limit(self.max_connections + FD_RESERVE)
            GUARD = ConnectionGuard(self.idle_timeout_s, max(1, min(self.max_connections, soft - FD_RESERVE)))
            log.info("connections: at most %d open (RLIMIT_NOFILE %d), idle ones closed after %g s",
                     GUARD.max_connections, soft, self.idle_timeout_s)
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (a threaded dev server)
        for sig in HANDLED:
            previous = signal.getsignal(sig)
            if callable(previous):  # uvicorn's Server.handle_exit, set before the lifespan starts
                signal.signal(sig, self._stop_listening_first(previous) if self.is_entry else self._held(previous))

    def _stop_listening_first(self, previous: Callable[[int, Any], Any]) -> Callable[[int, Any], None]:
        def handler(signum: int, frame: Any) -> None:
            stop_listening()
            previous(signum, frame)

        return handler

    def _held(self, previous: Callable[[int, Any], Any]) -> Callable[[int, Any], None]:
        started: list[float] = []

        def wait_then_stop(signum: int) -> None:
            deadline = started[0] + self.grace_s
            while time.monotonic() < deadline and _entry_workers_alive(self.entry):
                time.sleep(0.2)
            previous(signum, None)  # uvicorn's handler only sets flags that its main loop polls

        def handler(signum: int, frame: Any) -> None:
            if not started:  # a second signal (the arbiter's, after zoo serve's) changes nothing
                started.append(time.monotonic())
                threading.Thread(target=wait_then_stop, args=(signum,), daemon=True).start()

        return handler


def keep_sockets_while_draining() -> None:
    """BentoML's arbiter (``bentoml serve``'s main process; bentoml 1.4) removes the folder of the
    workers' unix sockets first thing when it stops, before it stops the workers: the API worker,
    still draining its requests, could then open no new connection to the inference worker ("Cannot
    connect to unix socket … No such file"). Its clean-up (that folder, BentoML's usage tracking) is
    moved to the end of the process, after the workers have stopped."""
    from bentoml._internal.utils.circus import Arbiter
    from circus.arbiter import Arbiter as CircusArbiter

    if getattr(Arbiter.stop, "medzoo", False):
        return

    def stop(self: Any) -> Any:
        atexit.register(self.exit_stack.__exit__, None, None, None)
        return CircusArbiter.stop(self)

    stop.medzoo = True  # type: ignore[attr-defined]
    Arbiter.stop = stop  # type: ignore[method-assign]


def install(entry: Any, grace_s: float, idle_timeout_s: float, max_connections: int) -> None:
    """Install the guard and the signal hooks for the BentoML service ``entry`` and its dependencies."""
    keep_sockets_while_draining()
    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:GuardedHTTPProtocol"
    entry.add_asgi_middleware(ShutdownHooks, entry=entry.name, is_entry=True, grace_s=grace_s,
                              idle_timeout_s=idle_timeout_s, max_connections=max_connections)
    for name, dep in entry.all_services(exclude_urls=True).items():
        if name != entry.name:
            dep.add_asgi_middleware(ShutdownHooks, entry=entry.name, is_entry=False, grace_s=grace_s)


__all__ = ["ConnectionGuard", "GuardedHTTPProtocol", "ShutdownHooks", "install", "raise_fd_limit", "stop_listening"]
