"""Format adapters: a raw row -> a validated `Example`, or a `RowProblem` naming the field and what was expected.

Formats (column names are the defaults; `DatasetSpec.columns` maps our names to yours):

- alpaca: `instruction`, optional `input` (appended to the instruction after a newline), `output`, optional
  `system` and `history` ([[question, answer], ...], earlier turns).
- sharegpt: `conversations`, a list of {from, value}; roles human/gpt/system/function_call/observation, renamed
  with `DatasetSpec.tags` (role_tag, content_tag, user_tag, assistant_tag, system_tag, function_tag,
  observation_tag). A function_call turn holds JSON {"name", "arguments"} and becomes an assistant tool call; an
  observation turn becomes a `tool` message answering it. Optional `system` and `tools` columns.
- openai: `messages`, a list of {role, content} with roles system/user/assistant/tool (assistant `tool_calls`
  and `tool_call_id` as in the OpenAI API; content may be a list of text parts). Optional `tools` column.
  LLaMA-Factory's v1 `loss_weight` per message: 0 on an assistant turn masks it (kept as `loss_weight: 0`); its
  assistant `reasoning` parts go before the reply as `<think>...</think>`, its `tool_call` parts become tool calls.
- text: `text`, plain text for pre-training.
- pairwise, kto, typed, prompt: alignment data (preference pairs, KTO rows, ranked typed responses, prompts for
  sampling); see tuneforge/data/preference.py.
- auto: guessed from the first row of each file (see `guess_format`).

Rows with media (non-empty `images`, `videos`, `audios`) are refused: text only.
List-valued cells may also hold JSON text (CSV files, LLaMA-Factory's `tools` column). Every conversation is
checked by `validate_conversation`: known roles, non-empty contents, a system message only first, turns that
alternate user -> assistant (tool results after a tool call) and a final assistant reply or tool call.
"""

from __future__ import annotations

import json
from typing import Any

from tuneforge.data.types import Example, RowProblem
from tuneforge.errors import DataError

FORMATS = ("alpaca", "sharegpt", "openai", "text", "pairwise", "kto", "typed", "prompt")
CHAT_FORMATS = ("alpaca", "sharegpt", "openai")

SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "system_tag": "system", "function_tag": "function_call", "observation_tag": "observation"}

ROLES = ("system", "user", "assistant", "tool")

# The names `DatasetSpec.columns` may map, per format (the adapters here and in preference.py read these). The
# alignment formats read their prompt the way the chat formats do, so they take those roles too.
_CHAT_ROLES = ("messages", "instruction", "input", "history", "system", "tools")
COLUMN_ROLES = {
    "alpaca": ("instruction", "input", "output", "system", "history", "reference"),
    "sharegpt": ("messages", "system", "tools", "reference"),
    "openai": ("messages", "system", "tools", "reference"),
    "text": ("text",),
    "pairwise": ("prompt", "chosen", "rejected", "chosen_messages", "rejected_messages", "margin", "reference",
                 *_CHAT_ROLES),
    "kto": ("label", "prompt", "completion", "output", "reference", *_CHAT_ROLES),
    "typed": ("prompt", "responses", "reference", *_CHAT_ROLES),
    "prompt": ("prompt", "reference", "output", "completion", *_CHAT_ROLES),
}


def to_example(data: dict, fmt: str, source: str, columns: dict, tags: dict, ranking: list[str] | None = None):
    """One raw row in format `fmt` -> Example (PairExample for pairwise, a list of them for typed); raises
    RowProblem."""
    from tuneforge.data import preference

    refuse_media(data, columns)
    if fmt == "typed":
        examples = preference.typed_examples(data, source, columns, ranking)
        for example in examples:
            check_unicode(example)
        return examples
    if fmt in ("pairwise", "kto", "prompt"):
        adapter = {"pairwise": preference.pairwise_example, "kto": preference.kto_example,
                   "prompt": preference.prompt_example}[fmt]
        example = adapter(data, source, columns, tags)
    elif fmt == "sharegpt":
        example = sharegpt_example(data, source, columns, {**SHAREGPT_TAGS, **tags})
    else:
        example = {"alpaca": alpaca_example, "openai": openai_example, "text": text_example}[fmt](data, source, columns)
    if fmt in CHAT_FORMATS:
        example.reference = preference.reference_column(data, columns)
    check_unicode(example)
    return example


