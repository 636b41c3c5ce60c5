"""Chat requests -> what the chat template renders: messages as plain dicts, and the tools plan.

`tool_choice` decides what the model may do, in the format its template taught it (see tools.py):
- absent / "auto": the tools are shown to the model (rendered by its template) and its reply is parsed for calls;
- "none": the tools are not shown and nothing is parsed (a plain answer);
- "required" or {"type": "function", "function": {"name": X}}: the reply is started for the model with the opening
  of a call (of X), which it then completes. That is a strong hint, not a grammar: a reply that still does not
  parse as a call is a 400 `tool_use_failed` error (completions.check_forced_call), never text posing as a call.
"""

from __future__ import annotations

import json

from tuneforge.inference.serve.protocol import ChatCompletionRequest, OpenAIError

# The opening of a call in each family, with and without the function's name.
CALL_OPENINGS = {
    "hermes": ('<tool_call>\n{"name": "', '", "arguments": '),
    "llama3": ('{"name": "', '", "parameters": '),
    "mistral": ('[TOOL_CALLS] [{"name": "', '", "arguments": '),
}


def _text(content, index: int) -> str:
    """A message's content as text: a string, or OpenAI content parts of type text (joined)."""
    if content is None or isinstance(content, str):
        return content or ""
    pieces = []
    for part in content:
        if part.get("type") != "text":
            raise OpenAIError(400, f"messages[{index}]: content part of type {part.get('type')!r} is not supported; "
                                   f"this server takes text only.", param="messages")
        pieces.append(str(part.get("text", "")))
    return "".join(pieces)


def _tool_calls(calls: list[dict], index: int) -> list[dict]:
    """Assistant tool calls with their arguments as objects (chat templates render them with tojson)."""
    out = []
    for call in calls:
        function = dict(call.get("function") or {})
        args = function.get("arguments")
        if isinstance(args, str):
            try:
                function["arguments"] = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise OpenAIError(400, f"messages[{index}].tool_calls: arguments are not valid JSON ({e}).",
                                  param="messages") from e
        out.append({**call, "type": call.get("type", "function"), "function": function})
    return out


def chat_messages(req: ChatCompletionRequest) -> list[dict]:
    messages = []
    for i, m in enumerate(req.messages):
        message = {"role": "system" if m.role == "developer" else m.role, "content": _text(m.content, i)}
        if m.tool_calls:
            message["tool_calls"] = _tool_calls(m.tool_calls, i)
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            message["name"] = m.name
        messages.append(message)
    return messages


def _forced_name(req: ChatCompletionRequest) -> str | None:
    choice = req.tool_choice
    if not isinstance(choice, dict):
        return None
    name = (choice.get("function") or {}).get("name")
    known = [(t.get("function") or {}).get("name") for t in req.tools or []]
    if not name or name not in known:
        raise OpenAIError(400, f"`tool_choice` names the function {name!r}, which is not among `tools` "
                               f"({', '.join(map(str, known))}).", param="tool_choice")
    return name


def tool_plan(req: ChatCompletionRequest, family: str | None) -> tuple[list | None, str, str | None]:
    """(tools for the template, text the reply is started with, tool-call family to parse with or None)."""
    choice = req.tool_choice
    if isinstance(choice, str) and choice not in ("none", "auto", "required"):
        raise OpenAIError(400, f"`tool_choice` is {choice!r}; use none, auto, required or "
                               f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}.", param="tool_choice")
    if not req.tools:
        if choice not in (None, "none", "auto"):
            raise OpenAIError(400, "`tool_choice` needs `tools`.", param="tool_choice")
        return None, "", None
    for i, tool in enumerate(req.tools):
        if tool.get("type", "function") != "function" or not (tool.get("function") or {}).get("name"):
            raise OpenAIError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                                   f"\"parameters\": ...}}}}.", param="tools")
    if choice == "none" or family is None:
        return None, "", None
    name = _forced_name(req)
    opening, after_name = CALL_OPENINGS[family]
    if name is not None:
        return req.tools, opening + name + after_name, family
    return req.tools, opening if choice == "required" else "", family
