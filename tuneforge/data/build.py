"""The one data path for every stage: dataset specs -> validated Examples -> Encoded (ids + labels) -> packed rows.

    train, evals, report = build_datasets(cfg.data, tokenizer, "sft", chat_template=cfg.model.chat_template)

Where a dataset comes from (`DatasetSpec.path`), in this order: a name in the registry (`data.registry`, a
LLaMA-Factory `dataset_info.json`); `builtin:<path>` under tuneforge/assets (e.g. builtin:example_task/train.jsonl);
a local file or folder (relative paths: the current folder first, then `base_dir`, usually the config's folder);
otherwise a Hugging Face hub dataset name (`split` picks its split; a local file has none, so `split` on one is
refused). The specs themselves (`max_samples`, the roles in `columns`, `data.mix`) are checked first (specs.py).

Stages:
- sft: chat rows rendered with the chat template, loss on assistant replies (`data.loss_on`). Rows longer than
  `max_length` are truncated or dropped (`data.overlong`); rows left with no label token are dropped. Both counted.
- pt: text + eos (and bos where the tokenizer adds one), labels = input ids. Documents longer than `max_length` are
  split into max_length chunks (counted); packing is on unless `data.packing: false`.
- pairwise (rm, dpo, coh): preference pairs -> `EncodedPair`; kto: labelled conversations (or pairs, each side
  labelled) -> `EncodedKTO`; prompt (ppo, grpo): prompts (or chat rows and pairs, cut before the reply) ->
  `EncodedPrompt`. See encode_align.py for lengths; these stages never pack.

Nothing is dropped silently: bad rows (reading, format, validation, rendering, tokenizing: whatever one row
raises, see `types.bad_row`) raise one DataError listing them (`data.on_error: raise`) or are skipped and listed in
the report (`skip`); cuts are counted in the report. A file without rows, or no training row left after reading,
fails in `read_datasets`, before the model loads; when no training row is of a kind the stage uses (SFT rows for
dpo), one error names each file and what it holds instead of listing every row. Data text that spells a special token of the tokenizer follows
`data.special_tokens_in_text` (a bad row, escaped, or kept; counted).
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from tuneforge.data import encode_align, formats, readers
from tuneforge.data.encode import CHARS_PER_TOKEN, TEMPLATE_FAILS, encode_chat, special_tokens_in
from tuneforge.data.packing import pack
from tuneforge.data.placeholders import count_placeholders
from tuneforge.data.registry import Registry
from tuneforge.data.specs import check_data_config
from tuneforge.data.templates import resolve_chat_template
from tuneforge.data.types import IGNORE_INDEX, BadRow, DataReport, Encoded, Example, PairExample, RowProblem, bad_row
from tuneforge.errors import ConfigError, DataError, close_name_near
from tuneforge.models.loading import hub_offline, hub_reachable, looks_local

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
STAGES = ("pt", "sft", "pairwise", "kto", "prompt")
# The data each training stage reads (`build_datasets` takes either name).
DATA_STAGE = {"pt": "pt", "sft": "sft", "rm": "pairwise", "dpo": "pairwise", "coh": "pairwise", "kto": "kto",
              "ppo": "prompt", "grpo": "prompt"}
ALIGN_ENCODERS = {"pairwise": encode_align.encode_pair, "kto": encode_align.encode_kto,
                  "prompt": encode_align.encode_prompt_example}


def read_datasets(data_cfg, base_dir: str | Path | None = None, stage: str | None = None,
                  ) -> tuple[list[Example], list[Example], DataReport]:
    """Read and validate every row (train, eval) without a tokenizer. With `on_error: raise` a bad row fails here,
    before a recipe spends minutes loading the model. `stage` (optional): rows of a kind the stage does not train
    on (a preference pair in sft, a plain conversation in dpo) are bad rows here too."""
    check_data_config(data_cfg)
    report = DataReport()
    registry = open_registry(data_cfg.registry, base_dir)
    kind = DATA_STAGE.get(stage, stage)
    if data_cfg.mix is not None:
        groups = load_groups(data_cfg.train, registry, base_dir, report, kind)
        train_examples = mixed(groups, data_cfg)
        report.mixed = mixed_counts(data_cfg.train, groups, train_examples)
    else:
        train_examples = load_examples(data_cfg.train, registry, base_dir, report, kind)
    train_rows = report.rows_read  # the messages below count training rows; rows_read counts the eval rows too
    with report.evaluation():
        eval_examples = load_examples(data_cfg.eval, registry, base_dir, report, kind)
    if stage is not None:
        train_examples, eval_examples = fit_stage(train_examples, eval_examples, report, stage)
    if not data_cfg.eval and data_cfg.eval_ratio > 0:
        train_examples, eval_examples = split_eval(train_examples, data_cfg.eval_ratio, data_cfg.seed)
    elif data_cfg.eval_ratio > 0:  # both set: data.eval wins (as its help says), but say so
        report.notes.append(f"data.eval_ratio {data_cfg.eval_ratio:g} is not used: data.eval names the evaluation "
                            f"rows, so no training row is held out")
    report.has_eval = report.has_eval or bool(eval_examples)  # held out by eval_ratio: counted apart from here on
    if data_cfg.on_error == "raise":
        check_bad_rows(report, data_cfg)
    if data_cfg.train and not train_examples:
        check_bad_rows(report, data_cfg)  # lists what was skipped
        raise DataError(" ".join([f"No training rows left: all {train_rows} training rows read are bad.",
                                  "; ".join(report.lines()[1:])]).rstrip())
    return train_examples, eval_examples, report


def build_datasets(data_cfg, tokenizer, stage: str, chat_template: str | None = None,
                   base_dir: str | Path | None = None,
                   read: tuple[list[Example], list[Example], DataReport] | None = None,
                   ) -> tuple[list[Encoded], list[Encoded], DataReport]:
    """(train, eval, report) for `stage` (pt, sft, pairwise, kto or prompt, or a training stage such as dpo, see
    DATA_STAGE); see the module docstring. `read`: the result of
    `read_datasets` when the caller validated the rows already."""
    name, stage = stage, DATA_STAGE.get(stage, stage)
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES} or a training stage {tuple(DATA_STAGE)}, got {stage!r}")
    train_examples, eval_examples, report = read if read is not None else read_datasets(data_cfg, base_dir, name)
    template = resolve_chat_template(tokenizer, chat_template) if stage != "pt" else None
    train = encode_examples(train_examples, tokenizer, stage, data_cfg, template, report)
    with report.evaluation():
        evals = encode_examples(eval_examples, tokenizer, stage, data_cfg, template, report)
    check_bad_rows(report, data_cfg)
    if not train:  # rows_read counts the eval rows too: name the training examples that were lost
        raise DataError(f"No training examples left: none of the {len(train_examples)} training examples read is "
                        f"left after encoding ({report.rows_read} rows read in all, training and evaluation). "
                        + "; ".join(report.lines()[1:]))
    if stage in ("pt", "sft") and (data_cfg.packing if data_cfg.packing is not None else stage == "pt"):
        n_train, n_eval = len(train), len(evals)
        train, evals = pack(train, data_cfg.max_length), pack(evals, data_cfg.max_length)
        report.packed = (n_train, n_eval, data_cfg.max_length, sum(len(row) for row in train))
    return train, evals, report


# ---- reading --------------------------------------------------------------------------------------------------

def open_registry(path: str | None, base_dir) -> Registry | None:
    if not path:
        return None
    found = find_local(path, base_dir)
    if found is not None and found.is_dir():  # LLaMA-Factory names the folder (dataset_dir); we want the file
        inside = found / "dataset_info.json"
        fix = (f"give the file inside it, {Path(path) / 'dataset_info.json'}" if inside.is_file()
               else "give the dataset_info.json file itself")
        raise DataError(f"The dataset registry (`data.registry`, or --registry of the data tools) is {path}, a "
                        f"folder: {fix}.")
    if found is None:
        raise DataError(f"`data.registry` is {path}: no such file. Point it at a dataset_info.json.")
    return Registry(found)


def nearby_file_hint(path: str, base_dir=None) -> str:
    """A close name in the missing data path's folder (`close_name_near`, from the current folder or the config's,
    as find_local looks), or a note that the folder itself is missing; '' when neither helps."""
    hint = close_name_near(path, [base_dir])
    folder = Path(path).expanduser().parent
    beside_config = base_dir is not None and not folder.is_absolute() and (Path(base_dir) / folder).is_dir()
    there = folder.is_dir() or beside_config
    return hint or ("" if there or str(folder) in ("", ".") else f" Its folder {folder} does not exist either.")


def find_local(path: str, base_dir) -> Path | None:
    if path.startswith("builtin:"):
        candidate = ASSETS / path[len("builtin:"):]
        return candidate if candidate.exists() else None
    for root in (Path.cwd(), Path(base_dir) if base_dir else None):
        if root is not None and (root / Path(path).expanduser()).exists():
            return root / Path(path).expanduser()
    return None


def fit_stage(train: list, evals: list, report: DataReport, name: str) -> tuple[list, list]:
    """The train and eval examples of a kind the training stage `name` uses (errors name it, dpo, not the kind of
    data it reads, pairwise); the others are bad rows, or one error when no training row fits."""
    stage = DATA_STAGE.get(name, name)
    fitting, unfit = fitting_stage(train, stage, report, name)
    if not fitting:
        check_some_file_fits(unfit, stage, name)
    with report.evaluation():
        return fitting, fitting_stage(evals, stage, report, name)[0]


def fitting_stage(examples: list, stage: str, report: DataReport, name: str | None = None) -> tuple[list, list]:
    """(the examples whose kind `stage` trains on, the others), the others as bad rows too (see
    encode_align.for_stage). `name`: the training stage, for the messages."""
    kept, unfit = [], []
    for example in examples:
        try:
            check_kto_label(encode_align.for_stage(example, stage, name), stage)
            kept.append(example)
        except Exception as e:  # noqa: BLE001 - the row guard (see types.bad_row)
            report.bad_rows.append(bad_row(e, example.source))
            unfit.append(example)
    return kept, unfit


def check_kto_label(items: list, stage: str) -> None:
    """A chat row without a label cannot train kto: said while reading, before the model loads, not when
    encoding."""
    if stage == "kto" and any(item.label is None for item in items):
        raise RowProblem("label", "stage kto needs a boolean `label` per conversation (true: a desirable reply), or "
                                  "preference pairs (chosen: true, rejected: false); this row has none")


# What each data stage trains on, and which stages each kind of example suits (for `check_some_file_fits`).
STAGE_NEEDS = {"pairwise": "preference pairs (`prompt`, `chosen` and `rejected` per row: format pairwise)",
               "kto": "conversations with a boolean `label` (format kto), or preference pairs",
               "prompt": "prompts, conversations or preference pairs", "sft": "conversations (alpaca, sharegpt or "
               "openai rows)", "pt": "plain text (format text)"}
KINDS = {"pairs": ("preference pairs", "rm, dpo, coh or kto"), "kto": ("KTO rows", "kto"),
         "chat": ("SFT chat rows", "sft"), "text": ("plain-text rows", "pt")}
ACCEPTS = {"pairwise": ("pairs",), "kto": ("pairs", "kto"), "prompt": ("pairs", "kto", "chat"), "sft": ("chat",),
           "pt": ("text",)}


def kind_of(example) -> str:
    """The key in KINDS of a read example."""
    if isinstance(example, PairExample):
        return "pairs"
    if example.label is not None:
        return "kto"
    return "chat" if example.messages is not None else "text"


def check_some_file_fits(unfit: list, stage: str, name: str) -> None:
    """When no training row is of a kind the stage trains on (SFT rows given to dpo), one error naming each file,
    what it holds and what the stage needs: not N identical bad rows and advice to skip them, which leaves nothing.
    A single row keeps its own message (it says as much), as do rows of a kind the stage does take (typed rows of
    three ranks in kto)."""
    held: dict[str, Counter] = {}
    for example in unfit:
        held.setdefault(row_of(example).rsplit(":", 1)[0], Counter())[kind_of(example)] += 1
    if len(unfit) < 2 or any(kind in ACCEPTS[stage] for kinds in held.values() for kind in kinds):
        return
    files = "; ".join(f"{file} holds " + " and ".join(f"{n} {KINDS[k][0]} (data for stage {KINDS[k][1]})"
                                                      for k, n in kinds.items()) for file, kinds in held.items())
    raise DataError(f"No training row fits stage {name}: {files}. Stage {name} trains on {STAGE_NEEDS[stage]}. Point "
                    f"`data.train` at such data (README: Data formats), or train this data with the stage named "
                    f"for it.")


def load_examples(specs: list, registry: Registry | None, base_dir, report: DataReport,
                  stage: str | None = None) -> list[Example]:
    """Read and validate every row of every spec; bad rows go to the report. `stage`: the data stage read for, when
    known (it helps `format: auto`, see formats.guess_format)."""
    return [example for group in load_groups(specs, registry, base_dir, report, stage) for example in group]


def load_groups(specs: list, registry: Registry | None, base_dir, report: DataReport,
                stage: str | None = None) -> list[list[Example]]:
    """The examples of each spec (a list per spec, in spec order); bad rows go to the report."""
    groups = []
    for spec in specs:
        examples = []
        for item in read_spec(spec, registry, base_dir, stage)[:spec.max_samples]:
            report.rows_read += 1
            report.count_row(spec.path, isinstance(item, BadRow))
            if isinstance(item, BadRow):
                report.bad_rows.append(item)
            elif isinstance(item, list):  # a typed row: one pair per ordered pair of its responses
                examples += item
            else:
                examples.append(item)
        count_placeholders(examples, report)
        groups.append(examples)
    return groups


def mixed(groups: list[list[Example]], data_cfg) -> list[Example]:
    """`data.mix`: the train datasets mixed by `tuneforge data mix`'s allocation (one implementation), seeded by
    `data.seed` so a resumed run draws the same rows. A dataset with no usable rows takes no share. The settings
    were checked in `read_datasets` (specs.mix_problems)."""
    from tuneforge.data.curate.mix import draw

    mix, usable = data_cfg.mix, [g for g in groups if g]
    if not usable:
        return []
    size = mix.size if mix.size is not None else sum(len(g) for g in usable)
    picked, _ = draw(usable, mix.strategy, mix.T, mix.K, size, data_cfg.seed, shuffle=True)
    return [example for _, example in picked]


def mixed_counts(specs: list, groups: list[list[Example]], drawn: list[Example]) -> dict[str, int]:
    """How many of the drawn examples came from each train dataset (an example object belongs to one group)."""
    origin = {id(example): spec.path for spec, group in zip(specs, groups) for example in group}
    counts = {spec.path: 0 for spec in specs}
    for example in drawn:
        counts[origin[id(example)]] += 1
    return counts


def read_spec(spec, registry: Registry | None, base_dir, stage: str | None = None) -> list:
    """Examples and BadRows of one dataset spec, in file order (`stage`: see load_examples)."""
    if registry is not None and spec.path in registry:
        spec, rows = read_registry_entry(spec, registry)
    else:
        rows = read_source(spec, registry, base_dir)
    return adapt_rows(rows, spec, stage)


def read_registry_entry(spec, registry: Registry) -> tuple:
    """(the spec with the entry's settings, its rows). The entry's file is next to the registry, so a missing one
    is the entry's fault, not a path to look up elsewhere."""
    name = spec.path
    missing = registry.missing_file(name)
    if missing is not None:
        raise registry.missing_file_error(name, missing)
    spec = registry.resolve(spec)
    local = find_local(spec.path, None)
    if local is not None:
        return spec, read_local_spec(spec, local)
    try:
        return spec, read_hub_or_cache(spec)
    except DataError as e:
        raise registry.hub_error(name, spec.path, hub_reachable(), root_cause(e)) from e


def read_source(spec, registry: Registry | None, base_dir) -> list:
    """The rows of a path or hub name that is not a registry name."""
    local = find_local(spec.path, base_dir)
    if local is not None:
        return read_local_spec(spec, local)
    if readers.looks_like_local_path(spec.path) or spec.path.startswith("builtin:") or looks_local(spec.path):
        where = f"the current folder, {Path.cwd()}{', or ' + str(base_dir) if base_dir else ''}"
        hint = (registry.suggestion(spec.path) if registry is not None else "") or nearby_file_hint(spec.path, base_dir)
        raise DataError(f"Dataset {spec.path}: no such file or folder (relative paths are looked up in {where})."
                        f"{hint or ' Check the path, or set it relative to the folder you run tuneforge from.'}")
    try:
        return read_hub_or_cache(spec)
    except DataError as e:
        if registry is None:  # a LLaMA-Factory name (alpaca_en_demo) without the dataset_info.json that lists it
            raise DataError(f"{e} For a name listed in a dataset_info.json (LLaMA-Factory's data/dataset_info.json), "
                            f"set `data.registry` to that file.") from e
        raise DataError(f"{e}{registry.hint(spec.path)}") from e


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
                            f"start from the current folder).") from e


