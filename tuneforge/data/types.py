"""The shapes that travel along the one data path.

raw row -> (format adapter) -> Example (messages or text) -> (chat template) -> Encoded (ids + labels) -> batch
"""

from __future__ import annotations

from dataclasses import dataclass, field

IGNORE_INDEX = -100  # label value that gets no loss (the convention of torch's cross_entropy and transformers)


@dataclass
class Example:
    """One validated row. Chat rows have `messages` ([{role, content, ...}], roles system/user/assistant/tool);
    pre-training rows have `text`. `source` says where it came from, e.g. 'data/train.jsonl:12'."""

    source: str
    messages: list[dict] | None = None
    text: str | None = None
    tools: list | None = None


@dataclass
class Encoded:
    """Token ids and labels (IGNORE_INDEX where no loss) of one example."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class BadRow:
    source: str  # file:line or file:record N
    field: str
    problem: str  # what was expected / what is wrong

    def __str__(self) -> str:
        return f"{self.source}: field `{self.field}`: {self.problem}"


@dataclass
class DataReport:
    """What happened to the rows, so nothing is dropped silently."""

    rows_read: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)  # sources of examples cut at max_length
    dropped_overlong: list[str] = field(default_factory=list)
    dropped_no_loss: list[str] = field(default_factory=list)  # e.g. the assistant reply was cut away entirely
    split_documents: list[str] = field(default_factory=list)  # pre-training documents cut into max_length chunks

    def lines(self) -> list[str]:
        out = [f"{self.rows_read} rows read"]
        if self.bad_rows:
            out.append(f"{len(self.bad_rows)} bad rows skipped (first: {self.bad_rows[0]})")
        if self.truncated:
            out.append(f"{len(self.truncated)} examples truncated to max_length (first: {self.truncated[0]})")
        if self.dropped_overlong:
            out.append(f"{len(self.dropped_overlong)} examples over max_length dropped (first: "
                       f"{self.dropped_overlong[0]})")
        if self.dropped_no_loss:
            out.append(f"{len(self.dropped_no_loss)} examples dropped because no trainable token was left "
                       f"(first: {self.dropped_no_loss[0]})")
        if self.split_documents:
            out.append(f"{len(self.split_documents)} documents longer than max_length split into chunks (first: "
                       f"{self.split_documents[0]})")
        return out
