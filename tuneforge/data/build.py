"""The one data path for every stage: dataset specs -> validated Examples -> Encoded (ids + labels) -> packed rows.

    train, evals, report = build_datasets(cfg.data, tokenizer, "sft", chat_template=cfg.model.chat_template)

Where a dataset comes from (`DatasetSpec.path`), in this order: a name in the registry (`data.registry`, a
LLaMA-Factory `dataset_info.json`); `builtin:<path>` under tuneforge/assets (e.g. builtin:example_task/train.jsonl);
a local file or folder (relative paths: the current folder first, then `base_dir`, usually the config's folder);
otherwise a Hugging Face hub dataset name.

Stages:
- sft: chat rows rendered with the chat template, loss on assistant replies (`data.loss_on`). Rows longer than
  `max_length` are truncated or dropped (`data.overlong`); rows left with no label token are dropped. Both counted.
- pt: text + eos (and bos where the tokenizer adds one), labels = input ids. Documents longer than `max_length` are
  split into max_length chunks (counted); packing is on unless `data.packing: false`.

Nothing is dropped silently: bad rows (reading, format, validation, rendering) raise one DataError listing them
(`data.on_error: raise`) or are skipped and listed in the report (`skip`); cuts are counted in the report.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from tuneforge.data import formats, readers
from tuneforge.data.encode import encode_chat
from tuneforge.data.packing import pack
from tuneforge.data.registry import Registry
from tuneforge.data.templates import resolve_chat_template
from tuneforge.data.types import IGNORE_INDEX, BadRow, DataReport, Encoded, Example
from tuneforge.errors import DataError
from tuneforge.models.loading import hub_offline, hub_reachable, looks_local

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
STAGES = ("pt", "sft")


def read_datasets(data_cfg, base_dir: str | Path | None = None) -> tuple[list[Example], list[Example], DataReport]:
    """Read and validate every row (train, eval) without a tokenizer. With `on_error: raise` a bad row fails here,
    before a recipe spends minutes loading the model."""
    report = DataReport()
    registry = open_registry(data_cfg.registry, base_dir)
    train_examples = load_examples(data_cfg.train, registry, base_dir, report)
    eval_examples = load_examples(data_cfg.eval, registry, base_dir, report)
    if not data_cfg.eval and data_cfg.eval_ratio > 0:
        train_examples, eval_examples = split_eval(train_examples, data_cfg.eval_ratio, data_cfg.seed)
    if data_cfg.on_error == "raise":
        check_bad_rows(report, data_cfg)
    return train_examples, eval_examples, report


def build_datasets(data_cfg, tokenizer, stage: str, chat_template: str | None = None,
                   base_dir: str | Path | None = None,
                   read: tuple[list[Example], list[Example], DataReport] | None = None,
                   ) -> tuple[list[Encoded], list[Encoded], DataReport]:
    """(train, eval, report) for `stage` (pt or sft); see the module docstring. `read`: the result of
    `read_datasets` when the caller validated the rows already."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    train_examples, eval_examples, report = read if read is not None else read_datasets(data_cfg, base_dir)
    template = resolve_chat_template(tokenizer, chat_template) if stage == "sft" else None
    train = encode_examples(train_examples, tokenizer, stage, data_cfg, template, report)
    evals = encode_examples(eval_examples, tokenizer, stage, data_cfg, template, report)
    check_bad_rows(report, data_cfg)
    if not train:
        raise DataError(f"No training examples left after reading {report.rows_read} rows. "
                        + "; ".join(report.lines()[1:]))
    if data_cfg.packing if data_cfg.packing is not None else stage == "pt":
        train, evals = pack(train, data_cfg.max_length), pack(evals, data_cfg.max_length)
    return train, evals, report


# ---- reading --------------------------------------------------------------------------------------------------

def open_registry(path: str | None, base_dir) -> Registry | None:
    if not path:
        return None
    found = find_local(path, base_dir)
    if found is None or not found.is_file():
        raise DataError(f"`data.registry` is {path}: no such file. Point it at a dataset_info.json.")
    return Registry(found)


def find_local(path: str, base_dir) -> Path | None:
    if path.startswith("builtin:"):
        candidate = ASSETS / path[len("builtin:"):]
        return candidate if candidate.exists() else None
    for root in (Path.cwd(), Path(base_dir) if base_dir else None):
        if root is not None and (root / Path(path).expanduser()).exists():
            return root / Path(path).expanduser()
    return None


def load_examples(specs: list, registry: Registry | None, base_dir, report: DataReport) -> list[Example]:
    """Read and validate every row of every spec; bad rows go to the report."""
    examples = []
    for spec in specs:
        for item in read_spec(spec, registry, base_dir)[:spec.max_samples]:
            report.rows_read += 1
            if isinstance(item, BadRow):
                report.bad_rows.append(item)
            else:
                examples.append(item)
    return examples


def read_spec(spec, registry: Registry | None, base_dir) -> list:
    """Examples and BadRows of one dataset spec, in file order."""
    if registry is not None and spec.path in registry:
        spec = registry.resolve(spec)
    local = find_local(spec.path, base_dir)
    if local is not None:
        rows = readers.read_local(local)
    elif readers.looks_like_local_path(spec.path) or spec.path.startswith("builtin:") or looks_local(spec.path):
        where = f"the current folder{' or ' + str(base_dir) if base_dir else ''}"
        hint = registry.hint(spec.path) if registry is not None else " (no `data.registry` is set)"
        raise DataError(f"Dataset {spec.path}: no such file or folder (relative paths are looked up in {where}).{hint}")
    else:
        try:
            rows = read_hub_or_cache(spec)
        except DataError as e:
            if registry is None:
                raise
            raise DataError(f"{e}{registry.hint(spec.path)}") from e
    return adapt_rows(rows, spec)