def read_local_spec(spec, local: Path) -> list:
    """The rows of a local file or folder (see `check_no_split`)."""
    check_no_split(spec, local)
    return readers.read_local(local)


def check_no_split(spec, local: Path) -> None:
    """`split` picks a split of a hub dataset; a local file has none, so a split other than the default is refused
    rather than silently ignored (which would train on rows the user meant to hold out)."""
    if spec.split != "train":
        raise ConfigError(f"Dataset {spec.path}: `split: {spec.split}` selects a split of a Hugging Face hub dataset, "
                          f"but {local} is local and has no splits. Remove `split`, or point `path` at the file "
                          f"that holds the {spec.split} rows.")


def root_cause(error: BaseException) -> BaseException:
    """What the library raised first, under our DataErrors."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


class FirstRow(NamedTuple):
    """What `format: auto` learnt from a file's first row: the format, where (`line 1`) and the fields of that
    format the row has."""

    format: str
    where: str
    fields: set[str]


def adapt_rows(rows: list, spec, stage: str | None = None) -> list:
    """Each raw row as an Example (or a list of pairs), or a BadRow. `format: auto` guesses each file's format from
    its first row (`stage`: see load_examples)."""
    firsts: dict[str, FirstRow] = {}
    out = []
    for row in rows:
        if isinstance(row, BadRow):
            out.append(row)
            continue
        if spec.format == "auto" and row.file not in firsts:
            try:
                firsts[row.file] = first_row(row, spec, stage)
            except DataError:  # no format fits the file's first row: a file error
                raise
            except Exception as e:  # noqa: BLE001 - the row guard; the next row may tell the format
                out.append(bad_row(e, row.source))
                continue
        fmt = firsts[row.file].format if spec.format == "auto" else spec.format
        try:
            out.append(formats.to_example(row.data, fmt, row.source, spec.columns, spec.tags, spec.ranking))
        except Exception as e:  # noqa: BLE001 - the row guard (see types.bad_row)
            bad = bad_row(e, row.source)
            out.append(other_format(bad, row, spec, firsts[row.file], stage) if spec.format == "auto" else bad)
    check_labels_not_all_ints(rows, spec, firsts)
    return out


def first_row(row, spec, stage: str | None) -> FirstRow:
    fmt = formats.guess_format(row.data, spec.columns, row.file, stage)
    return FirstRow(fmt, row.source.rsplit(":", 1)[-1], set(row.data) & formats.format_fields(fmt, spec.columns))


def other_format(bad: BadRow, row, spec, first: FirstRow, stage: str | None = None) -> BadRow:
    """A bad row of a file whose format was guessed from its first row: when the row itself is of another format,
    say so; the adapter's own complaint (`instruction` missing, map a column to it) would mislead. A damaged row of
    the file's format keeps that complaint (see `damaged_row_of`)."""
    try:
        looks = formats.guess_format(row.data, spec.columns, row.file, stage)
    except Exception:  # noqa: BLE001 - the row fits no format either: the adapter's complaint stands
        return bad
    if looks == first.format or damaged_row_of(row.data, looks, first, spec.columns):
        return bad
    return BadRow(bad.source, "<row>", f"this row looks like {looks}, but the file's format was detected as "
                                       f"{first.format} from its {first.where} (format auto reads each file in one "
                                       f"format). Keep one format per file, or convert this row to {first.format}.")


