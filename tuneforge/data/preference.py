"""Format adapters for alignment data: preference pairs, KTO rows, typed (ranked) responses and prompt-only rows.

Formats (column names are the defaults; `DatasetSpec.columns` maps our names to yours):

- pairwise: one prompt and two replies, `chosen` (better) and `rejected`. The layout is read from each row's keys:
  - alpaca: `instruction`, optional `input`, `system`, `history`; `chosen` and `rejected` strings;
  - sharegpt / openai: `conversations` or `messages` (the prompt, ending with the user's turn) and `chosen` /
    `rejected` message objects ({from: gpt, value} or {role: assistant, content}), strings or message lists
    (LLaMA-Factory's dpo_en_demo.json);
  - `chosen_messages` / `rejected_messages` (or `chosen` / `rejected` message lists without `prompt`): two whole
    conversations; all but the last reply is the prompt, which must be the same in both;
  - `prompt` (a string or messages) + `chosen` + `rejected` (strings, message objects or message lists; TRL's
    preference layout);
  - hh-rlhf: `chosen` / `rejected` full transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ..."), parsed into turns; the
    turns both share (up to the last shared user turn) are the prompt.
  An optional `margin` column (a number) says by how much chosen is better; an optional `answer`/`reference` column
  is the reference answer when the pair's prompt is used for sampling (else the chosen reply is).
- kto: one conversation (any chat layout: alpaca, sharegpt, openai, or `prompt` + `completion`) and a boolean
  `label` (true: a desirable reply); LLaMA-Factory names the column `kto_tag`.
- typed: CValues-style responses to one prompt, each with a type, and a ranking of the types (`DatasetSpec.ranking`,
  best first); every (better, worse) pair becomes one preference pair (see `ordered_pairs`). Rows hold `prompt`
  and `responses` ([{text, type}, ...]) or the CValues comparison columns `pos_resp`, `neg_resp`, `pos_type`,
  `neg_type`.
- prompt: prompts for sampling (PPO, GRPO): `prompt` (a string or messages), `messages`/`conversations` ending with
  the user's turn, or `instruction` (+ `input`); an optional reference answer in `reference` or `answer` (a chat
  row's final reply, or its `output`/`completion`, becomes the reference when no such column is there).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tuneforge.data import formats
from tuneforge.data.formats import (
    SHAREGPT_TAGS,
    _kind,
    _maybe_json,
    _short,
    optional_text,
    required_text,
    validate_conversation,
)
from tuneforge.data.types import Example, PairExample, RowProblem

# The CValues ranking (Xu et al. 2023): a refusal with positive guidance > a plain refusal > a risky answer. Its
# published comparison data names the types in Chinese; its paper's figures in English.
DEFAULT_RANKING = ["refuse_with_guidance", "refuse", "risky"]
TYPE_ALIASES = {"拒绝&正向建议": "refuse_with_guidance", "拒绝为主": "refuse", "风险回复": "risky",
                "refuse with positive guidance": "refuse_with_guidance", "risky answer": "risky"}
REFERENCE_COLUMNS = ("reference", "answer")


# ---- typed responses: the one expansion into ordered pairs (also used by `tuneforge data safety`) -------------

@dataclass
class TypedResponse:
    text: str
    type: str
    rank: int  # position of its type in the ranking, 0 = best
    source: str = ""


def ordered_pairs(responses: list[TypedResponse]) -> list[tuple[TypedResponse, TypedResponse]]:
    """Every (better, worse) pair of one prompt's responses, best-ranked chosen first (equal ranks keep their order).
    Responses of equal rank, and identical texts, are never paired: neither is preferred."""
    ordered = sorted(responses, key=lambda r: r.rank)
    return [(better, worse) for i, better in enumerate(ordered) for worse in ordered[i + 1:]
            if worse.rank != better.rank and worse.text.strip() != better.text.strip()]


def canonical_type(name: str) -> str:
    return TYPE_ALIASES.get(name, name)


def typed_responses(data: dict, columns: dict) -> list[tuple[str, str, str]]:
    """(field, text, type) of every response of a typed row, in either layout; raises RowProblem."""
    field = columns.get("responses", "responses")
    if field in data:
        items = _maybe_json(data[field])
        if not isinstance(items, list) or not items:
            raise RowProblem(field, f"expected a non-empty list of {{text, type}} objects, got {_kind(items)}")
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise RowProblem(f"{field}[{i}]", f"expected an object {{text, type}}, got {_kind(item)}")
            key = next((k for k in ("text", "response", "content") if k in item), "text")
            out.append((f"{field}[{i}]", _text(item.get(key), f"{field}[{i}].{key}"),
                        _text(item.get("type"), f"{field}[{i}].type")))
        return out
    if "pos_resp" in data or "neg_resp" in data:
        return [(f"{side}_resp", required_text(data, f"{side}_resp"), required_text(data, f"{side}_type"))
                for side in ("pos", "neg")]
    raise RowProblem(field, f"missing; typed rows need `{field}` ([{{text, type}}, ...]) or CValues' pos_resp/"
                            f"neg_resp/pos_type/neg_type (keys here: {sorted(data)})")


def typed_examples(data: dict, source: str, columns: dict, ranking: list[str] | None) -> list[PairExample]:
    """A typed row -> one PairExample per ordered pair of its responses; RowProblem when there is none."""
    ranking = [canonical_type(t) for t in (ranking or DEFAULT_RANKING)]
    prompt = _prompt_messages(data, source, columns)
    responses = []
    for field, text, kind in typed_responses(data, columns):
        name = canonical_type(kind)
        if name not in ranking:
            raise RowProblem(f"{field}.type" if "[" in field else field.replace("resp", "type"),
                             f"type {kind!r} is not in the ranking {' > '.join(ranking)}; add it to the dataset's "
                             f"`ranking` (best first)")
        responses.append(TypedResponse(text, name, ranking.index(name), source))
    tools = formats.tools_column(data, columns)
    pairs = ordered_pairs(responses)
    if not pairs:
        raise RowProblem(columns.get("responses", "responses"), "no pair: every response has the same rank (or the "
                                                                "same text), so none is preferred")
    reference = reference_column(data, columns)
    return [PairExample(f"{source} (pair {k}: {better.type} > {worse.type})", prompt, _reply(better.text),
                        _reply(worse.text), tools, kinds=(better.type, worse.type), pair_index=(k, len(pairs)),
                        reference=reference)
            for k, (better, worse) in enumerate(pairs, start=1)]


# ---- pairwise -----------------------------------------------------------------------------------------------

def pairwise_example(data: dict, source: str, columns: dict, tags: dict) -> PairExample:
    tags = {**SHAREGPT_TAGS, **tags}
    col = {name: columns.get(name, name) for name in ("chosen", "rejected", "prompt", "instruction", "margin")}
    chosen_messages = columns.get("chosen_messages", "chosen_messages")
    if chosen_messages in data:
        return _whole_conversations(data, source, chosen_messages, columns.get("rejected_messages",
                                                                               "rejected_messages"), columns, tags)
    chosen, rejected = _maybe_json(data.get(col["chosen"])), _maybe_json(data.get(col["rejected"]))
    has_prompt = any(k in data for k in (col["prompt"], col["instruction"], _conversation_field(data, columns)))
    if not has_prompt and isinstance(chosen, list):
        return _whole_conversations(data, source, col["chosen"], col["rejected"], columns, tags)
    if not has_prompt and any(isinstance(v, str) and HH_TURN.search(v) for v in (chosen, rejected)):
        pair = hh_example(data, source, col["chosen"], col["rejected"], margin=_margin(data, col["margin"]))
        pair.reference = reference_column(data, columns)
        return pair
    if not has_prompt:
        raise RowProblem(col["prompt"], "missing; a pair needs its prompt (`prompt`, `instruction` or "
                                        "`conversations`/`messages`), or `chosen` and `rejected` as whole "
                                        "conversations or hh-rlhf transcripts (\"\\n\\nHuman: ...\")")
    prompt = _prompt_messages(data, source, columns, tags)
    sides = [_response(value, col[side], tags) for side, value in (("chosen", chosen), ("rejected", rejected))]
    for side, reply in zip(("chosen", "rejected"), sides):
        validate_conversation(prompt + reply, col[side])
    _check_differ(sides[0], sides[1], col["rejected"], col["chosen"])
    return PairExample(source, prompt, sides[0], sides[1], formats.tools_column(data, columns),
                       margin=_margin(data, col["margin"]), reference=reference_column(data, columns))


def _check_differ(chosen: list[dict], rejected: list[dict], rejected_field: str, chosen_field: str) -> None:
    if chosen == rejected:
        raise RowProblem(rejected_field, f"identical to `{chosen_field}`: the pair prefers nothing")


def _whole_conversations(data, source, chosen_field, rejected_field, columns, tags) -> PairExample:
    """Two whole conversations: the prompt is all but the last reply and must be the same in both."""
    sides = []
    for field in (chosen_field, rejected_field):
        messages = chat_messages(formats.required_list(data, field), field, tags)
        validate_conversation(messages, field)
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        sides.append((messages[:last_user + 1], messages[last_user + 1:]))
    (prompt, chosen), (other, rejected) = sides
    if other != prompt:
        k = next((i for i, (a, b) in enumerate(zip(prompt, other)) if a != b), min(len(prompt), len(other)))
        raise RowProblem(f"{rejected_field}[{k}]", f"the prompt differs from `{chosen_field}`'s (message {k + 1}); "
                                                   f"both must share every message before the replies")
    _check_differ(chosen, rejected, rejected_field, chosen_field)
    system = optional_text(data, columns.get("system", "system"))
    if system and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}, *prompt]
    return PairExample(source, prompt, chosen, rejected, formats.tools_column(data, columns),
                       margin=_margin(data, columns.get("margin", "margin")), reference=reference_column(data, columns))


# hh-rlhf transcripts: "\n\nHuman: ...\n\nAssistant: ..." (a few rows lack the leading blank line).
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant): ?")


def hh_turns(text: str, field: str) -> list[dict]:
    """An hh-rlhf transcript -> messages; consecutive turns of one speaker (a few rows have them) are joined.
    Raises RowProblem when it does not start with a Human turn."""
    marks = list(HH_TURN.finditer(text))
    if not marks or text[:marks[0].start()].strip():
        raise RowProblem(field, f"expected an hh-rlhf transcript starting with \"\\n\\nHuman: \", got {_short(text)}")
    out = []
    for mark, nxt in zip(marks, marks[1:] + [None]):
        content = text[mark.end():nxt.start() if nxt else len(text)].strip()
        role = "user" if mark.group(1) == "Human" else "assistant"
        if out and out[-1]["role"] == role:  # a few transcripts repeat a speaker: one turn, as it was meant
            out[-1]["content"] = f"{out[-1]['content']}\n\n{content}".strip()
        else:
            out.append({"role": role, "content": content})
    return out


def hh_example(data: dict, source: str, chosen_field: str = "chosen", rejected_field: str = "rejected",
               margin: float | None = None) -> PairExample:
    """The shared turns (up to the last user turn both share) are the prompt; the rest of each side its reply."""
    chosen = hh_turns(required_text(data, chosen_field), chosen_field)
    rejected = hh_turns(required_text(data, rejected_field), rejected_field)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    cut = max((i + 1 for i in range(shared) if chosen[i]["role"] == "user"), default=0)
    if cut == 0:
        raise RowProblem(chosen_field, "chosen and rejected share no user turn, so there is no common prompt")
    _check_differ(chosen, rejected, rejected_field, chosen_field)
    for field, side in ((chosen_field, chosen), (rejected_field, rejected)):
        validate_conversation(side, field)
    return PairExample(source, chosen[:cut], chosen[cut:], rejected[cut:], margin=margin)


# ---- kto ----------------------------------------------------------------------------------------------------

def kto_example(data: dict, source: str, columns: dict, tags: dict) -> Example:
    field = columns.get("label") or ("kto_tag" if "kto_tag" in data and "label" not in data else "label")
    label = kto_label(data.get(field), field, field in data)
    completion = columns.get("completion", "completion")
    if completion in data and not any(k in data for k in ("messages", "conversations")):
        prompt = _prompt_messages(data, source, columns, tags)
        messages = prompt + [{"role": "assistant", "content": required_text(data, completion)}]
        validate_conversation(messages, completion)
        example = Example(source, messages=messages, tools=formats.tools_column(data, columns),
                          reference=reference_column(data, columns))
    else:
        fmt = formats.guess_chat_format(data, columns, source)
        example = formats.to_example(data, fmt, source, columns, tags)
    example.label = label
    return example


def kto_label(value: Any, field: str, present: bool = True) -> bool:
    """true/false; CSV cells spell them as text."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not present:
        raise RowProblem(field, f"missing; KTO rows need a boolean `{field}` (true: a desirable reply)")
    raise RowProblem(field, f"expected a boolean (true: a desirable reply, false: an undesirable one; the strings "
                            f"\"true\"/\"false\" are read too), got {_kind(value)}")


