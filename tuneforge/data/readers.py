"""Readers: a file, a folder or a Hugging Face dataset name -> raw rows, each with where it came from.

Sources name the row so a user can open the file at the right place:
  JSONL, CSV and .txt: `file:line N` (1-based line where the row starts);
  JSON arrays: `file:record N` (1-based position in the array);
  Parquet: `file:row N`; Hugging Face datasets: `name[split]:row N`.

`.txt` files are plain text for pre-training: documents are separated by blank lines; a file without any blank
line has one document per line (the common "one article per line" dump, e.g. LLaMA-Factory's wiki_demo.txt).

Text files may be gzip-compressed (`.jsonl.gz`, `.json.gz`, `.csv.gz`, `.txt.gz`: hh-rlhf ships so); they are read
through gzip and named as they are on disk.

A JSON file that holds JSON lines (a common misnaming) is read as JSON lines. A row that cannot be parsed
(a broken JSON line, a CSV row with the wrong number of cells, JSON nested deeper than the parser can go, anything
else one row raises) is reported as a bad row, not raised, so the `data.on_error` policy decides what happens to
it. Text is decoded with errors="surrogateescape": a byte that is not UTF-8 stays in its row (as a lone surrogate)
and the format adapter reports that row with its line, so one bad byte costs one row, not the file; a file saved
as UTF-16 (a byte order mark FF FE or FE FF) is one file error instead of a bad row per line. A file that
cannot be read at all, or that holds no rows (empty, blank lines only, `[]`, a CSV header alone, a zero-row
Parquet file), raises DataError naming it.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from tuneforge.data.types import BadRow, bad_row
from tuneforge.errors import DataError, counted

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
GZIP_SUFFIXES = tuple(f"{s}.gz" for s in SUFFIXES if s != ".parquet")
ENCODING = {"encoding": "utf-8-sig", "errors": "surrogateescape"}  # see the module docstring


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
    reader = READERS.get(data_suffix(path))
    if reader is None:
        raise DataError(f"{path}: unsupported file type `{path.suffix}`. Use one of {', '.join(SUFFIXES)} "
                        f"(text ones also gzip-compressed, e.g. .jsonl.gz; or a folder of such files).")
    try:
        rows = reader(path)
    except (OSError, EOFError) as e:  # gzip: BadGzipFile is an OSError, a cut-off file an EOFError
        raise DataError(f"{path}: cannot read the file ({e}).") from e
    if not rows:
        raise no_rows(path)
    return rows


def no_rows(path: Path) -> DataError:
    return DataError(f"{path}: no data rows in this file (it is empty, or holds only blank lines, an empty JSON "
                     f"list `[]`, a CSV header or a table of zero rows). Fill it, or remove it from the dataset.")


def read_folder(folder: Path) -> Rows:
    return [row for file in folder_files(folder) for row in read_local(file)]


def folder_files(folder: Path) -> list[Path]:
    """The data files under a folder (sorted, recursive; hidden files and a registry's dataset_info.json aside)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and data_suffix(p) in READERS
                   and not p.name.startswith(".") and p.name != "dataset_info.json")
    if not files:
        raise DataError(f"{folder} is a folder without data files ({', '.join(SUFFIXES)}).")
    refuse_tool_reports(files)
    return files


TOOL_REPORTS = ("rejected.jsonl", "report.json", "progress.jsonl")  # what `tuneforge data` writes beside its rows


def refuse_tool_reports(files: list[Path]) -> None:
    """A `tuneforge data` output folder given whole would train on its removed rows (rejected.jsonl) and fail on
    its report.json: say which file holds the rows instead. Its report.md beside them tells such a folder."""
    reports = [p for p in files if p.name in TOOL_REPORTS and (p.parent / "report.md").is_file()]
    if not reports:
        return
    rows = [p for p in files if p.parent == reports[0].parent and p.name not in TOOL_REPORTS]
    given = f" Give its rows file instead: `{rows[0]}`." if rows else ""
    raise DataError(f"{reports[0].parent} is the output folder of a `tuneforge data` command: "
                    f"{', '.join(sorted({p.name for p in reports}))} are its reports (removed rows, counts, "
                    f"saved teacher replies), not training rows.{given}")


def data_suffix(path: Path) -> str:
    """The suffix that names the data format: `.jsonl` for both train.jsonl and train.jsonl.gz."""
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] == ".gz" and suffixes[-2] != ".parquet":
        return suffixes[-2]
    return suffixes[-1] if suffixes else ""


def open_text(path: Path, newline: str | None = None):
    """The file as text (see ENCODING), through gzip when it ends in .gz."""
    refuse_utf16(path)
    if path.suffix.lower() == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), newline=newline, **ENCODING)
    return path.open(newline=newline, **ENCODING)


