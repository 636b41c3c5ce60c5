"""Chat rendering and the loss mask: `Example.messages` -> `Encoded` (token ids + labels).

The ids are exactly what `tokenizer.apply_chat_template(messages, tools=..., tokenize=True)["input_ids"]` gives
(we render the text with the same call and tokenize it the same way, `add_special_tokens=False`), so training sees
the very format the model is served with.

The mask is found on the rendered text, then mapped to tokens through the fast tokenizer's offset mapping:

1. Where each assistant turn starts: the template rendered up to the turn with `add_generation_prompt=True` is
   the prompt; how far it matches the full text is a lower bound, and the reply is searched from there (as
   written, stripped, or its answer part when the template drops `<think>` reasoning). It matches from the start,
   or, for templates that rewrite earlier parts once more turns exist (Mistral's [AVAILABLE_TOOLS] sits before
   the last user turn), from the last user/tool content on; the bound is never before that content's end.
2. Where it ends: after the reply come the template's end-of-turn markers (`<|im_end|>`, `<|eot_id|>`, `</s>`,
   `<end_of_turn>`, the tokenizer's eos, ...; whitespace between them allowed). The span runs through the last
   consecutive marker **plus one newline right after it when there is one** (ChatML and Gemma write it as part
   of the turn; LLaMA-Factory trains on it too). Templates that write no end marker at all (ChatGLM3, GLM-4,
   Baichuan2) get the reply alone: their models stop on the next role token, which belongs to the next turn.
3. A token is labelled when its characters overlap the span, so " Hello" (space from the template, word from
   the reply) is trained on.

Conversations a template cannot express are adapted before rendering, and the ids then equal
`apply_chat_template` of the adapted messages: a system message the template refuses or silently drops is
merged into the first user turn; tool calls are written as JSON text for templates without tool-call support,
and tool results become user turns (one per run of results) for templates without a tool role;
tool schemas go into the system prompt when the template does not write `tools=` (decided by rendering with and
without them: GLM-4's template names "tools" but ignores the argument).

Two options change the ids on purpose: `max_length` cuts a huge row before rendering (see `cap_contents`; the
result is what truncation at max_length gives), and `escape_special_tokens` tokenizes data text that spells a
special token (`<|im_end|>` in a reply) as plain text instead of as that token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import weakref

from tuneforge.data.templates import resolve_chat_template
from tuneforge.data.types import IGNORE_INDEX, Encoded
from tuneforge.errors import DataError, UserError

log = logging.getLogger(__name__)

LOSS_ON = ("assistant", "all", "last")
# A token covers at most this many characters in any common vocabulary (typical text: 3-5), so contents longer than
# max_length * CHARS_PER_TOKEN cannot fit in max_length tokens: a row is cut there before rendering (cap_contents).
CHARS_PER_TOKEN = 32

# End-of-turn markers of the common templates; the tokenizer's own eos is added at run time.
END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>", "<|EOT|>",
               "<｜end▁of▁sentence｜>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|END_RESPONSE|>",
               "<|END_OF_TURN_TOKEN|>", "<|return|>", "<|stop|>", "<|eom|>", "<|turn_end|>")

_warned: set[str] = set()


def encode_chat(tokenizer, messages: list[dict], tools: list | None = None, loss_on: str = "assistant",
                chat_template: str | None = None, max_length: int | None = None,
                escape_special_tokens: bool = False, skip_turns: int = 0) -> Encoded:
    """Render `messages` with the chat template and label the assistant replies (see the module docstring).

    loss_on: `assistant` (every assistant turn), `all` (every token) or `last` (the last assistant turn).
    max_length: bounds the work on huge rows (see cap_contents): the contents are cut at max_length *
    CHARS_PER_TOKEN characters before rendering and the ids end where the cut content ends (`Encoded.truncated`),
    so such a row ends up truncated at max_length as if it had been rendered whole. escape_special_tokens: text in
    the messages that spells a special token (`<|im_end|>`) is tokenized as ordinary text, not as that token.
    skip_turns: the first N assistant turns get no loss (they belong to a preference pair's or KTO row's prompt).
    An assistant message with `loss_weight: 0` (LLaMA-Factory's v1 rows) gets no loss whatever `loss_on` says.
    Raises DataError when the template cannot render the conversation or its replies cannot be located.
    """
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")
    template = resolve_chat_template(tokenizer, chat_template, tools)
    given, trained = without_loss_weights(messages)
    messages, capped = cap_contents(given, max_length * CHARS_PER_TOKEN if max_length else None)
    last_cut_away = any(m["role"] == "assistant" for m in given[len(messages):])
    messages, tools = adapt_to_template(tokenizer, messages, tools, template)
    if escape_special_tokens:
        messages, text, data_specials = render_escaped(tokenizer, template, messages, tools)
    else:
        (messages, text), data_specials = render_conversation(tokenizer, template, messages, tools), []
    enc = tokenize_with_offsets(tokenizer, text, data_specials)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    if loss_on == "all" and all(trained):
        labels = list(ids)
    elif loss_on == "all":
        turns = zip(assistant_spans(tokenizer, template, messages, tools, text), trained)
        labels = unlabel_spans(list(ids), offsets, [span for span, train in turns if not train])
    else:
        turns = list(zip(assistant_spans(tokenizer, template, messages, tools, text), trained))[skip_turns:]
        if loss_on == "last":
            turns = [] if last_cut_away else turns[-1:]  # the last turn lies past the cut: nothing to learn
        labels = label_spans(ids, offsets, [span for span, train in turns if train])
    end = _cut_at(text, offsets, capped)
    return Encoded(ids[:end], labels[:end], truncated=end < len(ids) or bool(capped))


def without_loss_weights(messages: list[dict]) -> tuple[list[dict], list[bool]]:
    """The messages without their `loss_weight` keys (a template must see the conversation as served), and per
    assistant turn, in order, whether it gets loss: not when the row gave it `loss_weight: 0` (formats._no_loss).
    The adaptations before rendering keep the assistant turns and their order, so the flags stay aligned with
    `assistant_spans`."""
    trained = [m.get("loss_weight") != 0 for m in messages if m["role"] == "assistant"]
    if all(trained):
        return messages, trained
    return [{k: v for k, v in m.items() if k != "loss_weight"} for m in messages], trained


def tokenize_with_offsets(tokenizer, text: str, escaped: list[tuple[int, int]] = ()):
    """Exactly how apply_chat_template tokenizes (no extra special tokens), plus character offsets. The `escaped`
    spans [start, end) are tokenized as ordinary text even where they spell a special token; the text between them
    is tokenized as usual (a special token splits the text there anyway, so the pieces are what the tokenizer sees)."""
    try:
        if not escaped:
            return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets, pos = [], [], 0
        for a, b in [*escaped, (len(text), len(text))]:
            for start, end, split in ((pos, a, False), (a, b, True)):
                if end > start:
                    enc = tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True,
                                    split_special_tokens=split)
                    ids += enc["input_ids"]
                    offsets += [(s + start, e + start) for s, e in enc["offset_mapping"]]
            pos = b
        return {"input_ids": ids, "offset_mapping": offsets}
    except NotImplementedError as e:  # only fast (Rust `tokenizers`) tokenizers report offsets
        raise UserError(f"The tokenizer ({type(tokenizer).__name__}) cannot report character offsets, which the "
                        f"loss mask needs; load a fast tokenizer (tokenizer.json).") from e


def encode_prompt(tokenizer, messages: list[dict], tools: list | None = None, chat_template: str | None = None,
                  escape_special_tokens: bool = False) -> tuple[list[int], list[dict]]:
    """A prompt rendered with the generation prompt (the assistant header), as the generation engine renders it,
    adapted like `encode_chat` when the template refuses or drops a system message. Returns the ids and the
    messages actually rendered."""
    template = resolve_chat_template(tokenizer, chat_template, tools)
    messages, tools = adapt_to_template(tokenizer, without_loss_weights(messages)[0], tools, template)
    last_error, dropped = None, None
    for variant, change in _variants(messages):
        try:
            text = render(tokenizer, template, variant, tools, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - templates raise anything
            last_error = e
            continue
        if _drops_system(variant, text):  # the next variant merges the system prompt into the user turn
            dropped = dropped or (variant, text)
            continue
        if change:
            _warn_once(change, _CHANGES[change])
        return _prompt_ids(tokenizer, text, variant, escape_special_tokens), variant
    if dropped:  # no variant keeps the system prompt: render as the template allows (as render_conversation does)
        return _prompt_ids(tokenizer, dropped[1], dropped[0], escape_special_tokens), dropped[0]
    raise DataError(f"The chat template cannot render this prompt: {last_error}.{template_hint(last_error)}")


def _prompt_ids(tokenizer, text: str, messages: list[dict], escape_special_tokens: bool) -> list[int]:
    escaped = _escaped_spans(text, messages) if escape_special_tokens else []
    return list(tokenize_with_offsets(tokenizer, text, escaped)["input_ids"])


def _escaped_spans(text: str, messages: list[dict]) -> list[tuple[int, int]]:
    """Where the message contents are in a rendered prompt (tokenized as plain text when escaping)."""
    spans, pos = [], 0
    for m in messages:
        content = m.get("content")
        at = text.find(content, pos) if isinstance(content, str) and content else -1
        if at >= 0:
            spans.append((at, at + len(content)))
            pos = at + len(content)
    return spans


# ---- huge rows --------------------------------------------------------------------------------------------------

def cap_contents(messages: list[dict], max_chars: int | None) -> tuple[list[dict], str]:
    """A huge row bounded before it is rendered: the contents together keep at most `max_chars` characters. The
    message that reaches the bound is cut there and the ones after it are left out (they all lie past max_length
    tokens), so neither one 10 MB message nor ten thousand turns are rendered, tokenized and searched whole.
    Returns the messages and the cut content ('' when nothing was cut)."""
    budget = max_chars or 0
    for i, m in enumerate(messages if max_chars else ()):
        content = m.get("content")
        size = len(content) if isinstance(content, str) else 0
        if size > budget:
            keep = budget if content[:budget].strip() else len(content) - len(content.lstrip()) + 1
            return [*messages[:i], {**m, "content": content[:keep]}], content[:keep]
        budget -= size
    return messages, ""


def _cut_at(text: str, offsets, capped: str) -> int:
    """How many tokens to keep: all, or those before the end of the cut content, the last one rendered (a cut reply
    must not be followed by its end-of-turn marker in training, just as with truncation at max_length)."""
    if not capped:
        return len(offsets)
    for form in (capped, capped.strip()):
        pos = text.rfind(form)
        if pos >= 0:
            end = pos + len(form)
            return next((t for t, (_, e) in enumerate(offsets) if e > end), len(offsets))
    return len(offsets)


# ---- text that spells special tokens ----------------------------------------------------------------------------

_PATTERNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PLACEHOLDER = 0xF0000  # Unicode private-use plane 15: stands for the k-th special spelling while rendering


def special_token_pattern(tokenizer) -> re.Pattern | None:
    """A regex of the spellings of the tokenizer's special tokens (None when it has none)."""
    if tokenizer not in _PATTERNS:
        decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
        spellings = sorted({t.content for t in decoder.values() if t.special and t.content}, key=len, reverse=True)
        _PATTERNS[tokenizer] = re.compile("|".join(map(re.escape, spellings))) if spellings else None
    return _PATTERNS[tokenizer]


def special_tokens_in(tokenizer, strings) -> tuple[str, str] | None:
    """The first (field, spelling) among (field, string) pairs whose string spells a special token."""
    pattern = special_token_pattern(tokenizer)
    if pattern is None:
        return None
    for field, text in strings:
        match = pattern.search(text)
        if match:
            return field, match.group()
    return None


def render_escaped(tokenizer, template: str, messages: list[dict], tools):
    """render_conversation, plus where the rendered text holds special-token spellings that came from the data:
    those are replaced by placeholder characters for the render, then put back and their spans recorded."""
    pattern = special_token_pattern(tokenizer)
    if pattern is None:
        return (*render_conversation(tokenizer, template, messages, tools), [])
    spellings: list[str] = []

    def hide(text: str) -> str:
        def one(match):
            if match.group() not in spellings:
                spellings.append(match.group())
            return chr(_PLACEHOLDER + spellings.index(match.group()))
        return pattern.sub(one, text)

    hidden, text = render_conversation(tokenizer, template, _map_strings(messages, hide), _map_strings(tools, hide))
    marks = re.compile(f"[{chr(_PLACEHOLDER)}-{chr(_PLACEHOLDER + max(len(spellings), 1) - 1)}]")
    spans, parts, pos, shift = [], [], 0, 0
    for match in marks.finditer(text):
        spelling = spellings[ord(match.group()) - _PLACEHOLDER]
        parts += [text[pos:match.start()], spelling]
        start = match.start() + shift
        spans.append((start, start + len(spelling)))
        shift += len(spelling) - 1
        pos = match.end()
    parts.append(text[pos:])

    def show(text: str) -> str:
        return marks.sub(lambda m: spellings[ord(m.group()) - _PLACEHOLDER], text)

    return _map_strings(hidden, show), "".join(parts), spans


def _map_strings(value, fn):
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    return value


def render(tokenizer, template: str, messages: list[dict], tools=None, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools or None, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


# ---- adapting a conversation to what the template can express ------------------------------------------------

def adapt_to_template(tokenizer, messages: list[dict], tools: list | None,
                      template: str) -> tuple[list[dict], list | None]:
    """Tool calls (and tool schemas) as text, and tool results as user turns, for templates that do not know them;
    ids for tool calls where the template writes them (Mistral); everything else unchanged."""
    if "tool_call_id" in template and any(m.get("tool_calls") for m in messages):
        messages = with_tool_call_ids(messages, nine_chars="length != 9" in template)
    if "tool_calls" not in template and any(m.get("tool_calls") for m in messages):
        messages = [_tool_calls_as_text(m) if m.get("tool_calls") else m for m in messages]
        _warn_once("tool_calls", "The chat template has no tool-call support; tool calls are written into the "
                                 "assistant replies as JSON text.")
    if any(m["role"] == "tool" for m in messages) and not renders_tool_results(tokenizer, template, messages,
                                                                                tools):
        messages = tool_results_as_user(messages)
        _warn_once("tool_role", "The chat template has no tool role; tool results are given to the model as user "
                                "turns (as LLaMA-Factory does for templates without an observation format).")
    if tools and not renders_tools(tokenizer, template, messages, tools):
        messages = _tools_in_system(messages, tools)
        _warn_once("tools", "The chat template does not render tool schemas; they are added to the system prompt.")
        tools = None
    return messages, tools


def with_tool_call_ids(messages: list[dict], nine_chars: bool = False) -> list[dict]:
    """Tool calls without an `id`, and the results that answer them, given one. Mistral's templates write both and
    refuse a conversation without them; datasets in the sharegpt/glaive layout carry none. An id is a hash of the
    conversation up to the call, so an encoding is reproducible; results without `tool_call_id` answer the open
    calls in order, as the formats pair them. `nine_chars` (Mistral Nemo: 9 letters or digits, as mistral-common
    makes them) also maps other ids, such as OpenAI's `call_...`, to 9 characters, the same on call and result."""
    def fit(call_id: str) -> str:
        ok = not nine_chars or (len(call_id) == 9 and call_id.isalnum())
        return call_id if ok else hashlib.sha1(call_id.encode()).hexdigest()[:9]

    out, open_ids = [], []
    for i, m in enumerate(messages):
        if m.get("tool_calls"):
            calls = []
            for k, call in enumerate(m["tool_calls"]):
                seed = json.dumps([messages[:i], k], sort_keys=True, ensure_ascii=False, default=str)
                call_id = str(call["id"]) if call.get("id") else hashlib.sha1(seed.encode()).hexdigest()[:9]
                calls.append({**call, "id": fit(call_id)})
            m, open_ids = {**m, "tool_calls": calls}, [c["id"] for c in calls]
        elif m["role"] == "tool" and m.get("tool_call_id"):
            m = {**m, "tool_call_id": fit(str(m["tool_call_id"]))}
        elif m["role"] == "tool" and open_ids:
            m = {**m, "tool_call_id": open_ids.pop(0)}
        out.append(m)
    return out


def _tool_calls_as_text(message: dict) -> dict:
    calls = [c.get("function", c) for c in message["tool_calls"]]
    text = "\n".join(json.dumps({"name": c.get("name"), "arguments": c.get("arguments")}, ensure_ascii=False)
                     for c in calls)
    content = message.get("content") or ""
    return {"role": "assistant", "content": f"{content}\n{text}" if content else text}


def renders_tool_results(tokenizer, template: str, messages: list[dict], tools: list | None) -> bool:
    """Whether the template writes every tool result of this conversation. Templates without a tool role either
    refuse it (Gemma, Mistral v0.1: roles must alternate) or drop it unseen (Phi-3, Zephyr, Yi): rendering tells
    both apart from templates that write it, as is or JSON-escaped (Llama 3.1)."""
    results = [m["content"].strip() for m in messages
               if m["role"] == "tool" and isinstance(m.get("content"), str) and m["content"].strip()]
    for variant, _ in _variants(messages):
        try:
            text = render(tokenizer, template, variant, tools)
        except Exception:  # noqa: BLE001,S112 - try the next adaptation (see render_conversation)
            continue
        return all(any(form in text for form in _rendered_forms(result)) for result in results)
    return False


def tool_results_as_user(messages: list[dict]) -> list[dict]:
    """Each run of tool results as one user turn (a template without a tool role alternates user/assistant)."""
    out: list[dict] = []
    for m in messages:
        if m["role"] != "tool":
            out.append(m)
        elif out and out[-1].get("from_tools"):
            out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + (m.get("content") or "")}
        else:
            out.append({"role": "user", "content": m.get("content") or "", "from_tools": True})
    return [{k: v for k, v in m.items() if k != "from_tools"} for m in out]


def renders_tools(tokenizer, template: str, messages: list[dict], tools: list) -> bool:
    """Whether the template writes `tools=` into this conversation: rendered with and without them, the texts
    differ. (A substring test is not enough: GLM-4's template says "tools" but reads a per-message key and drops
    `tools=`.) A template that renders the conversation but fails with the tools cannot take them either."""
    for variant, _ in _variants(messages):
        try:
            without = render(tokenizer, template, variant)
        except Exception:  # noqa: BLE001,S112 - try the next adaptation (see render_conversation)
            continue
        try:
            return render(tokenizer, template, variant, tools) != without
        except Exception:  # noqa: BLE001
            return False
    return True  # nothing renders at all: render_conversation reports why


def _tools_in_system(messages: list[dict], tools: list) -> list[dict]:
    block = "You can call these tools:\n" + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + block}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


