"""build_datasets: the bad-row policy, counted truncation and drops, pre-training chunks and packing, the eval
split, system prompts, and every file format end to end."""

from __future__ import annotations

import json
import os
import re

import pytest

from tests.data.chat_fixtures import make_tokenizer
from tests.data.curate.helpers import write_jsonl
from tuneforge.configs.schema import DataConfig, DatasetSpec
from tuneforge.data import IGNORE_INDEX, PackedRow, build_datasets
from tuneforge.data.templates import CHATML
from tuneforge.errors import DataError


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(CHATML)


def qa(question: str, answer: str) -> dict:
    return {"instruction": question, "output": answer}


def config(paths, **kwargs) -> DataConfig:
    return DataConfig(train=[DatasetSpec(path=p) if isinstance(p, str) else p for p in paths], **kwargs)


def bad_file(tmp_path) -> str:
    rows = [qa("Hi", "Hello"), {"instruction": "No answer"}, qa("Ok", ""), qa("Two?", "2"), {"instruction": 5,
                                                                                          "output": "x"}]
    path = tmp_path / "mixed.jsonl"
    write_jsonl(path, rows)
    with path.open("a", encoding="utf-8") as f:
        f.write("{broken json\n")
    return str(path)


def test_bad_rows_raise_one_error_listing_them(tmp_path, tokenizer):
    path = bad_file(tmp_path)
    with pytest.raises(DataError) as info:
        build_datasets(config([path]), tokenizer, "sft")
    message = str(info.value)
    assert "4 of 6 data rows are bad" in message
    assert f"{path}:line 2: field `output`: missing" in message
    assert f"{path}:line 3: field `output`: empty" in message
    assert f"{path}:line 5: field `instruction`: expected a string" in message
    assert f"{path}:line 6: field `<line>`: not valid JSON" in message
    assert "data.on_error=skip" in message
    with pytest.raises(DataError, match=r"(?s)line 3.*\.\.\. and 2 more"):
        build_datasets(config([path], max_errors_shown=2), tokenizer, "sft")


