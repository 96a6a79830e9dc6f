"""Serve the app with waitress, tuned for token streaming.

- waitress >= 3 sends each chunk as soon as the route yields it (send_bytes defaults to 1;
  tests/test_server_streaming.py proves it);
- channel_request_lookahead=1: waitress keeps reading the socket during a response, so a
  client that hangs up is noticed (environ["waitress.client_disconnected"]) and its
  generation cancelled without waiting for the next token;
- enough threads for every queued request plus a few for /health and model listings;
- connection limits (ConnectionLimits): many open connections are cheap (poll(), no select()
  limit of 1024 descriptors), and one that stays idle or never finishes its request is closed
  after `channel_timeout` seconds, so idle or half-open clients cannot lock others out;
- `serve_until_stopped`: SIGTERM and SIGINT stop admitting requests (503), let running replies
  finish for a grace period, end the rest cleanly (in-band error, end of stream), and return.

`bind_sockets` reserves host:port before the model loads (minutes), so a port in use fails
at once; `create_server(..., sockets=...)` then serves on exactly those sockets.
"""

from __future__ import annotations

import logging
import resource
import signal
import socket
import threading
import time
from dataclasses import asdict, dataclass

import waitress
from waitress import wasyncore
from waitress.adjustments import Adjustments
from flask import Flask


def bind_sockets(host: str, port: int) -> list[socket.socket]:
    """Bind, without listening, every address waitress would serve host:port on.

    Not listening yet: a client that connects during the model load is refused at once
    instead of hanging. Raises OSError (port in use, address not on this machine) or
    ValueError (host that does not resolve).
    """
    bound = []
    try:
        for family, kind, proto, address in Adjustments(host=host, port=port).listen:
            sock = socket.socket(family, kind, proto)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as waitress: restart without TIME_WAIT
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    return bound


log = logging.getLogger("ktransformers.server")


@dataclass(frozen=True)
class ConnectionLimits:
    """waitress settings that keep /health and new chats answering under many idle connections."""

    connection_limit: int = 1000    # open connections served at once; more wait in the listen backlog
    channel_timeout: int = 60       # seconds an idle (or never completed) connection is kept
    cleanup_interval: int = 5       # how often idle connections are looked for
    backlog: int = 1024             # connections the kernel holds before accept()
    max_request_header_size: int = 64 * 1024
    max_request_body_size: int = 64 * 1024 * 1024   # waitress' own cut (plain-text 413); the app's JSON 413 is lower
    asyncore_use_poll: bool = True  # poll(): select() cannot watch descriptors past 1023


DEFAULT_LIMITS = ConnectionLimits()


def raise_open_file_limit(wanted: int) -> None:
    """Each connection is a file descriptor: lift the soft limit (often 1024) toward the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            log.warning("cannot raise the open-file limit from %d to %d: fewer connections will fit", soft, target)


def create_server(app: Flask, host: str | None, port: int | None, queue_size: int,
                  sockets: list[socket.socket] | None = None, limits: ConnectionLimits = DEFAULT_LIMITS):
    """waitress on host:port, or on already bound `sockets` (then host and port are not used)."""
    where = {"sockets": sockets} if sockets else {"host": host, "port": port}
    raise_open_file_limit(limits.connection_limit + 256)
    return waitress.create_server(app, threads=queue_size + 4, channel_request_lookahead=1,
                                  ident="ktransformers", clear_untrusted_proxy_headers=True, **asdict(limits), **where)


def socket_map(server) -> dict:
    """The dispatcher map of a waitress server (one listener: `_map`; several: `map`)."""
    return server.map if hasattr(server, "map") else server._map


def _idle(server) -> bool:
    """No request running or queued in waitress, and nothing left to send."""
    dispatcher = server.task_dispatcher
    if dispatcher.active_count or dispatcher.queue:
        return False
    return not any(getattr(ch, "requests", None) or getattr(ch, "total_outbufs_len", 0)
                   for ch in socket_map(server).values())


DRAIN_EXTRA_S = 5.0   # after the grace period: time for the last bytes to reach the clients


def serve_until_stopped(server, engine, grace_s: float = 5.0, signals=(signal.SIGTERM, signal.SIGINT)) -> None:
    """Serve in this (main) thread until SIGTERM or SIGINT, then shut down gracefully.

    New requests get 503 from the moment the signal arrives; waiting ones are refused; the
    running one may finish within `grace_s`, else its stream ends with an in-band error and
    its end-of-stream marker. Returns once every reply has been sent (or DRAIN_EXTRA_S after).
    """
    stop = threading.Event()

    def on_signal(signum, _frame):
        if stop.is_set():
            log.warning("second %s: exiting without waiting", signal.Signals(signum).name)
            raise SystemExit(1)
        log.info("%s: shutting down (running replies get %.1f s to finish)", signal.Signals(signum).name, grace_s)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in signals}
    socket_map_ = socket_map(server)
    use_poll = server.adj.asyncore_use_poll

    def one_round(timeout: float) -> None:
        wasyncore.loop(timeout=timeout, map=socket_map_, use_poll=use_poll, count=1)

    try:
        while not stop.is_set():
            one_round(0.5)
        drain = threading.Thread(target=engine.stop, kwargs={"grace_s": grace_s, "timeout": 1.0},
                                 name="ktransformers-drain", daemon=True)
        drain.start()
        deadline = time.monotonic() + grace_s + DRAIN_EXTRA_S
        while time.monotonic() < deadline and (drain.is_alive() or not _idle(server)):
            one_round(0.05)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        wasyncore.close_all(socket_map_)
        server.task_dispatcher.shutdown(timeout=1)


class BackgroundServer:
    """waitress in a daemon thread on a free port (tests, benchmarks): `with BackgroundServer(app) as url:`.

    With `sockets` (from bind_sockets) it serves on those instead; one address, not several.

    The event loop runs in short rounds so it can be stopped from outside; closing every
    socket from inside the loop thread avoids waitress' select() on a closed descriptor.
    """

    def __init__(self, app: Flask, host: str = "127.0.0.1", port: int = 0, queue_size: int = 8,
                 sockets: list[socket.socket] | None = None, limits: ConnectionLimits = DEFAULT_LIMITS):
        self.server = create_server(app, host, port, queue_size, sockets=sockets, limits=limits)
        self.url = f"http://{self.server.effective_host}:{self.server.effective_port}"
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="waitress", daemon=True)

    def _loop(self) -> None:
        dispatchers = socket_map(self.server)
        use_poll = self.server.adj.asyncore_use_poll
        while not self._stopping.is_set():
            wasyncore.loop(timeout=0.05, map=dispatchers, count=1, use_poll=use_poll)
        for dispatcher in list(dispatchers.values()):
            dispatcher.close()

    def __enter__(self) -> str:
        self._thread.start()
        return self.url

    def __exit__(self, *exc) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self.server.task_dispatcher.shutdown(timeout=5)
