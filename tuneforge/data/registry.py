"""The dataset registry: a LLaMA-Factory style `dataset_info.json` mapping names to files and their layout.

    {"alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
     "glaive_toolcall_en_demo": {"file_name": "glaive_toolcall_en_demo.json", "formatting": "sharegpt",
                                 "columns": {"messages": "conversations", "tools": "tools"}},
     "alpaca_en": {"hf_hub_url": "llamafactory/alpaca_en"}}

Entries give `file_name` (relative to the registry file) or `hf_hub_url`, `formatting` (alpaca, the default, or
sharegpt), `columns` and `tags` (sharegpt role names). LLaMA-Factory's column names are translated to ours
(prompt -> instruction, query -> input, response -> output); an entry whose only column is `prompt` is plain text
for pre-training (LLaMA-Factory's c4_demo/wiki_demo). `ranking: true` entries are preference pairs (format
pairwise; LLaMA-Factory's `chosen`/`rejected` columns); a `kto_tag` column makes an entry KTO data (format kto).
A hub entry's `split` is read (adgen_eval: validation); a hub entry's `subset` (a dataset configuration) is
refused with the fix, since the hub reader cannot select it.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import replace
from pathlib import Path

from tuneforge.configs.schema import DatasetSpec
from tuneforge.errors import DataError

LF_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}
# How alike a name must be to a registry name to be suggested: registries hold dozens of names sharing parts
# (`_en`, `_demo`), so the looser cutoff of config keys would suggest unrelated datasets.
NAME_CUTOFF = 0.8


class Registry:
    def __init__(self, path: Path):
        self.path = path
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"Dataset registry {path}: cannot read it as JSON ({e}).") from e
        if not isinstance(entries, dict):
            raise DataError(f"Dataset registry {path}: expected an object mapping dataset names to entries.")
        self.entries: dict[str, dict] = entries

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def hint(self, name: str) -> str:
        """For a name that is not in the registry: says so, with the registry name it was likely meant as."""
        return f" `{name}` is not a name in the dataset registry {self.path} either.{self.suggestion(name)}"

    def suggestion(self, name: str) -> str:
        """' Did you mean `x`?' for a registry name close to `name`, else ''."""
        close = difflib.get_close_matches(name, [n for n in self.entries if n != name], n=1, cutoff=NAME_CUTOFF)
        return f" Did you mean `{close[0]}`?" if close else ""

    def missing_file(self, name: str) -> Path | None:
        """The file entry `name` points at when it does not exist (None when it exists or is a hub entry)."""
        entry = self.entries.get(name)
        if not isinstance(entry, dict) or not entry.get("file_name"):
            return None
        path = self.path.parent / entry["file_name"]
        return None if path.exists() else path

    def missing_file_error(self, name: str, path: Path) -> DataError:
        return DataError(f"Dataset registry {self.path}: registry entry `{name}` points at {path}, which does not "
                         f"exist (`file_name` is relative to the registry's folder). Put the file there, or fix "
                         f"the entry's `file_name`.")

    def hub_error(self, name: str, hub_name: str, reachable: bool, cause: BaseException) -> DataError:
        """Why a registry entry that names a Hugging Face hub dataset (`hf_hub_url`) could not be read; `cause`:
        what `datasets` raised."""
        where = f"Registry entry `{name}` ({self.path}) is the Hugging Face hub dataset `{hub_name}`"
        if not reachable:
            return DataError(f"{where}, and the hub is unreachable from here and the dataset is not in the local "
                             f"cache. Run once where the hub is reachable (the download is cached), or download its "
                             f"files and point the entry at them with `file_name`.")
        return DataError(f"{where}, and loading it from the hub failed ({type(cause).__name__}: {cause}). Check `hf_hub_url` and the "
                         f"spec's `split`.")

    def resolve(self, spec: DatasetSpec) -> DatasetSpec:
        """The spec of registry entry `spec.path`: a path (or hub name) and its format, columns and tags.
        What the spec itself sets (format other than auto, columns, tags) wins over the entry."""
        name, entry = spec.path, self.entries[spec.path]
        where = f"Dataset registry {self.path}, entry `{name}`"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an object with `file_name` or `hf_hub_url`.")
        fmt, columns = _format_and_columns(entry, where)
        split = _hub_split(entry, spec.split, where)
        if entry.get("ranking"):
            fmt = "pairwise"
        elif "kto_tag" in columns:
            fmt, columns = "kto", {("label" if k == "kto_tag" else k): v for k, v in columns.items()}
        return replace(spec, path=self._location(entry, where), split=split,
                       format=spec.format if spec.format != "auto" else fmt,
                       columns={**columns, **spec.columns}, tags={**(entry.get("tags") or {}), **spec.tags})

    def _location(self, entry: dict, where: str) -> str:
        if entry.get("file_name"):
            return str(self.path.parent / entry["file_name"])
        if entry.get("hf_hub_url"):
            return entry["hf_hub_url"]
        close = difflib.get_close_matches("file_name", [k for k in entry if isinstance(k, str)], n=1, cutoff=0.7)
        typo = f" It has `{close[0]}`: did you mean `file_name`?" if close else ""
        raise DataError(f"{where}: needs `file_name` (relative to the registry) or `hf_hub_url`; other sources "
                        f"(ModelScope, scripts) are not supported.{typo}")


def _hub_split(entry: dict, split: str, where: str) -> str:
    """The split of a hub entry: the entry's `split` (LLaMA-Factory's adgen_eval reads `validation`) unless the spec
    names another than the default. An entry's `subset` (a dataset configuration) cannot be passed on: say so
    rather than read another configuration's rows."""
    if entry.get("file_name"):
        return split  # a local file has no splits (LLaMA-Factory reads its only one, train)
    if entry.get("subset"):
        raise DataError(f"{where}: the hub dataset `{entry.get('hf_hub_url')}` is read with its configuration "
                        f"(`subset: {entry['subset']}`), which TuneForge cannot pass on to the hub. Download that "
                        f"configuration's files and point the entry at them with `file_name`.")
    default = DatasetSpec.__dataclass_fields__["split"].default
    return entry.get("split", split) if split == default else split


def _format_and_columns(entry: dict, where: str) -> tuple[str, dict]:
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise DataError(f"{where}: unknown formatting {formatting!r}; expected alpaca or sharegpt.")
    raw = entry.get("columns") or {}
    if formatting == "alpaca" and set(raw) == {"prompt"}:
        return "text", {"text": raw["prompt"]}  # LLaMA-Factory's pre-training entries
    columns = {LF_COLUMNS.get(k, k): v for k, v in raw.items() if isinstance(v, str)}
    tags = entry.get("tags") or {}
    if formatting == "sharegpt" and tags.get("role_tag") == "role" and tags.get("content_tag") == "content" \
            and tags.get("user_tag", "user") == "user" and tags.get("assistant_tag", "assistant") == "assistant":
        return "openai", columns  # sharegpt tags spelling out OpenAI messages: read them as such (tool calls too)
    return formatting, columns
