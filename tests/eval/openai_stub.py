"""The reply half of the scripted OpenAI-compatible endpoints the judge tests run (one copy, not one per test)."""

from __future__ import annotations

import json


def send_chat_reply(handler, reply: str) -> None:
    """Answer the handler's request with one assistant message in OpenAI's chat-completion shape."""
    data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)

