"""Readers: a file, a folder or a Hugging Face dataset name -> raw rows, each with where it came from.

Sources name the row so a user can open the file at the right place:
  JSONL, CSV and .txt: `file:line N` (1-based line where the row starts);
  JSON arrays: `file:record N` (1-based position in the array);
  Parquet: `file:row N`; Hugging Face datasets: `name[split]:row N`.

`.txt` files are plain text for pre-training: documents are separated by blank lines; a file without any blank
line has one document per line (the common "one article per line" dump, e.g. LLaMA-Factory's wiki_demo.txt).

A JSON file that holds JSON lines (a common misnaming) is read as JSON lines. A row that cannot be parsed
(a broken JSON line, a CSV row with the wrong number of cells) is reported as a bad row, not raised, so the
`data.on_error` policy decides what happens to it. A file that cannot be read at all raises DataError.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from tuneforge.data.types import BadRow
from tuneforge.errors import DataError

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")


@dataclass
class RawRow:
    source: str  # e.g. data/train.jsonl:line 12
    data: dict
    file: str = ""  # the file (or hub name) it came from; formats are guessed per file


Rows = list  # of RawRow and BadRow, in file order (so `max_samples` counts bad rows where they are)


def read_local(path: Path) -> Rows:
    """All rows of a file, or of every supported file under a folder (sorted, recursive)."""
    if path.is_dir():
        return read_folder(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type `{path.suffix}`. Use one of {', '.join(SUFFIXES)} "
                        f"(or a folder of such files).")
    try:
        return reader(path)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the file ({e}).") from e


def read_folder(folder: Path) -> Rows:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                   and not p.name.startswith(".") and p.name != "dataset_info.json")
    if not files:
        raise DataError(f"{folder} is a folder without data files ({', '.join(SUFFIXES)}).")
    return [row for file in files for row in read_local(file)]


def read_json(path: Path) -> Rows:
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several JSON values one after another: JSON lines under a .json name
            return read_jsonl(path)
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}). Fix the file, "
                        f"or use JSON lines (one object per line) with a .jsonl name.") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: the top level must be a list of objects ([{{...}}, {{...}}]), got "
                        f"{type(data).__name__}. Use a list, or JSON lines (one object per line).")
    return [_row_or_bad(item, f"{path}:record {i}", "<record>", path) for i, item in enumerate(data, start=1)]


def _row_or_bad(item, source: str, field: str, path: Path):
    if isinstance(item, dict):
        return RawRow(source, item, str(path))
    return BadRow(source, field, f"expected an object {{...}}, got {type(item).__name__}")


def read_jsonl(path: Path) -> Rows:
    rows = []
    with path.open(encoding="utf-8-sig") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            source = f"{path}:line {n}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append(BadRow(source, "<line>", f"not valid JSON ({e.msg} at column {e.colno})"))
                continue
            rows.append(_row_or_bad(item, source, "<line>", path))
    return rows


def read_csv(path: Path) -> Rows:
    """CSV with a header row. Cells are strings; list-valued columns (history, conversations) hold JSON text."""
    rows = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: empty CSV file; the first line must name the columns.")
        start = reader.line_num + 1
        for cells in reader:
            source = f"{path}:line {start}"
            start = reader.line_num + 1  # a quoted cell may span several lines
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(header):
                rows.append(BadRow(source, "<row>", f"{len(cells)} cells but the header names {len(header)} columns"))
                continue
            rows.append(RawRow(source, dict(zip(header, cells)), str(path)))
    return rows


def read_parquet(path: Path) -> Rows:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several error types for a broken file
        raise DataError(f"{path}: not a readable Parquet file ({e}).") from e
    return [RawRow(f"{path}:row {i}", item, str(path)) for i, item in enumerate(table.to_pylist(), start=1)]


def read_txt(path: Path) -> Rows:
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    filled = [n for n, line in enumerate(lines) if line.strip()]
    if not filled:
        return []
    inner = lines[filled[0]:filled[-1] + 1]
    if all(line.strip() for line in inner):  # no blank line inside: one document per line
        return [RawRow(f"{path}:line {n + 1}", {"text": lines[n]}, str(path)) for n in filled]
    rows, current, first = [], [], 0
    for n, line in enumerate(lines, start=1):
        if line.strip():
            first = first if current else n
            current.append(line)
        elif current:
            rows.append(RawRow(f"{path}:line {first}", {"text": "\n".join(current)}, str(path)))
            current = []
    if current:
        rows.append(RawRow(f"{path}:line {first}", {"text": "\n".join(current)}, str(path)))
    return rows


READERS = {".json": read_json, ".jsonl": read_jsonl, ".csv": read_csv, ".parquet": read_parquet, ".txt": read_txt}


def read_hub(name: str, split: str) -> Rows:
    """A dataset from the Hugging Face hub through `datasets` (needs network access to the hub)."""
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - offline, unknown name, bad split: all the same fix for the user
        raise DataError(f"`{name}` is not a local file or folder nor a name in the dataset registry, and loading it "
                        f"from the Hugging Face hub failed ({type(e).__name__}: {e}). Check the path (relative "
                        f"paths start from the current folder), add the name to the registry (`data.registry`), "
                        f"or make the hub reachable.") from e
    return [RawRow(f"{name}[{split}]:row {i}", dict(item), name) for i, item in enumerate(dataset, start=1)]


def looks_like_local_path(path: str) -> bool:
    """A path the user clearly meant as a file (so a missing one is 'not found', not a hub lookup)."""
    return (path.startswith(("/", "./", "../", "~")) or path.lower().endswith(SUFFIXES)
            or "\\" in path or path.count("/") > 1)
