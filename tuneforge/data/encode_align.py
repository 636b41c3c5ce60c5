"""Encoding for the alignment stages, through the same chat encoder as SFT (`encode.encode_chat`).

- pairwise: a `PairExample` -> `EncodedPair`: prompt + chosen and prompt + rejected, each rendered whole with the
  chat template; labels on the reply only (the prompt's own assistant turns get none).
- kto: an `Example` with a label -> `EncodedKTO`: labels on the last assistant turn only.
- prompt: an `Example` -> `EncodedPrompt`: the prompt rendered with the generation prompt (what sampling sees).

Length (`data.max_length`): a pair is cut or dropped as one (`data.overlong`): when either side is too long, both
keep their prompt and lose the end of their reply (each side cut at max_length), or the pair is dropped; counted
once. A prompt that leaves no room for the reply (the reply would start at or after max_length) is skipped and
counted (`DataReport.no_room`), for pairs, KTO rows and prompts alike.
"""

from __future__ import annotations

from tuneforge.data.encode import encode_chat, encode_prompt
from tuneforge.data.types import (
    IGNORE_INDEX,
    DataReport,
    Encoded,
    EncodedKTO,
    EncodedPair,
    EncodedPrompt,
    Example,
    PairExample,
    RowProblem,
)


def prompt_length(encoded: Encoded) -> int:
    """Tokens before the first labelled one (the reply's start); the whole length when nothing is labelled."""
    return next((i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX), len(encoded))


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    if system and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system}, *messages]
    return messages


def encode_pair(example: PairExample, tokenizer, data_cfg, template: str, escape: bool,
                report: DataReport) -> list[EncodedPair]:
    """Both sides rendered whole; [] when the pair was dropped (counted in `report`)."""
    prompt = with_system(example.prompt, data_cfg.system)
    skip = sum(m["role"] == "assistant" for m in prompt)
    sides = [encode_chat(tokenizer, prompt + reply, tools=example.tools, loss_on="assistant", chat_template=template,
                         max_length=data_cfg.max_length, escape_special_tokens=escape, skip_turns=skip)
             for reply in (example.chosen, example.rejected)]
    for side in sides:
        side.source = example.source
    fitted = fit_replies(sides, example.source, data_cfg, report)
    if fitted is None:
        return []
    chosen, rejected = fitted
    return [EncodedPair(chosen, rejected, example.source, example.margin, prompt_length(chosen),
                        prompt_length(rejected))]


def encode_kto(example: Example, tokenizer, data_cfg, template: str, escape: bool,
               report: DataReport) -> list[EncodedKTO]:
    if example.label is None:
        raise RowProblem("label", "stage kto needs a boolean `label` per conversation (true: a desirable reply), or "
                                  "preference pairs (chosen: true, rejected: false); this row has none")
    messages = with_system(example.messages, data_cfg.system)
    encoded = encode_chat(tokenizer, messages, tools=example.tools, loss_on="last", chat_template=template,
                          max_length=data_cfg.max_length, escape_special_tokens=escape)
    encoded.source = example.source
    fitted = fit_replies([encoded], example.source, data_cfg, report)
    if fitted is None:
        return []
    (kept,) = fitted
    return [EncodedKTO(kept.input_ids, kept.labels, example.source, label=example.label,
                       prompt_length=prompt_length(kept))]


def encode_prompt_example(example: Example, tokenizer, data_cfg, template: str, escape: bool,
                          report: DataReport) -> list[EncodedPrompt]:
    messages = with_system(example.messages, data_cfg.system)
    ids, rendered = encode_prompt(tokenizer, messages, tools=example.tools, chat_template=template,
                                  escape_special_tokens=escape)
    if len(ids) >= data_cfg.max_length:
        report.no_room.append(f"{example.source} (prompt of {len(ids)} tokens)")
        return []
    return [EncodedPrompt(ids, rendered, example.reference, example.source)]


def fit_replies(sides: list[Encoded], source: str, data_cfg, report: DataReport) -> list[Encoded] | None:
    """Apply max_length to the sides of one row together (see the module docstring); None when it is skipped."""
    max_length = data_cfg.max_length
    starts = [prompt_length(side) for side in sides]
    if any(start >= min(len(side), max_length) for start, side in zip(starts, sides)):
        if any(start >= max_length or side.truncated for start, side in zip(starts, sides)):
            report.no_room.append(f"{source} (prompt of {max(starts)} tokens)")
        else:  # nothing labelled although everything fits: the template wrote no reply tokens
            report.dropped_no_loss.append(source)
        return None
    cut = any(len(side) > max_length or side.truncated for side in sides)
    if cut and data_cfg.overlong == "drop":
        report.dropped_overlong.append(source)
        return None
    if cut:
        report.truncated.append(source)
        sides = [Encoded(side.input_ids[:max_length], side.labels[:max_length], source, truncated=True)
                 for side in sides]
    return sides