def test_rows_of_one_file_with_one_problem_are_one_line(tmp_path, tokenizer):
    """A preference file given to sft has every row bad for the same reason: one line naming the file, the rows and
    the problem, not the first 20 of 30 identical lines; rows with other problems keep their own lines."""
    pairs = [{"instruction": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(30)]
    path = write_jsonl(tmp_path / "prefs.jsonl", pairs)
    ok = write_jsonl(tmp_path / "ok.jsonl", [qa("Hi", "Hello"), {"instruction": 5, "output": "x"}])
    with pytest.raises(DataError) as info:
        build_datasets(config([str(ok), str(path)]), tokenizer, "sft")
    lines = str(info.value).splitlines()
    assert "31 of 32 data rows are bad" in lines[0]
    assert len(lines) == 4, lines  # header, the 30 pairs, the odd row, the advice
    assert re.search(rf"{re.escape(str(path))}:lines 1, 2, 3, 4, 5, \.\.\. \(30 rows\): field `chosen`: .*dpo",
                     "\n".join(lines))
    assert f"{ok}:line 2: field `instruction`: expected a string" in "\n".join(lines)
    with pytest.raises(DataError) as info:  # the limit counts lines; "... and N more" counts the rows not shown
        build_datasets(config([str(ok), str(path)], max_errors_shown=1), tokenizer, "sft")
    shown = str(info.value).splitlines()[1]
    assert str(info.value).splitlines()[2] == f"  ... and {1 if '(30 rows)' in shown else 30} more"


def test_a_template_that_fails_on_every_row_is_one_template_error(tmp_path):
    """A template that needs a token the tokenizer lacks fails the same way on every row: that is one error about the
    template, not "N rows are bad, fix these rows" (also with on_error=skip, which would leave nothing)."""
    tokenizer = make_tokenizer("{{ missing_token + messages[0]['content'] }}{% for m in messages[1:] %}"
                               "{{ m['content'] }}{% endfor %}")  # `missing_token` is undefined in every render
    path = write_jsonl(tmp_path / "ok.jsonl", [qa(f"q{i}", f"a{i}") for i in range(3)])
    for on_error in ("error", "skip"):
        with pytest.raises(DataError, match=r"fails the same way on every one of the 3 rows \(first: .*ok.jsonl:line "
                                            r"1\), so the template is at fault") as info:
            build_datasets(config([path], on_error=on_error), tokenizer, "sft")
        assert "Fix these rows" not in str(info.value)


def test_skip_counts_and_names_bad_rows(tmp_path, tokenizer):
    path = bad_file(tmp_path)
    train, evals, report = build_datasets(config([path], on_error="skip"), tokenizer, "sft")
    assert len(train) == 2 and evals == []
    assert report.rows_read == 6
    assert [b.source for b in report.bad_rows] == [f"{path}:line {n}" for n in (2, 3, 5, 6)]
    assert "4 bad rows skipped" in report.lines()[1]


def test_overlong_rows_are_truncated_or_dropped_and_counted(tmp_path, tokenizer):
    long_answer = "word " * 60
    path = write_jsonl(tmp_path / "d.jsonl", [qa("Short?", "Yes."), qa("Long?", long_answer),
                                              qa("Question " * 40, "Cut away")])
    train, _, report = build_datasets(config([path], max_length=40), tokenizer, "sft")
    assert [e.source.rsplit(":", 1)[1] for e in train] == ["line 1", "line 2"]
    assert all(len(e) <= 40 for e in train)
    assert report.truncated == [f"{path}:line 2"]
    # its reply started after token 40: nothing to learn, and the fix is a longer max_length (said in the line)
    assert report.no_room == [f"{path}:line 3 (no reply token within the first 40 tokens)"]
    assert not report.dropped_no_loss and "raise data.max_length" in report.lines()[-1]
    train, _, report = build_datasets(config([path], max_length=40, overlong="drop"), tokenizer, "sft")
    assert len(train) == 1 and report.dropped_overlong == [f"{path}:line 2", f"{path}:line 3"]
    assert any("truncated" in line for line in build_datasets(config([path], max_length=40), tokenizer,
                                                               "sft")[2].lines())


def test_sft_labels_only_assistant_replies(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [qa("What is two plus two?", "Four.")])
    (example,), _, _ = build_datasets(config([path]), tokenizer, "sft")
    labelled = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])
    assert labelled.strip() == "Four.<|im_end|>"
    (example,), _, _ = build_datasets(config([path], loss_on="all"), tokenizer, "sft")
    assert example.labels == example.input_ids


def test_system_prompt_is_added_where_missing(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [qa("Hi", "Hello"), {**qa("Hi", "Hello"), "system": "Own."}])
    train, _, _ = build_datasets(config([path], system="Be brief."), tokenizer, "sft")
    texts = [tokenizer.decode(e.input_ids) for e in train]
    assert "<|im_start|>system\nBe brief.<|im_end|>" in texts[0]
    assert "Own." in texts[1] and "Be brief." not in texts[1]