def damaged_row_of(data: dict, looks: str, first: FirstRow, columns: dict) -> bool:
    """Whether a row that reads as format `looks` is rather a damaged row of the file's format: it has at least half
    of the format's fields that the first row has, and no field of `looks` that the file's format does not read. A
    pair without `rejected` reads as a prompt row and a KTO row with `label: 1` as a chat row, yet "rejected:
    missing" and "label: expected a boolean" are what the user needs to hear."""
    foreign = (set(data) & formats.format_fields(looks, columns)) - formats.format_fields(first.format, columns)
    return not foreign and 2 * len(first.fields & set(data)) >= len(first.fields)


def check_labels_not_all_ints(rows: list, spec, firsts: dict[str, FirstRow]) -> None:
    """A KTO file whose every label is the integer 0 or 1 (written for a tool that counts) is one error about the
    file, not one bad row per line."""
    labels: dict[tuple[str, str], list] = {}  # (file, label column) -> the labels
    for row in (r for r in rows if not isinstance(r, BadRow)):
        if (firsts[row.file].format if row.file in firsts else spec.format) == "kto":
            field = label_field(row.data, spec.columns)
            labels.setdefault((row.file, field), []).append(row.data.get(field))
    for (file, field), values in labels.items():
        if all(type(v) is int and v in (0, 1) for v in values):
            raise DataError(f"{file}: every `{field}` is the integer 0 or 1 ({len(values)} rows), but KTO labels are "
                            f"booleans: write true (a desirable reply) for 1 and false (an undesirable one) for 0. "
                            f"The strings \"true\" and \"false\" are accepted too (CSV cells).")


