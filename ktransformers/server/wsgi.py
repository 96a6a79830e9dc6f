"""Serve the app with waitress, tuned for token streaming.

- waitress >= 3 sends each chunk as soon as the route yields it (send_bytes defaults to 1;
  tests/test_server_streaming.py proves it);
- channel_request_lookahead=1: waitress keeps reading the socket during a response, so a
  client that hangs up is noticed (environ["waitress.client_disconnected"]) and its
  generation cancelled without waiting for the next token;
- enough threads for every queued request plus a few for /health and model listings.

`bind_sockets` reserves host:port before the model loads (minutes), so a port in use fails
at once; `create_server(..., sockets=...)` then serves on exactly those sockets.
"""

from __future__ import annotations

import socket
import threading

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


def create_server(app: Flask, host: str | None, port: int | None, queue_size: int,
                  sockets: list[socket.socket] | None = None):
    """waitress on host:port, or on already bound `sockets` (then host and port are not used)."""
    where = {"sockets": sockets} if sockets else {"host": host, "port": port}
    return waitress.create_server(app, threads=queue_size + 4, channel_request_lookahead=1,
                                  ident="ktransformers", clear_untrusted_proxy_headers=True, **where)


class BackgroundServer:
    """waitress in a daemon thread on a free port (tests, benchmarks): `with BackgroundServer(app) as url:`.

    With `sockets` (from bind_sockets) it serves on those instead; one address, not several.

    The event loop runs in short rounds so it can be stopped from outside; closing every
    socket from inside the loop thread avoids waitress' select() on a closed descriptor.
    """

    def __init__(self, app: Flask, host: str = "127.0.0.1", port: int = 0, queue_size: int = 8,
                 sockets: list[socket.socket] | None = None):
        self.server = create_server(app, host, port, queue_size, sockets=sockets)
        self.url = f"http://{self.server.effective_host}:{self.server.effective_port}"
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="waitress", daemon=True)

    def _loop(self) -> None:
        socket_map = self.server._map
        while not self._stopping.is_set():
            wasyncore.loop(timeout=0.05, map=socket_map, count=1)
        for dispatcher in list(socket_map.values()):
            dispatcher.close()

    def __enter__(self) -> str:
        self._thread.start()
        return self.url

    def __exit__(self, *exc) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self.server.task_dispatcher.shutdown(timeout=5)
