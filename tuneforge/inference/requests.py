"""One request's life: its sampling state and text stream (`Sequence`), and what the caller holds (`Handle`)."""

from __future__ import annotations

import asyncio
import queue
import threading

import torch

from tuneforge.inference.text import TextStream
from tuneforge.inference.types import Completion, Delta, SamplingParams


class Handle:
    """A submitted request: iterate it for `Delta`s (blocking), `async for d in handle.aiter()` in asyncio code,
    `cancel()` to free its batch slot at once, `result()` for the whole `Completion`."""

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens
        self.cancelled = False
        self.generated = 0  # tokens generated, the stopping one included (usage.completion_tokens)
        self.finished = False  # set by the engine with the last delta
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._async: tuple[asyncio.AbstractEventLoop, asyncio.Queue] | None = None
        self._done = False

    def _push(self, item: Delta | BaseException) -> None:
        """From the engine: the next delta (or the error that ended the request)."""
        with self._lock:
            if self._async is not None:
                loop, aqueue = self._async
                try:
                    loop.call_soon_threadsafe(aqueue.put_nowait, item)
                except RuntimeError:  # the caller's event loop is closed: nobody is listening any more
                    self.cancelled = True
            else:
                self._queue.put(item)

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def done(self) -> bool:
        """The caller has received the last delta."""
        return self._done

    def __iter__(self):
        while not self._done:
            yield self._unwrap(self._queue.get())

    def poll(self) -> list[Delta]:
        """The deltas ready now, without waiting."""
        items = []
        while not self._done and not self._queue.empty():
            items.append(self._unwrap(self._queue.get_nowait()))
        return items

    def _unwrap(self, item):
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._done = item.finish_reason is not None
        return item

    async def aiter(self):
        """Async iteration for asyncio code (e.g. a FastAPI handler); the engine thread wakes the event loop."""
        aqueue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            while not self._queue.empty():
                aqueue.put_nowait(self._queue.get_nowait())
            self._async = (asyncio.get_running_loop(), aqueue)
        while not self._done:
            yield self._unwrap(await aqueue.get())

    def result(self) -> Completion:
        """Wait for the end of the request and assemble its deltas."""
        deltas = list(self)
        last = deltas[-1]
        ids = [t for d in deltas for t in d.token_ids]
        logprobs = [x for d in deltas for x in d.logprobs] if last.logprobs is not None else None
        top = [x for d in deltas for x in d.top_logprobs] if last.top_logprobs is not None else None
        return Completion(text="".join(d.text for d in deltas), token_ids=ids, logprobs=logprobs, top_logprobs=top,
                          finish_reason=last.finish_reason, prompt_tokens=self.prompt_tokens,
                          completion_tokens=self.generated, stop_token_id=last.stop_token_id)


def wants_logprobs(params: SamplingParams) -> bool:
    return params.logprobs or params.top_logprobs > 0


class Sequence:
    """Engine-side state of one request while it waits or decodes."""

    def __init__(self, handle: Handle, prompt_ids: list[int], params: SamplingParams, adapter: str | None,
                 tokenizer, stop_ids: set[int], max_new_tokens: int, prefix_len: int,
                 device: torch.device | str = "cpu"):
        self.handle, self.prompt_ids, self.params, self.adapter = handle, prompt_ids, params, adapter
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else stop_ids)
        self.max_new_tokens = max_new_tokens
        self.prefix_len = prefix_len  # virtual tokens of a prompt-learning adapter
        # on the model's device: the draw takes one number per vocabulary token each step (sampling.py), which on
        # a GPU must not be made on the CPU and copied over (150k tokens x the batch, every step)
        self.generator = torch.Generator(device=device)
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        self.generator.manual_seed(seed)
        self.stream = TextStream(tokenizer, params.stop)
        self.generated = 0
        self.finished = False
        self._ids: list[int] = []
        self._stop_token: int | None = None
        self._logprobs: list[float] = []
        self._top: list[dict[str, float]] = []

    def accept(self, token: int, logprob: float | None, top: dict[str, float] | None) -> bool:
        """Take the next generated token; emit a delta when there is text to show. Returns True when finished."""
        self.generated += 1
        if token in self.stop_ids:
            self._stop_token = token
            self.finish("stop")
            return True
        self._ids.append(token)
        if logprob is not None:
            self._logprobs.append(logprob)
        if top is not None:
            self._top.append(top)
        text = self.stream.add(token)
        if self.stream.stopped:
            self.finish("stop", text)
        elif self.generated >= self.max_new_tokens:
            self.finish("length", text)
        elif text:
            self._emit(text, None)
        return self.finished

    def finish(self, reason: str, text: str = "") -> None:
        if self.finished:
            return
        self.finished = True
        if reason != "cancelled":
            text += self.stream.flush()
        self.handle.generated = self.generated
        self._emit(text, reason)
        self.handle.finished = True

    def fail(self, error: BaseException) -> None:
        self.finished = True
        self.handle._push(error)
        self.handle.finished = True

    def _emit(self, text: str, reason: str | None) -> None:
        p = self.params
        delta = Delta(text=text, token_ids=self._ids, logprobs=self._logprobs if wants_logprobs(p) else None,
                      top_logprobs=self._top if p.top_logprobs else None, finish_reason=reason,
                      stop_token_id=self._stop_token if reason else None)
        self._ids, self._logprobs, self._top = [], [], []
        self.handle._push(delta)