def test_pretraining_chunks_eos_and_packing_by_default(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text("A short document.\n\n" + "A much longer document " * 30 + "\n\nAnother short one.\n",
                    encoding="utf-8")
    train, _, report = build_datasets(config([str(path)], max_length=32), tokenizer, "pt")
    assert report.split_documents == [f"{path}:line 3"]
    assert all(isinstance(row, PackedRow) and len(row) <= 32 for row in train)
    sources = [s for row in train for s in row.sources]
    assert f"{path}:line 3 (part 2)" in sources and f"{path}:line 1" in sources
    unpacked, _, _ = build_datasets(config([str(path)], max_length=32, packing=False), tokenizer, "pt")
    assert not any(isinstance(e, PackedRow) for e in unpacked)
    first = unpacked[0]
    assert first.labels == first.input_ids and first.input_ids[-1] == tokenizer.eos_token_id
    assert sum(len(e) for e in unpacked) == sum(len(r) for r in train)  # packing loses no token


def test_the_size_line_says_how_many_examples_were_packed_into_how_many_rows(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [qa(f"Question {i}?", f"Answer {i}.") for i in range(12)])
    train, evals, report = build_datasets(config([path], max_length=128, packing=True), tokenizer, "sft")
    tokens = sum(len(row) for row in train)
    assert report.packed == (12, 0, 128, tokens) and len(train) < 12
    filled = f"{100 * tokens / (len(train) * 128):.1f}% filled"  # how much of the rows is real tokens, not padding
    assert report.sizes_line(len(train), len(evals)) == (f"12 training examples packed into {len(train)} rows of 128 "
                                                         f"tokens, {filled}; 0 evaluation examples")
    train, evals, report = build_datasets(config([path], eval_ratio=0.25), tokenizer, "sft")
    assert report.packed is None and report.sizes_line(len(train), len(evals)) == ("9 training and 3 evaluation "
                                                                                   "examples")


def test_stage_and_format_mismatch_is_a_bad_row(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "plain"}])
    with pytest.raises(DataError, match="stage sft needs conversations"):
        build_datasets(config([path]), tokenizer, "sft")


def test_eval_split_is_seeded_and_disjoint(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [qa(f"Question {i}?", f"Answer {i}.") for i in range(20)])

    def split(seed):
        train, evals, _ = build_datasets(config([path], eval_ratio=0.25, seed=seed), tokenizer, "sft")
        return [e.source for e in train], [e.source for e in evals]

    train, evals = split(0)
    assert len(evals) == 5 and len(train) == 15 and not set(train) & set(evals)
    assert split(0) == (train, evals)
    assert split(1)[1] != evals
    other = write_jsonl(tmp_path / "e.jsonl", [qa("Held?", "Out.")])
    cfg = config([path], eval_ratio=0.25)
    cfg.eval = [DatasetSpec(path=other)]
    train, evals, _ = build_datasets(cfg, tokenizer, "sft")
    assert len(train) == 20 and [e.source for e in evals] == [f"{other}:line 1"]


def test_max_samples_and_builtin_example_task(tokenizer):
    spec = DatasetSpec(path="builtin:example_task/train.jsonl", max_samples=7)
    train, _, report = build_datasets(config([spec]), tokenizer, "sft")
    assert len(train) == 7 and report.rows_read == 7
    assert train[0].source.endswith("example_task/train.jsonl:line 1")


def test_missing_local_path_is_not_looked_up_on_the_hub(tokenizer):
    with pytest.raises(DataError, match=rf"no such file or folder \(relative paths are looked up in the current "
                                        rf"folder, {re.escape(os.getcwd())}\)"):  # named, as for models
        build_datasets(config(["data/missing.jsonl"]), tokenizer, "sft")


def test_every_file_format_end_to_end(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.csv").write_text("question,answer\nWhat is red?,A colour.\n", encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": "Hi"},
                                                                    {"from": "gpt", "value": "Hello"}]}]),
                                     encoding="utf-8")
    pq.write_table(pa.table({"messages": [[{"role": "user", "content": "Name?"},
                                           {"role": "assistant", "content": "Forge."}]]}), tmp_path / "c.parquet")
    specs = [DatasetSpec(path=str(tmp_path / "a.csv"), columns={"instruction": "question", "output": "answer"}),
             str(tmp_path / "b.json"), str(tmp_path / "c.parquet")]
    train, _, report = build_datasets(config(specs), tokenizer, "sft")
    replies = [tokenizer.decode([t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE_INDEX]).strip()
               for e in train]
    assert replies == ["A colour.<|im_end|>", "Hello<|im_end|>", "Forge.<|im_end|>"]
    assert report.rows_read == 3 and not report.bad_rows


