"""Collate: encoded examples -> a batch of tensors, padded on the right.

Every key except `labels` goes straight into `model(**inputs)`:

- plain examples: `input_ids`, `attention_mask` (1 on real tokens), `labels` (IGNORE_INDEX on padding);
- packed rows (any `PackedRow` in the batch): `input_ids`, `position_ids`, `labels` and **no** `attention_mask`.
  transformers 5.x builds a block-diagonal causal mask from position ids that restart at 0 (its
  `find_packed_sequence_indices`) only when `attention_mask` is None; a 2D mask would switch that off and let
  examples see each other. Padding gets positions 0, 1, ... too, so it forms a block of its own and is never seen
  by a real token. (A 4D mask is also accepted by transformers, but eager wants it additive-float and sdpa boolean
  or of the query dtype; position ids work unchanged for sdpa, eager, flex and flash-attention.)

  The model must run without a KV cache (`model.config.use_cache = False`, as training sets it, or
  `use_cache=False` in the call): with a cache, transformers skips the packed-sequence detection and packed
  examples would attend to each other.
"""

from __future__ import annotations

import torch

from tuneforge.data.packing import PackedRow
from tuneforge.data.types import IGNORE_INDEX, Encoded


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


def _position_ids(batch: list[Encoded], width: int) -> torch.Tensor:
    rows = []
    for item in batch:
        positions = item.position_ids if isinstance(item, PackedRow) else list(range(len(item)))
        rows.append(list(positions) + list(range(width - len(item))))  # padding: a block of its own
    return torch.tensor(rows, dtype=torch.long)