# Byte order marks of the encodings that Windows tools ("Unicode" in Notepad, PowerShell's `>`) save text in.
WIDE_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
             (b"\xfe\xff", "UTF-16"))


def refuse_utf16(path: Path) -> None:
    """A UTF-16 (or UTF-32) file is one file error: read as UTF-8 every line would be a bad row of NUL bytes."""
    with (gzip.open(path, "rb") if path.suffix.lower() == ".gz" else path.open("rb")) as f:
        head = f.read(4)
    for bom, name in WIDE_BOMS:
        if head.startswith(bom):
            raise DataError(f"{path} is {name} (byte order mark {bom.hex(' ').upper()}); save it as UTF-8 (in most "
                            f"editors: Save As, encoding UTF-8) and run again.")


def read_text(path: Path) -> str:
    with open_text(path) as f:
        return f.read()


def read_json(path: Path) -> Rows:
    text = read_text(path)
    try:
        data = json.loads(text)
    except RecursionError:  # some record nests deeper than the parser goes: read the records one by one
        return [row for row in _json_records(text, path)]
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several JSON values one after another: JSON lines under a .json name
            return read_jsonl(path)
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}){_bytes_note(text)}"
                        f"{_trailing_comma_note(e)}. Fix the file, or use JSON lines (one object per line) with a "
                        f".jsonl name.") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: the top level must be a list of objects ([{{...}}, {{...}}]), got "
                        f"{type(data).__name__}. {_not_a_list_hint(data, path)}")
    return [_row_or_bad(item, f"{path}:record {i}", "<record>", path) for i, item in enumerate(data, start=1)]


REGISTRY_KEYS = {"file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name"}


def _not_a_list_hint(data, path: Path) -> str:
    """What to do with a JSON file whose top level is not the rows: a LLaMA-Factory registry given as a dataset, or
    rows wrapped in an object (`{"data": [...]}`, as SQuAD-style files and some exports have them)."""
    if isinstance(data, dict) and data and all(isinstance(v, dict) and REGISTRY_KEYS & v.keys() for v in data.values()):
        return (f"This is a LLaMA-Factory dataset registry (dataset_info.json), not a dataset: give it as the registry "
                f"(`data.registry: {path}`; data tools: `--registry`) and name its entries as datasets (e.g. "
                f"`{next(iter(data))}`), or name a data file.")
    lists = [k for k, v in data.items() if isinstance(v, list) and v and isinstance(v[0], dict)] \
        if isinstance(data, dict) else []
    if lists:
        return (f"Its key `{lists[0]}` holds a list of {counted(len(data[lists[0]]), 'object')}: save that list as the file, "
                f"e.g. `jq '.{lists[0]}' {path} > rows.json`.")
    return "Use a list, or JSON lines (one object per line)."


def _json_records(text: str, path: Path):
    """The records of a top-level JSON array one at a time, a record too deeply nested to parse becoming a bad row
    (the whole-file parse is the fast path; this one runs only after it hit the nesting limit)."""
    decoder, pos, n = json.JSONDecoder(), _skip_space(text, 0), 0
    if not text.startswith("[", pos):
        raise DataError(f"{path}: the top level must be a list of objects ([{{...}}, {{...}}]).")
    pos = _skip_space(text, pos + 1)
    while not text.startswith("]", pos):
        n += 1
        source = f"{path}:record {n}"
        try:
            item, pos = decoder.raw_decode(text, pos)
            yield _row_or_bad(item, source, "<record>", path)
        except RecursionError as e:
            yield bad_row(e, source, "<record>")
            pos = _skip_json_value(text, pos, path)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).") from e
        pos = _skip_space(text, pos)
        if text.startswith(",", pos):
            pos = _skip_space(text, pos + 1)
        elif not text.startswith("]", pos):
            line = text.count("\n", 0, pos) + 1
            raise DataError(f"{path}: not valid JSON (expected `,` or `]` after record {n}, at line {line}).")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _skip_json_value(text: str, pos: int, path: Path) -> int:
    """The end of the array or object starting at `pos`, by counting brackets outside strings."""
    depth, in_string, escaped = 0, False, False
    for k in range(pos, len(text)):
        c = text[k]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return k + 1
    raise DataError(f"{path}: not valid JSON: the record at line {text.count(chr(10), 0, pos) + 1} does not end.")


def _bytes_note(text: str, first_line: int = 1) -> str:
    """Where text read with surrogateescape holds a byte that is not UTF-8 (the likely cause of a parse error)."""
    at = next((k for k, c in enumerate(text) if "\udc80" <= c <= "\udcff"), None)
    if at is None:
        return ""
    line = first_line + text.count("\n", 0, at)
    return f"; the byte 0x{ord(text[at]) - 0xDC00:02X} at line {line} is not UTF-8 (save the file as UTF-8)"


