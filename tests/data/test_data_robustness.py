"""No row crashes the data path: whatever one row raises while it is read, parsed, validated, rendered or tokenized
becomes a bad row with its file and line (skipped and counted with on_error=skip); files without rows, bytes that
are not UTF-8 and huge rows are handled; a property-based test throws random JSON shapes at every reader."""

from __future__ import annotations

import json
import os

import pytest

from tests.data.chat_fixtures import make_tokenizer
from tuneforge.configs.schema import DataConfig, DatasetSpec
from tuneforge.data import build, formats
from tuneforge.data.build import build_datasets, read_datasets
from tuneforge.data.templates import CHATML
from tuneforge.errors import ConfigError, DataError

GOOD = {"instruction": "Two plus two?", "output": "Four."}
DEEP = "[" * 100_000 + "]" * 100_000  # deeper than the JSON parser's recursion limit


def config(path, fmt: str = "auto", **kwargs) -> DataConfig:
    return DataConfig(train=[DatasetSpec(path=str(path), format=fmt)], **kwargs)


def write_lines(path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def skipped(path, fmt: str = "auto") -> list[str]:
    """Read with on_error=skip: the good row must survive, and the bad rows come back as text."""
    train, _, report = read_datasets(config(path, fmt, on_error="skip"))
    assert len(train) == 1
    return [str(b) for b in report.bad_rows]


# ---- rows that crashed the reader or the adapters ------------------------------------------------------------

OPENAI_GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
CRASHERS = [
    ("alpaca", GOOD, DEEP, "RecursionError"),
    ("openai", OPENAI_GOOD, json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]},
                                                     {"role": "assistant", "content": "x"}]}),
     "messages[0].content[0].text`: expected a string"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
     json.dumps({"conversations": [{"from": ["human"], "value": "Hi"}, {"from": "gpt", "value": "x"}]}),
     "conversations[0].from`: unknown role"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
     json.dumps({"conversations": [{"from": {"a": 1}, "value": "Hi"}, {"from": "gpt", "value": "x"}]}),
     "unknown role"),
    ("openai", OPENAI_GOOD, json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                     {"role": "assistant", "content": "", "tool_calls": 7}]}),
     "tool_calls`: expected a list"),
    ("openai", OPENAI_GOOD, json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                     {"role": "assistant", "content": "x", "tool_calls": True}]}),
     "tool_calls`: expected a list"),
    ("alpaca", GOOD, '{"instruction": "Hi \\ud83d", "output": "x"}', "lone surrogate escape \\ud83d"),
]


@pytest.mark.parametrize("fmt, good, bad_line, words", CRASHERS, ids=lambda v: str(v)[:30])
def test_rows_that_crashed_become_bad_rows(tmp_path, fmt, good, bad_line, words):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(good), bad_line])
    bad = skipped(path, fmt)
    assert len(bad) == 1 and bad[0].startswith(f"{path}:line 2: field `") and words in bad[0], bad
    with pytest.raises(DataError, match="1 of 2 data rows are bad"):
        read_datasets(config(path, fmt))


def test_deeply_nested_record_in_a_json_array(tmp_path):
    path = tmp_path / "d.json"
    tricky = json.dumps("brackets ] } [ { and a quote \\\" in a string")  # the record's end is found past them
    path.write_text(f'[{json.dumps(GOOD)}, {{"instruction": {tricky}, "deep": {DEEP}, "output": "x"}}, '
                    f'"not an object", {json.dumps(GOOD)}]', encoding="utf-8")
    train, _, report = read_datasets(config(path, on_error="skip"))
    assert [b.source for b in report.bad_rows] == [f"{path}:record 2", f"{path}:record 3"]
    assert "RecursionError" in report.bad_rows[0].problem and len(train) == 2