MEDIA_COLUMNS = ("images", "videos", "audios")  # LLaMA-Factory's multimodal columns


def refuse_media(data: dict, columns: dict) -> None:
    """A RowProblem for a row with images, videos or audio (LLaMA-Factory's multimodal columns, non-empty): read as
    text, the media would be dropped unseen and the model trained on answers to pictures it never got."""
    for name in MEDIA_COLUMNS:
        field = columns.get(name, name)
        value = data.get(field)
        if value not in (None, "", [], {}):
            raise RowProblem(field, f"holds {name} ({_short(value)}), and multimodal data is not supported: "
                                    f"TuneForge trains text models on text only. Train on rows without `{field}` "
                                    f"(and without `<image>`-style placeholders in the text).")


def check_unicode(example: Example) -> None:
    """Every string must be valid Unicode. JSON may spell half a UTF-16 pair (`"\\ud83d"`), and readers keep a byte
    that is not UTF-8 as a lone surrogate (errors="surrogateescape") so it is reported here, with its row, instead
    of failing the whole file or, later, the tokenizer. The text columns are checked as they are read
    (`checked_text`), so this names the row's own field there; this pass catches the rest."""
    for field, text in strings_of(example):
        checked_text(text, field)


def checked_text(text: str, field: str) -> str:
    """`text`, or a RowProblem when it is not valid Unicode (see check_unicode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char = ord(text[e.start])
        line = text.count("\n", 0, e.start)
        where = f" (line {line + 1} of this value)" if line else ""
        what = (f"the byte 0x{char - 0xDC00:02X}, which is not UTF-8 (or the escape \\u{char:04x})"
                if 0xDC80 <= char <= 0xDCFF else f"the lone surrogate escape \\u{char:04x} (half of a UTF-16 pair)")
        raise RowProblem(field, f"not valid Unicode text: {what} at character {e.start + 1}{where}. Fix the "
                                f"encoding of this row (save the file as UTF-8).") from None
    return text


def strings_of(example: Example):
    """(field, string) for every string of an example: texts, message contents, tool calls and tool schemas. The
    field is the row's own (`output`, `conversations[1].value`) where the example knows it (`Example.origins`)."""
    names = ("text", "messages", "prompt", "chosen", "rejected", "tools", "reference")
    stack = [(name, getattr(example, name)) for name in names if getattr(example, name, None) is not None]
    origins = getattr(example, "origins", None) or {}
    while stack:  # iterative: a row may nest deeper than Python's recursion limit allows
        field, value = stack.pop()
        if isinstance(value, str):
            yield user_field(origins, field), value
        elif isinstance(value, dict):  # keys may be invalid Unicode themselves: printed escaped
            stack += [(f"{field}.<key>", k) for k in value if isinstance(k, str)]
            stack += [(f"{field}.{str(k).encode('utf-8', 'backslashreplace').decode()}", v) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            stack += [(f"{field}[{i}]", v) for i, v in enumerate(value)]


def user_field(origins: dict[str, str], field: str) -> str:
    """`field` (ours, e.g. `messages[1].content`) as the row's own field, by the `Example.origins` entry that is a
    prefix of it (`messages[1].content` -> `output`; `messages[1]` -> `turns[1]`, so `messages[1].role` ->
    `turns[1].role`); unchanged when none is."""
    for prefix, user in origins.items():
        if field == prefix or field.startswith((prefix + ".", prefix + "[")):
            return user + field[len(prefix):]
    return field


def guess_format(data: dict, columns: dict, where: str, stage: str | None = None) -> str:
    """The format of a file from its first row's keys (and, for conversations, the keys of the first turn).
    `stage`: the data stage the file is read for, when known. Read for kto, a `label` column of any value is the
    KTO label, so a file of 0/1 labels is told its labels must be booleans instead of being read as chat rows that
    have no label at all."""
    def has(name: str) -> bool:
        return columns.get(name, name) in data

    if has("chosen_messages") or (has("chosen") and has("rejected")):
        return "pairwise"
    if has("responses") or "pos_resp" in data:
        return "typed"
    label = data.get(columns.get("label", "label"), data.get("kto_tag"))
    if isinstance(label, bool) or (isinstance(label, str) and label.strip().lower() in ("true", "false")):
        return "kto"  # a boolean label: a classification dataset's `label` column is not KTO data
    if stage == "kto" and (has("label") or "kto_tag" in data):
        return "kto"
    if has("prompt") and not has("output"):
        return "prompt"
    chat = guess_chat_format(data, columns, where)
    if stage == "prompt" and chat in ("openai", "sharegpt"):
        # read for sampling (grpo, ppo, generation tasks): a conversation that waits for its reply is a prompt, and
        # one with its reply gives the same prompt and reference as a chat row would (whatever the file's first row)
        return "prompt"
    return chat


# Columns a format reads under their default names besides those of COLUMN_ROLES (sharegpt's conversations, the
# typed layout of CValues, LLaMA-Factory's kto_tag).
# fields a format reads besides its column roles (`answer`: the reference answer's other name, see preference.py)
_OTHER_FIELDS = {"alpaca": ("answer",), "sharegpt": ("conversations", "answer"), "openai": ("conversations", "answer"),
                 "pairwise": ("conversations", "answer"), "kto": ("conversations", "kto_tag", "answer"),
                 "prompt": ("conversations", "answer"),
                 "typed": ("conversations", "pos_resp", "neg_resp", "pos_type", "neg_type", "answer")}


def format_fields(fmt: str, columns: dict) -> set[str]:
    """The row fields format `fmt` reads, under the dataset's column names."""
    return {columns.get(role, role) for role in COLUMN_ROLES[fmt]} | set(_OTHER_FIELDS.get(fmt, ()))


def guess_chat_format(data: dict, columns: dict, where: str) -> str:
    """alpaca, sharegpt, openai or text, from a row's keys (and, for conversations, the keys of the first turn)."""
    for name in ([columns["messages"]] if "messages" in columns else ["messages", "conversations"]):
        if name in data:
            turns = _maybe_json(data[name])
            first = turns[0] if isinstance(turns, list) and turns and isinstance(turns[0], dict) else {}
            if "from" in first or "value" in first:
                return "sharegpt"
            if "role" in first:
                return "openai"
            return "sharegpt" if name == "conversations" else "openai"
    if columns.get("instruction", "instruction") in data and columns.get("output", "output") in data:
        return "alpaca"
    if columns.get("text", "text") in data:
        return "text"
    raise DataError(f"{where}: cannot tell the data format from the first row's keys {sorted(data)}. Set `format` "
                    f"(alpaca, sharegpt, openai, text, pairwise, kto, typed or prompt) in the dataset spec and, when your columns have other "
                    f"names, `columns`, e.g. {{path: ..., format: alpaca, columns: {{instruction: question, "
                    f"output: answer}}}}.")


# ---- alpaca -------------------------------------------------------------------------------------------------

def alpaca_example(data: dict, source: str, columns: dict) -> Example:
    col = {name: columns.get(name, name) for name in ("instruction", "input", "output", "system", "history")}
    instruction = required_text(data, col["instruction"])
    extra = optional_text(data, col["input"])
    output = required_text(data, col["output"])
    system = optional_text(data, col["system"])
    messages = [{"role": "system", "content": system}] if system else []
    for question, answer in history_pairs(data, col["history"]):
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    prompt = f"{instruction}\n{extra}" if extra else instruction
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return Example(source=source, messages=messages, origins=_alpaca_origins(messages, col, bool(extra)))


def _alpaca_origins(messages: list[dict], col: dict, with_input: bool) -> dict[str, str]:
    """The column of each message (see `Example.origins`): system, history pairs, the prompt (instruction, with
    input when there is one) and output."""
    system = int(messages[0]["role"] == "system")
    origins = {"messages[0].content": col["system"]} if system else {}
    for k in range(system, len(messages) - 2):
        origins[f"messages[{k}].content"] = f"{col['history']}[{(k - system) // 2}][{(k - system) % 2}]"
    origins[f"messages[{len(messages) - 2}].content"] = (f"{col['instruction']} + {col['input']}" if with_input
                                                        else col["instruction"])
    origins[f"messages[{len(messages) - 1}].content"] = col["output"]
    return origins


def history_pairs(data: dict, field: str) -> list[tuple[str, str]]:
    history = _maybe_json(data.get(field))
    if history in (None, "", []):
        return []
    if not isinstance(history, list):
        raise RowProblem(field, f"expected a list of [question, answer] pairs, got {_kind(history)}")
    pairs = []
    for i, pair in enumerate(history):
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) and x.strip()
                                                                       for x in pair)
        if not ok:
            raise RowProblem(f"{field}[{i}]", f"expected a [question, answer] pair of non-empty strings, got "
                                              f"{_short(pair)}")
        pairs.append((pair[0], pair[1]))
    return pairs


