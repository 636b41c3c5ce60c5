"""The shapes that travel along the one data path.

raw row -> (format adapter) -> Example (messages or text) -> (chat template) -> Encoded (ids + labels) -> batch

Alignment data travels the same path: a preference pair is a `PairExample` (one prompt, two replies) -> `EncodedPair`;
a KTO row is an `Example` with a `label` -> `EncodedKTO`; a prompt for PPO/GRPO is an `Example` whose messages end
with the user's turn (and an optional `reference` answer) -> `EncodedPrompt`.
"""

from __future__ import annotations

import logging
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

from tuneforge.errors import DataError, UserError, counted

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that gets no loss (the convention of torch's cross_entropy and transformers)


@dataclass
class Example:
    """One validated row. Chat rows have `messages` ([{role, content, ...}], roles system/user/assistant/tool);
    pre-training rows have `text`. `source` says where it came from, e.g. 'data/train.jsonl:12'. KTO rows carry
    `label` (True: a desirable reply); prompt rows (messages ending with the user's turn) and chat rows may carry a
    `reference` answer that rule rewards compare against (the `answer`/`reference` column). `origins`: see below."""

    source: str
    messages: list[dict] | None = None
    text: str | None = None
    tools: list | None = None
    label: bool | None = None
    reference: str | None = None
    # The user's field each message came from (`messages[1]` -> `output`, `conversations[1].value`), so an error
    # found later (a special token, a byte that is not UTF-8) names the row's own field, not ours.
    origins: dict[str, str] | None = None


@dataclass
class PairExample:
    """A preference pair: the shared `prompt` (messages ending with the user's turn) and the `chosen` and
    `rejected` continuations (assistant turns, and any tool turns between them). `margin`: how much better chosen
    is, when the data says (a reward-model margin); `kinds`: (chosen type, rejected type) of typed responses;
    `reference`: the row's `answer`/`reference` column, for the pair's prompt used in ppo/grpo."""

    source: str
    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    tools: list | None = None
    margin: float | None = None
    kinds: tuple[str, str] | None = None
    pair_index: tuple[int, int] = (1, 1)  # (k, n): the k-th of the n pairs its row gave (typed rows give several)
    reference: str | None = None


@dataclass
class Encoded:
    """Token ids and labels (IGNORE_INDEX where no loss) of one example."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""
    truncated: bool = False  # cut before max_length was reached (a huge message; see encode.cap_contents)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class EncodedKTO(Encoded):
    """One KTO example: the conversation's ids and labels (the reply only) and whether the reply is desirable.
    `prompt_length`: tokens before the reply, so a batch can pair prompts with other rows' replies (KTO's KL
    reference point)."""

    label: bool = True
    prompt_length: int = 0


@dataclass
class EncodedPair:
    """Both sides of a preference pair, each the full conversation rendered with the chat template, labels on the
    reply only. `chosen_prompt_length` / `rejected_prompt_length`: tokens before each reply."""

    chosen: Encoded
    rejected: Encoded
    source: str = ""
    margin: float | None = None
    chosen_prompt_length: int = 0
    rejected_prompt_length: int = 0

    def __len__(self) -> int:  # the longer side decides the padded width (for group_by_length)
        return max(len(self.chosen), len(self.rejected))


@dataclass
class EncodedPrompt:
    """A prompt for sampling (PPO, GRPO): its ids rendered with the generation prompt, the messages (to render
    again, e.g. for a reward model with another template) and the reference answer when the row has one."""

    input_ids: list[int]
    messages: list[dict]
    reference: str | None = None
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


class RowProblem(Exception):
    """What is wrong with one row: the field (dotted path, e.g. `conversations[2].from`) and the problem."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


