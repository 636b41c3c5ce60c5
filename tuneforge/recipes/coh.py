"""Chain of Hindsight (Liu, Sferrazza and Abbeel 2023, "Chain of Hindsight Aligns Language Models with Feedback",
https://arxiv.org/abs/2302.02676): learn from preference pairs with plain SFT by showing both replies, each after
a feedback phrase.

    tuneforge train examples/coh_tiny.yaml

A pair (prompt, chosen, rejected) becomes one conversation:

    user:      <prompt>\\n\\nA good answer:        (feedback phrases: coh.good_phrase / coh.bad_phrase)
    assistant: <chosen>
    user:      A bad answer:
    assistant: <rejected>

(which reply comes first: `coh.order`, random per row by default). The feedback phrases sit in user turns, so the
SFT loss covers the two answers only (the earlier replies of a multi-turn prompt are context, without loss, as in
dpo); the rest is the SFT stage unchanged (same encoder, same loss). At inference, end the prompt with the good
phrase to ask for a good answer.
"""

from __future__ import annotations

import random

from tuneforge.data.types import Example, PairExample
from tuneforge.recipes.sft import SFTStage
from tuneforge.training.loop import Trainer, TrainResult
from tuneforge.training.setup import done_line, read_data, save_final, setup_data, setup_model, setup_run


def hindsight_example(pair: PairExample, opts, seed: int) -> Example:
    """The pair as one conversation with feedback phrases (see the module docstring)."""
    good = (opts.good_phrase, pair.chosen)
    bad = (opts.bad_phrase, pair.rejected)
    good_first = opts.order == "good_first" or (opts.order == "random" and random.Random(f"{seed}:{pair.source}")
                                                .random() < 0.5)
    (first_phrase, first), (second_phrase, second) = (good, bad) if good_first else (bad, good)
    *before, question = pair.prompt
    # the prompt's own replies (a multi-turn prompt, hh-rlhf's earlier turns) are context, not answers: no loss, as
    # in dpo/rm (encode_pair's skip_turns); `loss_weight: 0` is how a row says that to the SFT encoder
    before = [{**m, "loss_weight": 0} if m["role"] == "assistant" else m for m in before]
    asked = {**question, "content": f"{question['content']}\n\n{first_phrase}"}
    messages = [*before, asked, *first, {"role": "user", "content": second_phrase}, *second]
    return Example(pair.source, messages=messages, tools=pair.tools)


def run(cfg, log=print) -> TrainResult:
    runtime = setup_run(cfg, log)
    train_rows, eval_rows, report = read_data(cfg)  # preference pairs
    rows = ([hindsight_example(p, cfg.coh, cfg.data.seed) for p in train_rows],
            [hindsight_example(p, cfg.coh, cfg.data.seed) for p in eval_rows], report)
    model, tokenizer, method = setup_model(cfg, runtime, log=log)
    train, evals, collate = setup_data(cfg, tokenizer, "sft", runtime, log, read=rows)
    result = Trainer(cfg, runtime, model, method, train, evals, collate, SFTStage(), log).train()
    if result.finished:
        save_final(cfg, model, method, tokenizer, runtime)
        if runtime.is_main:
            log(done_line(result, cfg.output_dir))
    return result
