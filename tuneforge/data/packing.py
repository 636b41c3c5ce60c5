"""Packing: several encoded examples per row, without cross-contamination.

Rows are filled best-fit-decreasing (longest example first, each into the fullest row it still fits; ties keep
dataset order), which is deterministic and wastes little room. In each row:

- position ids restart at 0 for every example, which is how transformers (5.x) recognises packed sequences: when
  a batch has `position_ids` and no `attention_mask`, its mask builder gives every example its own causal block
  (for the sdpa, eager and flex kernels; for flash-attention the training loop turns the same position ids into
  the varlen kernel's `cu_seq_lens`, training/padding_free.py);
- the first label of every example is IGNORE_INDEX: it would otherwise be predicted from the previous example.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from tuneforge.data.types import IGNORE_INDEX, Encoded


@dataclass
class PackedRow(Encoded):
    """Several examples back to back; `position_ids` restart at 0 at each one, `sources` lists them."""

    position_ids: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def example_lengths(self) -> list[int]:
        """The tokens of each example in the row, from where its positions restart at 0."""
        starts = [i for i, p in enumerate(self.position_ids) if p == 0] + [len(self.position_ids)]
        return [b - a for a, b in zip(starts, starts[1:]) if b > a]


def pack(examples: list[Encoded], max_length: int) -> list[PackedRow]:
    """Pack examples (each at most max_length tokens) into rows of at most max_length tokens."""
    too_long = [e.source for e in examples if len(e) > max_length]
    if too_long:
        raise ValueError(f"{len(too_long)} examples exceed max_length {max_length} (first: {too_long[0]}); "
                         f"truncate or split them before packing")
    rows: list[list[Encoded]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted: the fullest row that fits comes first
    for index in sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i)):
        example = examples[index]
        at = bisect.bisect_left(free, (len(example), -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = max_length, len(rows)
            rows.append([])
        rows[row].append(example)
        bisect.insort(free, (room - len(example), row))
    return [join(row) for row in rows]


def join(examples: list[Encoded]) -> PackedRow:
    ids, labels, positions = [], [], []
    for example in examples:
        ids += example.input_ids
        labels += [IGNORE_INDEX] + list(example.labels[1:])
        positions += list(range(len(example)))
    return PackedRow(ids, labels, source=examples[0].source, position_ids=positions,
                     sources=[e.source for e in examples])