def label_field(data: dict, columns: dict) -> str:
    """The column of a KTO row's label, as preference.kto_example reads it."""
    return columns.get("label") or ("kto_tag" if "kto_tag" in data and "label" not in data else "label")


def split_eval(examples: list, ratio: float, seed: int) -> tuple[list, list]:
    """A seeded random `ratio` share of the rows for evaluation (at least one when there are two or more). The
    pairs of one typed row stay on one side, so no prompt is both trained on and evaluated."""
    if len(examples) < 2:
        return examples, []
    rows: dict[str, list[int]] = {}
    for i, example in enumerate(examples):
        rows.setdefault(row_of(example), []).append(i)
    order = list(rows)
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * ratio)))
    held: set[int] = set()
    for key in order:
        if len(held) >= n_eval or len(held) + len(rows[key]) == len(examples):
            break
        held.update(rows[key])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def row_of(example) -> str:
    """The row an example came from (the pairs of a typed row carry ' (pair k: ...)' after it)."""
    if isinstance(example, PairExample) and example.pair_index[1] > 1:
        return example.source.rsplit(" (pair ", 1)[0]
    return example.source


def check_bad_rows(report: DataReport, data_cfg) -> None:
    bad = report.bad_rows
    if not bad:
        return
    _check_template_renders_something(report)
    listing, more = bad_row_listing(bad, data_cfg.max_errors_shown)
    if data_cfg.on_error == "skip":
        split = report.train_eval("bad_rows")
        log.warning("Skipping %d bad rows of %d%s:\n%s%s", len(bad), report.rows_read, f" ({split})" if split else "",
                    listing, more)
        return
    raise DataError(f"{len(bad)} of {report.rows_read} data rows are bad:\n{listing}{more}\nFix these rows, or set "
                    f"`data.on_error=skip` to train without them (they are then counted and listed).")


