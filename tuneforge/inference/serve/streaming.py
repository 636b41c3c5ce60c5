"""Server-sent event streams in OpenAI's chunk format, ending with `data: [DONE]`.

Each choice first gets a chunk with `role: assistant`; then every delta of the engine becomes a chunk (content,
tool calls once complete, logprobs of the tokens it carries, finish_reason on the last). With
`stream_options.include_usage` every chunk has `usage: null` and a last chunk with no choices carries the counts.
The `finally` cancels the request's handles: when the client disconnects, Starlette cancels this generator and the
engine drops the rows at its next step.
"""

from __future__ import annotations

import logging
import time

from tuneforge.inference.serve.completions import (
    Choice,
    TokenText,
    absorb,
    cancel_all,
    chat_logprobs,
    completion_logprobs,
    merged,
    new_id,
    sse,
    usage,
)
from tuneforge.inference.serve.protocol import OpenAIError
from tuneforge.inference.serve.tools import ToolCall

log = logging.getLogger(__name__)
DONE = "data: [DONE]\n\n"


def _error_event(e: BaseException) -> str:
    """Errors after the 200 header went out can only be told in the stream (as vLLM and OpenAI do)."""
    if isinstance(e, OpenAIError):
        return sse(e.body())
    log.exception("Generation failed mid-stream", exc_info=e)
    return sse(OpenAIError(500, f"Generation failed: {type(e).__name__}: {e}").body())


def _chat_delta(choice: Choice, events: list, calls_before: int) -> dict:
    delta: dict = {}
    text = "".join(e for e in events if isinstance(e, str))
    calls = [e for e in events if isinstance(e, ToolCall)]
    if text:
        delta["content"] = text
    if calls:
        delta["tool_calls"] = [call.to_openai(index=calls_before + k) for k, call in enumerate(calls)]
    return delta


def chunk_writer(req, id_prefix: str, object_name: str):
    """(chunk(payloads, counts=None) -> one SSE event, include_usage) for one stream: every chunk of a stream shares
    its id, creation time and model; with include_usage each carries `usage` (null until the last)."""
    rid, created = new_id(id_prefix), int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(payloads: list[dict], counts: dict | None = None) -> str:
        body = {"id": rid, "object": object_name, "created": created, "model": req.model, "choices": payloads}
        if include_usage:
            body["usage"] = counts
        return sse(body)

    return chunk, include_usage


async def chat_stream(req, choices: list[Choice], prompt_tokens: int, token_text: TokenText, first_events: list):
    chunk, include_usage = chunk_writer(req, "chatcmpl", "chat.completion.chunk")
    top_n = req.top_logprobs or 0

    try:
        for c, events in zip(choices, first_events):
            yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
            if events:
                yield chunk([{"index": c.index, "delta": _chat_delta(c, events, 0), "logprobs": None,
                              "finish_reason": None}])
        async for c, delta in merged(choices):
            seen, calls_before = len(c.logprobs), len(c.tool_calls)
            events = absorb(c, delta)
            fresh = c.logprobs[seen:]
            if not (events or fresh or delta.finish_reason):
                continue
            logprobs = chat_logprobs(fresh, token_text, top_n) if req.logprobs and fresh else None
            finish = c.finish_reason if delta.finish_reason is not None else None
            yield chunk([{"index": c.index, "delta": _chat_delta(c, events, calls_before), "logprobs": logprobs,
                          "finish_reason": finish}])
        if include_usage:
            yield chunk([], usage(prompt_tokens, choices))
        yield DONE
    except Exception as e:  # noqa: BLE001 - reported in the stream; the server keeps running
        yield _error_event(e)
        yield DONE
    finally:
        cancel_all(choices)


async def completion_stream(req, choices: list[Choice], prompt_tokens: int, token_text: TokenText,
                            echoes: list[str]):
    chunk, include_usage = chunk_writer(req, "cmpl", "text_completion")

    try:
        if req.echo:
            for c in choices:
                yield chunk([{"index": c.index, "text": echoes[c.index // req.n], "logprobs": None,
                              "finish_reason": None}])
        offsets = {c.index: 0 for c in choices}
        async for c, delta in merged(choices):
            seen = len(c.logprobs)
            events = absorb(c, delta)
            fresh = c.logprobs[seen:]
            if not (events or fresh or delta.finish_reason):
                continue
            logprobs = None
            if req.logprobs is not None:
                logprobs = completion_logprobs(fresh, token_text, req.logprobs, offsets[c.index])
                offsets[c.index] += sum(len(t) for t in logprobs["tokens"])
            yield chunk([{"index": c.index, "text": "".join(events), "logprobs": logprobs,
                          "finish_reason": c.finish_reason if delta.finish_reason is not None else None}])
        if include_usage:
            yield chunk([], usage(prompt_tokens, choices))
        yield DONE
    except Exception as e:  # noqa: BLE001 - reported in the stream; the server keeps running
        yield _error_event(e)
        yield DONE
    finally:
        cancel_all(choices)