# ---- prompt-only --------------------------------------------------------------------------------------------

def prompt_example(data: dict, source: str, columns: dict, tags: dict) -> Example:
    reference = reference_column(data, columns)
    field = _conversation_field(data, columns)
    prompt_col = columns.get("prompt", "prompt")
    if field in data and prompt_col not in data:
        messages = chat_messages(formats.required_list(data, field), field, tags)
        if messages and messages[-1]["role"] != "user" and any(m["role"] == "user" for m in messages):
            # a chat row: the conversation before its last reply, that reply the reference (as_prompt, as a chat
            # row read for a sampling stage gives it)
            chat = as_prompt(Example(source, messages=messages, reference=reference))
            messages, reference = chat.messages, chat.reference
        _validate_prompt(messages, field)
        system = optional_text(data, columns.get("system", "system"))
        if system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
    else:
        messages = _prompt_messages(data, source, columns, tags)
        for name in (columns.get("output", "output"), columns.get("completion", "completion")):
            if reference is None and isinstance(data.get(name), str) and data[name].strip():
                reference = data[name]  # an SFT row's answer
    return Example(source, messages=messages, tools=formats.tools_column(data, columns), reference=reference)


def as_prompt(example: Example) -> Example:
    """A chat row as a prompt: the conversation before its last reply; that reply is the reference unless the row
    names one."""
    messages = example.messages
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    reference = example.reference
    if reference is None and last + 1 < len(messages):
        reference = messages[-1].get("content") or None
    return Example(example.source, messages=messages[:last + 1], tools=example.tools, reference=reference)