TEMPLATE_FAILS = "The chat template cannot render this conversation:"


def template_hint(error: BaseException | None) -> str:
    """What to do when a template reads a name the tokenizer does not define (`bos_token` in a Llama 3 template
    given to a tokenizer without a BOS): the usual sign of a template written for another tokenizer."""
    found = re.search(r"'(\w+)' is undefined", str(error or ""))
    if not found:
        return ""
    return (f" The template reads `{found.group(1)}`, which this tokenizer does not define: it was probably written "
            f"for another tokenizer. Use the model's own template (drop --chat-template / model.chat_template) or one "
            f"written for this tokenizer.")


def render_conversation(tokenizer, template: str, messages: list[dict], tools) -> tuple[list[dict], str]:
    """Render the whole conversation, adapting it when the template cannot take it as is: a system message the
    template refuses or drops goes into the first user turn (the layout those models' authors recommend), and
    tool-call arguments become JSON strings for templates that concatenate them. Returns the messages actually
    rendered and the text."""
    last_error, dropped = None, None
    for variant, change in _variants(messages):
        try:
            text = render(tokenizer, template, variant, tools)
        except Exception as e:  # noqa: BLE001 - templates raise anything (TemplateError, TypeError, ...)
            last_error = e  # the error left after the most adaptation is the one to report
            continue
        if _drops_system(variant, text):
            dropped = dropped or (variant, text)
            continue
        if change:
            _warn_once(change, _CHANGES[change])
        return variant, text
    if dropped:
        return dropped
    raise DataError(f"{TEMPLATE_FAILS} {last_error}.{template_hint(last_error)}")