def bad_row_listing(bad: list, limit: int) -> tuple[str, str]:
    """The bad rows as lines, rows of one file with the same problem on one line (a DPO file given to sft has every
    row bad for one reason: one line naming the rows, not 20 identical lines), at most `limit` lines."""
    groups: dict[tuple, list] = {}  # (file, unit, field, problem) -> [(row number, BadRow)]; other sources: alone
    for b in bad:
        where = _SOURCE_ROW.match(b.source)
        key = (where.group(1), where.group(2), b.field, b.problem) if where else (id(b),)
        groups.setdefault(key, []).append((where.group(3) if where else None, b))
    lines = [_bad_group_line(key, rows) for key, rows in groups.items()]
    shown_rows = sum(len(rows) for rows in list(groups.values())[:limit])
    more = f"\n  ... and {len(bad) - shown_rows} more" if len(lines) > limit else ""
    return "\n".join(f"  - {line}" for line in lines[:limit]), more


# a BadRow's source: `file:line N`, `file:record N`, or a parquet file's or hub split's `...:row N`
_SOURCE_ROW = re.compile(r"^(.*):(line|record|row) (\d+)$")


def _bad_group_line(key: tuple, rows: list) -> str:
    if len(rows) == 1:
        return str(rows[0][1])
    path, unit, field, problem = key
    numbers = [n for n, _ in rows]
    listed = ", ".join(numbers[:5]) + (f", ... ({len(rows)} rows)" if len(rows) > 5 else "")
    return f"{path}:{unit}s {listed}: field `{field}`: {problem}"