def reference_column(data: dict, columns: dict) -> str | None:
    names = [columns["reference"]] if "reference" in columns else list(REFERENCE_COLUMNS)
    for name in names:
        value = data.get(name)
        if value is None:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a numeric answer (GSM8K-style) compares as text
        if not isinstance(value, str):
            raise RowProblem(name, f"expected the reference answer as a string, got {_kind(value)}")
        return value
    return None


# ---- shared pieces ------------------------------------------------------------------------------------------

def chat_messages(turns: list, field: str, tags: dict) -> list[dict]:
    """Turns in sharegpt ({from, value}) or OpenAI ({role, content}) form -> normalised messages."""
    tags = {**SHAREGPT_TAGS, **tags}
    roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system",
             tags["function_tag"]: "function_call", tags["observation_tag"]: "tool"}
    calls = formats._CallIds()
    out = []
    for i, turn in enumerate(turns):
        where = f"{field}[{i}]"
        if isinstance(turn, dict) and tags["role_tag"] in turn and "role" not in turn:
            out.append(formats._sharegpt_turn(turn, where, tags, roles, calls))
        else:
            out.append(formats._openai_message(turn, where))
    return out


def _conversation_field(data: dict, columns: dict) -> str:
    return columns.get("messages") or ("conversations" if "conversations" in data else "messages")


