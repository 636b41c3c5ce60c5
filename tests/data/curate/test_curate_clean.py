"""`tuneforge data clean`: every rule on crafted rows, exact and near duplicates injected into real Alpaca data
(counts equal the injected ones; each reported pair is above the threshold by exact Jaccard), the rejected-row
ledger, round trip of kept rows, and token limits with a real chat template."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from tests.data.curate.helpers import parse, read_jsonl, write_jsonl
from tuneforge.data.curate import rows as rows_mod
from tuneforge.data.curate.clean import char_run, clean, repeated_line_share, repeated_ngram_share
from tuneforge.data.curate.inspect import inspect
from tuneforge.data.curate.mix import mix
from tuneforge.data.curate.text import language, row_text, shingles
from tuneforge.errors import DataError, UserError

ALPACA = "datasets/stanford_alpaca/alpaca_5000.json"


def run(tmp_path, data: list[str], *extra: str, out: str = "out") -> dict:
    return clean(parse("clean", ["--data", *data, "--out", str(tmp_path / out), *extra]))


def qa(q: str, a: str) -> dict:
    return {"instruction": q, "output": a}


def check_ledger(report: dict, tmp_path, out: str = "out") -> list[dict]:
    """rows_in = kept + rejected, and the files agree with the report."""
    rejected = read_jsonl(tmp_path / out / "rejected.jsonl")
    kept = read_jsonl(tmp_path / out / "clean.jsonl")
    assert report["rows_in"] == report["rows_kept"] + sum(report["rejected"].values())
    assert len(kept) == report["rows_kept"] and len(rejected) == sum(report["rejected"].values())
    assert json.loads((tmp_path / out / "report.json").read_text()) == report
    return rejected


def test_each_rule_names_the_row_it_removes(tmp_path):
    long_answer = " ".join(f"word{i}" for i in range(60))
    rows = [qa("Say hi", "Hello there"),                                      # 1 kept
            qa("Empty?", "   "),                                              # 2 empty_answer (data path)
            qa("Placeholder?", "N/A"),                                        # 3 empty_answer (placeholder)
            qa("Loop", " ".join(["the same words again"] * 15)),              # 4 repeated_ngrams
            qa("Song", "\n".join(["chorus line here"] * 6 + [" ".join(f"w{k}{i}" for i in range(15))
                                                            for k in range(3)])),  # 5 repeated_lines
            qa("Shout", "no" + "o" * 60),                                     # 6 char_run
            qa("Repeat after me: the cat sat on the mat", "Repeat after me... the cat sat on the mat!"),  # 7 echo
            qa("你好", "你好，我是助手。"),                                     # 8 language (zh with --languages en)
            qa("SAY  HI", "hello   there"),                                    # 9 exact duplicate of 1
            qa("Long", long_answer),                                          # 10 kept
            qa("Long", long_answer.replace("word30", "other")),               # 11 near duplicate of 10
            {"instruction": "No output column"}]                              # 12 bad_row
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    report = run(tmp_path, [path], "--languages", "en")
    rejected = {r["source"].rsplit(" ", 1)[1]: r for r in check_ledger(report, tmp_path)}
    expected = {"2": "empty_answer", "3": "empty_answer", "4": "repeated_ngrams", "5": "repeated_lines",
                "6": "char_run", "7": "echo", "8": "language", "9": "exact_duplicate", "11": "near_duplicate",
                "12": "bad_row"}
    assert {line: r["rule"] for line, r in rejected.items()} == expected
    assert rejected["9"]["duplicate_of"] == f"{path}:line 1"
    assert rejected["11"]["duplicate_of"] == f"{path}:line 10" and rejected["11"]["jaccard"] >= 0.8
    assert rejected["4"]["row"] == rows[3]  # the original row, so it can be restored
    assert report["rows_kept"] == 2


def test_measures():
    assert repeated_ngram_share("ab cd ef " * 10, 3) == pytest.approx(1 - 3 / 28)
    assert repeated_ngram_share("short text", 3) == 0.0  # under 20 n-grams: not judged
    assert repeated_line_share("one two three\nfour five six\none two three\nseven eight nine") == 0.25
    assert char_run("ab!!!!!c", 4) == (5, "!") and char_run("ab!!!!!c", 5) is None
    assert char_run("|" + "-" * 80 + "|", 4) is None  # markdown rules are not runs
    assert language("用 Python 写一个排序函数") == "zh" and language("Hello, world") == "en"
    assert language("12345") == "none" and language("こんにちは世界") == "ja"
    assert shingles("A b  C d", 3, 5) == {"a b c", "b c d"}
    assert shingles("今天天气很好", 3, 5) == {"今天天气很", "天天气很好"}


def test_chinese_rows_with_latin_words_or_code_are_chinese(tmp_path, shared_assets):
    """Scripts weigh per word: a Han character against a Latin word, code blocks aside. Counted per letter, the
    glossary and program rows below read as English and `--languages zh` dropped 68 of alpaca_zh_demo's rows."""
    def text(row: dict) -> str:
        return "\n".join([row["instruction"], row["input"], row["output"]])

    folder = shared_assets / "datasets/llamafactory"
    zh = json.loads((folder / "alpaca_zh_demo.json").read_text(encoding="utf-8"))
    en = json.loads((folder / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    assert "寒冷(cold)" in zh[49]["output"] and "```" in zh[221]["output"]  # record 50: glosses, 222: a C++ program
    assert [language(text(zh[i])) for i in (5, 49, 221, 521)] == ["zh"] * 4
    assert sum(language(text(row)) == "zh" for row in zh) >= 975  # the rest answer in English (e.g. record 333)
    assert all(language(text(row)) == "en" for row in en[:200])
    assert language("My neighbour 王小明 moved to Shanghai last year and opened a small bookshop there.") == "en"
    path = write_jsonl(tmp_path / "zh.jsonl", [zh[5], zh[49], en[0]])
    report = run(tmp_path, [path, "--languages", "zh"])
    assert report["rows_kept"] == 2 and report["rejected"]["language"] == 1


def test_repeated_ngrams_counts_words_of_prose_not_code_or_tables():
    """A regex and a truth table from Stanford Alpaca (records 793 and 4173) repeat symbols and single letters by
    their nature; counted over every unit they read as 73% and 64% repeats and were removed."""
    regex = ("^[a-zA-Z0-9.!#$%&'*+/=?^_`{|}~-]+@[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?(?:\\.[a-zA-Z0-9]"
             "(?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*$")
    rows = [" ".join(row) for row in itertools.product("TF", repeat=4)]
    truth_table = "P    Q    R    S    (~P -> Q) v (R -> S)\n" + "\n".join(f"  {r}    T" for r in rows)
    notes = "C D D D D D D D D D D E E C C C C C C C C C C D D D D D D D D D E E."
    for text in (regex, truth_table, notes):
        assert repeated_ngram_share(text, 3) == 0.0
    loop = "I think that the answer is yes. " + "The answer is yes and the answer is yes. " * 8
    assert repeated_ngram_share(loop, 3) > 0.5
    assert repeated_ngram_share("答案是肯定的。" * 12, 3) > 0.5  # Chinese loops still count, per character


def test_real_alpaca_has_no_duplicates_and_two_empty_outputs(tmp_path, shared_assets):
    path = str(shared_assets / ALPACA)
    report = run(tmp_path, [path])
    rejected = check_ledger(report, tmp_path)
    assert report["rows_in"] == 5000
    assert report["rejected"]["exact_duplicate"] == 0 and report["rejected"]["near_duplicate"] == 0
    empty = [r["source"] for r in rejected if r["detail"] == "field `output`: empty"]
    assert empty == [f"{path}:record 2336", f"{path}:record 4659"]
    assert all(r["rule"] == "empty_answer" for r in rejected if r["source"] in empty)


def _near_copy(row: dict, rng: random.Random) -> dict:
    """The row with one word of its output replaced (a near duplicate, not an exact one)."""
    words = row["output"].split(" ")
    k = rng.randrange(len(words) // 3, 2 * len(words) // 3)
    words[k] = "zzzq" + words[k]
    return {**row, "output": " ".join(words)}


def _exact_copy(row: dict, k: int) -> dict:
    """Equal after normalisation only: case, whitespace, and full-width letters (NFKC)."""
    variants = [lambda s: s.upper(), lambda s: "  " + s.replace(" ", "   ") + "\n", lambda s: s.replace("a", "ａ")]
    return {key: variants[k % 3](value) if isinstance(value, str) else value for key, value in row.items()}


def test_injected_duplicates_are_found_exactly(tmp_path, shared_assets):
    data = json.loads((shared_assets / ALPACA).read_text(encoding="utf-8"))
    rng = random.Random(0)
    long_rows = [i for i, r in enumerate(data) if len(r["output"].split(" ")) >= 60 and "\n" not in r["output"]]
    exact_of = rng.sample(range(len(data)), 7)
    near_of = rng.sample(long_rows, 9)
    copy = list(data)
    made = [(_exact_copy(data[i], k), data[i]) for k, i in enumerate(exact_of)]
    made += [(_near_copy(data[i], rng), data[i]) for i in near_of]
    for row, original in made:
        copy.insert(rng.randrange(_index_of(copy, original) + 1, len(copy) + 1), row)  # somewhere after it
    # 1-based record of each injected row -> record of its original
    injected = {_index_of(copy, row) + 1: _index_of(copy, original) + 1 for row, original in made}
    path = tmp_path / "alpaca_dups.json"
    path.write_text(json.dumps(copy, ensure_ascii=False), encoding="utf-8")
    report = run(tmp_path, [str(path)])
    check_ledger(report, tmp_path)
    assert report["rejected"]["exact_duplicate"] == 7 and report["rejected"]["near_duplicate"] == 9
    rejected = [r for r in read_jsonl(tmp_path / "out" / "rejected.jsonl") if r["rule"].endswith("duplicate")]
    found = {int(r["source"].rsplit(" ", 1)[1]): int(r["duplicate_of"].rsplit(" ", 1)[1]) for r in rejected}
    assert found == injected
    examples = {row.source: row.example for row in rows_mod.iter_rows(rows_mod.sources_of(
        parse("clean", ["--data", str(path), "--out", str(tmp_path / "x")])))}
    for r in rejected:
        if r["rule"] == "near_duplicate":
            a = shingles(row_text(examples[r["source"]]), 3, 5)
            b = shingles(row_text(examples[r["duplicate_of"]]), 3, 5)
            exact = len(a & b) / len(a | b)
            assert exact >= 0.8 and r["jaccard"] == pytest.approx(exact, abs=1e-4)
            assert 0 <= r["jaccard_estimated"] <= 1


def test_rows_that_call_different_tools_are_not_duplicates(tmp_path):
    def tool_row(name: str) -> dict:
        schema = {"name": name, "description": "Make a password", "parameters": {"type": "object"}}
        return {"conversations": [{"from": "human", "value": "I need a new password of 12 characters."},
                                  {"from": "function_call", "value": json.dumps({"name": name,
                                                                                 "arguments": {"length": 12}})},
                                  {"from": "observation", "value": '{"password": "aB3#fG7!kL9@"}'},
                                  {"from": "gpt", "value": "Here is your new password: aB3#fG7!kL9@."}],
                "tools": json.dumps([schema])}

    rows = [tool_row("generate_password"), tool_row("make_password"), tool_row("generate_password")]
    path = write_jsonl(tmp_path / "tools.jsonl", rows)
    report = run(tmp_path, [path, "--no-near-dedup"])
    (dup,) = check_ledger(report, tmp_path)
    assert (dup["rule"], dup["source"], dup["duplicate_of"]) == ("exact_duplicate", f"{path}:line 3",
                                                                 f"{path}:line 1")
    differ = write_jsonl(tmp_path / "schemas.jsonl", [rows[0], {**rows[0], "tools": rows[1]["tools"]}])
    assert run(tmp_path, [differ, "--no-near-dedup"], out="schemas")["rows_kept"] == 2  # the schema alone differs


def _index_of(rows: list[dict], row: dict) -> int:
    return next(i for i, r in enumerate(rows) if r is row)


def test_chinese_near_duplicates_use_character_shingles(tmp_path, shared_assets):
    data = json.loads((shared_assets / "datasets/llamafactory/alpaca_zh_demo.json").read_text(encoding="utf-8"))
    long = next(r for r in data if len(r["output"]) > 200 and " " not in r["output"])
    changed = {**long, "output": long["output"][:100] + "很" + long["output"][101:]}
    path = write_jsonl(tmp_path / "zh.jsonl", [long, qa("别的问题", "别的回答，完全不同。"), changed])
    report = run(tmp_path, [path])
    (dup,) = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert dup["rule"] == "near_duplicate" and dup["source"].endswith("line 3") and dup["jaccard"] > 0.9
    assert report["rows_kept"] == 2
    report = run(tmp_path, [path], "--jaccard", "0.99", out="strict")
    assert report["rejected"]["near_duplicate"] == 0


def test_kept_rows_read_back_by_training_as_the_same_examples(tmp_path, shared_assets):
    from tuneforge.configs.schema import DatasetSpec
    from tuneforge.data.build import load_examples
    from tuneforge.data.types import DataReport

    path = str(shared_assets / "datasets/llamafactory/glaive_toolcall_en_demo.json")
    report = run(tmp_path, [path, "--no-near-dedup"])
    before = load_examples([DatasetSpec(path=path)], None, None, DataReport())
    read = DataReport()
    kept = load_examples([DatasetSpec(path=str(tmp_path / "out/clean.jsonl"))], None, None, read)
    assert not read.bad_rows and len(kept) == report["rows_kept"] > 250
    after = {r["source"]: example for r, example in zip(read_jsonl(tmp_path / "out/clean.jsonl"), kept)}
    assert set(after) <= {e.source for e in before}
    for example in before:
        if example.source in after:
            assert (after[example.source].messages, after[example.source].tools) == (example.messages,
                                                                                     example.tools)


def test_token_limits_use_the_chat_template(tmp_path, tiny_qwen2_dir):
    from transformers import AutoTokenizer

    from tuneforge.data.encode import encode_chat

    rows = [qa(f"Question {i}", " ".join(["answer"] * (i * 7 + 1))) for i in range(12)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    lengths = [len(encode_chat(tokenizer, [{"role": "user", "content": r["instruction"]},
                                           {"role": "assistant", "content": r["output"]}])) for r in rows]
    limit = sorted(lengths)[7]
    report = run(tmp_path, [path], "--model", str(tiny_qwen2_dir), "--max-tokens", str(limit), "--no-near-dedup")
    assert report["rejected"]["too_long"] == sum(n > limit for n in lengths) == 4
    with pytest.raises(UserError, match="--model"):
        run(tmp_path, [path], "--max-tokens", "10")


def test_never_overwrites_its_input(tmp_path):
    path = write_jsonl(tmp_path / "clean.jsonl", [qa("a", "b")])
    with pytest.raises(UserError, match="overwrite the input"):
        clean(parse("clean", ["--data", path, "--out", str(tmp_path)]))
    assert read_jsonl(tmp_path / "clean.jsonl") == [qa("a", "b")]
    assert not list(tmp_path.glob(".*tmp"))


def test_band_table_finds_rows_before_and_after_merging():
    import numpy as np

    from tuneforge.data.curate.dedup import BandTable

    rng = np.random.default_rng(0)
    table, keys = BandTable(), rng.integers(0, 2**63, size=(4000, 17), dtype=np.uint64)
    keys[3999, 5] = keys[10, 3]  # a shared bucket
    for row, k in enumerate(keys):
        table.insert(k, row)
    assert len(table.keys) > 0 and table.recent  # merged once (over 50k keys), newer ones still in the dict
    assert table.query(keys[10]) == {10, 3999} and table.query(keys[3999]) == {10, 3999}
    assert table.query(keys[2500]) == {2500}
    assert table.query(rng.integers(0, 2**63, size=17, dtype=np.uint64)) == set()


def test_bad_lines_are_rejected_by_file_line_through_the_data_path_reader(tmp_path):
    """The data tools stream JSON lines through readers.iter_jsonl: the row guard (a row nested too deeply), bad
    JSON and non-UTF-8 bytes cost one row each, named by file:line, as in training."""
    path = tmp_path / "rows.jsonl"
    good = json.dumps(qa("Say hi", "Hello there")).encode()
    deep = b'{"instruction": "x", "output": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path.write_bytes(b"\n".join([good, b'{"instruction": broken', b'{"instruction": "caf\xff", "output": "ok"}',
                                 deep, json.dumps(qa("Other", "Fine answer")).encode()]) + b"\n")
    report = run(tmp_path, [str(path)])
    rejected = {r["source"]: r for r in check_ledger(report, tmp_path)}
    assert set(rejected) == {f"{path}:line {n}" for n in (2, 3, 4)}
    assert all(r["rule"] == "bad_row" for r in rejected.values())
    assert "not valid JSON" in rejected[f"{path}:line 2"]["detail"]
    assert "nested too deeply" in rejected[f"{path}:line 4"]["detail"]
    assert report["rows_kept"] == 2


def test_gzipped_json_lines_stream_too(tmp_path):
    import gzip

    path = tmp_path / "rows.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps(qa("Say hi", "Hello there")) + "\n" + json.dumps(qa("Bye", "Goodbye friend")) + "\n")
    report = run(tmp_path, [str(path)])
    assert report["rows_kept"] == 2
    assert read_jsonl(tmp_path / "out" / "clean.jsonl")[1]["source"] == f"{path}:line 2"


@pytest.mark.parametrize("asked, fix", [("zh-CN", "`zh` for `zh-CN`"), ("fr", "`en` for `fr`"), ("klingon", "")])
def test_a_language_the_filter_cannot_tell_is_refused_not_every_row_dropped(tmp_path, asked, fix):
    """`--languages zh-CN` (or `fr`: Latin script reads as `en`) once kept 0 rows, each rejected as `language`."""
    data = write_jsonl(tmp_path / "zh.jsonl", [qa("介绍一下长城。", "长城是中国古代的军事防御工程。")])
    with pytest.raises(UserError, match="knows ja, ko, zh, ru, ar, en, none") as e:
        run(tmp_path, [data], "--languages", "zh", asked)
    assert f"`--languages {asked}`" in str(e.value) and fix in str(e.value)
    assert not (tmp_path / "out").exists()
    assert run(tmp_path, [data], "--languages", "zh", "none")["rows_kept"] == 1


@pytest.mark.parametrize("verb", ["clean", "mix", "inspect"])
@pytest.mark.parametrize("inside", [".", "cleaned"])
def test_out_in_an_input_folder_is_refused_before_anything_is_written(tmp_path, verb, inside):
    """`--data raw --out raw/cleaned` once wrote among the inputs; the same command run again then refused to
    overwrite raw/cleaned/clean.jsonl (now an input), and `--out raw` read report.json as rows."""
    folder = tmp_path / "raw"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [qa("What is 2 + 2?", "4"), qa("Name a colour.", "Blue.")])
    out = folder / inside
    with pytest.raises(UserError, match="lies in the input folder") as e:
        {"clean": clean, "mix": mix, "inspect": inspect}[verb](parse(verb, ["--data", str(folder), "--out", str(out)]))
    assert f"`--data {folder}`" in str(e.value)
    assert sorted(p.name for p in folder.iterdir()) == ["a.jsonl"]
    assert clean(parse("clean", ["--data", str(folder), "--out", str(tmp_path / "raw_clean")]))["rows_kept"] == 2


def test_registry_names_missing_or_on_the_hub_say_what_to_do(tmp_path):
    registry = tmp_path / "dataset_info.json"
    write_jsonl(tmp_path / "ident.jsonl", [qa("Who are you?", "An assistant.")])
    registry.write_text(json.dumps({"identity": {"file_name": "ident.jsonl"},
                                    "alpaca_en": {"hf_hub_url": "llamafactory/alpaca_en"}}), encoding="utf-8")
    with pytest.raises(DataError, match="Did you mean `identity`"):
        run(tmp_path, ["identiy", "--registry", str(registry)])
    with pytest.raises(DataError, match="is the Hugging Face hub dataset `llamafactory/alpaca_en`; the data tools "
                                        "read local files only") as e:
        run(tmp_path, ["alpaca_en", "--registry", str(registry)])
    assert "nor a name in the registry" not in str(e.value) and "`file_name`" in str(e.value)
    assert run(tmp_path, ["identity", "--registry", str(registry)])["rows_kept"] == 1
