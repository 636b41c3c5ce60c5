"""Requests -> engine handles -> OpenAI responses: the glue between the HTTP layer and the continuous-batching engine.

A request with `n` choices (and, for /v1/completions, several prompts) becomes one engine request per choice, all
submitted at once so they decode in the same running batch; choice i gets seed + i so the choices differ yet each is
reproducible. Streaming merges the choices' deltas in the order they are produced into OpenAI chunks, and a client
that goes away cancels every handle of its request in the `finally` (the engine frees the slots at its next step).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from tuneforge.errors import UserError
from tuneforge.inference.serve.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError, logit_bias
from tuneforge.inference.serve.tools import ToolCall, ToolCallParser


@dataclass
class Limits:
    max_tokens: int = 4096  # the largest max_tokens a request may ask for (and the default when it gives none)
    max_n: int = 16
    max_body_bytes: int = 4 * 1024 * 1024


@dataclass
class Choice:
    """One running answer: its engine handle and what it produced so far."""

    index: int
    handle: object
    parser: ToolCallParser | None = None
    prefill: str = ""  # text forced at the start of the reply (tool_choice), part of what the parser reads
    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[tuple[int, float, dict | None]] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None

    def completion_tokens(self) -> int:
        return getattr(self.handle, "generated", None) or self.tokens


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---- request -> engine ----------------------------------------------------------------------------------------
def max_new_tokens(asked: int | None, limits: Limits, param: str) -> int:
    if asked is None:
        return limits.max_tokens
    if asked > limits.max_tokens:
        raise OpenAIError(400, f"`{param}` is {asked}, above this server's limit of {limits.max_tokens} "
                               f"(--max-tokens-limit).", param=param)
    return asked


def check_n(n: int, limits: Limits, what: str = "`n`") -> None:
    if n > limits.max_n:
        raise OpenAIError(400, f"{what} is {n}, above this server's limit of {limits.max_n} (--max-n).", param="n")


def stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops) or len(stops) > 16:
        raise OpenAIError(400, "`stop` must be up to 16 non-empty strings.", param="stop")
    return stops


def sampling(req, max_tokens: int, index: int, logprobs: bool, top_logprobs: int):
    from tuneforge.inference import SamplingParams

    return SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                          top_k=req.top_k, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                          presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                          logit_bias=logit_bias(req),
                          stop=stop_list(req.stop), stop_token_ids=list(req.stop_token_ids or []),
                          seed=None if req.seed is None else req.seed + index, ignore_eos=req.ignore_eos,
                          logprobs=logprobs, top_logprobs=top_logprobs)


def check_room(engine, ids: list[int], asked: int | None, param: str, adapter: str | None,
               what: str = "messages") -> None:
    """A prompt that fills the context, or a `max_tokens` the client set that the context cannot hold after the
    prompt, is refused as OpenAI and vLLM do (in their words, which clients parse; `what`: messages or prompt),
    instead of the engine's own wording or a reply silently cut short with finish_reason `length`. Without
    `max_tokens`, the reply may use whatever room the prompt leaves."""
    room = engine.room_after(ids, adapter)
    context = room + len(ids)
    if room <= 0:
        raise OpenAIError(400, f"This model's maximum context length is {context} tokens. However, your {what} "
                               f"resulted in {len(ids)} tokens. Please reduce the length of the {what}.", param=what,
                          code="context_length_exceeded")
    if asked is not None and 0 < room < asked:
        raise OpenAIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                               f"{len(ids) + asked} tokens ({len(ids)} in the messages, {asked} in the completion). "
                               f"Please reduce the length of the messages or completion.", param=param)


def submit_all(engine, jobs: list[tuple[list[int], object]], adapter: str | None) -> list:
    """Submit every choice or none: a refused one (prompt too long, ...) cancels those already queued."""
    handles = []
    try:
        for ids, params in jobs:
            handles.append(engine.submit(ids, params, adapter))
    except UserError as e:
        for h in handles:
            h.cancel()
        raise OpenAIError(400, str(e)) from e
    return handles


# ---- engine -> choices ----------------------------------------------------------------------------------------
def absorb(choice: Choice, delta) -> list:
    """Record one delta on the choice; returns the client-visible events (str content / ToolCall) it produced."""
    choice.tokens += len(delta.token_ids)
    if delta.logprobs is not None:
        tops = delta.top_logprobs or [None] * len(delta.logprobs)
        choice.logprobs += list(zip(delta.token_ids, delta.logprobs, tops))
    if choice.parser is None:
        events = [delta.text] if delta.text else []
    else:
        events = choice.parser.feed(delta.text) if delta.text else []
        if delta.finish_reason is not None:
            events += choice.parser.finish()
    for e in events:
        if isinstance(e, ToolCall):
            choice.tool_calls.append(e)
        else:
            choice.text += e
    if delta.finish_reason is not None:
        check_forced_call(choice, delta.finish_reason)
        choice.finish_reason = "tool_calls" if choice.tool_calls else delta.finish_reason
    return events


def check_forced_call(choice: Choice, finish_reason: str) -> None:
    """tool_choice "required" or a named function promises a call, but the reply is only started with a call's
    opening (see chat.py), and a model can still complete it into something that does not parse. A client trusting
    tool_choice reads `tool_calls[0]`, so that is an error (400 `tool_use_failed`, as Groq answers; 400 so that
    clients do not retry it like a 500), not text."""
    if not choice.prefill or choice.tool_calls:
        return
    cut = " (cut off by max_tokens)" if finish_reason == "length" else ""
    shown = choice.text if len(choice.text) <= 300 else choice.text[:300] + "..."
    raise OpenAIError(400, f"`tool_choice` asks for a tool call, but the model's reply does not parse as one{cut}: "
                           f"{shown!r}. The reply is started with the call's opening, not constrained by a grammar. "
                           f"Ask again (with sampling), use a model trained for tool calls, or use tool_choice "
                           f"auto to get such replies back as text.", param="tool_choice", code="tool_use_failed")


def start_parsers(choices: list[Choice]) -> list[list]:
    """Feed each choice's prefill to its parser first (the model continues from it)."""
    return [absorb_text(c, c.prefill) if c.prefill else [] for c in choices]


