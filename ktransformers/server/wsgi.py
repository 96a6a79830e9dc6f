"""Serve the app with waitress, tuned for token streaming.

- waitress >= 3 sends each chunk as soon as the route yields it (send_bytes defaults to 1;
  tests/test_server_streaming.py proves it);
- channel_request_lookahead=1: waitress keeps reading the socket during a response, so a
  client that hangs up is noticed (environ["waitress.client_disconnected"]) and its
  generation cancelled without waiting for the next token;
- enough threads for every queued request plus a few for /health and model listings.
"""

from __future__ import annotations

import threading

import waitress
from waitress import wasyncore
from flask import Flask


def create_server(app: Flask, host: str, port: int, queue_size: int):
    return waitress.create_server(app, host=host, port=port, threads=queue_size + 4,
                                  channel_request_lookahead=1, ident="ktransformers",
                                  clear_untrusted_proxy_headers=True)


class BackgroundServer:
    """waitress in a daemon thread on a free port (tests, benchmarks): `with BackgroundServer(app) as url:`.

    The event loop runs in short rounds so it can be stopped from outside; closing every
    socket from inside the loop thread avoids waitress' select() on a closed descriptor.
    """

    def __init__(self, app: Flask, host: str = "127.0.0.1", port: int = 0, queue_size: int = 8):
        self.server = create_server(app, host, port, queue_size)
        self.url = f"http://{host}:{self.server.effective_port}"
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