_CHANGES = {"system": "The chat template refuses or drops system messages; system prompts are put into the first "
                      "user turn.",
            "arguments": "The chat template needs tool-call arguments as strings; they are passed as JSON text.",
            "system+arguments": "The chat template refuses system messages and needs tool-call arguments as "
                                "strings; adapted both."}


def _variants(messages: list[dict]):
    """The conversation as given, then the adaptations a template may need (see render_conversation)."""
    has_system = bool(messages) and messages[0]["role"] == "system"
    dict_args = any(isinstance(c.get("function", c).get("arguments"), dict)
                    for m in messages for c in m.get("tool_calls") or [])
    yield messages, None
    if dict_args:
        yield _string_arguments(messages), "arguments"
    if has_system:
        yield merge_system_into_user(messages), "system"
        if dict_args:
            yield _string_arguments(merge_system_into_user(messages)), "system+arguments"


def _drops_system(messages: list[dict], text: str) -> bool:
    return bool(messages) and messages[0]["role"] == "system" and messages[0]["content"].strip() not in text


def _string_arguments(messages: list[dict]) -> list[dict]:
    def call_with_text(call: dict) -> dict:
        function = call.get("function", call)
        args = function.get("arguments")
        if isinstance(args, dict):
            function = {**function, "arguments": json.dumps(args, ensure_ascii=False)}
        return {**call, "function": function} if "function" in call else function

    return [{**m, "tool_calls": [call_with_text(c) for c in m["tool_calls"]]} if m.get("tool_calls") else m
            for m in messages]


