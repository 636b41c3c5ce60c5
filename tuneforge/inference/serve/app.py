"""The FastAPI app: OpenAI's `/v1/models`, `/v1/chat/completions`, `/v1/completions`, and `/health`.

    app = create_app(ServerState(engine=engine, served=served))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Every failure is answered in OpenAI's error shape ({"error": {"message", "type", "param", "code"}}) with the
status the OpenAI clients expect: 400 bad parameters, 401 missing/wrong key, 404 unknown model, 413 body too
large, 500 a bug (logged with its traceback). No request can take the server down: errors end that request only.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tuneforge.errors import UserError
from tuneforge.inference.serve.chat import chat_messages, tool_plan
from tuneforge.inference.serve.completions import (
    Choice,
    Limits,
    TokenText,
    cancel_all,
    chat_response,
    check_n,
    check_room,
    completion_response,
    max_new_tokens,
    run_to_end,
    sampling,
    start_parsers,
    submit_all,
)
from tuneforge.inference.serve.models import ServedModels
from tuneforge.inference.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    refuse_unsupported,
)
from tuneforge.inference.serve.streaming import chat_stream, completion_stream
from tuneforge.inference.serve.tools import ToolCallParser

log = logging.getLogger(__name__)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ServerState:
    engine: object  # tuneforge.inference.Engine (started by the app's lifespan unless already running)
    served: ServedModels
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None
    tool_family: str | None = "hermes"  # None: never parse tool calls
    tool_families: dict[str, str | None] = field(default_factory=dict)  # model id -> its own (its own template)
    created: int = field(default_factory=lambda: int(time.time()))

    def adapter_for(self, model_id: str) -> str | None:
        if not self.served.knows(model_id):
            raise OpenAIError(404, f"The model `{model_id}` does not exist. This server serves: "
                                   f"{', '.join(self.served.ids())}.", param="model", code="model_not_found")
        return self.served.adapter_for(model_id)

    def tool_family_for(self, model_id: str) -> str | None:
        return self.tool_families.get(model_id, self.tool_family)


def _error(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class Guard:
    """ASGI middleware: the API key (before anything else is read), then the body-size limit. The body is read
    here, counted, and replayed to the app, so a chunked upload without Content-Length is limited too."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.state.api_key and scope["path"] != "/health" and not self._authorized(headers):
            err = OpenAIError(401, "Missing or wrong API key. Send it as `Authorization: Bearer KEY` (the openai "
                                   "client's api_key).", code="invalid_api_key")
            return await _error(err)(scope, receive, send)
        limit = self.state.limits.max_body_bytes
        too_large = OpenAIError(413, f"The request body is larger than this server's limit of {limit} bytes "
                                     f"(--max-body-bytes).", code="request_too_large")
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await _error(too_large)(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await _error(too_large)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls: the client's disconnect

        return await self.app(scope, replay, send)

    def _authorized(self, headers: dict) -> bool:
        given = headers.get(b"authorization", b"").decode("latin-1")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        return hmac.compare_digest(token.encode(), self.state.api_key.encode())


def _validation_message(e: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in e.errors():
        if err.get("type") == "json_invalid":  # FastAPI puts the character offset where a field name would be
            at = next((x for x in err.get("loc", ()) if isinstance(x, int)), None)
            where = f" (at character {at})" if at is not None else ""
            reason = (err.get("ctx") or {}).get("error") or err.get("msg")
            return f"The request body is not valid JSON{where}: {reason}.", None
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = param or (loc[0] if loc else None)
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
    return "Invalid request: " + "; ".join(parts), param


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(request, e: OpenAIError):
        return _error(e)

    @app.exception_handler(UserError)
    async def user_error(request, e: UserError):
        return _error(OpenAIError(400, str(e)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        message, param = _validation_message(e)
        return _error(OpenAIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return _error(OpenAIError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        log.exception("Request failed")
        return _error(OpenAIError(500, f"Internal error: {type(e).__name__}: {e}"))


def create_app(state: ServerState) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        started = not state.engine.running
        if started:
            state.engine.start()
        yield
        if started:
            state.engine.stop()

    app = FastAPI(title="TuneForge", lifespan=lifespan)
    app.state.tf = state
    _install_error_handlers(app)
    app.add_middleware(Guard, state=state)
    _routes(app, state)
    return app


def _model_card(model_id: str, state: ServerState) -> dict:
    base = state.served.base_id
    return {"id": model_id, "object": "model", "created": state.created, "owned_by": "tuneforge",
            "root": base, "parent": None if model_id == base else base}


def _routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health():
        return {"status": "ok", "models": state.served.ids()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(m, state) for m in state.served.ids()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        state.adapter_for(model_id)
        return _model_card(model_id, state)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await _chat(req, request, state)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await _complete(req, request, state)


async def _until_disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.2)


async def _finish(choices: list[Choice], request: Request) -> None:
    """Wait for all choices; a client that leaves before the answer is ready frees the slots at once."""
    work = asyncio.ensure_future(run_to_end(choices))
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():  # the client left (or this handler was cancelled): stop generating for it
            cancel_all(choices)
            work.cancel()
    if not work.done() or work.cancelled():
        raise OpenAIError(499, "The client disconnected.")  # nobody reads this; it ends the handler
    work.result()


async def _chat(req: ChatCompletionRequest, request: Request, state: ServerState):
    refuse_unsupported(req)
    adapter = state.adapter_for(req.model)
    check_n(req.n, state.limits)
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = max_new_tokens(asked, state.limits, "max_completion_tokens" if req.max_completion_tokens
                                else "max_tokens")
    tools, prefill, family = tool_plan(req, state.tool_family_for(req.model))
    engine = state.engine
    try:
        ids = engine.encode_chat(chat_messages(req), tools, state.served.template_for(req.model))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a template that rejects the conversation (jinja raise_exception)
        raise OpenAIError(400, f"The messages cannot be rendered with the model's chat template: {e}",
                          param="messages") from e
    if prefill:
        ids = ids + list(engine.tokenizer(prefill, add_special_tokens=False)["input_ids"])
    check_room(engine, ids, asked, "max_completion_tokens" if req.max_completion_tokens else "max_tokens", adapter)
    logprobs, top = bool(req.logprobs), int(req.top_logprobs or 0) if req.logprobs else 0
    jobs = [(ids, sampling(req, max_tokens, i, logprobs, top)) for i in range(req.n)]
    handles = submit_all(engine, jobs, adapter)
    most = 1 if req.parallel_tool_calls is False else None  # OpenAI: at most one call when parallel calls are off
    choices = [Choice(index=i, handle=h, parser=ToolCallParser(family, most) if family else None, prefill=prefill)
               for i, h in enumerate(handles)]
    first_events = start_parsers(choices)
    token_text = TokenText(engine.tokenizer)
    if req.stream:
        return StreamingResponse(chat_stream(req, choices, len(ids), token_text, first_events),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    await _finish(choices, request)
    return chat_response(req, choices, len(ids), token_text)


def _completion_prompts(req: CompletionRequest, engine) -> list[tuple[list[int], str]]:
    """(ids, text) per prompt: a string, a list of strings, a list of ids or a list of id lists."""
    prompt = req.prompt
    items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
    if not items:
        raise OpenAIError(400, "`prompt` is empty.", param="prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            out.append((list(engine.tokenizer(item)["input_ids"]), item))
        else:
            out.append((list(item), engine.tokenizer.decode(item)))
    return out


async def _complete(req: CompletionRequest, request: Request, state: ServerState):
    refuse_unsupported(req)
    adapter = state.adapter_for(req.model)
    max_tokens = max_new_tokens(req.max_tokens, state.limits, "max_tokens")
    engine = state.engine
    prompts = _completion_prompts(req, engine)
    check_n(req.n * len(prompts), state.limits, "`n` x the number of prompts")  # all decode at once
    for ids, _ in prompts:
        check_room(engine, ids, req.max_tokens, "max_tokens", adapter, what="prompt")
    top = int(req.logprobs or 0)
    jobs = [(ids, sampling(req, max_tokens, j, req.logprobs is not None, top)) for ids, _ in prompts
            for j in range(req.n)]
    handles = submit_all(engine, jobs, adapter)
    choices = [Choice(index=i, handle=h) for i, h in enumerate(handles)]
    prompt_tokens = sum(len(ids) for ids, _ in prompts)
    echoes = [text for _, text in prompts]
    token_text = TokenText(engine.tokenizer)
    if req.stream:
        return StreamingResponse(completion_stream(req, choices, prompt_tokens, token_text, echoes),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    await _finish(choices, request)
    return completion_response(req, choices, prompt_tokens, token_text, echoes)