def read_hub_or_cache(spec) -> list:
    """A Hugging Face dataset; with the hub unreachable, from the local cache or a DataError in seconds (not after a
    minute of `datasets` retries)."""
    if hub_reachable():
        return readers.read_hub(spec.path, spec.split)
    with hub_offline():
        try:
            return readers.read_hub(spec.path, spec.split)
        except DataError as e:
            raise DataError(f"Dataset {spec.path}: no such file or folder, and not a Hugging Face dataset in the "
                            f"local cache either: the hub is unreachable from here. Check the path (relative paths "
                            f"start from the current folder) or add the name to the registry.") from e


def adapt_rows(rows: list, spec) -> list:
    formats_by_file: dict[str, str] = {}
    out = []
    for row in rows:
        if isinstance(row, BadRow):
            out.append(row)
            continue
        fmt = spec.format
        if fmt == "auto":
            if row.file not in formats_by_file:
                formats_by_file[row.file] = formats.guess_format(row.data, spec.columns, row.file)
            fmt = formats_by_file[row.file]
        try:
            out.append(formats.to_example(row.data, fmt, row.source, spec.columns, spec.tags))
        except formats.RowProblem as e:
            out.append(BadRow(row.source, e.field, e.problem))
    return out


def split_eval(examples: list[Example], ratio: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded random `ratio` share of the rows for evaluation (at least one when there are two or more)."""
    if len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * ratio)))
    held = set(order[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def check_bad_rows(report: DataReport, data_cfg) -> None:
    bad = report.bad_rows
    if not bad:
        return
    shown = bad[:data_cfg.max_errors_shown]
    listing = "\n".join(f"  - {b}" for b in shown)
    more = f"\n  ... and {len(bad) - len(shown)} more" if len(bad) > len(shown) else ""
    if data_cfg.on_error == "skip":
        log.warning("Skipping %d bad rows of %d:\n%s%s", len(bad), report.rows_read, listing, more)
        return
    raise DataError(f"{len(bad)} of {report.rows_read} data rows are bad:\n{listing}{more}\nFix these rows, or set "
                    f"`data.on_error=skip` to train without them (they are then counted and listed).")


# ---- encoding -------------------------------------------------------------------------------------------------

def encode_examples(examples: list[Example], tokenizer, stage: str, data_cfg, template: str | None,
                    report: DataReport) -> list[Encoded]:
    out = []
    for example in examples:
        try:
            if stage == "sft":
                out += fit_length(encode_sft(example, tokenizer, data_cfg, template), data_cfg, report)
            else:
                out += encode_pt(example, tokenizer, data_cfg.max_length, report)
        except (DataError, formats.RowProblem) as e:
            field = e.field if isinstance(e, formats.RowProblem) else "messages"
            problem = e.problem if isinstance(e, formats.RowProblem) else str(e)
            report.bad_rows.append(BadRow(example.source, field, problem))
    return out


def encode_sft(example: Example, tokenizer, data_cfg, template: str) -> Encoded:
    if example.messages is None:
        raise formats.RowProblem("text", "stage sft needs conversations (alpaca, sharegpt or openai rows); this is a "
                                         "plain-text row, which is for stage pt")
    messages = example.messages
    if data_cfg.system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": data_cfg.system}, *messages]
    encoded = encode_chat(tokenizer, messages, tools=example.tools, loss_on=data_cfg.loss_on,
                          chat_template=template)
    encoded.source = example.source
    return encoded


def fit_length(encoded: Encoded, data_cfg, report: DataReport) -> list[Encoded]:
    """Truncate or drop an over-long example, and drop one left with nothing to learn; each counted once."""
    cut = len(encoded) > data_cfg.max_length
    if cut and data_cfg.overlong == "drop":
        report.dropped_overlong.append(encoded.source)
        return []
    if cut:
        encoded = Encoded(encoded.input_ids[:data_cfg.max_length], encoded.labels[:data_cfg.max_length],
                          encoded.source)
    if all(label == IGNORE_INDEX for label in encoded.labels[1:]):  # label 0 is never predicted
        report.dropped_no_loss.append(encoded.source)
        return []
    if cut:
        report.truncated.append(encoded.source)
    return [encoded]


def encode_pt(example: Example, tokenizer, max_length: int, report: DataReport) -> list[Encoded]:
    """Text + eos (+ bos where the tokenizer adds one) in max_length chunks; labels are the ids."""
    if example.text is None:
        raise formats.RowProblem("messages", "stage pt trains on plain text (format text, a `text` column or .txt "
                                             "files); this row is a conversation, which is for stage sft")
    ids = list(tokenizer(example.text)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    if len(ids) > max_length:
        report.split_documents.append(example.source)
    chunks = []
    for k, start in enumerate(range(0, len(ids), max_length)):
        piece = ids[start:start + max_length]
        source = example.source if start == 0 else f"{example.source} (part {k + 1})"
        if len(piece) < 2:  # one token predicts nothing
            report.dropped_no_loss.append(source)
            continue
        chunks.append(Encoded(piece, list(piece), source))
    return chunks