def test_a_row_of_another_format_says_the_format_was_detected_from_the_first_line(tmp_path, tokenizer):
    from tuneforge.data.build import read_spec

    path = write_jsonl(tmp_path / "mixed.jsonl", [
        qa("a", "b"), {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        {"instruction": "no answer"}])
    _, sharegpt, alpaca = read_spec(DatasetSpec(path=path), None, None)
    assert (sharegpt.field, sharegpt.problem) == ("<row>", "this row looks like sharegpt, but the file's format was "
                                                           "detected as alpaca from its line 1 (format auto reads each "
                                                           "file in one format). Keep one format per file, or convert "
                                                           "this row to alpaca.")
    assert alpaca.field == "output" and alpaca.problem.startswith("missing")  # an alpaca row keeps its own problem


def v1_turn(role: str, text: str, weight) -> dict:
    """A message in LLaMA-Factory's v1 layout (content parts, a per-message loss_weight)."""
    return {"role": role, "content": [{"type": "text", "value": text}], "loss_weight": weight}


def labelled_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def test_loss_weight_zero_masks_that_assistant_turn(tmp_path, tokenizer):
    row = {"messages": [v1_turn("user", "Q1", 0.0), v1_turn("assistant", "Alpha reply", 0.0),
                        v1_turn("user", "Q2", 0.0), v1_turn("assistant", "Beta reply", 1.0)]}
    path = write_jsonl(tmp_path / "v1.jsonl", [row])
    (example,), _, _ = build_datasets(config([path]), tokenizer, "sft")
    assert "Alpha" in tokenizer.decode(example.input_ids)
    assert labelled_text(tokenizer, example).strip() == "Beta reply<|im_end|>"
    (example,), _, _ = build_datasets(config([path], loss_on="all"), tokenizer, "sft")
    assert "Alpha" not in labelled_text(tokenizer, example) and "Q2" in labelled_text(tokenizer, example)
    row["messages"][1]["loss_weight"], row["messages"][3]["loss_weight"] = 1, 0
    path = write_jsonl(tmp_path / "v1_last.jsonl", [row, {"messages": [v1_turn("user", "Other?", 0),
                                                                           v1_turn("assistant", "Kept.", 1)]}])
    train, _, report = build_datasets(config([path], loss_on="last"), tokenizer, "sft")
    assert len(train) == 1 and report.dropped_no_loss == [f"{path}:line 1"]  # its only trained turn is excluded


@pytest.mark.parametrize("role, weight, words", [
    ("assistant", 0.5, "got 0.5; only 0 (no loss on this turn) and 1 are supported"),
    ("assistant", "1", "got '1'; only 0"),
    ("user", 1.0, "1 on a `user` message, but loss goes to assistant turns only"),
])
def test_other_loss_weights_are_bad_rows(tmp_path, tokenizer, role, weight, words):
    turns = [v1_turn("user", "Q", 0.0), v1_turn("assistant", "A", 1.0)]
    turns[0 if role == "user" else 1]["loss_weight"] = weight
    path = write_jsonl(tmp_path / "v1.jsonl", [{"messages": turns}])
    index = 0 if role == "user" else 1
    with pytest.raises(DataError, match=re.escape(f"field `messages[{index}].loss_weight`: {words}")):
        build_datasets(config([path]), tokenizer, "sft")


def test_eval_ratio_beside_an_eval_set_is_reported_as_unused(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [qa(f"Question {i}?", f"Answer {i}.") for i in range(8)])
    held = write_jsonl(tmp_path / "e.jsonl", [qa("Held?", "Out.")])
    cfg = config([path], eval_ratio=0.5)
    cfg.eval = [DatasetSpec(path=held)]
    train, evals, report = build_datasets(cfg, tokenizer, "sft")
    assert (len(train), len(evals)) == (8, 1)
    assert report.lines()[-1] == ("note: data.eval_ratio 0.5 is not used: data.eval names the evaluation rows, so no "
                                  "training row is held out")
    _, _, report = build_datasets(config([path], eval_ratio=0.5), tokenizer, "sft")
    assert not any("eval_ratio" in line for line in report.lines())


# ---- format auto: a damaged row of the file's format keeps that format's message ------------------------------

def chat(answer: str = "Hello") -> list[dict]:
    return [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer}]


