"""Collate: encoded examples -> a batch of tensors, padded on the right.

Every key except `labels` goes straight into `model(**inputs)`:

- plain examples: `input_ids`, `attention_mask` (1 on real tokens), `labels` (IGNORE_INDEX on padding);
- packed rows (any `PackedRow` in the batch): `input_ids`, `position_ids`, `labels` and **no** `attention_mask`.
  transformers 5.x builds a block-diagonal causal mask from position ids that restart at 0 (its
  `find_packed_sequence_indices`) only when `attention_mask` is None; a 2D mask would switch that off and let
  examples see each other. Padding gets positions 0, 1, ... too, so it forms a block of its own and is never seen
  by a real token. (A 4D mask is also accepted by transformers, but eager wants it additive-float and sdpa boolean
  or of the query dtype; position ids work unchanged for sdpa, eager and flex. FlashAttention needs the sequence
  boundaries as `cu_seq_lens` when a batch has more than one row: the training loop adds them,
  training/padding_free.py.)

  The model must run without a KV cache (`model.config.use_cache = False`, as training sets it, or
  `use_cache=False` in the call): with a cache, transformers skips the packed-sequence detection and packed
  examples would attend to each other.
- padding-free (`collate_padding_free`, `training.padding_free`): the whole micro-batch as one row, position ids
  restarting per example, no mask and no padding; FlashAttention's varlen kernel runs it (training/padding_free.py).

Alignment batches (`collate_pairs`, `collate_kto`, `collate_prompts`) add keys that are not model inputs (named
below); a recipe pops them before `model(**inputs)`.
"""

from __future__ import annotations

import torch

from tuneforge.data.packing import PackedRow
from tuneforge.data.types import IGNORE_INDEX, Encoded, EncodedKTO, EncodedPair, EncodedPrompt


