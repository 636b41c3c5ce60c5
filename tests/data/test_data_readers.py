"""Readers: every file type, folders, hub names; each row keeps the file and line/record it came from."""

from __future__ import annotations

import json

import pytest

from tuneforge.data import readers
from tuneforge.data.readers import RawRow, read_local
from tuneforge.data.types import BadRow
from tuneforge.errors import DataError


def rows_only(items) -> list[RawRow]:
    assert all(isinstance(i, RawRow) for i in items), [str(i) for i in items if isinstance(i, BadRow)]
    return items


def test_json_array_sources_are_record_numbers(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"text": "one"}, {"text": "two"}, "oops"]), encoding="utf-8")
    items = read_local(path)
    assert [(i.source, i.data) for i in items[:2]] == [(f"{path}:record 1", {"text": "one"}),
                                                       (f"{path}:record 2", {"text": "two"})]
    assert isinstance(items[2], BadRow) and items[2].source == f"{path}:record 3" and "object" in items[2].problem


def test_json_lines_misnamed_json_and_broken_lines(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": broken}\n', encoding="utf-8")
    items = read_local(path)
    assert [i.source for i in items] == [f"{path}:line 1", f"{path}:line 3", f"{path}:line 4"]
    assert isinstance(items[2], BadRow) and "not valid JSON" in items[2].problem


def test_invalid_json_and_wrong_top_level_raise(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"text": "a"},', encoding="utf-8")
    with pytest.raises(DataError, match="broken.json: not valid JSON"):
        read_local(broken)
    mapping = tmp_path / "mapping.json"
    mapping.write_text('{"data": []}', encoding="utf-8")
    with pytest.raises(DataError, match="must be a list"):
        read_local(mapping)


def test_a_top_level_object_says_what_it_is_and_what_to_do(tmp_path):
    """A LLaMA-Factory dataset_info.json given as data, and rows wrapped in {"data": [...]}, only heard "must be a
    list"."""
    registry = tmp_path / "dataset_info.json"
    registry.write_text(json.dumps({"identity": {"file_name": "identity.json"}, "hub": {"hf_hub_url": "a/b"}}))
    with pytest.raises(DataError, match=r"dataset registry \(dataset_info.json\), not a dataset: give it as the "
                                        r"registry \(`data.registry: .*dataset_info.json`; data tools: `--registry`\) "
                                        r"and name its entries as datasets \(e.g. `identity`\)"):
        read_local(registry)
    wrapped = tmp_path / "squad.json"
    wrapped.write_text(json.dumps({"version": "1", "data": [{"instruction": "a", "output": "b"}] * 3}))
    with pytest.raises(DataError, match=r"Its key `data` holds a list of 3 objects: save that list as the file, "
                                        r"e.g. `jq '.data' .*squad.json > rows.json`"):
        read_local(wrapped)


def test_csv_lines_count_multiline_cells(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,output\nfirst,"two\nlines"\nsecond,ok\nthird\n', encoding="utf-8")
    items = read_local(path)
    assert [i.source for i in items] == [f"{path}:line 2", f"{path}:line 4", f"{path}:line 5"]
    assert items[0].data == {"instruction": "first", "output": "two\nlines"}
    assert isinstance(items[2], BadRow) and "1 cells" in items[2].problem


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b"], "output": ["x", "y"]}), path)
    items = rows_only(read_local(path))
    assert [(i.source, i.data) for i in items] == [(f"{path}:row 1", {"instruction": "a", "output": "x"}),
                                                   (f"{path}:row 2", {"instruction": "b", "output": "y"})]


def test_txt_paragraphs_or_lines(tmp_path):
    paragraphs = tmp_path / "p.txt"
    paragraphs.write_text("First doc\nstill first.\n\n\nSecond doc.\n", encoding="utf-8")
    items = rows_only(read_local(paragraphs))
    assert [(i.source, i.data["text"]) for i in items] == [(f"{paragraphs}:line 1", "First doc\nstill first."),
                                                           (f"{paragraphs}:line 5", "Second doc.")]
    lines = tmp_path / "l.txt"
    lines.write_text("doc one\ndoc two\n\n", encoding="utf-8")  # no blank line inside: one document per line
    assert [i.data["text"] for i in read_local(lines)] == ["doc one", "doc two"]


def test_folder_reads_supported_files_in_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.jsonl").write_text('{"text": "b"}\n', encoding="utf-8")
    (tmp_path / "sub" / "a.txt").write_text("a\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / "dataset_info.json").write_text("{}", encoding="utf-8")
    assert [i.data["text"] for i in read_local(tmp_path)] == ["b", "a"]
    with pytest.raises(DataError, match="unsupported file type `.md`"):
        read_local(tmp_path / "notes.md")


def test_hub_names_go_through_datasets(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        return [{"text": "hello"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    items = readers.read_hub("someone/corpus", "validation")
    assert calls == [("someone/corpus", "validation")]
    assert items[0].source == "someone/corpus[validation]:row 1" and items[0].data == {"text": "hello"}


def test_unreachable_hub_is_a_clean_data_error(monkeypatch):
    import datasets

    def offline(name, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="someone/corpus.*hub failed.*ConnectionError"):
        readers.read_hub("someone/corpus", "train")


def test_paths_that_look_local():
    assert readers.looks_like_local_path("data/train.jsonl")
    assert readers.looks_like_local_path("./x")
    assert not readers.looks_like_local_path("tatsu-lab/alpaca")


@pytest.mark.parametrize(("encoding", "bom"), [("utf-16-le", "FF FE"), ("utf-16-be", "FE FF")])
def test_a_utf16_file_is_one_file_error(tmp_path, encoding, bom):
    path = tmp_path / "d.jsonl"
    path.write_bytes(("\ufeff" + json.dumps({"instruction": "a", "output": "b"}) + "\n").encode(encoding))
    with pytest.raises(DataError) as err:
        read_local(path)
    assert str(err.value).startswith(f"{path} is UTF-16 (byte order mark {bom}); save it as UTF-8")
    with pytest.raises(DataError, match="is UTF-16"):
        list(readers.iter_jsonl(path))  # the data tools' streaming reader too


def test_a_data_tool_output_folder_names_its_rows_file(tmp_path):
    """`--data data/alpaca_clean` (the folder `tuneforge data clean` wrote) read its rejected.jsonl as training rows
    (or, empty, failed on it) and its report.json as a dataset: now one error naming clean.jsonl."""
    from tuneforge.cli import main

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"}\n', encoding="utf-8")
    assert main(["data", "clean", "--data", str(rows), "--out", str(tmp_path / "cleaned")]) == 0
    with pytest.raises(DataError, match=r"cleaned is the output folder of a `tuneforge data` command: "
                                        r"rejected.jsonl, report.json are its reports .* `.*cleaned/clean.jsonl`"):
        read_local(tmp_path / "cleaned")
    assert len(read_local(tmp_path / "cleaned" / "clean.jsonl")) == 1
    (tmp_path / "plain").mkdir()  # a folder of data that merely holds a report.json is read as before
    (tmp_path / "plain" / "report.json").write_text('[{"instruction": "x", "output": "y"}]', encoding="utf-8")
    assert len(read_local(tmp_path / "plain")) == 1