def absorb_text(choice: Choice, text: str) -> list:
    events = choice.parser.feed(text) if choice.parser else [text]
    for e in events:
        if isinstance(e, ToolCall):
            choice.tool_calls.append(e)
        else:
            choice.text += e
    return events


async def run_to_end(choices: list[Choice]) -> None:
    """Wait for every choice (non-streaming)."""
    async def one(choice: Choice):
        async for delta in choice.handle.aiter():
            absorb(choice, delta)

    try:
        await asyncio.gather(*(one(c) for c in choices))
    except BaseException:
        cancel_all(choices)  # one failed choice fails the request: free the other choices' slots
        raise


async def merged(choices: list[Choice]):
    """(choice, delta) pairs from all choices, in the order the engine produces them."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice: Choice):
        try:
            async for delta in choice.handle.aiter():
                await queue.put((choice, delta, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which reports it to the client
            await queue.put((choice, None, e))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        open_choices = len(choices)
        while open_choices:
            choice, delta, error = await queue.get()
            if error is not None:
                raise error
            yield choice, delta
            if delta.finish_reason is not None:
                open_choices -= 1
    finally:
        for t in tasks:
            t.cancel()


def cancel_all(choices: list[Choice]) -> None:
    for c in choices:
        c.handle.cancel()


# ---- choices -> OpenAI JSON -----------------------------------------------------------------------------------
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, reversed: the printable character standing for each byte -> the byte.
    (Written out because transformers 5 no longer exports `bytes_to_unicode` from a stable place.)"""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


BYTE_DECODER = _byte_decoder()


class TokenText:
    """Token id -> (its text, its bytes), cached, for logprobs. A token holding part of a multi-byte character
    decodes to U+FFFD on its own; its real bytes come from the byte-level vocabulary entry, so a client can join
    the `bytes` of consecutive tokens back into the text (what OpenAI's `bytes` field is for)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}
        self.special = set(getattr(tokenizer, "all_special_ids", None) or [])  # decoded as "" (skipped)

    def __call__(self, token_id: int) -> str:
        return self.entry(token_id)[0]

    def entry(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self.cache:
            text = self.tokenizer.decode([token_id])
            raw = text.encode("utf-8")
            piece = getattr(self.tokenizer, "convert_ids_to_tokens", lambda i: None)(token_id)
            if token_id not in self.special and isinstance(piece, str) and piece and \
                    all(c in BYTE_DECODER for c in piece):
                raw = bytes(BYTE_DECODER[c] for c in piece)
            self.cache[token_id] = (text, list(raw))
        return self.cache[token_id]


def chat_logprobs(entries, token_text: TokenText, top_n: int) -> dict:
    def item(token: str, logprob: float, raw: list[int] | None = None) -> dict:
        return {"token": token, "logprob": logprob, "bytes": raw if raw is not None else list(token.encode())}

    content = []
    for token_id, logprob, top in entries:
        best = sorted((top or {}).items(), key=lambda kv: -kv[1])[:top_n]
        text, raw = token_text.entry(token_id)
        content.append({**item(text, logprob, raw), "top_logprobs": [item(t, v) for t, v in best]})
    return {"content": content}


def completion_logprobs(entries, token_text: TokenText, top_n: int, offset: int = 0) -> dict:
    tokens, offsets = [], []
    for token_id, _, _ in entries:
        offsets.append(offset)
        tokens.append(token_text(token_id))
        offset += len(tokens[-1])
    tops = [dict(sorted((top or {}).items(), key=lambda kv: -kv[1])[:top_n]) if top_n else None
            for _, _, top in entries]
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries], "top_logprobs": tops,
            "text_offset": offsets}


def usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    completion = sum(c.completion_tokens() for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def chat_response(req: ChatCompletionRequest, choices: list[Choice], prompt_tokens: int, token_text: TokenText):
    out = []
    for c in choices:
        message = {"role": "assistant", "content": c.text.strip() if c.tool_calls else c.text}
        if c.tool_calls:
            message["tool_calls"] = [t.to_openai() for t in c.tool_calls]
            message["content"] = message["content"] or None
        logprobs = chat_logprobs(c.logprobs, token_text, req.top_logprobs or 0) if req.logprobs else None
        out.append({"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": c.finish_reason})
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": req.model,
            "choices": out, "usage": usage(prompt_tokens, choices)}


def completion_response(req: CompletionRequest, choices: list[Choice], prompt_tokens: int, token_text: TokenText,
                        echoes: list[str]):
    out = []
    for c in choices:
        echo = echoes[c.index // req.n] if req.echo else ""
        logprobs = completion_logprobs(c.logprobs, token_text, req.logprobs or 0) if req.logprobs is not None \
            else None
        out.append({"index": c.index, "text": echo + c.text, "logprobs": logprobs, "finish_reason": c.finish_reason})
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": req.model,
            "choices": out, "usage": usage(prompt_tokens, choices)}
