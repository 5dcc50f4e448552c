"""A scripted OpenAI-like HTTP server in a thread, for the client-side fault tests (eval, loadtest): the real
server cannot be made to answer 500, hang or drop a stream on cue."""

from __future__ import annotations

import contextlib
import threading
from http.server import ThreadingHTTPServer


@contextlib.contextmanager
def stub_server(handler, **state):
    """Yield (base URL, server) with `handler` answering; `state` becomes attributes of the server, which the
    handler reads and writes as `self.server.<name>`."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    for name, value in state.items():
        setattr(server, name, value)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.shutdown()
