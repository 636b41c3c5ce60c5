"""Continuous batching: one running batch; between decode steps finished or cancelled rows leave it and waiting
requests join it (prefilled on their own, then merged into the batch's KV cache, see kv.py).

`Scheduler.step()` is the whole engine loop body: admit, decode one token for every row, retire. The engine calls it
from its background thread (server) or from the caller's thread (`Engine.generate`/`stream`), so both paths run the
same code.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading

import torch

from tuneforge.inference import kv
from tuneforge.inference.adapters import ModelRunner
from tuneforge.inference.requests import Sequence, wants_logprobs
from tuneforge.inference.sampling import BatchParams, choose_tokens, counts_reply_tokens, token_logprobs

log = logging.getLogger(__name__)

MIN_SHARED_PREFIX = 8  # shorter common prompt starts are not worth a separate forward


class Batch:
    """Rows decoding together: their cache, 2-D attention mask (columns of the cache + 1 per step), next positions
    and last tokens, the sampling parameters as tensors, which tokens each row has seen (prompt and reply: repetition
    penalty) and how often each is in its reply (presence/frequency penalties); those two only when a row needs them."""

    def __init__(self, rows: list[Sequence], cache, mask: torch.Tensor, positions: torch.Tensor,
                 seen: torch.Tensor | None, vocab_size: int, counts: torch.Tensor | None = None):
        self.rows, self.cache, self.mask, self.positions, self.seen = rows, cache, mask, positions, seen
        self.counts, self.vocab_size = counts, vocab_size
        self.last: torch.Tensor | None = None
        self.params = BatchParams.of([r.params for r in rows], mask.device, vocab_size)
        self.generators = [r.generator for r in rows]
        self.adapters = [r.adapter for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def merge(self, other: Batch) -> Batch:
        t = max(self.mask.shape[1], other.mask.shape[1])
        mask = torch.cat([_pad_mask(self.mask, t), _pad_mask(other.mask, t)])
        merged = Batch(self.rows + other.rows, kv.join(self.cache, other.cache), mask,
                       torch.cat([self.positions, other.positions]), _stack(self, other, "seen", torch.bool),
                       self.vocab_size, _stack(self, other, "counts", torch.float32))
        merged.last = torch.cat([self.last, other.last])
        return merged

    def keep(self, keep: list[int]) -> Batch | None:
        """The batch without the other rows, and without leading columns none of the kept rows uses."""
        if not keep:
            return None
        if len(keep) == len(self.rows):
            return self
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask[index]
        drop = int(mask.any(dim=0).int().argmax())  # first column some kept row uses
        batch = Batch([self.rows[i] for i in keep], kv.select(self.cache, index, drop), mask[:, drop:],
                      self.positions[index], self.seen[index] if self.seen is not None else None, self.vocab_size,
                      self.counts[index] if self.counts is not None else None)
        batch.last = self.last[index]
        return batch


def _pad_mask(mask: torch.Tensor, t: int) -> torch.Tensor:
    return torch.cat([mask.new_zeros((mask.shape[0], t - mask.shape[1])), mask], dim=1)


def _stack(first: Batch, second: Batch, name: str, dtype) -> torch.Tensor | None:
    """Two batches' per-row token tables (`seen` or `counts`) as one; a batch without one gets zeros."""
    tables = [getattr(b, name) for b in (first, second)]
    if all(t is None for t in tables):
        return None
    return torch.cat([t if t is not None else torch.zeros((len(b), b.vocab_size), dtype=dtype, device=b.mask.device)
                      for t, b in zip(tables, (first, second))])