# ---- sharegpt -----------------------------------------------------------------------------------------------

def sharegpt_example(data: dict, source: str, columns: dict, tags: dict) -> Example:
    field = columns.get("messages") or ("conversations" if "conversations" in data else "messages")
    turns = required_list(data, field)
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system",
             tags["function_tag"]: "function_call", tags["observation_tag"]: "tool"}
    calls = _CallIds()
    messages = [_sharegpt_turn(turn, f"{field}[{i}]", tags, roles, calls) for i, turn in enumerate(turns)]
    validate_conversation(messages, field)
    # a turn's text is its content; tool calls parsed from a function_call turn keep our names
    return _chat_example(source, messages, data, columns, ".content",
                         [f"{field}[{i}].{tags['content_tag']}" for i in range(len(turns))])


def _chat_example(source: str, messages: list[dict], data: dict, columns: dict, part: str,
                  fields: list[str]) -> Example:
    """A conversation with the row's `system` and `tools` columns. `fields`: the row's field of each message's
    `part` (see `Example.origins`)."""
    full = _with_system_column(messages, data, columns)
    added = len(full) - len(messages)
    origins = {f"messages[{k + added}]{part}": name for k, name in enumerate(fields)}
    if added:
        origins["messages[0].content"] = columns.get("system", "system")
    return Example(source=source, messages=full, tools=tools_column(data, columns), origins=origins)


