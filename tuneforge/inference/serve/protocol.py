"""OpenAI's request bodies (the fields TuneForge serves) and its error shape.

Unknown fields are ignored, as OpenAI-compatible servers do, so clients that send newer options still work;
options that would change the answer and that the engine cannot honour (JSON mode, `suffix`, `best_of` > n) are
refused with a 400 naming the field rather than silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class OpenAIError(Exception):
    """An error answered in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             413: "invalid_request_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields both endpoints share. Defaults are OpenAI's (temperature 1: sampling); top_k, min_p,
    repetition_penalty, stop_token_ids and ignore_eos are vLLM-style extensions (the openai client's `extra_body`)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (as JSON keys are strings) -> bias in [-100, 100]
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    user: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for /v1/completions
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


def refuse_unsupported(req: _Sampling) -> None:
    """400 for options whose effect the engine cannot give (better than an answer that silently differs)."""
    if isinstance(req, ChatCompletionRequest) and req.response_format and \
            req.response_format.get("type", "text") != "text":
        raise OpenAIError(400, "`response_format` other than text (JSON mode, JSON schema) is not supported.",
                          param="response_format")
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise OpenAIError(400, "`suffix` (fill-in-the-middle) is not supported.", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise OpenAIError(400, "`best_of` other than `n` is not supported.", param="best_of")
        if req.echo and req.logprobs is not None:
            raise OpenAIError(400, "`echo` together with `logprobs` (prompt log-probabilities) is not supported.",
                              param="echo")


def logit_bias(req: _Sampling) -> dict[int, float]:
    """`logit_bias` with its token ids as integers; a key that is not one, or a bias outside [-100, 100], is a 400
    naming it (OpenAI's range)."""
    out = {}
    for key, value in (req.logit_bias or {}).items():
        if not key.strip().isdigit() or not -100 <= value <= 100:
            raise OpenAIError(400, f"`logit_bias` maps token ids (\"50256\") to biases in [-100, 100]; got {key!r}: "
                                   f"{value!r}.", param="logit_bias")
        out[int(key)] = float(value)
    return out
