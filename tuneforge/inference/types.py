"""What callers hand the engine (`SamplingParams`) and what they get back (`Delta` while streaming, `Completion`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from tuneforge.errors import UserError


@dataclass
class SamplingParams:
    """How to pick the next tokens of one request. The defaults are plain greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy (argmax); top_p/top_k/min_p/seed then have no effect
    top_p: float = 1.0  # keep the smallest set of tokens whose probability adds up to top_p
    top_k: int = 0  # keep the k most likely tokens (0: off)
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    repetition_penalty: float = 1.0  # CTRL-style, on every token of the prompt and reply (1.0: off)
    presence_penalty: float = 0.0  # OpenAI's: subtracted from each token the reply already holds, in [-2, 2]
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time the reply already holds a token, in [-2, 2]
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, in [-100, 100]
    stop: list[str] = field(default_factory=list)  # stop strings; the text ends before the first one
    stop_token_ids: list[int] = field(default_factory=list)  # added to the model's own eos/end-of-turn ids
    seed: int | None = None  # same seed -> same text alone; in a batch too, but for float-rounding ties (sampling.py)
    logprobs: bool = False  # log-probabilities of the chosen tokens (the model's raw distribution)
    top_logprobs: int = 0  # and of the n most likely tokens at each step
    ignore_eos: bool = False  # run to max_new_tokens through end-of-turn tokens (benchmarks); stop strings still apply

    def validate(self, spell: Callable[[str], str] | None = None) -> SamplingParams:
        """Raise UserError naming each bad field and its valid range; returns self for chaining. `spell` gives the
        name the user typed for a field (chat: `--top-p` for top_p); by default the field name, which is also the
        server's JSON field."""
        problems = self.problems(spell)
        if problems:
            raise UserError(" ".join(problems))
        return self

    def problems(self, spell: Callable[[str], str] | None = None) -> list[str]:
        """Every field outside its valid range, one sentence each (a config check collects them with its own)."""
        spell = spell or (lambda name: name)
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
            ("temperature", self.temperature >= 0 and math.isfinite(self.temperature), ">= 0 (0 is greedy)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k >= 0, ">= 0 (0 is off)"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty),
             "> 0 (1.0 is off)"),
            ("top_logprobs", 0 <= self.top_logprobs <= 20, "in [0, 20]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2] (0 is off)"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2] (0 is off)"),
        ]
        problems = [f"Sampling parameter `{spell(name)}` is {getattr(self, name)!r}; it must be {expected}."
                    for name, ok, expected in checks if not ok]
        bad_bias = {k: v for k, v in self.logit_bias.items()
                    if not isinstance(k, int) or k < 0 or not -100 <= v <= 100}
        if bad_bias:
            problems.append(f"Sampling parameter `{spell('logit_bias')}` maps token ids (integers >= 0) to biases in "
                            f"[-100, 100]; got {bad_bias!r}.")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append(f"Sampling parameter `{spell('stop')}` must be a list of non-empty strings, got "
                            f"{self.stop!r}.")
        return problems


@dataclass
class Delta:
    """One streamed piece of a reply. `text` never ends inside a multi-byte character or inside a possible stop
    string; `token_ids`/`logprobs` are the tokens that produced it (possibly more than one, possibly with no text
    yet on the last delta). `finish_reason` is set on the last delta only: "stop" (end-of-turn token or stop
    string), "length" (max_new_tokens or the model's context) or "cancelled"."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[dict[str, float]] | None = None
    finish_reason: str | None = None
    stop_token_id: int | None = None  # on the last delta: the end-of-turn token that stopped the reply, if one did


@dataclass
class Completion:
    """A whole reply. `token_ids` are the reply's tokens without the end-of-turn token that stopped it, which is
    `stop_token_id` (None when a stop string, the length or a cancel ended it; a model may have several, e.g.
    `<|im_end|>` and `<|endoftext|>`); `completion_tokens` counts every generated token (that one included), as
    OpenAI's usage does."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[dict[str, float]] | None
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    stop_token_id: int | None = None
