"""A scripted OpenAI-compatible chat server on 127.0.0.1, in a thread: replies come from a Python function of the
request's messages, so the synth pipelines, filters and parsers run deterministically. A reply may be an int (an
HTTP status to answer with, e.g. 429 or 500) to exercise retries, or GONE: the server drops that request unanswered
and stops listening, as a teacher that crashes mid-run (every later request fails to connect)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GONE = object()  # a scripted reply: the server goes down (see the module docstring)


class StubTeacher:
    def __init__(self, script):
        self.script = script  # (messages, body) -> str | int
        self.requests: list[dict] = []  # every request body received, in arrival order
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append(body)
                reply = stub.script(body["messages"], body)
                if reply is GONE:
                    stub.go_down()
                    self.close_connection = True
                elif isinstance(reply, int):
                    self._send(reply, {"error": {"message": "scripted failure"}})
                else:
                    self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                                  "finish_reason": "stop"}]})

            def _send(self, status, data):
                blob = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(blob)))
                self.end_headers()
                self.wfile.write(blob)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.down = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def prompts(self) -> list[str]:
        """The last message of every request received."""
        return [r["messages"][-1]["content"] for r in self.requests]

    def go_down(self) -> None:
        """Stop listening (from another thread: `shutdown` waits for the serving loop, which runs this handler's
        caller). New connections are refused once the socket is closed."""
        if not self.down.is_set():
            self.down.set()
            threading.Thread(target=self._stop, daemon=True).start()

    def _stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if not self.down.is_set():
            self._stop()