def bad_rows_of(path: str, fmt: str, stage: str) -> list[str]:
    from tuneforge.data.build import read_datasets

    _, _, report = read_datasets(DataConfig(train=[DatasetSpec(path=path, format=fmt)], on_error="skip"),
                                 stage=stage)
    return [str(b) for b in report.bad_rows]


def test_a_bad_kto_label_gets_the_kto_message_with_format_auto(tmp_path):
    bad = [{"messages": chat(), "label": value} for value in (1, None, "yes", 0.7)] + [{"messages": chat()}]
    path = write_jsonl(tmp_path / "kto.jsonl", [{"messages": chat(), "label": True}, *bad,
                                                {"messages": chat(), "label": "false"}])
    expected = bad_rows_of(path, "kto", "kto")
    assert expected[0] == (f"{path}:line 2: field `label`: expected a boolean (true: a desirable reply, false: an "
                           f'undesirable one; the strings "true"/"false" are read too), got int 1')
    assert len(expected) == 5 and all("field `label`" in line for line in expected)
    assert bad_rows_of(path, "auto", "kto") == expected
    from tuneforge.data.build import read_spec  # read for no stage: the file's own format still decides

    assert [str(b) for b in read_spec(DatasetSpec(path=path), None, None) if hasattr(b, "problem")] == expected


def test_a_file_of_integer_kto_labels_is_told_to_write_booleans(tmp_path):
    from tuneforge.data.build import read_datasets

    path = write_jsonl(tmp_path / "ints.jsonl", [{"messages": chat(), "label": n % 2} for n in range(4)])
    for fmt in ("auto", "kto"):
        with pytest.raises(DataError, match=r'ints.jsonl: every `label` is the integer 0 or 1 \(4 rows\), but KTO '
                                            r'labels are booleans: write true .* The strings "true" and "false" are '
                                            r'accepted too') as info:
            read_datasets(DataConfig(train=[DatasetSpec(path=path, format=fmt)], on_error="skip"), stage="kto")
        assert "has none" not in str(info.value)
    train, _, report = read_datasets(DataConfig(train=[DatasetSpec(path=path)]), stage="sft")
    assert len(train) == 4 and not report.bad_rows  # for sft the file is chat rows with a column of its own