def test_csv_cell_over_the_csv_modules_limit_is_data(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(f"instruction,output\nHi,{'x' * 300_000}\n", encoding="utf-8")
    train, _, report = read_datasets(config(path))
    assert len(train[0].messages[1]["content"]) == 300_000 and not report.bad_rows


@pytest.mark.parametrize("suffix, lines", [
    (".jsonl", [json.dumps(GOOD).encode(), b'{"instruction": "caf\xe9", "output": "x"}']),
    (".csv", [b"instruction,output", b"Two plus two?,Four.", b"caf\xe9,x"]),
    (".txt", [b"First document is fine.", b"Second has a bad byte \xff here."]),
])
def test_a_byte_that_is_not_utf8_costs_its_line(tmp_path, suffix, lines):
    path = tmp_path / f"d{suffix}"
    path.write_bytes(b"\n".join(lines) + b"\n")
    bad = skipped(path)
    line = len(lines)
    assert len(bad) == 1 and bad[0].startswith(f"{path}:line {line}:") and "not UTF-8" in bad[0], bad
    with pytest.raises(DataError, match=f"line {line}.*0x(E9|FF), which is not UTF-8"):
        read_datasets(config(path))


def test_a_byte_that_is_not_utf8_in_a_json_array_names_its_record(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[{"instruction": "a", "output": "b"},\n {"instruction": "caf\xe9", "output": "x"}]')
    with pytest.raises(DataError, match=r"record 2: field `instruction`: not valid Unicode"):  # the row's own
        read_datasets(config(path))


# ---- files without rows ----------------------------------------------------------------------------------------

def _zero_row_parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"instruction": pa.array([], pa.string()), "output": pa.array([], pa.string())}), path)


@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("blank.jsonl", "\n  \n\n"), ("list.json", "[]"),
                                           ("header.csv", "instruction,output\n"), ("empty.csv", ""),
                                           ("blank.txt", "\n\n"), ("zero.parquet", None)])
def test_a_file_without_rows_is_an_error_naming_it(tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        _zero_row_parquet(path)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=f"{path}: no data rows"):
        read_datasets(config(path, on_error="skip"))  # before any model or tokenizer


def test_all_rows_bad_with_skip_fails_before_the_model(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ['{"instruction": 1}', "nope"])
    cfg = config(path, "alpaca", on_error="skip")
    cfg.eval = [DatasetSpec(path=write_lines(tmp_path / "e.jsonl", ['{"instruction": "Q", "output": "A"}'] * 3))]
    with pytest.raises(DataError, match="No training rows left: all 2 training rows read are bad"):  # not 5
        read_datasets(cfg)


# ---- the one guard ------------------------------------------------------------------------------------------

def test_any_exception_of_a_row_becomes_a_bad_row_naming_its_type(tmp_path, monkeypatch):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD), json.dumps({**GOOD, "instruction": "boom"})])
    real = formats.to_example

    def flaky(data, *args):
        if data["instruction"] == "boom":
            raise ValueError("something odd")
        return real(data, *args)

    monkeypatch.setattr(formats, "to_example", flaky)
    bad = skipped(path)
    assert bad == [f"{path}:line 2: field `<row>`: cannot be processed (ValueError: something odd)"]


@pytest.mark.parametrize("error", [MemoryError(), KeyboardInterrupt(), ConfigError("not about the row")])
def test_what_is_not_about_the_row_propagates(tmp_path, monkeypatch, error):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD)])

    def fail(*args):
        raise error

    monkeypatch.setattr(formats, "to_example", fail)
    with pytest.raises(type(error)):
        read_datasets(config(path, on_error="skip"))


def test_rendering_and_tokenizing_errors_are_row_errors(tmp_path, monkeypatch):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD), json.dumps({**GOOD, "output": "boom"})])
    real = build.encode_chat

    def flaky(tokenizer, messages, **kwargs):
        if messages[-1]["content"] == "boom":
            raise TypeError("template bug")
        return real(tokenizer, messages, **kwargs)

    monkeypatch.setattr(build, "encode_chat", flaky)
    train, _, report = build_datasets(config(path, on_error="skip"), make_tokenizer(CHATML), "sft")
    assert len(train) == 1 and [str(b) for b in report.bad_rows] == [
        f"{path}:line 2: field `messages`: cannot be processed (TypeError: template bug)"]


