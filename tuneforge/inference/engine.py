"""The generation engine: every reply TuneForge produces (chat, server, evaluation, quickstart) comes from here.

    engine = Engine(model, tokenizer, max_batch_size=16)
    [reply] = engine.generate([[{"role": "user", "content": "What is 2+3?"}]], SamplingParams(max_new_tokens=32))
    for delta in engine.stream(messages, SamplingParams(temperature=0.7, seed=1)):
        print(delta.text, end="", flush=True)

    engine.start()                                   # server: a background thread decodes continuously
    handle = engine.submit(engine.encode_chat(messages), params, adapter="sql")
    async for delta in handle.aiter(): ...           # or `for delta in handle`; handle.cancel() frees the slot

Prompts are rendered by the data path's own chat-template code (tuneforge.data.encode), so the ids a model is
served are the ids it was trained on. Without `start()`, `generate`/`stream` drive the same scheduler from the
caller's thread; with it, they submit to the running batch like any other request.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator

from tuneforge.errors import UserError
from tuneforge.inference.adapters import ModelRunner, active_adapter
from tuneforge.inference.requests import Handle, Sequence
from tuneforge.inference.scheduler import Scheduler
from tuneforge.inference.types import Completion, Delta, SamplingParams

log = logging.getLogger(__name__)

# Tokens that end an assistant turn in common chat formats; only those the tokenizer knows are used.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                      "<|end_of_text|>", "<|user|>", "<|observation|>", "</s>", "<|EOT|>")


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def stop_token_ids(model, tokenizer) -> list[int]:
    """eos of the tokenizer and of the model's generation config, plus known end-of-turn tokens in the vocab."""
    ids = _as_list(tokenizer.eos_token_id)
    ids += _as_list(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
    return sorted(set(ids))


def encode_chat(tokenizer, messages: list[dict], tools: list | None = None,
                chat_template: str | None = None) -> list[int]:
    """Prompt ids for `messages`, ending with the assistant header: the training data path's own prompt encoder (the
    same template choice and the same adaptations, e.g. a system prompt merged into the first user turn for templates
    that refuse one), so training and serving formats cannot drift. `chat_template`: another template than the
    tokenizer's (the server renders an adapter's requests with the one it was trained with)."""
    from tuneforge.data.encode import encode_prompt

    return encode_prompt(tokenizer, messages, tools, chat_template)[0]


class Engine:
    """Batched, KV-cached, continuously batched generation for one model (and its adapters)."""

    def __init__(self, model, tokenizer, max_batch_size: int = 16, default_adapter: str | None = None):
        self.runner = ModelRunner(model)
        self.tokenizer = tokenizer
        self.runner.check(default_adapter)
        self.default_adapter = default_adapter
        self.stop_ids = set(stop_token_ids(self.runner.model, tokenizer))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop_ids, default=0)
        config = getattr(self.runner.model, "config", None)
        self.context_length = getattr(config, "max_position_embeddings", None) or sys.maxsize
        head = getattr(self.runner.model, "get_output_embeddings", lambda: None)()
        self.vocab_size = head.weight.shape[0] if head is not None else getattr(config, "vocab_size", sys.maxsize)
        self.scheduler = Scheduler(self.runner, tokenizer, max_batch_size, pad_id)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._step_lock = threading.Lock()

    # ---- prompts ------------------------------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict], tools: list | None = None,
                    chat_template: str | None = None) -> list[int]:
        return encode_chat(self.tokenizer, messages, tools, chat_template)

    def encode(self, prompt) -> list[int]:
        """A message list (chat template), a string (raw text, the tokenizer's own special tokens) or ids."""
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        if prompt and all(isinstance(m, dict) for m in prompt):
            return self.encode_chat(prompt)
        if all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise UserError("A prompt must be a list of chat messages ({'role', 'content'} dicts), a string, or a list "
                        "of token ids.")

    # ---- requests -----------------------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None,
               adapter: str | None = None) -> Handle:
        """Queue one request (thread-safe); it joins the running batch at the next step."""
        params = (params or SamplingParams()).validate()
        outside = sorted(t for t in params.logit_bias if t >= self.vocab_size)
        if outside:
            raise UserError(f"`logit_bias` names token id(s) {outside[:5]}, outside this model's vocabulary of "
                            f"{self.vocab_size} tokens (ids 0 to {self.vocab_size - 1}).")
        adapter = adapter if adapter is not None else self.default_adapter
        self.runner.check(adapter)
        if not prompt_ids:
            raise UserError("The prompt is empty: there is nothing to continue from.")
        prefix = self.runner.prefix_len(adapter)
        room = self.room_after(prompt_ids, adapter)
        if room <= 0:
            # callers that know what the prompt is made of (chat, the server) check first and say it their way
            raise UserError(f"The prompt is {len(prompt_ids)} tokens, which leaves no room for a reply in the "
                            f"model's context of {self.context_length} tokens; shorten the prompt.")
        handle = Handle(prompt_tokens=len(prompt_ids))
        self.scheduler.add(Sequence(handle, list(prompt_ids), params, adapter, self.tokenizer, self.stop_ids,
                                    min(params.max_new_tokens, room), prefix, self.runner.device))
        return handle

    def room_after(self, prompt_ids: list[int], adapter: str | None = None) -> int:
        """How many tokens the context leaves for a reply to `prompt_ids` (an adapter's virtual tokens count)."""
        adapter = adapter if adapter is not None else self.default_adapter
        return self.context_length - self.runner.prefix_len(adapter) - len(prompt_ids)

    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None,
                 adapter: str | None = None) -> list[Completion]:
        """One completion per prompt, in order; all decode as one continuously refilled batch."""
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise UserError(f"{len(prompts)} prompts but {len(per_prompt)} sampling parameter sets.")
        handles = [self.submit(self.encode(p), sp, adapter) for p, sp in zip(prompts, per_prompt)]
        if not self.running:
            with self._eval_mode():
                while not all(h.finished for h in handles):
                    self._step()
        return [h.result() for h in handles]

    def stream(self, prompt, params: SamplingParams | None = None, adapter: str | None = None) -> Iterator[Delta]:
        """Text deltas of one request as they are produced. Stopping the iteration early cancels the request."""
        handle = self.submit(self.encode(prompt), params, adapter)
        try:
            if self.running:
                yield from handle
                return
            with self._eval_mode():
                while True:
                    self._step()
                    for delta in handle.poll():
                        yield delta
                    if handle.done:
                        return
        finally:
            handle.cancel()  # no effect once finished; frees the slot when the caller stopped reading

    # ---- the loop -----------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def in_flight(self) -> int:
        """Requests decoding or waiting to join the batch (0: idle, every slot free)."""
        with self.scheduler.lock:
            batch = self.scheduler.batch
            return len(self.scheduler.waiting) + (len(batch) if batch is not None else 0)

    def _step(self) -> None:
        with self._step_lock:  # several threads may drive the same scheduler without a background thread
            self.scheduler.step()

    @contextlib.contextmanager
    def _eval_mode(self):
        model = self.runner.model
        was_training = model.training
        model.eval()  # no dropout; training code (evaluation mid-run) gets its mode back
        try:
            yield
        finally:
            model.train(was_training)

    def start(self) -> None:
        """Decode in a background thread: submitted requests join the running batch between steps."""
        if self._thread is not None:
            return
        self.runner.model.eval()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="tuneforge-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        scheduler = self.scheduler
        while True:
            with scheduler.wakeup:
                while not self._stopping and not scheduler.has_work():
                    scheduler.wakeup.wait()
                if self._stopping:
                    return
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - the thread must outlive any one bad step
                log.exception("Engine step failed; ending the requests in the batch.")
                self.scheduler.abort(e)

    def stop(self) -> None:
        """Stop the background thread; requests still in flight end with finish_reason "cancelled"."""
        if self._thread is None:
            return
        with self.scheduler.wakeup:
            self._stopping = True
            self.scheduler.wakeup.notify_all()
        self._thread.join()
        self._thread = None
        self.scheduler.cancel_all()
        self._step()  # retires them


def generate_replies(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 64, batch_size: int = 8,
                     repetition_penalty: float = 1.0) -> list[str]:
    """Greedy replies (stripped text) to each message list, through the engine, with the model's active adapter:
    what evaluation and the quickstart compare before and after fine-tuning."""
    engine = Engine(model, tokenizer, max_batch_size=batch_size, default_adapter=active_adapter(model))
    params = SamplingParams(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
    return [c.text.strip() for c in engine.generate(prompts, params)]