def _row_or_bad(item, source: str, field: str, path: Path):
    if isinstance(item, dict):
        return RawRow(source, item, str(path))
    return BadRow(source, field, f"expected an object {{...}}, got {type(item).__name__}")


def read_jsonl(path: Path) -> Rows:
    return list(iter_jsonl(path))


def iter_jsonl(path: Path):
    """The rows of a JSON lines file one at a time (RawRow or BadRow), so a tool can stream a file of any size with
    the same sources, row guard and non-UTF-8 handling as read_jsonl. A file without rows raises (`no_rows`) when
    the stream ends, as read_local does, so the data tools refuse it just as training does."""
    empty = True
    with open_text(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            empty_before, empty = empty, False
            source = f"{path}:line {n}"
            try:
                value = json.loads(line)
                if empty_before and isinstance(value, list):  # a one-line JSON list under a .jsonl name
                    yield from _json_list_in_jsonl(path)
                    return
                yield _row_or_bad(value, source, "<line>", path)
            except json.JSONDecodeError as e:
                if empty_before and line.lstrip().startswith("["):  # a pretty-printed JSON list under a .jsonl name
                    yield from _json_list_in_jsonl(path)
                    return
                yield BadRow(source, "<line>", f"not valid JSON ({e.msg} at column {e.colno}){_bytes_note(line, n)}")
            except Exception as e:  # noqa: BLE001 - the row guard (see types.bad_row)
                yield bad_row(e, source, "<line>")
    if empty:
        raise no_rows(path)


def _trailing_comma_note(err: json.JSONDecodeError) -> str:
    """'; a comma before `]` at line 3 ...' when the parser stopped at a closing bracket right after a comma (JSON,
    unlike Python and JavaScript, allows no trailing comma); '' otherwise."""
    text, at = err.doc, err.pos
    before = text[:at].rstrip()
    if at >= len(text) or text[at] not in "]}" or not before.endswith(","):
        return ""
    comma = len(before) - 1
    line, column = before.count("\n") + 1, comma - before.rfind("\n")
    return (f"; the comma at line {line}, column {column} comes right before `{text[at]}`: JSON allows no trailing "
            f"comma, delete it")


def _json_list_in_jsonl(path: Path) -> Rows:
    """The records of a JSON list (`[` then one object over several lines) saved with a .jsonl name, as a .json file
    would be read: line by line, every line of it was a bad row and nothing said why."""
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: starts with `[` like a JSON list, but is named .jsonl (one object per line) and is "
                        f"not valid JSON either ({e.msg} at line {e.lineno}, column {e.colno}"
                        f"{_trailing_comma_note(e)}). Fix the list and name "
                        f"the file .json, or write one object per line.") from None
    items = data if isinstance(data, list) else [data]
    if not items:
        raise no_rows(path)
    return [_row_or_bad(item, f"{path}:record {i}", "<record>", path) for i, item in enumerate(items, start=1)]


def read_csv(path: Path) -> Rows:
    """CSV with a header row. Cells are strings; list-valued columns (history, conversations) hold JSON text."""
    _allow_large_csv_cells()
    rows = []
    with open_text(path, newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
        except csv.Error as e:
            raise DataError(f"{path}: cannot read the CSV header ({e}).") from e
        if not header:
            return []
        start = reader.line_num + 1
        while True:
            source = f"{path}:line {start}"
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as e:  # the reader goes on with the next line
                rows.append(BadRow(source, "<row>", f"not valid CSV ({e})"))
                start = reader.line_num + 1
                continue
            start = reader.line_num + 1  # a quoted cell may span several lines
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(header):
                rows.append(BadRow(source, "<row>", f"{len(cells)} cells but the header names {len(header)} columns"))
                continue
            rows.append(RawRow(source, dict(zip(header, cells)), str(path)))
    return rows


def _allow_large_csv_cells() -> None:
    """csv refuses cells over 128 KiB by default; a long document is data (max_length cuts it later), not an error."""
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:  # a C long is 32 bits on some platforms
            limit //= 2


def read_parquet(path: Path) -> Rows:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several error types for a broken file
        raise DataError(f"{path}: not a readable Parquet file ({e}).") from e
    return [RawRow(f"{path}:row {i}", item, str(path)) for i, item in enumerate(table.to_pylist(), start=1)]


def read_txt(path: Path) -> Rows:
    lines = read_text(path).splitlines()
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
    rows = [RawRow(f"{name}[{split}]:row {i}", dict(item), name) for i, item in enumerate(dataset, start=1)]
    if not rows:
        raise DataError(f"`{name}` (split {split}) has no rows.")
    return rows


def looks_like_local_path(path: str) -> bool:
    """A path the user clearly meant as a file (so a missing one is 'not found', not a hub lookup)."""
    return (path.startswith(("/", "./", "../", "~")) or path.lower().endswith(SUFFIXES + GZIP_SUFFIXES)
            or "\\" in path or path.count("/") > 1)