class Scheduler:
    def __init__(self, runner: ModelRunner, tokenizer, max_batch_size: int, pad_id: int):
        self.runner, self.tokenizer, self.max_batch_size = runner, tokenizer, max_batch_size
        self.pad_id = pad_id
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.batch: Batch | None = None
        self.lock = threading.Lock()  # guards `waiting` between submitting threads and the stepping thread
        self.wakeup = threading.Condition(self.lock)

    def add(self, seq: Sequence) -> None:
        with self.lock:
            self.waiting.append(seq)
            self.wakeup.notify()

    def cancel_all(self) -> None:
        with self.lock:
            for seq in [*self.waiting, *(self.batch.rows if self.batch is not None else [])]:
                seq.handle.cancel()

    def has_work(self) -> bool:
        return bool(self.waiting) or self.batch is not None

    @torch.inference_mode()
    def step(self) -> None:
        """Retire cancelled rows, admit waiting requests, decode one token for every row. An error fails the
        requests it touched (their handles raise it) and leaves the engine ready for the next ones."""
        self._retire_cancelled()
        newcomers = self._admit()
        try:
            if self.batch is not None:
                self._decode()
            if newcomers is not None:
                self.batch = newcomers if self.batch is None else self.batch.merge(newcomers)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: fail the batch, keep the engine alive
            log.exception("Decoding failed; the requests in the batch are ended with the error.")
            self._fail_all(e, newcomers)

    def _fail_all(self, error: BaseException, newcomers: Batch | None = None) -> None:
        rows = [r for b in (self.batch, newcomers) if b is not None for r in b.rows]
        self.batch = None
        for seq in rows:
            seq.fail(error)

    def abort(self, error: BaseException) -> None:
        """Last resort after an unexpected error: end every running request with it, keep nothing."""
        rows, self.batch = (self.batch.rows if self.batch is not None else []), None
        for seq in rows:
            with contextlib.suppress(Exception):
                seq.fail(error)

    def _retire_cancelled(self) -> None:
        with self.lock:
            for seq in [s for s in self.waiting if s.handle.cancelled]:
                self.waiting.remove(seq)
                seq.finish("cancelled")
        if self.batch is not None and any(r.handle.cancelled for r in self.batch.rows):
            for r in self.batch.rows:
                if r.handle.cancelled:
                    r.finish("cancelled")
            self.batch = self.batch.keep([i for i, r in enumerate(self.batch.rows) if not r.finished])

    def _admit(self) -> Batch | None:
        """Prefill the waiting requests that fit (free slots, compatible adapters), in arrival order."""
        running = self.batch.adapters if self.batch is not None else []
        free = self.max_batch_size - len(running)
        chosen: list[Sequence] = []
        with self.lock:
            while self.waiting and len(chosen) < free:
                seq = self.waiting[0]
                if not all(self.runner.can_share(seq.adapter, a) for a in {*running, *(c.adapter for c in chosen)}):
                    break
                chosen.append(self.waiting.popleft())
        if not chosen:
            return None
        try:
            return self._prefill(chosen)
        except Exception as e:  # noqa: BLE001 - a failing prefill ends only the requests it was prefilling
            log.exception("Prefill failed; those requests are ended with the error.")
            for seq in chosen:
                seq.fail(e)
            return None

    def _prefill(self, rows: list[Sequence]) -> Batch | None:
        """One forward over the newcomers' prompts (left-padded, after their prefixes); samples their first token."""
        device = self.runner.device
        prefixes = [self.runner.prefix(r.adapter) for r in rows]
        shared = 0 if any(prefixes) else self._shared_prefix_len(rows)
        if shared:
            prefixes = [self._encode_prefix(rows[0].prompt_ids[:shared], rows[0].adapter)] * len(rows)
        cache = kv.prefix_cache(prefixes)
        cached = cache.get_seq_length()
        rest = [r.prompt_ids[shared:] for r in rows]
        before = [r.prefix_len + shared for r in rows]  # positions ahead of each row's remaining prompt
        longest = max(map(len, rest))
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), cached + longest), dtype=torch.long)
        for i, (row_ids, n) in enumerate(zip(rest, before)):
            ids[i, longest - len(row_ids):] = torch.tensor(row_ids)
            mask[i, cached - n:cached] = 1
            mask[i, mask.shape[1] - len(row_ids):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask[:, cached:].cumsum(dim=1) - 1).clamp(min=0) + torch.tensor(before, device=device)[:, None]
        logits = self.runner.forward(ids, mask, positions, cache, [r.adapter for r in rows])
        seen = self._seen(rows, logits) if any(r.params.repetition_penalty != 1.0 for r in rows) else None
        counts = torch.zeros(logits.shape, device=logits.device) if any(
            counts_reply_tokens(r.params) for r in rows) else None
        batch = Batch(rows, cache, mask, positions[:, -1] + 1, seen, logits.shape[-1], counts)
        self._advance(batch, logits)
        return batch.keep([i for i, r in enumerate(batch.rows) if not r.finished])

    @staticmethod
    def _shared_prefix_len(rows: list[Sequence]) -> int:
        """Tokens all newcomers' prompts start with (a chat template's system prompt, a few-shot preamble): they are
        encoded once and shared, instead of once per row. Only within one adapter, whose keys/values they are."""
        if len(rows) < 2 or any(r.adapter != rows[0].adapter for r in rows):
            return 0
        n = min(len(os.path.commonprefix([r.prompt_ids for r in rows])), min(len(r.prompt_ids) for r in rows) - 1)
        return n if n >= MIN_SHARED_PREFIX else 0

    def _encode_prefix(self, ids: list[int], adapter: str | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        cache = kv.empty_cache()
        x = torch.tensor([ids], device=self.runner.device)
        self.runner.forward(x, torch.ones_like(x), torch.arange(len(ids), device=x.device)[None], cache, [adapter])
        return kv.tensors_of(cache)

    @staticmethod
    def _seen(rows: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """Which tokens each row's prompt holds (the repetition penalty counts the prompt, as transformers does)."""
        seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        for i, r in enumerate(rows):
            seen[i, torch.tensor(r.prompt_ids, device=logits.device)] = True
        return seen

    def _decode(self) -> None:
        batch = self.batch
        ones = batch.mask.new_ones((len(batch), 1))
        batch.mask = torch.cat([batch.mask, ones], dim=1)
        logits = self.runner.forward(batch.last[:, None], batch.mask, batch.positions[:, None], batch.cache,
                                     batch.adapters)
        batch.positions = batch.positions + 1
        self._advance(batch, logits)
        if any(r.finished for r in batch.rows):
            self.batch = batch.keep([i for i, r in enumerate(batch.rows) if not r.finished])

    def _advance(self, batch: Batch, logits: torch.Tensor) -> None:
        """Choose every row's next token, record it and hand it to its request."""
        tokens = choose_tokens(logits, batch.params, batch.generators, batch.seen, batch.counts)
        if batch.seen is not None:
            batch.seen.scatter_(1, tokens[:, None], True)
        if batch.counts is not None:
            batch.counts.scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=batch.counts.dtype))
        batch.last = tokens
        chosen_lp, top = self._logprobs(batch, logits, tokens)
        for i, (seq, token) in enumerate(zip(batch.rows, tokens.tolist())):
            seq.accept(token, chosen_lp[i] if chosen_lp is not None else None, top[i] if top is not None else None)

    def _logprobs(self, batch: Batch, logits, tokens):
        if not any(wants_logprobs(r.params) for r in batch.rows):
            return None, None
        chosen, top = token_logprobs(logits, tokens, batch.params.top_logprobs)
        chosen = chosen.tolist()
        if top is None:
            return chosen, None
        values, ids = top[0].tolist(), top[1].tolist()
        tops = [self._top_dict(ids[i][:r.params.top_logprobs], values[i]) if r.params.top_logprobs else None
                for i, r in enumerate(batch.rows)]
        return chosen, tops

    def _top_dict(self, ids: list[int], values: list[float]) -> dict[str, float]:
        """Token text -> logprob, most likely first. Tokens that decode to the same text (e.g. lone bytes shown as
        U+FFFD) keep the higher value."""
        top: dict[str, float] = {}
        for t, v in zip(ids, values):
            top.setdefault(self.tokenizer.decode([t]), v)
        return top