def test_a_pair_missing_rejected_gets_the_pair_message_with_format_auto(tmp_path):
    pair = {"prompt": "Add 2 and 3", "chosen": "5", "rejected": "6", "answer": "5"}
    rows = [pair, {"prompt": "Add 1 and 1", "chosen": "2", "answer": "2"}, qa("Hi", "Hello"), {"prompt": "Only?"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    missing = (f"{path}:line 2: field `rejected`: missing; preference rows need `rejected` (map another column to it "
               f"with `columns`)")
    assert bad_rows_of(path, "pairwise", "dpo")[0] == missing
    auto = bad_rows_of(path, "auto", "dpo")
    assert auto[0] == missing
    # rows that really are of another format still say so
    assert auto[1:] == [f"{path}:line {n}: field `<row>`: this row looks like {fmt}, but the file's format was "
                        f"detected as pairwise from its line 1 (format auto reads each file in one format). Keep one "
                        f"format per file, or convert this row to pairwise." for n, fmt in ((3, "alpaca"),
                                                                                            (4, "prompt"))]


# ---- a whole file of the wrong kind for the stage --------------------------------------------------------------

@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_rows_no_stage_can_use_are_one_message_about_the_file(tmp_path, on_error):
    from tuneforge.data.build import read_datasets

    sft = write_jsonl(tmp_path / "sft.jsonl", [qa(f"Q{i}?", f"A{i}.") for i in range(3)])
    text = write_jsonl(tmp_path / "doc.jsonl", [{"text": "A document."}])
    cfg = DataConfig(train=[DatasetSpec(path=sft), DatasetSpec(path=text)], on_error=on_error)
    with pytest.raises(DataError) as info:
        read_datasets(cfg, stage="dpo")
    assert str(info.value) == (
        f"No training row fits stage dpo: {sft} holds 3 SFT chat rows (data for stage sft); {text} holds 1 "
        f"plain-text rows (data for stage pt). Stage dpo trains on preference pairs (`prompt`, `chosen` and "
        f"`rejected` per row: format pairwise). Point `data.train` at such data (README: Data formats), or train "
        f"this data with the stage named for it.")
    with pytest.raises(DataError, match=rf"No training row fits stage kto: {re.escape(sft)} holds 3 SFT chat rows .*"
                                        r"Stage kto trains on conversations with a boolean `label`"):
        read_datasets(DataConfig(train=[DatasetSpec(path=sft)], on_error=on_error), stage="kto")


def test_chat_rows_without_a_label_are_refused_for_kto_while_reading(tmp_path):
    from tuneforge.data.build import read_datasets

    kto = write_jsonl(tmp_path / "kto.jsonl", [{"messages": chat(), "label": True}])
    sft = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat()}])
    with pytest.raises(DataError, match=r"chat.jsonl:line 1: field `label`: stage kto needs a boolean `label`"):
        read_datasets(DataConfig(train=[DatasetSpec(path=kto), DatasetSpec(path=sft)]), stage="kto")


# ---- max_length: the fix is named, and the count is of training rows --------------------------------------------

def test_no_training_example_left_names_the_max_length_fix_and_counts_training_rows(tmp_path, tokenizer):
    long = "Please answer this question carefully. " * 10
    train = write_jsonl(tmp_path / "train.jsonl", [qa(long, "Yes."), qa(long, "No.")])
    held = write_jsonl(tmp_path / "eval.jsonl", [qa(f"Q{i}?", "A.") for i in range(3)])
    cfg = config([train], max_length=16)
    cfg.eval = [DatasetSpec(path=held)]
    with pytest.raises(DataError) as info:
        build_datasets(cfg, tokenizer, "sft")
    message = str(info.value)
    assert message.startswith("No training examples left: none of the 2 training examples read is left after "
                              "encoding (5 rows read in all, training and evaluation).")
    assert "raise data.max_length" in message and "no trainable token" not in message


def test_coh_conversations_cut_at_max_length_name_the_fix(tmp_path, tokenizer):
    from tuneforge.configs.schema import CoHConfig
    from tuneforge.data.build import read_datasets
    from tuneforge.recipes.coh import hindsight_example

    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Explain the sky " * 10, "chosen": "Blue.",
                                                   "rejected": "Red."}])
    cfg = config([path], max_length=16)
    pairs, evals, report = read_datasets(cfg, stage="coh")
    rows = ([hindsight_example(p, CoHConfig(), 0) for p in pairs], evals, report)
    with pytest.raises(DataError, match=r"(?s)none of the 1 training examples.*raise data.max_length"):
        build_datasets(cfg, tokenizer, "sft", read=rows)