def collate(batch: list[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    if pad_token_id is None:
        raise ValueError("collate needs a pad token id (the tokenizer's pad or eos token)")
    width = max(len(item) for item in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(batch):
        input_ids[row, :len(item)] = torch.tensor(item.input_ids, dtype=torch.long)
        labels[row, :len(item)] = torch.tensor(item.labels, dtype=torch.long)
    if any(isinstance(item, PackedRow) for item in batch):
        return {"input_ids": input_ids, "position_ids": _position_ids(batch, width), "labels": labels}
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        attention_mask[row, :len(item)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_padding_free(batch: list[Encoded], pad_token_id: int | None = None) -> dict[str, torch.Tensor]:
    """The micro-batch as ONE row of its examples end to end (TRL's `padding_free`, transformers'
    `DataCollatorWithFlattening`): `input_ids`, `position_ids` restarting at 0 per example (a packed row keeps its
    own), `labels` with each example's first label ignored (it would be predicted from the previous example; the
    padded batch never predicts it either), no `attention_mask` and not one padding position. For FlashAttention
    varlen (training/padding_free.py); `pad_token_id` is unused, kept for the collate signature."""
    ids, labels, positions = [], [], []
    for item in batch:
        ids += item.input_ids
        labels += [IGNORE_INDEX] + list(item.labels[1:])
        positions += list(item.position_ids) if isinstance(item, PackedRow) else list(range(len(item)))
    return {"input_ids": torch.tensor([ids], dtype=torch.long), "position_ids": torch.tensor([positions]),
            "labels": torch.tensor([labels], dtype=torch.long)}


def _position_ids(batch: list[Encoded], width: int) -> torch.Tensor:
    rows = []
    for item in batch:
        positions = item.position_ids if isinstance(item, PackedRow) else list(range(len(item)))
        rows.append(list(positions) + list(range(width - len(item))))  # padding: a block of its own
    return torch.tensor(rows, dtype=torch.long)


def collate_pairs(batch: list[EncodedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """2B rows, the B chosen sides then the B rejected ones (one forward serves both: row i and row B + i are a
    pair), padded to one width. Extra key: `margin` (B floats, 0 where the data gives none)."""
    out = collate([p.chosen for p in batch] + [p.rejected for p in batch], pad_token_id)
    out["margin"] = torch.tensor([p.margin or 0.0 for p in batch], dtype=torch.float)
    return out


def collate_pairs_padding_free(batch: list[EncodedPair], pad_token_id: int | None = None) -> dict[str, torch.Tensor]:
    """`collate_pairs` as ONE row: the B chosen sides then the B rejected ones end to end (`collate_padding_free`),
    plus `sequence_ids` (which of the 2B sequences each position belongs to, for the per-sequence log-prob sums) and
    `margin`. No position is padding."""
    sides = [p.chosen for p in batch] + [p.rejected for p in batch]
    out = collate_padding_free(sides)
    out["sequence_ids"] = torch.tensor([[i for i, side in enumerate(sides) for _ in range(len(side))]])
    out["margin"] = torch.tensor([p.margin or 0.0 for p in batch], dtype=torch.float)
    return out


def collate_kto(batch: list[EncodedKTO], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The B conversations plus, for KTO's KL reference point, B mismatched ones: row i's prompt with row
    (i + 1) % B's reply (as TRL builds them). Extra keys: `kto_label` (B bools) and `kl_input_ids`,
    `kl_attention_mask`, `kl_labels` (the mismatched batch, cut to the batch's width so it never exceeds
    max_length; with B = 1 it is the row itself)."""
    out = collate(batch, pad_token_id)
    out["kto_label"] = torch.tensor([item.label for item in batch], dtype=torch.bool)
    kl = collate(_mismatched(batch), pad_token_id)
    out.update({f"kl_{key}": value for key, value in kl.items()})
    return out


def collate_kto_padding_free(batch: list[EncodedKTO], pad_token_id: int | None = None) -> dict[str, torch.Tensor]:
    """`collate_kto` as ONE row: the B conversations then their B mismatched ones end to end, with `sequence_ids`
    (for the per-sequence log-prob sums) and `kto_label`. No position is padding."""
    sequences = list(batch) + _mismatched(batch)
    out = collate_padding_free(sequences)
    out["sequence_ids"] = torch.tensor([[i for i, seq in enumerate(sequences) for _ in range(len(seq))]])
    out["kto_label"] = torch.tensor([item.label for item in batch], dtype=torch.bool)
    return out


def _mismatched(batch: list[EncodedKTO]) -> list[Encoded]:
    """Row i's prompt with row (i + 1) % B's reply, cut to the batch's longest row (never past max_length)."""
    width, out = max(len(item) for item in batch), []
    for i, item in enumerate(batch):
        other = batch[(i + 1) % len(batch)]
        cut = other.prompt_length
        out.append(Encoded((item.input_ids[:item.prompt_length] + other.input_ids[cut:])[:width],
                           ([IGNORE_INDEX] * item.prompt_length + other.labels[cut:])[:width]))
    return out


def collate_prompts(batch: list[EncodedPrompt], pad_token_id: int) -> dict:
    """Prompts padded on the **left**, so every row ends where sampling begins: `input_ids`, `attention_mask`.
    Extra keys (lists, not tensors): `messages` (the rendered conversations) and `reference` (answers or None)."""
    width = max(len(item) for item in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        input_ids[row, width - len(item):] = torch.tensor(item.input_ids, dtype=torch.long)
        attention_mask[row, width - len(item):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "messages": [item.messages for item in batch],
            "reference": [item.reference for item in batch]}


def collate_for(stage: str, padding_free: bool = False):
    """The collate function of a data stage (pt, sft, pairwise, kto, prompt) or training stage (dpo, grpo, ...);
    `padding_free`: its one-row form (stages pt, sft, dpo and kto: training/padding_free.py)."""
    from tuneforge.data.build import DATA_STAGE

    data_stage = DATA_STAGE.get(stage, stage)
    if padding_free:
        return {"pairwise": collate_pairs_padding_free, "kto": collate_kto_padding_free}.get(data_stage,
                                                                                          collate_padding_free)
    by_data = {"pairwise": collate_pairs, "kto": collate_kto, "prompt": collate_prompts}
    return by_data.get(data_stage, collate)