def _prompt_messages(data: dict, source: str, columns: dict, tags: dict | None = None) -> list[dict]:
    """The prompt of a row: a conversation ending with the user's turn (`conversations`/`messages`), `prompt` (a
    string or messages), or alpaca's instruction (+ input, system, history)."""
    tags = {**SHAREGPT_TAGS, **(tags or {})}
    prompt_col, field = columns.get("prompt", "prompt"), _conversation_field(data, columns)
    if prompt_col in data and isinstance(_maybe_json(data[prompt_col]), list):
        messages, where = chat_messages(_maybe_json(data[prompt_col]), prompt_col, tags), prompt_col
    elif prompt_col in data:
        messages, where = [{"role": "user", "content": required_text(data, prompt_col)}], prompt_col
    elif field in data:
        messages, where = chat_messages(formats.required_list(data, field), field, tags), field
    else:
        messages = formats.alpaca_example({**data, "output": "-"}, source, columns).messages[:-1]
        where = columns.get("instruction", "instruction")
    system = optional_text(data, columns.get("system", "system"))
    if system and messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    _validate_prompt(messages, where)
    return messages


def _validate_prompt(messages: list[dict], field: str) -> None:
    """A prompt is a conversation that ends with the user's turn (checked as if a reply followed)."""
    if messages and messages[-1]["role"] == "assistant":
        raise RowProblem(f"{field}[{len(messages) - 1}]", "the prompt ends with an assistant turn; it must end "
                                                          "with the user's turn (the replies come separately)")
    validate_conversation([*messages, {"role": "assistant", "content": "-"}], field)


def _response(value: Any, field: str, tags: dict) -> list[dict]:
    """A reply: a string, one message object, or a list of messages (assistant turns, tool turns between)."""
    if value is None:
        raise RowProblem(field, f"missing; preference rows need `{field}` (map another column to it with `columns`)")
    if isinstance(value, str):
        if not value.strip():
            raise RowProblem(field, "empty")
        return _reply(value)
    if isinstance(value, dict):
        return chat_messages([value], field, tags)[:1]
    if isinstance(value, list) and value:
        return chat_messages(value, field, tags)
    raise RowProblem(field, f"expected a string, a message object or a list of messages, got {_kind(value)}")


def _reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RowProblem(field, f"expected a non-empty string, got {_kind(value)}")
    return value


def _margin(data: dict, field: str) -> float | None:
    value = data.get(field)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise RowProblem(field, f"expected a number (how much better `chosen` is), got {_kind(value)}")
