"""`tuneforge data inspect --show N`: the first N rows as the model sees them in training.

    tuneforge data inspect --config examples/sft_lora_tiny.yaml --show 2 --out reports/sft

Each row goes through the training encoder (`build.encode_examples`, the stage's own encoding: sft, pt, a DPO
pair, a KTO row, a PPO/GRPO prompt) with the model's chat template, and is printed as text decoded from the token
ids, the tokens that get loss between TRAIN_OPEN and TRAIN_CLOSE, with the token and trained-token counts (the
first token is never predicted, so it is never counted as trained). This is LLaMA-Factory's printed example
(inputs / labels) in one block: a wrong chat template or loss mask shows at a glance.
"""

from __future__ import annotations

from dataclasses import replace

from tuneforge.data import build
from tuneforge.data.types import (
    IGNORE_INDEX,
    DataReport,
    Encoded,
    EncodedKTO,
    EncodedPair,
    EncodedPrompt,
)

TRAIN_OPEN, TRAIN_CLOSE = "{+", "+}"  # wdiff's marks for added text: rare in data, plain ASCII


def stage_for(example, config_stage: str | None) -> str:
    """The data stage that encodes `example`: the config's stage, else the one its kind trains (a chat row that
    ends with the user's turn is a prompt for sampling)."""
    if config_stage is not None:
        return build.DATA_STAGE[config_stage]
    kind = build.kind_of(example)
    if kind == "chat" and example.messages[-1]["role"] != "assistant":
        return "prompt"
    return {"pairs": "pairwise", "kto": "kto", "chat": "sft", "text": "pt"}[kind]


def show_rows(rows: list, tokenizer, template: str | None, data_cfg, config_stage: str | None) -> str:
    """The text that `--show` prints for `rows` (curate.rows.Row with an example)."""
    blocks = [f"Trained tokens (they get loss) are between {TRAIN_OPEN} and {TRAIN_CLOSE}; the rest is context."]
    for number, row in enumerate(rows, 1):
        stage = stage_for(row.example, config_stage)
        report = DataReport()
        items = build.encode_examples([row.example], tokenizer, stage, data_cfg, template, report)
        title = f"=== row {number}: {row.source} (stage {stage}"
        if not items:  # a bad row or one the stage drops (too long, nothing to learn): say why, as training would
            blocks.append(f"{title}) ===\nnot encoded: {why_not(report, row.example.source, data_cfg)}")
        for item in items:
            blocks.append(f"{title}) ===\n{describe(item, tokenizer)}")
    return "\n\n".join(blocks) + "\n"


def describe(item, tokenizer) -> str:
    if isinstance(item, EncodedPair):
        return describe_pair(item, tokenizer)
    if isinstance(item, EncodedPrompt):
        return (f"prompt: {len(item)} tokens; sampling continues after it (no loss on the prompt)\n"
                f"{decode(tokenizer, item.input_ids)}")
    label = f"; label: {'desirable' if item.label else 'undesirable'}" if isinstance(item, EncodedKTO) else ""
    return f"{counts(item)}{label}\n{marked(tokenizer, item.input_ids, item.labels)}"


def describe_pair(pair: EncodedPair, tokenizer) -> str:
    """The prompt once, then each reply as it continues that prompt: both sides are rendered whole (prompt + reply),
    as DPO, RM and CoH train on them."""
    chosen, rejected = pair.chosen, pair.rejected
    lines = [f"prompt: {pair.chosen_prompt_length} tokens (no loss)", decode(tokenizer,
                                                                          chosen.input_ids[:pair.chosen_prompt_length])]
    for name, side, start in (("chosen", chosen, pair.chosen_prompt_length),
                              ("rejected", rejected, pair.rejected_prompt_length)):
        lines += [f"--- {name}: {counts(side, 'with the prompt')}",
                  marked(tokenizer, side.input_ids[start:], side.labels[start:], first=start)]
    return "\n".join(lines)


def counts(encoded: Encoded, scope: str = "") -> str:
    trained = sum(1 for label in encoded.labels[1:] if label != IGNORE_INDEX)
    cut = " (truncated to max_length)" if encoded.truncated else ""
    return f"{len(encoded)} tokens{' ' + scope if scope else ''}, {trained} trained{cut}"


def why_not(report: DataReport, source: str, data_cfg) -> str:
    """Why training keeps nothing of one row, in the row's own words (the report's lines count a whole run)."""
    def detail(entries: list[str]) -> str:
        rest = entries[0].removeprefix(source).strip()
        return f" {rest}" if rest else ""

    if report.bad_rows:
        bad = report.bad_rows[0]
        return f"a bad row, training rejects it: field `{bad.field}`: {bad.problem}"
    if report.no_room:
        return (f"the prompt leaves no room for the reply within max_length {data_cfg.max_length}"
                f"{detail(report.no_room)}, so training skips this row (raise data.max_length or shorten the prompt)")
    if report.dropped_overlong:
        return f"longer than max_length {data_cfg.max_length}: dropped (data.overlong: drop)"
    if report.dropped_no_loss:
        return "no token to learn (no reply that gets loss): training drops this row"
    return "nothing to encode"


def marked(tokenizer, ids: list[int], labels: list[int], first: int = 0) -> str:
    """The decoded ids with each run of trained tokens between the marks. `first`: the position of ids[0] in the
    whole example (position 0 is never predicted)."""
    parts, run, trained = [], [], None
    for position, (token, label) in enumerate(zip(ids, labels), first):
        on = label != IGNORE_INDEX and position > 0
        if run and on != trained:
            parts.append(_wrap(decode(tokenizer, run), trained))
            run = []
        run.append(token)
        trained = on
    if run:
        parts.append(_wrap(decode(tokenizer, run), trained))
    return "".join(parts)


def _wrap(text: str, trained: bool) -> str:
    return f"{TRAIN_OPEN}{text}{TRAIN_CLOSE}" if trained else text


def decode(tokenizer, ids: list[int]) -> str:
    """The text of the ids with every special token spelled out (the template's markers are part of the format)."""
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def data_config(config, max_length: int | None, loss_on: str | None):
    """The data settings the rows are encoded with: the config's `data` (system prompt, special-token policy...)
    or the defaults, with `--max-length` / `--loss-on` when given."""
    from tuneforge.configs.schema import DataConfig

    base = config.data if config is not None else DataConfig()
    return replace(base, max_length=max_length or base.max_length, loss_on=loss_on or base.loss_on)
