"""Tool calls parsed out of a model's reply, in the format its chat template taught it (whole or while streaming).

Three families cover the chat templates in use (the template's own source tells which one a model speaks):

- `hermes`  (Qwen2/2.5/3, Hermes, ChatML tool templates): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
  any number of them, with ordinary text around them;
- `llama3`  (Llama 3.1/3.2/3.3): the whole reply is one JSON object `{"name": ..., "parameters": {...}}` (or several
  separated by `;`), optionally after `<|python_tag|>`;
- `mistral` (Mistral v0.3, Nemo, Mixtral): `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`.

`ToolCallParser.feed(text)` takes reply text as it is produced and returns what may go to the client now: plain
text (content) as soon as it cannot be the start of a call, and each call once it is complete. Text that looks
like a call but does not parse is given back as content at the end, never dropped. Parsing a whole reply is the
same thing in one call (`parse_tool_calls`), so streamed and non-streamed answers cannot disagree.

Special tokens such as `[TOOL_CALLS]` or `<|python_tag|>` are usually removed when ids are decoded to text, so the
llama3 and mistral parsers also recognise a reply that starts with the bare JSON (`{"name"` / `[{"name"`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

FAMILIES = ("hermes", "llama3", "mistral")


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def to_openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def tool_family(chat_template: str | None) -> str:
    """The tool-call format a chat template writes (hermes when it shows none: TuneForge's own templates use it)."""
    source = chat_template or ""
    if "[TOOL_CALLS]" in source:
        return "mistral"
    if "<tool_call>" in source:
        return "hermes"
    if "<|python_tag|>" in source or ("<|start_header_id|>" in source and "tool" in source):
        return "llama3"
    return "hermes"


def _call_from_json(obj) -> ToolCall | None:
    """A {"name", "arguments"|"parameters"} object as a ToolCall; None for anything else."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return ToolCall(name=obj["name"], arguments=json.dumps(args, ensure_ascii=False))


def _calls_from_text(text: str) -> list[ToolCall] | None:
    """One JSON object, a JSON list of objects, or objects separated by ';' -> calls; None if anything fails."""
    text = text.strip()
    try:
        parsed = json.loads(text)
        items = parsed if isinstance(parsed, list) else [parsed]
    except json.JSONDecodeError:
        try:
            items = [json.loads(part) for part in text.split(";") if part.strip()]
        except json.JSONDecodeError:
            return None
    calls = [_call_from_json(item) for item in items]
    return calls if calls and all(c is not None for c in calls) else None


def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (held back: it may grow into it)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    """Incremental parser for one reply: `feed` text pieces, then `finish`; both return a list of events, each
    either a str (content) or a ToolCall."""

    def __init__(self, family: str, max_calls: int | None = None):
        """`max_calls`: 1 for a request with `parallel_tool_calls: false` (OpenAI then returns one call at most; a
        model may still write several, and the later ones are dropped)."""
        if family not in FAMILIES:
            raise ValueError(f"unknown tool-call family {family!r}; one of {FAMILIES}")
        self.family, self.max_calls = family, max_calls
        self.buffer = ""
        self.in_call = False  # inside a call (hermes) or past the start of the calls block (llama3, mistral)
        self.decided = False  # llama3/mistral: whether the reply's start has been classified
        self.calls = 0

    def feed(self, text: str) -> list:
        self.buffer += text
        if self.family == "hermes":
            return self._feed_hermes(final=False)
        return self._feed_block(final=False)

    def finish(self) -> list:
        if self.family == "hermes":
            return self._feed_hermes(final=True)
        return self._feed_block(final=True)

    def _drop_gaps(self, events: list) -> list:
        """Once a call was made, whitespace-only text is the newline templates put between calls: not content."""
        if not self.calls:
            return events
        return [e for e in events if not (isinstance(e, str) and not e.strip())]

    def _calls(self, calls: list[ToolCall]) -> list[ToolCall]:
        room = len(calls) if self.max_calls is None else max(0, self.max_calls - self.calls)
        self.calls += len(calls)
        return calls[:room]

    def _feed_hermes(self, final: bool) -> list:
        start, end = "<tool_call>", "</tool_call>"
        events: list = []
        while self.buffer:
            if self.in_call:
                close = self.buffer.find(end)
                if close < 0 and not final:
                    break
                body = self.buffer[:close] if close >= 0 else self.buffer
                raw = start + (self.buffer[:close + len(end)] if close >= 0 else body)
                calls = _calls_from_text(body)  # an unterminated call at the very end counts when its JSON is whole
                events += self._calls(calls) if calls else [raw]
                self.buffer = self.buffer[close + len(end):] if close >= 0 else ""
                self.in_call = False
                continue
            opening = self.buffer.find(start)
            if opening >= 0:
                if opening:
                    events.append(self.buffer[:opening])
                self.buffer, self.in_call = self.buffer[opening + len(start):], True
                continue
            keep = 0 if final else _held_prefix(self.buffer, start)
            if len(self.buffer) > keep:
                events.append(self.buffer[:len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep:]
            break
        return self._drop_gaps(events)

    def _feed_block(self, final: bool) -> list:
        """llama3 / mistral: the calls are the rest of the reply from a marker (or from the start) on."""
        markers = ("<|python_tag|>",) if self.family == "llama3" else ("[TOOL_CALLS]",)
        starts = ("{",) if self.family == "llama3" else ("[{", "[ {")
        if self.in_call:
            return self._end_block() if final else []
        if not self.decided:
            head = self.buffer.lstrip()
            if any(head.startswith(m) for m in markers) or any(head.startswith(s) for s in starts):
                self.decided = self.in_call = True
                return self._end_block() if final else []
            if not final and (not head or any(m.startswith(head) or s.startswith(head)
                                              for m in markers for s in starts)):
                return []  # too little text yet to tell
            self.decided = True
        if self.family == "mistral":  # the marker may also follow some text
            at = self.buffer.find(markers[0])
            if at >= 0:
                content, self.buffer, self.in_call = self.buffer[:at], self.buffer[at:], True
                return ([content] if content else []) + (self._end_block() if final else [])
            keep = 0 if final else _held_prefix(self.buffer, markers[0])
        else:
            keep = 0
        out, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
        return [out] if out else []

    def _end_block(self) -> list:
        text, self.buffer = self.buffer, ""
        body = text.strip()
        for marker in ("<|python_tag|>", "[TOOL_CALLS]"):
            body = body.removeprefix(marker)
        calls = _calls_from_text(body)
        return self._calls(calls) if calls else [text]


def parse_tool_calls(text: str, family: str) -> tuple[str, list[ToolCall]]:
    """A whole reply -> (content text, tool calls)."""
    parser = ToolCallParser(family)
    events = parser.feed(text) + parser.finish()
    content = "".join(e for e in events if isinstance(e, str))
    return content.strip() if any(isinstance(e, ToolCall) for e in events) else content, \
        [e for e in events if isinstance(e, ToolCall)]