def test_several_datasets_report_rows_and_bad_rows_per_file(tmp_path):
    """A LLaMA-Factory user mixing alpaca + sharegpt files saw one total ("1390 rows read"): a file that gave
    nothing usable hid inside it."""
    from tuneforge.configs.schema import MixConfig
    from tuneforge.data.build import read_datasets

    a = write_jsonl(tmp_path / "a.jsonl", [qa("Hi", "Hello"), {"instruction": "No answer"}, qa("Two?", "2")])
    b = write_jsonl(tmp_path / "b.jsonl", [qa(f"Q{i}", f"A{i}") for i in range(5)])
    _, _, report = read_datasets(config([a, b], on_error="skip", eval_ratio=0))
    assert report.lines()[0] == f"8 rows read: {a} 3 (1 bad), {b} 5"
    _, _, report = read_datasets(config([a, b], on_error="skip", eval_ratio=0,
                                        mix=MixConfig(strategy="equal", size=6)))
    assert f"data.mix drew 6 training examples ({a} 3, {b} 3)" in report.lines()
    _, _, report = read_datasets(config([b], eval_ratio=0))
    assert report.lines() == ["5 rows read"]  # one dataset: the total says it all


def test_skipped_rows_are_counted_for_train_and_eval_apart(tmp_path, tokenizer):
    """12 bad rows in one line sends a user to the training file when most of them were evaluation rows."""
    train_file = bad_file(tmp_path)  # 4 bad of 6
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [qa("Hi", "Hello"), {"instruction": "No answer"},
                                                     qa("Long?", "word " * 60)])
    cfg = config([train_file], eval=[DatasetSpec(path=eval_file)], on_error="skip", max_length=40)
    _, evals, report = build_datasets(cfg, tokenizer, "sft")
    lines = report.lines()
    assert lines[0].startswith("9 rows read (6 train, 3 eval): ")
    assert lines[1].startswith("5 bad rows skipped: 4 train, 1 eval (first: ")
    assert any(line.startswith("1 example truncated to max_length: 0 train, 1 eval (first: ") for line in lines)
    _, _, alone = build_datasets(config([train_file], on_error="skip"), tokenizer, "sft")
    assert alone.lines()[1].startswith("4 bad rows skipped (first: ")  # no evaluation data: nothing to tell apart


def test_placeholders_are_warned_about_once_per_file(tmp_path, tokenizer, shared_assets):
    """LLaMA-Factory's identity.json has `{{name}}` and `{{author}}` for the user to fill in; trained as they are,
    the model says "I am {{name}}". One warning per file: the file, how many rows, the names and a sed command."""
    identity = str(shared_assets / "datasets/llamafactory/identity.json")
    code = write_jsonl(tmp_path / "code.jsonl", [qa("Show a Vue binding", "```html\n<p>{{ message }}</p>\n```"),
                                                 qa("Hi", "Hello")])
    rows = json.loads(open(identity, encoding="utf-8").read())
    expected = sum(bool(re.search(r"\{\{(name|author)\}\}", json.dumps(r, ensure_ascii=False))) for r in rows)
    _, _, report = build_datasets(config([identity, code]), tokenizer, "sft")
    warnings = [line for line in report.lines() if line.startswith("warning:")]
    assert len(warnings) == 1  # code in a fenced block is meant literally
    assert f"{identity}: {expected} rows contain the placeholders {{{{author}}}}, {{{{name}}}}" in warnings[0]
    assert f"sed -i 's/{{{{author}}}}/YOUR_AUTHOR/g; s/{{{{name}}}}/YOUR_NAME/g' {identity}" in warnings[0]
    assert any("I am {{name}}" in m["content"] for m in rows_as_messages(rows))  # left as written: not replaced


def rows_as_messages(rows: list[dict]) -> list[dict]:
    return [{"content": r["output"]} for r in rows]


def test_bad_rows_of_parquet_files_and_hub_splits_group_too():
    from tuneforge.data.build import bad_row_listing
    from tuneforge.data.types import BadRow

    bad = [BadRow(f"d.parquet:row {i}", "output", "empty") for i in range(1, 8)]
    bad += [BadRow(f"org/set[train]:row {i}", "output", "empty") for i in (3, 9)]
    listing, more = bad_row_listing(bad, 5)
    assert listing.splitlines() == ["  - d.parquet:rows 1, 2, 3, 4, 5, ... (7 rows): field `output`: empty",
                                    "  - org/set[train]:rows 3, 9: field `output`: empty"] and more == ""