def merge_system_into_user(messages: list[dict]) -> list[dict]:
    system, rest = messages[0], list(messages[1:])
    for i, m in enumerate(rest):
        if m["role"] == "user":
            rest[i] = {**m, "content": system["content"] + "\n\n" + m["content"]}
            return rest
    return rest


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


# ---- locating the assistant turns in the rendered text -----------------------------------------------------

def assistant_spans(tokenizer, template: str, messages: list[dict], tools, text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of every assistant turn (reply + end-of-turn markers) in `text`."""
    markers = end_markers(tokenizer)
    spans: list[tuple[int, int]] = []
    prev_end = 0  # end of the previous assistant span
    anchor = None  # (start, end) of the last user/tool content located since then
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            anchor = _skip_content(text, message, i, max(anchor[1] if anchor else 0, prev_end)) or anchor
            continue
        prompt_end, _ = _match_end(_prompt_before(tokenizer, template, messages[:i], tools), text, anchor)
        lower = max(prompt_end, prev_end, anchor[1] if anchor else 0)
        start, end = _locate_reply(text, message, lower)
        if message.get("tool_calls"):
            start, end = _locate_tool_calls(tokenizer, template, messages[:i + 1], tools, text, lower, start, end,
                                            markers, anchor)
            _check_tool_calls_rendered(text, message, i, start, end)
        if start is None:
            raise DataError(f"Assistant turn {i + 1} does not appear verbatim in the text the chat template renders, "
                            f"so its loss mask cannot be found (does the template rewrite replies?).")
        end = extend_through_end_markers(text, end, markers)
        spans.append((start, end))
        prev_end, anchor = end, None
    return spans


def _match_end(rendered: str, text: str, anchor: tuple[int, int] | None) -> tuple[int, bool]:
    """How far a render of the conversation so far matches the full text, and whether all of it matched.

    Usually the render is a prefix of the full text. Some templates rewrite earlier parts once more turns exist
    (Mistral v0.3 and Nemo put [AVAILABLE_TOOLS] before the *last* user turn, so a render that ends earlier has the
    block in another place and shares only `<s>` with the full text); then the render's tail after the last
    located user/tool content (`anchor`) is matched from that content on. A bound from the start of the text alone
    would let a reply's search start before the user's question."""
    n = _common_prefix_len(rendered, text)
    if n == len(rendered) or anchor is None or n >= anchor[1]:
        return n, n == len(rendered)
    a, b = anchor
    k = rendered.rfind(text[a:b])
    if k < 0:
        return n, False
    tail = rendered[k + b - a:]
    m = _common_prefix_len(tail, text[b:b + len(tail)])
    return b + m, m == len(tail)


def end_markers(tokenizer) -> tuple[str, ...]:
    eos = getattr(tokenizer, "eos_token", None)
    return END_MARKERS + ((eos,) if eos and eos not in END_MARKERS else ())


def extend_through_end_markers(text: str, pos: int, markers: tuple[str, ...]) -> int:
    """The end of the turn: through consecutive end markers (whitespace between them allowed) and one newline."""
    end = pos
    while True:
        k = end
        while k < len(text) and text[k] in " \t\r\n":
            k += 1
        marker = next((m for m in markers if text.startswith(m, k)), None)
        if marker is None:
            break
        end = k + len(marker)
    if end > pos and text.startswith("\n", end):
        end += 1
    return end


def _prompt_before(tokenizer, template: str, messages: list[dict], tools) -> str:
    """The rendered prompt before an assistant turn, or '' when the template refuses a partial conversation."""
    for generation_prompt in (True, False):
        try:
            return render(tokenizer, template, messages, tools, add_generation_prompt=generation_prompt)
        except Exception:  # noqa: BLE001,S112 - e.g. templates that insist on ending with an assistant turn
            continue
    return ""


def _skip_content(text: str, message: dict, index: int, cursor: int) -> tuple[int, int] | None:
    """Where a user/tool message's content is, at or after `cursor` (None for system prompts, which may move, and
    for contents not found there). Raises DataError when the template dropped the message: the conversation it
    renders is not the one given."""
    content = message.get("content")
    if message["role"] == "system" or not isinstance(content, str) or not content.strip():
        return None
    forms = _rendered_forms(content.strip())
    if not any(form in text for form in forms):
        raise DataError(f"The chat template does not render `{message['role']}` messages (message {index + 1} is "
                        f"missing from its output), so it cannot express this conversation.")
    found = [(p, p + len(form)) for form in forms if (p := text.find(form, cursor)) >= 0]
    return min(found, key=lambda span: span[1]) if found else None


def _rendered_forms(content: str) -> list[str]:
    """How a template may write a content string: as is, or JSON-escaped (e.g. Llama 3.1's `tojson` tool results)."""
    return list(dict.fromkeys([content, json.dumps(content, ensure_ascii=False)[1:-1], json.dumps(content)[1:-1]]))


def _locate_reply(text: str, message: dict, lower: int) -> tuple[int | None, int | None]:
    """The reply's [start, end) at or after `lower`: as written, stripped, or only its answer after `</think>`
    (reasoning templates drop earlier reasoning). Rendered reasoning is included in the span."""
    content = message.get("content")
    if not isinstance(content, str):
        return None, None
    answer = content.split("</think>")[-1].lstrip("\n") if "</think>" in content else None
    best = None
    for candidate in dict.fromkeys(c for c in (content, content.strip(), answer, answer and answer.strip()) if c):
        pos = text.find(candidate, lower)
        if pos >= 0 and (best is None or pos < best[0] or (pos == best[0] and pos + len(candidate) > best[1])):
            best = (pos, pos + len(candidate))
    if best is None:
        return None, None
    return _reasoning_start(text, message, lower, best[0]), best[1]


def _reasoning_start(text: str, message: dict, lower: int, answer_start: int) -> int:
    """Move the start back over the `<think>` block when the template rendered the reasoning before the answer."""
    content = message["content"]
    reasoning = message.get("reasoning_content")
    if not reasoning and "</think>" in content:
        reasoning = content.split("</think>")[0].split("<think>")[-1]
    reasoning = (reasoning or "").strip()
    if not reasoning:
        return answer_start
    pos = text.rfind(reasoning, lower, answer_start)
    if pos < 0:
        return answer_start
    tag = text.rfind("<think>", lower, pos)
    return tag if tag >= 0 else pos


def _locate_tool_calls(tokenizer, template, messages, tools, text, lower, start, end, markers, anchor):
    """A tool-call turn is written by the template in its own format. It ends where the conversation rendered
    through this turn stops matching the full text (see `_match_end`), when that point is the whole render or just
    after an end marker; otherwise (templates that render a last turn differently) at the first end marker after
    the call."""
    through, complete = _match_end(_prompt_through(tokenizer, template, messages, tools), text, anchor)
    start = lower if start is None else start
    if through > start and (complete or text[:through].rstrip().endswith(markers)):
        return start, max(through, end or start)
    name = _call_name(messages[-1]["tool_calls"][0])
    at = text.find(name, start) if name else -1
    if at < 0:
        return None, None
    ends = [p for p in (text.find(m, at) for m in markers) if p >= 0]
    return start, (min(ends) if ends else len(text))


def _call_name(call: dict) -> str:
    return (call.get("function") or call).get("name") or ""


def _check_tool_calls_rendered(text: str, message: dict, index: int, start, end) -> None:
    missing = [n for n in map(_call_name, message["tool_calls"]) if start is None or n not in text[start:end]]
    if missing:
        raise DataError(f"The chat template does not render the tool call `{missing[0]}` of assistant turn "
                        f"{index + 1}, so it cannot express this conversation (some templates only render tool "
                        f"calls whose content is None, which transformers drops before rendering).")


def _prompt_through(tokenizer, template, messages, tools) -> str:
    try:
        return render(tokenizer, template, messages, tools)
    except Exception:  # noqa: BLE001
        return ""


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search on the first differing character; a[:lo] == b[:lo] holds throughout
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def unlabel_spans(labels: list[int], offsets, spans: list[tuple[int, int]]) -> list[int]:
    """`labels` with IGNORE_INDEX on tokens whose characters overlap a span (turns the row excludes from loss)."""
    for t, (s, e) in enumerate(offsets):
        if e > s and any(s < span_end and e > span_start for span_start, span_end in spans):
            labels[t] = IGNORE_INDEX
    return labels


def label_spans(ids: list[int], offsets, spans: list[tuple[int, int]]) -> list[int]:
    """Labels = ids on tokens whose characters overlap a span, IGNORE_INDEX elsewhere."""
    labels = [IGNORE_INDEX] * len(ids)
    for t, (s, e) in enumerate(offsets):
        if e > s and any(s < span_end and e > span_start for span_start, span_end in spans):
            labels[t] = ids[t]
    return labels