def _check_template_renders_something(report: DataReport) -> None:
    """A chat template that fails the same way on every row is the template's problem (a `bos_token` the tokenizer
    lacks, a role it never heard of), not the data's: one error about the template, not "fix these N rows"."""
    problems = {b.problem for b in report.bad_rows}
    if len(report.bad_rows) < max(report.rows_read, 2) or len(problems) != 1:
        return
    problem = problems.pop()
    if problem.startswith(TEMPLATE_FAILS):
        raise DataError(f"{problem.removeprefix(TEMPLATE_FAILS).strip()}: the chat template fails the same way on "
                        f"every one of the {report.rows_read} rows (first: {report.bad_rows[0].source}), so the "
                        f"template is at fault, not the data. Check `model.chat_template` (a template written for "
                        f"another tokenizer?) or the model's own template.")


# ---- encoding -------------------------------------------------------------------------------------------------

def encode_examples(examples: list, tokenizer, stage: str, data_cfg, template: str | None,
                    report: DataReport) -> list:
    out = []
    for example in examples:
        try:
            for item in encode_align.for_stage(example, stage):  # a pair serves kto as two rows, ...
                if stage in ALIGN_ENCODERS:
                    escape = special_tokens_policy(item, tokenizer, data_cfg, report)
                    out += ALIGN_ENCODERS[stage](item, tokenizer, data_cfg, template, escape, report)
                elif stage == "sft":
                    out += fit_length(encode_sft(item, tokenizer, data_cfg, template, report), data_cfg, report)
                else:
                    out += encode_pt(item, tokenizer, data_cfg, report)
        except Exception as e:  # noqa: BLE001 - the row guard (see types.bad_row)
            report.bad_rows.append(bad_row(e, example.source, "messages" if stage != "pt" else "text"))
    return out