def kto_balance(examples: list[EncodedKTO], desirable_weight: float, undesirable_weight: float) -> list[str]:
    """Log lines on the desirable/undesirable balance of KTO training rows: the counts, and a notice when one side
    is empty (the loss then never sees the contrast KTO learns from) or the weighted ratio lambda_D n_D /
    (lambda_U n_U) is outside [1, 4/3], the range the KTO paper recommends (Ethayarajh et al. 2024)."""
    n_d = sum(1 for e in examples if e.label)
    n_u = len(examples) - n_d
    lines = [f"kto: {n_d} desirable and {n_u} undesirable training examples"]
    if not n_d or not n_u:
        side, other = ("desirable", "undesirable") if n_d else ("undesirable", "desirable")
        return lines + [f"note: every KTO training example is {side}: with no {other} one the loss has nothing to "
                        f"contrast them with; add rows labelled {str(not n_d).lower()} (or preference pairs)"]
    ratio = desirable_weight * n_d / (undesirable_weight * n_u)
    if not 1 <= ratio <= 4 / 3 + 1e-9:
        low, high = undesirable_weight * n_u / n_d, 4 / 3 * undesirable_weight * n_u / n_d
        lines.append(f"note: kto.desirable_weight x desirable / (kto.undesirable_weight x undesirable) = "
                     f"{desirable_weight:g} x {n_d} / ({undesirable_weight:g} x {n_u}) = {ratio:.2f}, outside the "
                     f"[1, 4/3] the KTO paper recommends; kto.desirable_weight between {low:.3g} and {high:.3g} "
                     f"would bring it in")
    return lines


# ---- what each stage accepts ----------------------------------------------------------------------------------

def wrong_kind(stage: str) -> RowProblem:
    """A conversation given to stage pt, or plain text to stage sft."""
    if stage == "pt":
        return RowProblem("messages", "stage pt trains on plain text (format text, a `text` column or .txt files); "
                                      "this row is a conversation, which is for stage sft")
    return RowProblem("text", "stage sft needs conversations (alpaca, sharegpt or openai rows); this is a "
                              "plain-text row, which is for stage pt")


def for_stage(example, stage: str, name: str | None = None) -> list:
    """The examples `stage` trains on from one read example; RowProblem, naming the training stage `name` (dpo
    for pairwise) when given, when the row's kind does not fit.
    Preference pairs also serve kto (chosen: desirable, rejected: undesirable; not typed rows of more than two
    ranks) and prompt (the prompt alone, once per row, its reference the row's answer column or the chosen reply);
    chat rows serve prompt (the conversation before the last reply, which becomes the reference unless the row is a
    KTO row labelled false)."""
    from tuneforge.data.preference import as_prompt

    is_pair, name = isinstance(example, PairExample), name or stage
    if stage in ("pt", "sft") and (is_pair or example.label is not None):
        raise RowProblem("chosen" if is_pair else "label",
                         f"this is alignment data ({'a preference pair' if is_pair else 'a KTO row'}), which stages "
                         f"pt and sft do not train on; use it with rm, dpo or kto")
    if (stage == "pt" and example.text is None) or (stage == "sft" and example.messages is None):
        raise wrong_kind(stage)  # said while reading, so a file of the other kind is one error, before the model
    if stage in ("pt", "sft"):
        return [example]
    if stage == "pairwise" and not is_pair:
        raise RowProblem("chosen", f"stage {name} needs preference pairs (`chosen` and `rejected`); this row is "
                                   f"{_kind_of(example)}")
    if is_pair and stage in ("kto", "prompt") and example.pair_index[1] > 1:
        if stage == "prompt":  # the pairs of one typed row share its prompt: sample it once
            return [pair_prompt(example)][:example.pair_index[0] == 1]
        if example.pair_index[0] > 1:
            return []  # the row is reported once, with its first pair
        raise RowProblem("responses", "typed responses of more than two ranks cannot become KTO rows (a middle-ranked "
                                      "response is better than one and worse than another); label each response "
                                      "desirable or not in kto rows (`label`)")
    if stage == "kto" and is_pair:
        return [Example(f"{example.source} (chosen)", messages=example.prompt + example.chosen, tools=example.tools,
                        label=True),
                Example(f"{example.source} (rejected)", messages=example.prompt + example.rejected,
                        tools=example.tools, label=False)]
    if stage == "prompt" and is_pair:
        return [pair_prompt(example)]
    if stage in ("kto", "prompt") and example.messages is None:
        raise RowProblem("text", f"stage {name} needs conversations; this is a plain-text row (for stage pt)")
    if stage == "prompt" and example.messages[-1]["role"] == "assistant":
        prompt = as_prompt(example)
        if example.label is False:  # an undesirable reply is no answer to aim at: only the row's own column counts
            prompt.reference = example.reference
        return [prompt]
    return [example]


def pair_prompt(example: PairExample) -> Example:
    """A pair's prompt for sampling; its reference is the row's `answer`/`reference` column, else the chosen reply
    (its last assistant text)."""
    replies = [m.get("content") for m in example.chosen if m["role"] == "assistant" and m.get("content")]
    reference = example.reference if example.reference is not None else (replies[-1] if replies else None)
    return Example(example.source, messages=example.prompt, tools=example.tools, reference=reference)


def _kind_of(example) -> str:
    if example.text is not None:
        return "plain text"
    if example.label is not None:
        return "a KTO row (one conversation with a label)"
    return "a single conversation"