def bad_row(error: Exception, source: str, field: str = "<row>") -> BadRow:
    """The one guard of per-row work (reading, parsing, validating, rendering, tokenizing): whatever one row raises
    becomes a BadRow, so `data.on_error` decides and a single odd row never kills a run. Call it from an
    `except Exception` block. What is not about the row propagates: MemoryError, and user errors that are not data
    errors (a slow tokenizer, a bad config). An unexpected exception keeps its type in the problem text (and its
    traceback in the debug log), so a bug in TuneForge stays visible instead of passing for bad data."""
    if isinstance(error, MemoryError) or (isinstance(error, UserError) and not isinstance(error, DataError)):
        raise error
    if isinstance(error, RowProblem):
        return BadRow(source, error.field, error.problem)
    if isinstance(error, DataError):
        return BadRow(source, field, str(error))
    if isinstance(error, RecursionError):
        return BadRow(source, field, "nested too deeply to read (RecursionError); flatten this row")
    log.debug("Row %s raised an unexpected error", source, exc_info=error)
    return BadRow(source, field, f"cannot be processed ({type(error).__name__}: {error})")


@dataclass
class DataReport:
    """What happened to the rows, so nothing is dropped silently."""

    rows_read: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)  # sources of examples cut at max_length
    dropped_overlong: list[str] = field(default_factory=list)
    dropped_no_loss: list[str] = field(default_factory=list)  # e.g. the assistant reply was cut away entirely
    split_documents: list[str] = field(default_factory=list)  # pre-training documents cut into max_length chunks
    special_tokens: list[str] = field(default_factory=list)  # rows whose text spells a special token (kept/escaped)
    no_room: list[str] = field(default_factory=list)  # prompts that leave no room for a reply within max_length
    # (training examples, evaluation examples, max_length) before packing, when they were packed into rows
    packed: tuple[int, int, int, int] | None = None  # examples (train, eval), max_length, tokens in train rows
    notes: list[str] = field(default_factory=list)  # settings that had no effect on this data, said once
    # dataset (as named in data.train / data.eval) -> [rows read, bad rows]; and with data.mix, the rows drawn
    rows_per_dataset: dict[str, list[int]] = field(default_factory=dict)
    mixed: dict[str, int] | None = None
    # file -> (rows, placeholder names) of rows holding `{{name}}`-style placeholders (see data/placeholders.py)
    placeholders: dict[str, tuple[int, list[str]]] = field(default_factory=dict)
    # How many of `rows_read` and of each list above came from evaluation rows (`evaluation()`), and whether the
    # run has any: "12 bad rows skipped" sends a user to the training file when 10 of them were eval rows.
    eval_counts: Counter = field(default_factory=Counter)
    has_eval: bool = False

    @contextmanager
    def evaluation(self):
        """Count what the block adds to `rows_read` and the per-example lists as evaluation rows. The data path
        reads and encodes train and eval one after the other, so the growth inside the block is the eval share."""
        before = {name: self._size(name) for name in SPLIT_COUNTED}
        try:
            yield
        finally:
            for name in SPLIT_COUNTED:
                self.eval_counts[name] += self._size(name) - before[name]
            self.has_eval = self.has_eval or self.eval_counts["rows_read"] > 0

    def _size(self, name: str) -> int:
        value = getattr(self, name)
        return value if isinstance(value, int) else len(value)

    def train_eval(self, name: str) -> str:
        """'3 train, 2 eval' for the count `name`, when the run has evaluation rows ('' otherwise)."""
        if not self.has_eval:
            return ""
        evals = self.eval_counts[name]
        return f"{self._size(name) - evals} train, {evals} eval"

    def _apart(self, name: str) -> str:
        split = self.train_eval(name)
        return f": {split}" if split else ""

    def sizes_line(self, n_train: int, n_eval: int) -> str:
        """How many training and evaluation items there are. Packed rows are not examples: a reader who sees 19
        "examples" from 64 rows would think 45 were lost, so packing names both counts."""
        if self.packed is None:
            return f"{n_train} training and {n_eval} evaluation examples"
        train, evals, length, tokens = self.packed
        held_out = f"{evals} evaluation examples into {n_eval} rows" if evals else "0 evaluation examples"
        filled = f", {100 * tokens / max(n_train * length, 1):.1f}% filled" if n_train else ""
        return f"{train} training examples packed into {n_train} rows of {length} tokens{filled}; {held_out}"

    def count_row(self, dataset: str, bad: bool) -> None:
        counts = self.rows_per_dataset.setdefault(dataset, [0, 0])
        counts[0] += 1
        counts[1] += bad

    def _per_dataset(self) -> str:
        """Rows (and bad rows) per dataset, when there are several: a mix whose total looks right can still hide
        one file that gave nothing usable."""
        if len(self.rows_per_dataset) < 2:
            return ""
        parts = [f"{name} {rows}" + (f" ({bad} bad)" if bad else "")
                 for name, (rows, bad) in self.rows_per_dataset.items()]
        return f": {', '.join(parts)}"

    def lines(self) -> list[str]:
        # rows held out by data.eval_ratio are read as training rows: only data.eval files make eval rows read
        split = self.train_eval("rows_read") if self.eval_counts["rows_read"] else ""
        out = [f"{counted(self.rows_read, 'row')} read{f' ({split})' if split else ''}{self._per_dataset()}"]
        if self.mixed is not None:
            counts = ", ".join(f"{name} {n}" for name, n in self.mixed.items())
            out.append(f"data.mix drew {sum(self.mixed.values())} training examples ({counts})")
        if self.bad_rows:
            out.append(f"{counted(len(self.bad_rows), 'bad row')} skipped{self._apart('bad_rows')} (first: {self.bad_rows[0]})")
        if self.truncated:
            out.append(f"{counted(len(self.truncated), 'example')} truncated to max_length{self._apart('truncated')} (first: "
                       f"{self.truncated[0]})")
        if self.dropped_overlong:
            out.append(f"{counted(len(self.dropped_overlong), 'example')} over max_length dropped"
                       f"{self._apart('dropped_overlong')} (first: {self.dropped_overlong[0]})")
        if self.dropped_no_loss:
            out.append(f"{counted(len(self.dropped_no_loss), 'example')} dropped because no trainable token was left"
                       f"{self._apart('dropped_no_loss')} (first: {self.dropped_no_loss[0]})")
        if self.split_documents:
            out.append(f"{counted(len(self.split_documents), 'document')} longer than max_length split into chunks"
                       f"{self._apart('split_documents')} (first: {self.split_documents[0]})")
        if self.special_tokens:
            out.append(f"{counted(len(self.special_tokens), 'row')} spell{'s' * (len(self.special_tokens) == 1)} a special token of the tokenizer in their text"
                       f"{self._apart('special_tokens')} (data.special_tokens_in_text; first: "
                       f"{self.special_tokens[0]})")
        if self.no_room:
            out.append(f"{counted(len(self.no_room), 'example')} skipped because the prompt leaves no room for the reply within "
                       f"max_length{self._apart('no_room')} (raise data.max_length or shorten the prompts; first: "
                       f"{self.no_room[0]})")
        out += [f"warning: {placeholder_warning(file, n, names)}" for file, (n, names) in self.placeholders.items()]
        return out + [f"note: {note}" for note in self.notes]


# The DataReport counts that `DataReport.evaluation` splits into train and eval.
SPLIT_COUNTED = ("rows_read", "bad_rows", "truncated", "dropped_overlong", "dropped_no_loss", "split_documents",
                 "special_tokens", "no_room")


def placeholder_warning(file: str, rows: int, names: list[str]) -> str:
    """One paragraph on a file whose rows hold `{{name}}`-style placeholders (LLaMA-Factory's identity.json ships
    `{{name}}` and `{{author}}` for the user to fill in): trained as they are, the model learns the braces."""
    shown = ", ".join(f"{{{{{n}}}}}" for n in names)
    sed = "; ".join(f"s/{{{{{n}}}}}/YOUR_{n.upper()}/g" for n in names)
    rows_hold = "1 row contains" if rows == 1 else f"{rows} rows contain"
    return (f"{file}: {rows_hold} the placeholder{'s' if len(names) > 1 else ''} {shown}, which would be trained as "
            f"literal text. Replace them with real values before training, e.g. `sed -i '{sed}' {file}` (this "
            f"edits the file in place: keep a copy). Ignore this if the braces are meant literally (template code).")
