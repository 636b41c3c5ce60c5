"""Where the data tools get their rows and put their results.

Rows come from the same dataset specs as `data.train` (`--data PATH_OR_NAME ...`, or `--config train.yaml` for
its `data.train` and `data.registry`), through the data path's own resolution, readers and format adapters, so a
row is named as in training errors (`file:line N`, `file:record N`). JSON lines files are streamed line by line;
other files are read whole by the data path's readers.

Results go to `--out DIR`, each file written to a temp name and renamed when complete, and never over an input.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tuneforge.configs.typed import opt
from tuneforge.data import build, formats, readers
from tuneforge.data.types import BadRow, Example
from tuneforge.errors import DataError, UserError, cannot_write


@dataclass(kw_only=True)
class SourceArgs:
    """Options every `tuneforge data` sub-verb shares: what to read and where to write."""

    out: str = opt(help="Output folder (created; files in it are replaced atomically, never an input file).")
    data: list[str] = opt(factory=list, help="Datasets: files, folders or registry names, as in `data.train`.")
    config: str | None = opt(None, "A training config YAML: its `data.train` (and `data.registry`) are read, "
                                   "relative paths from the current folder as `tuneforge train` reads them (then "
                                   "from the config's folder); `--data` adds to them.")
    format: Literal["auto", "alpaca", "sharegpt", "openai", "text"] = opt(
        "auto", "Row format of the `--data` datasets (auto guesses per file, like training).")
    registry: str | None = opt(None, "A dataset_info.json registry for names in `--data` (LLaMA-Factory style).")


@dataclass
class Row:
    """One input row: its source, the raw mapping (None when unreadable), and the Example or why it is bad."""

    source: str
    raw: dict | None
    example: Example | None = None
    bad: BadRow | None = None
    dataset: str = ""  # the spec it came from (its path or registry name)
    answer_column: str = "output"  # the alpaca answer column of its spec (for telling empty answers apart)
    spec_index: int = 0  # which of the dataset specs it came from

    @property
    def empty_answer(self) -> bool:
        """A row the data path refused only because its answer is empty."""
        return self.bad is not None and (self.bad.problem.startswith("empty `assistant`")
                                         or (self.bad.problem == "empty" and self.bad.field == self.answer_column))


@dataclass
class Sources:
    specs: list  # DatasetSpec
    registry: object | None
    base_dir: Path | None


def sources_of(args: SourceArgs) -> Sources:
    """The dataset specs named by --config and --data, with the registry to resolve names."""
    from tuneforge.configs.schema import DatasetSpec, load_train_config

    specs, registry_path, base_dir = [], args.registry, None
    if args.config:
        cfg = load_train_config(args.config)
        specs, base_dir = list(cfg.data.train), Path(args.config).resolve().parent
        registry_path = registry_path or cfg.data.registry
    specs += [DatasetSpec(path=p, format=args.format) for p in args.data]
    if not specs:
        raise UserError("No datasets given: name them with `--data PATH ...` (files, folders or registry names) "
                        "or `--config train.yaml` to read its `data.train`.")
    return Sources(specs, build.open_registry(registry_path, base_dir), base_dir)


def resolved(spec, sources: Sources):
    """(spec with registry settings applied, local path)."""
    registry, name = sources.registry, spec.path
    if registry is not None and name in registry:
        missing = registry.missing_file(name)
        if missing is not None:
            raise registry.missing_file_error(name, missing)
        spec = registry.resolve(spec)
    local = build.find_local(spec.path, sources.base_dir)
    if local is None and spec.path != name:  # a registry entry naming a hub dataset (`hf_hub_url`), not a file
        raise DataError(f"Registry entry `{name}` ({registry.path}) is the Hugging Face hub dataset `{spec.path}`; "
                        f"the data tools read local files only. Download its files and point the entry at them with "
                        f"`file_name` (relative to the registry's folder), or give the file with `--data PATH`.")
    if local is None:
        bare = "/" not in name and not Path(name).suffix  # looks like a registry name, not a path
        hint = registry.hint(name) if registry is not None else (
            " (A name of a dataset_info.json needs `--registry PATH`.)" if bare else "")
        raise DataError(f"Dataset {name}: no such file or folder.{hint} The data tools read local files; give a "
                        f"path relative to the current folder or an absolute one.")
    build.check_no_split(spec, local)
    return spec, local


def input_files(sources: Sources) -> list[Path]:
    files = []
    for spec in sources.specs:
        _, local = resolved(spec, sources)
        files += sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
    return [f.resolve() for f in files]


# Alignment formats a tool may read with `iter_rows(alignment=True)` (inspect: it writes no rows, so nothing of a
# pair or a label can be lost). A typed row (CValues' pos_resp/neg_resp) is read as its pairs, as dpo reads it.
ALIGNMENT_FORMATS = ("pairwise", "kto", "prompt", "typed")


def iter_rows(sources: Sources, alignment: bool = False) -> Iterator[Row]:
    """Every row of every spec, in order, adapted to an Example (or a BadRow saying why not). `alignment`: rows of
    ALIGNMENT_FORMATS are read too (a PairExample, or an Example with a label); otherwise such a file is refused."""
    for index, named in enumerate(sources.specs):
        spec, local = resolved(named, sources)
        guessed: dict[str, str] = {}
        for n, raw in enumerate(_raw_rows(local)):
            if spec.max_samples is not None and n >= spec.max_samples:
                break
            row = _adapt(raw, spec, guessed, alignment)
            row.spec_index, row.dataset = index, named.path  # the name the user gave (a registry name stays one)
            yield from _pairs_of(row)


def _pairs_of(row: Row) -> Iterator[Row]:
    """A typed row as one Row per pair it makes (its raw columns counted with the first only); others as they are."""
    if not isinstance(row.example, list):
        yield row
        return
    for k, example in enumerate(row.example):
        yield Row(example.source, row.raw if k == 0 else None, example, dataset=row.dataset,
                  answer_column=row.answer_column, spec_index=row.spec_index)


class OneKind:
    """Refuses a plain-text row and a conversation in one output file: no stage trains on both (pt reads text rows,
    the chat stages conversations), and `tuneforge train` would guess the file's format from its first line and
    call every row of the other kind bad."""

    def __init__(self, verb: str):
        self.verb, self.first = verb, {}

    def check(self, row: Row) -> None:
        if row.example is None:
            return
        kind = "text" if row.example.text is not None else "chat"
        self.first.setdefault(kind, row)
        if len(self.first) == 2:
            text, chat = self.first["text"], self.first["chat"]
            raise DataError(f"{text.dataset} holds plain-text rows (pre-training data, e.g. {text.source}) and "
                            f"{chat.dataset} conversations (e.g. {chat.source}); `tuneforge data {self.verb}` writes "
                            f"one file, and no stage trains on both kinds (pt reads text rows, the chat stages "
                            f"conversations). Run it on each kind separately.")


def _adapt(raw, spec, guessed: dict, alignment: bool = False) -> Row:
    if isinstance(raw, BadRow):
        return Row(raw.source, None, bad=raw)
    try:
        fmt = spec.format
        if fmt == "auto":
            if raw.file not in guessed:
                guessed[raw.file] = formats.guess_format(raw.data, spec.columns, raw.file)
            fmt = guessed[raw.file]
        readable = formats.CHAT_FORMATS + ("text",) + (ALIGNMENT_FORMATS if alignment else ())
        if fmt not in readable:  # these tools would drop chosen/rejected/label unseen
            raise DataError(f"{raw.file}: its rows are alignment data (format {fmt}: preference pairs, KTO rows, "
                            f"typed responses or prompts); this tool reads {', '.join(readable)} rows"
                            f"{'' if alignment else ' (inspect reads alignment data too)'}."
                            f"{' Typed responses become pairs with `tuneforge data safety`.' if fmt == 'typed' else ''}"
                            f" To mix alignment files, list them under `data.train` with `data.mix` in the training "
                            f"config.")
        return Row(raw.source, raw.data, formats.to_example(raw.data, fmt, raw.source, spec.columns, spec.tags,
                                                           spec.ranking))
    except formats.RowProblem as e:
        return Row(raw.source, raw.data, bad=BadRow(raw.source, e.field, e.problem),
                   answer_column=spec.columns.get("output", "output"))


def _raw_rows(local: Path) -> Iterator:
    if local.is_dir():
        for file in readers.folder_files(local):
            yield from _raw_rows(file)
    elif readers.data_suffix(local) == ".jsonl":  # streamed (also .jsonl.gz): 100k rows are not held
        yield from readers.iter_jsonl(local)
    else:
        yield from readers.read_local(local)


# ---- output ---------------------------------------------------------------------------------------------------

def example_row(example: Example, **extra) -> dict:
    """An Example as a row `tuneforge train` reads: OpenAI `messages` (with `tools`) or `text`, plus `extra`."""
    if example.text is not None:
        return {"text": example.text, **extra}
    row = {"messages": example.messages}
    if example.tools:
        row["tools"] = example.tools
    return {**row, **extra}


def prepare_out_for(out: str, sources: Sources, names: list[str]) -> Path:
    """`prepare_out` for the inputs of `sources`, refusing first an `--out` that is, or lies inside, a folder given
    as input: the outputs would be written among the inputs and read back as input by the next run (which then
    refuses to overwrite them, or fails on report.json's rows)."""
    folder = Path(out).expanduser().resolve()
    for spec in sources.specs:
        _, local = resolved(spec, sources)
        local = local.resolve()
        if local.is_dir() and (folder == local or local in folder.parents):
            raise UserError(f"`--out {out}` lies in the input folder {local} (`--data {spec.path}`): the outputs "
                            f"would be written among the inputs and read as input by the next run. Write to a "
                            f"folder outside it, e.g. `--out {local.name}_out` next to it.")
    return prepare_out(out, input_files(sources), names)


def prepare_out(out: str, inputs: list[Path], names: list[str]) -> Path:
    """The output folder, refusing when an output file would replace an input."""
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"`--out {out}` is a file; it must be a folder (created when missing).")
    for name in names:
        target = (folder / name).resolve()
        if target in inputs:
            raise UserError(f"`--out {out}` would overwrite the input {target}. Write to another folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only place, a file on the way, /proc: said, not a traceback
        raise cannot_write(folder, e, "--out") from None
    return folder


def current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


class AtomicWriter:
    """A text file written to a temp name in the same folder and renamed over `path` on `commit()`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self.tmp = Path(tmp)
        self.file = os.fdopen(fd, "w", encoding="utf-8")

    def write_row(self, row: dict) -> None:
        line = json.dumps(row, ensure_ascii=False)
        try:
            self.file.write(line + "\n")
        except UnicodeEncodeError:  # a rejected row holding a byte that was not UTF-8 (a lone surrogate, see
            self.file.write(json.dumps(row) + "\n")  # readers.ENCODING): written as a \udcXX escape, valid JSON

    def commit(self) -> None:
        self.file.close()
        os.chmod(self.tmp, 0o666 & ~current_umask())  # mkstemp makes 0600: a shared dataset must stay readable
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def write_text(path: Path, text: str) -> None:
    with AtomicWriter(path) as w:
        w.file.write(text)


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def load_tokenizer(model: str, chat_template: str | None = None):
    """The model's tokenizer (local folder, hub id or builtin:<name>) and its resolved chat template."""
    from tuneforge.configs.schema import ModelConfig
    from tuneforge.data.templates import resolve_chat_template
    from tuneforge.models.loading import load_tokenizer as load

    tokenizer = load(ModelConfig(name_or_path=model, chat_template=chat_template))
    tokenizer.model_max_length = 10**9  # we measure lengths; transformers' "longer than the maximum" warning is noise
    return tokenizer, resolve_chat_template(tokenizer, chat_template)