def _sharegpt_turn(turn: Any, field: str, tags: dict, roles: dict, calls: _CallIds) -> dict:
    role_tag, content_tag = tags["role_tag"], tags["content_tag"]
    if not isinstance(turn, dict):
        raise RowProblem(field, f"expected an object with `{role_tag}` and `{content_tag}`, got {_kind(turn)}")
    tag = turn.get(role_tag)
    role = roles.get(tag) if isinstance(tag, str) else None
    if role is None:
        raise RowProblem(f"{field}.{role_tag}", f"unknown role {turn.get(role_tag)!r}; expected one of "
                                                f"{', '.join(map(repr, roles))} (rename roles with `tags`, e.g. "
                                                f"{{user_tag: user, assistant_tag: assistant}})")
    value = turn.get(content_tag)
    if not isinstance(value, str):
        raise RowProblem(f"{field}.{content_tag}", f"expected a string, got {_kind(value)}")
    checked_text(value, f"{field}.{content_tag}")
    if role == "function_call":
        return {"role": "assistant", "content": "", "tool_calls": _function_calls(value, f"{field}.{content_tag}",
                                                                                   calls)}
    if role == "tool":
        return {"role": "tool", "content": value, "tool_call_id": calls.answer()}
    return {"role": role, "content": value}


class _CallIds:
    """Tool-call ids for formats that have none. Nine alphanumerics, because Mistral templates insist on it."""

    def __init__(self):
        self.issued, self.pending = 0, []

    def new(self) -> str:
        self.issued += 1
        self.pending.append(f"call{self.issued:05d}")
        return self.pending[-1]

    def answer(self) -> str:
        return self.pending.pop(0) if self.pending else f"call{self.issued:05d}"


def _function_calls(value: str, field: str, calls: _CallIds) -> list[dict]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = None
    items = parsed if isinstance(parsed, list) else [parsed]
    if not all(isinstance(c, dict) and isinstance(c.get("name"), str) and c["name"] for c in items):
        raise RowProblem(field, 'a function call must be JSON {"name": ..., "arguments": {...}} (or a list of '
                                f"them), got {_short(value)}")
    return [{"id": calls.new(), "type": "function",
             "function": {"name": c["name"], "arguments": _arguments(c.get("arguments", {}), field)}} for c in items]


# ---- openai -------------------------------------------------------------------------------------------------

def openai_example(data: dict, source: str, columns: dict) -> Example:
    field = columns.get("messages") or ("messages" if "messages" in data else "conversations")
    raw = required_list(data, field)
    messages = [_openai_message(m, f"{field}[{i}]") for i, m in enumerate(raw)]
    validate_conversation(messages, field)
    return _chat_example(source, messages, data, columns, "", [f"{field}[{i}]" for i in range(len(raw))])