# ---- random shapes --------------------------------------------------------------------------------------------

KEYS = ["instruction", "input", "output", "system", "history", "conversations", "messages", "from", "value", "role",
        "content", "tool_calls", "tool_call_id", "tools", "function", "name", "arguments", "type", "text", "id",
        "chosen", "rejected", "chosen_messages", "rejected_messages", "prompt", "label", "completion", "responses",
        "answer", "reference", "margin", "pos_resp", "pos_type"]
WORDS = ["user", "assistant", "system", "tool", "human", "gpt", "function_call", "observation", "text", "function",
         "Hi", "", " ", "<|im_end|>", "[1, 2]", '{"name": "f"}', "\ud83d", "true", "refuse", "risky",
         "\n\nHuman: a\n\nAssistant: b", "\n\nAssistant: "]


VALID = {  # one valid row per format, using every feature the format has
    "alpaca": {"instruction": "Hi", "input": "more", "output": "Hello", "system": "Be brief.",
               "history": [["Two?", "2"]]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Weather?"},
                                   {"from": "function_call", "value": '{"name": "get_weather", "arguments": {}}'},
                                   {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}],
                 "system": "You help.", "tools": '[{"name": "get_weather", "parameters": {}}]'},
    "openai": {"messages": [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
                            {"role": "assistant", "content": "", "tool_calls": [
                                {"id": "call00001", "type": "function",
                                 "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                            {"role": "tool", "content": "sunny", "tool_call_id": "call00001"},
                            {"role": "assistant", "content": "Sunny."}],
               "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]},
    "text": {"text": "Hello there."},
    "pairwise": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                                   {"from": "human", "value": "Add 2 and 3"}],
                 "chosen": {"from": "gpt", "value": "5"}, "rejected": [{"role": "assistant", "content": "6"}],
                 "system": "Be exact.", "margin": 1.5},
    "hh": {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Add 2 and 3\n\nAssistant: 5",
           "rejected": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Add 2 and 3\n\nAssistant: 6"},
    "messages_pair": {"chosen_messages": [{"role": "system", "content": [{"type": "text", "value": "Be exact."}]},
                                          {"role": "user", "content": "Add 2 and 3"},
                                          {"role": "assistant", "content": "5"}],
                      "rejected_messages": [{"role": "system", "content": [{"type": "text", "value": "Be exact."}]},
                                            {"role": "user", "content": "Add 2 and 3"},
                                            {"role": "assistant", "content": "6"}]},
    "kto": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
            "label": True},
    "typed": {"prompt": "Hi", "system": "Be kind.", "responses": [{"text": "Hello", "type": "refuse_with_guidance"},
                                                                  {"text": "Go", "type": "refuse"},
                                                                  {"text": "No", "type": "risky"}]},
    "prompt": {"prompt": [{"role": "user", "content": "Add 2 and 3"}], "answer": "5"},
}
FORMAT_OF = {"hh": "pairwise", "messages_pair": "pairwise"}  # VALID rows named by layout, not by format
STAGE_OF = {"text": "pt", "pairwise": "pairwise", "typed": "pairwise", "kto": "kto", "prompt": "prompt"}


def _places(value, out: list) -> list:
    """(container, key) of every value inside `value`."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        out.append((value, key))
        _places(inner, out)
    return out


def format_rows():
    """(format, row): a valid row of a format with one to three of its values (at any depth) replaced by any JSON
    or deleted, so the odd shapes reach every check inside the format rather than failing at the first key. The
    format is the row's own or `auto`."""
    import copy

    from hypothesis import strategies as st

    scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
               | st.sampled_from(WORDS) | st.text(max_size=8))
    anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=4),
                            max_leaves=10)

    @st.composite
    def rows(draw):
        name = draw(st.sampled_from(sorted(VALID)))
        row = copy.deepcopy(VALID[name])
        for _ in range(draw(st.integers(1, 3))):
            places = _places(row, [])
            if not places:
                break
            container, key = draw(st.sampled_from(places))
            if isinstance(container, dict) and draw(st.booleans()):
                del container[key]
            else:
                container[key] = draw(anything)
        return name, draw(st.sampled_from([FORMAT_OF.get(name, name), "auto"])), row

    return rows()