def encode_sft(example: Example, tokenizer, data_cfg, template: str, report: DataReport) -> Encoded:
    if example.messages is None:
        raise encode_align.wrong_kind("sft")
    escape = special_tokens_policy(example, tokenizer, data_cfg, report)
    messages = example.messages
    if data_cfg.system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": data_cfg.system}, *messages]
    encoded = encode_chat(tokenizer, messages, tools=example.tools, loss_on=data_cfg.loss_on,
                          chat_template=template, max_length=data_cfg.max_length, escape_special_tokens=escape)
    encoded.source = example.source
    return encoded


def special_tokens_policy(example: Example, tokenizer, data_cfg, report: DataReport) -> bool:
    """Apply `data.special_tokens_in_text` to a row whose text spells a special token of the tokenizer: a bad row
    (error), or counted and then kept as the token or escaped to plain text. Returns whether to escape."""
    found = special_tokens_in(tokenizer, formats.strings_of(example))
    if found is None:
        return False
    field, spelling = found
    policy = getattr(data_cfg, "special_tokens_in_text", "keep")
    if policy == "error":
        raise RowProblem(field, f"the text spells the tokenizer's special token {spelling!r}, which would become that "
                                f"token (e.g. end the turn) instead of text. Set `data.special_tokens_in_text=escape` "
                                f"to train on it as plain text, or `keep` to let it act as the special token.")
    report.special_tokens.append(f"{example.source} ({spelling!r}, {'escaped' if policy == 'escape' else 'kept'})")
    return policy == "escape"