def _openai_message(message: Any, field: str) -> dict:
    if not isinstance(message, dict):
        raise RowProblem(field, f"expected an object with `role` and `content`, got {_kind(message)}")
    role = message.get("role")
    if role not in ROLES:
        raise RowProblem(f"{field}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    out = {"role": role, "content": _content_text(message.get("content"), f"{field}.content", role)}
    if isinstance(out["content"], tuple):  # LLaMA-Factory v1 parts: the reply and its tool calls
        out["content"], out["tool_calls"] = out["content"]
    if role == "assistant" and message.get("tool_calls"):
        calls = _maybe_json(message["tool_calls"])
        if not isinstance(calls, list):
            raise RowProblem(f"{field}.tool_calls", f"expected a list of tool calls, got {_kind(calls)}")
        out["tool_calls"] = [_openai_call(c, f"{field}.tool_calls[{k}]") for k, c in enumerate(calls)]
    if role == "tool" and message.get("tool_call_id"):
        out["tool_call_id"] = str(message["tool_call_id"])
    if _no_loss(message, role, field) and role == "assistant":
        out["loss_weight"] = 0  # kept as the row spells it, so clean.jsonl/mix.jsonl keep it (see encode_chat)
    return out


def _no_loss(message: dict, role: str, field: str) -> bool:
    """Whether LLaMA-Factory's v1 `loss_weight` of a message is 0 (absent: as `data.loss_on` says). Only 0 and 1
    are honoured: the encoder masks turns, it does not scale their loss, so a fractional weight would silently
    train at full weight; and loss goes to assistant turns only, so a weight of 1 on another turn would be silently
    ignored. Both are refused."""
    weight = message.get("loss_weight")
    if weight is None:
        return False
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
        raise RowProblem(f"{field}.loss_weight", f"got {_short(weight)}; only 0 (no loss on this turn) and 1 are "
                                                 f"supported: TuneForge masks turns, it does not scale their loss")
    if weight == 1 and role != "assistant":
        raise RowProblem(f"{field}.loss_weight", f"1 on a `{role}` message, but loss goes to assistant turns only; "
                                                 f"set it to 0 or remove it (`data.loss_on: all` trains on every token)")
    return weight == 0


def _content_text(content: Any, field: str, role: str = "assistant") -> str | tuple[str, list]:
    """A string, or the text of a list of parts ({type: text, text|value: ...}); None reads as ''. An assistant's
    LLaMA-Factory v1 parts may also be `reasoning` (written before the reply as `<think>...</think>`, as reasoning
    templates render it) and `tool_call` (JSON {name, arguments}): then (text, tool calls)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise RowProblem(field, f"expected a string, got {_kind(content)}")
    parts: dict[str, list] = {"text": [], "reasoning": [], "tool_call": []}
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str) or kind not in parts or (kind != "text" and role != "assistant"):
            allowed = "text, reasoning and tool_call parts" if role == "assistant" else "only text parts"
            raise RowProblem(f"{field}[{k}]", f"{allowed} are supported in a `{role}` message, got {_short(part)}")
        text = part.get("text", part.get("value"))
        if text is not None and not isinstance(text, str):
            raise RowProblem(f"{field}[{k}].{'text' if 'text' in part else 'value'}",
                             f"expected a string, got {_kind(text)}")
        parts[kind].append((text or "", f"{field}[{k}]"))
    text = "".join(t for t, _ in parts["text"])
    if parts["reasoning"]:
        text = "<think>\n" + "".join(t for t, _ in parts["reasoning"]).strip() + "\n</think>\n\n" + text
    if not parts["tool_call"]:
        return text
    return text, [_openai_call({"function": _maybe_json(t)}, f"{where}.value") for t, where in parts["tool_call"]]


def _openai_call(call: Any, field: str) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise RowProblem(field, 'expected {"type": "function", "function": {"name": ..., "arguments": ...}}, got '
                                f"{_short(call)}")
    out = {"type": "function", "function": {"name": function["name"],
                                            "arguments": _arguments(function.get("arguments", {}), field)}}
    return {"id": str(call["id"]), **out} if call.get("id") else out


# ---- text ---------------------------------------------------------------------------------------------------

def text_example(data: dict, source: str, columns: dict) -> Example:
    return Example(source=source, text=required_text(data, columns.get("text", "text")))


# ---- checks shared by the chat formats ----------------------------------------------------------------------

# After a turn of this kind, which may come next ("call" is an assistant turn with tool calls).
_NEXT = {"start": ("user",), "system": ("user",), "user": ("assistant", "call"), "assistant": ("user",),
         "call": ("tool",), "tool": ("tool", "assistant", "call")}


def validate_conversation(messages: list[dict], field: str) -> None:
    """Roles, contents and turn order of a normalised conversation (see the module docstring)."""
    if not messages:
        raise RowProblem(field, "empty conversation; expected a user turn and an assistant reply")
    state = "start"
    for i, m in enumerate(messages):
        kind = "call" if m["role"] == "assistant" and m.get("tool_calls") else m["role"]
        where = f"{field}[{i}]"
        if kind == "system" and i > 0:
            raise RowProblem(where, "a system message may only come first")
        if kind != "system" and kind not in _NEXT[state]:
            expected = " or ".join(_NEXT[state]).replace("call", "assistant tool call")
            raise RowProblem(where, f"{_article(m['role'])} `{m['role']}` turn cannot follow {_describe(state)}; "
                                    f"expected {expected}")
        if kind != "call" and not m["content"].strip():
            raise RowProblem(where, f"empty `{m['role']}` content")
        state = kind
    if state not in ("assistant", "call"):  # ending on a tool call trains the call (LLaMA-Factory does too)
        raise RowProblem(field, f"the conversation ends with {_describe(state)}; it must end with the assistant's "
                                f"reply or tool call")


def _describe(state: str) -> str:
    return {"start": "the start", "call": "an assistant tool call"}.get(state, f"{_article(state)} `{state}` turn")


def _article(word: str) -> str:
    return "an" if word[0] in "aeio" else "a"  # "a user", "an assistant"


def _with_system_column(messages: list[dict], data: dict, columns: dict) -> list[dict]:
    system = optional_text(data, columns.get("system", "system"))
    if system and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}, *messages]
    return messages


def tools_column(data: dict, columns: dict) -> list | None:
    """Tool schemas as [{type: function, function: {...}}] (LLaMA-Factory stores bare functions as JSON text)."""
    field = columns.get("tools", "tools")
    tools = _maybe_json(data.get(field))
    if tools in (None, "", []):
        return None
    tools = [tools] if isinstance(tools, dict) else tools
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowProblem(field, f"expected a list of tool schemas (or JSON text of one), got {_short(tools)}")
    out = []
    for k, tool in enumerate(tools):
        if tool.get("type") == "function" and isinstance(tool.get("function"), dict):
            out.append(tool)
        elif isinstance(tool.get("name"), str):
            out.append({"type": "function", "function": tool})
        else:
            raise RowProblem(f"{field}[{k}]", f"a tool schema needs a `name`, got {_short(tool)}")
    return out


def _arguments(args: Any, field: str) -> dict | str:
    """Arguments as a dict when they are JSON (what chat templates expect); other text is kept as is."""
    if isinstance(args, str):
        try:
            parsed = json.loads(args)
        except json.JSONDecodeError:
            return args
        return parsed if isinstance(parsed, dict) else args
    if isinstance(args, dict):
        return args
    raise RowProblem(field, f"tool-call arguments must be an object or JSON text, got {_kind(args)}")


def required_text(data: dict, field: str) -> str:
    value = data.get(field)
    check_present(data, field, "text")
    if not isinstance(value, str):
        raise RowProblem(field, f"expected a string, got {_kind(value)}")
    if not value.strip():
        raise RowProblem(field, "empty")
    return checked_text(value, field)


def optional_text(data: dict, field: str) -> str:
    value = data.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowProblem(field, f"expected a string, got {_kind(value)}")
    return checked_text(value, field)


def check_present(data: dict, field: str, what: str) -> None:
    """A RowProblem for a required field that is absent or null (two different fixes: map a column, or fill it)."""
    if field not in data:
        raise RowProblem(field, f"missing; this format needs `{field}` (map another column to it with `columns`)")
    if data[field] is None:
        raise RowProblem(field, f"is null; this format needs {what} here (fill it in, or drop the row)")


def required_list(data: dict, field: str) -> list:
    check_present(data, field, "a list")
    value = _maybe_json(data[field])
    if not isinstance(value, list):
        raise RowProblem(field, f"expected a list (or JSON text of one), got {_kind(value)}")
    return value


def _maybe_json(value: Any) -> Any:
    """JSON text of a list or object is parsed (CSV cells, LLaMA-Factory's tools column); anything else is kept."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _kind(value: Any) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {_short(value)}"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