def write_rows(folder, suffix: str, rows: list) -> str:
    import csv

    path = folder / f"d{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8", errors="surrogatepass")
    elif suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        columns = list(dict.fromkeys(k for r in rows if isinstance(r, dict) for k in r)) or ["text"]
        with path.open("w", encoding="utf-8", errors="surrogatepass", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for r in rows:
                cells = r if isinstance(r, dict) else {}
                writer.writerow([v if isinstance(v, str) else json.dumps(v) for v in
                                 (cells.get(c, "") for c in columns)])
    return str(path)


def test_random_json_shapes_end_in_a_clear_error_or_are_accepted():
    """Every format reader (and auto; the alignment formats in their stages), every file type, then rendering and
    tokenizing: a DataError or named bad
    rows, never another exception type, and never the guard's last-resort "cannot be processed" (which would mean
    a shape the adapters do not check)."""
    import tempfile
    from pathlib import Path

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    tokenizer = make_tokenizer(CHATML)
    # The same 200 cases every run, so CI cannot fail on a case no one ran before; explore new random ones with
    # TUNEFORGE_FUZZ_EXAMPLES=5000 (a run of 3000 found the unhashable part `type` fixed in formats._content_text).
    explore = int(os.environ.get("TUNEFORGE_FUZZ_EXAMPLES", "0"))

    @settings(max_examples=explore or 200, derandomize=not explore, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(case=format_rows(), suffix=st.sampled_from([".jsonl", ".json", ".csv"]), first=st.booleans())
    def check(case, suffix, first):
        name, fmt, row = case
        base = VALID[name]
        with tempfile.TemporaryDirectory() as folder:
            path = write_rows(Path(folder), suffix, [row, base] if first else [base, row])
            data = config(path, fmt, on_error="skip", special_tokens_in_text="escape")
            try:
                train, _, report = build_datasets(data, tokenizer, STAGE_OF.get(FORMAT_OF.get(name, name), "sft"))
            except DataError:
                return
            assert train
            for bad in report.bad_rows:
                assert "cannot be processed" not in bad.problem, str(bad)

    check()


def test_a_byte_that_is_not_utf8_outside_a_string_is_named_too(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"instruction": "a", \xff"output": "x"}\n')
    assert skipped(path) == [f"{path}:line 2: field `<line>`: not valid JSON (Expecting property name enclosed in "
                             f"double quotes at column 22); the byte 0xFF at line 2 is not UTF-8 (save the file as "
                             f"UTF-8)"]
    array = tmp_path / "d.json"
    array.write_bytes(b'[{"instruction": "a", "output": "x"},\n \xff{"instruction": "a", "output": "x"}]')
    with pytest.raises(DataError, match=r"line 2, column 2\); the byte 0xFF at line 2 is not UTF-8"):
        read_datasets(config(array))


def test_a_first_row_that_crashes_format_guessing_is_a_bad_row(tmp_path):
    first = json.dumps({"messages": "[" * 100_000})  # JSON text of a list nested too deeply to parse
    path = write_lines(tmp_path / "d.jsonl", [first, json.dumps(OPENAI_GOOD)])
    assert skipped(path) == [f"{path}:line 1: field `<row>`: nested too deeply to read (RecursionError); flatten "
                             f"this row"]


def test_the_message_about_invalid_unicode_can_be_printed(tmp_path):
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": {"\ud83d": {"k": "\udcff"}}}}]}, {"role": "tool", "content": "ok"},
        {"role": "assistant", "content": "Done."}]}
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(OPENAI_GOOD), json.dumps(row)])
    (bad,) = skipped(path)
    bad.encode("utf-8")  # strict: a lone surrogate in the message would fail to print
    assert "field `messages[1].tool_calls[0].function.arguments.\\ud83d.k`: not valid Unicode text: the byte 0xFF" in bad