def fit_length(encoded: Encoded, data_cfg, report: DataReport) -> list[Encoded]:
    """Truncate or drop an over-long example, and drop one left with nothing to learn; each counted once. One whose
    replies all lie past max_length is counted with the pairs' and prompts' (`no_room`), whose line gives the fix
    (raise data.max_length)."""
    cut = len(encoded) > data_cfg.max_length or encoded.truncated
    if cut and data_cfg.overlong == "drop":
        report.dropped_overlong.append(encoded.source)
        return []
    # before the cut: a reply to learn, or contents cut before rendering (encode_chat), which left the reply out
    learns = encoded.truncated or any(label != IGNORE_INDEX for label in encoded.labels[1:])
    if cut:
        encoded = Encoded(encoded.input_ids[:data_cfg.max_length], encoded.labels[:data_cfg.max_length],
                          encoded.source)
    if all(label == IGNORE_INDEX for label in encoded.labels[1:]):  # label 0 is never predicted
        if cut and learns:
            report.no_room.append(f"{encoded.source} (no reply token within the first {data_cfg.max_length} tokens)")
        else:
            report.dropped_no_loss.append(encoded.source)
        return []
    if cut:
        report.truncated.append(encoded.source)
    return [encoded]


def encode_pt(example: Example, tokenizer, data_cfg, report: DataReport) -> list[Encoded]:
    """Text + eos (+ bos where the tokenizer adds one) in max_length chunks; labels are the ids."""
    if example.text is None:
        raise encode_align.wrong_kind("pt")
    max_length = data_cfg.max_length
    escape = special_tokens_policy(example, tokenizer, data_cfg, report)
    ids = tokenize_document(tokenizer, example.text, max_length * CHARS_PER_TOKEN, escape)
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    if len(ids) > max_length:
        report.split_documents.append(example.source)
    chunks, starts = [], chunk_starts(len(ids), max_length)
    for k, (start, end) in enumerate(zip(starts, starts[1:] + [len(ids)])):
        piece = ids[start:end]
        source = example.source if start == 0 else f"{example.source} (part {k + 1})"
        if len(piece) < 2:  # one token predicts nothing
            report.dropped_no_loss.append(source)
            continue
        chunks.append(Encoded(piece, list(piece), source))
    return chunks


def chunk_starts(n: int, max_length: int) -> list[int]:
    """Where each chunk of a document's n ids starts: every max_length ids, except that a last chunk of one id (its
    only id is never a target, so it would train nothing: usually the document's eos) takes the id before it."""
    starts = list(range(0, n, max_length))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts[-1] -= 1
    return starts


def tokenize_document(tokenizer, text: str, window: int, escape: bool = False) -> list[int]:
    """The ids of a document, with the tokenizer's own special tokens (bos). A document longer than `window`
    characters is tokenized window by window, each cut at a whitespace, so a 10 MB row never makes the tokenizer
    hold millions of tokens' offsets and strings at once; only the ids are kept."""
    if len(text) <= window:
        return list(tokenizer(text, split_special_tokens=escape)["input_ids"])
    plain = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    framed = list(tokenizer("x")["input_ids"])
    at = next((k for k in range(len(framed)) if framed[k:k + len(plain)] == plain), 0)
    ids, start = framed[:at], 0  # the specials the tokenizer puts before the text (bos)
    while start < len(text):
        end = min(len(text), start + window)
        if end < len(text):
            space = max(text.rfind(" ", start + window // 2, end), text.rfind("\n", start + window // 2, end))
            end = space if space > start else end
        ids += tokenizer(text[start:end], add_special_tokens=False, split_special_tokens=escape)["input_ids"]
        start = end
    return ids + framed[at + len(plain):]  # and those after it (eos, for tokenizers that add one)
