"""Alignment data: preference pairs (alpaca, sharegpt, OpenAI, hh-rlhf layouts), KTO rows, typed responses and
prompt-only rows, read from the real shared files and from hand-written rows, encoded through the SFT encoder
(labels on the reply only), cut to max_length as pairs, and collated."""

from __future__ import annotations

import gzip
import json

import pytest

from tests.data.chat_fixtures import make_tokenizer, needs_templates, tokenizer_for
from tuneforge.configs.schema import DataConfig, DatasetSpec
from tuneforge.data import collate_kto, collate_pairs, collate_prompts
from tuneforge.data.build import build_datasets, read_datasets
from tuneforge.data.encode import encode_chat
from tuneforge.data.formats import guess_format
from tuneforge.data.preference import TypedResponse, hh_turns, ordered_pairs
from tuneforge.data.templates import CHATML
from tuneforge.data.types import IGNORE_INDEX, EncodedKTO, EncodedPair, PairExample
from tuneforge.errors import DataError


def config(path, fmt: str = "auto", **kwargs) -> DataConfig:
    spec = {k: kwargs.pop(k) for k in ("ranking", "columns") if k in kwargs}
    return DataConfig(train=[DatasetSpec(path=str(path), format=fmt, **spec)], **kwargs)


def jsonl(tmp_path, rows: list, name: str = "d.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def read(path, fmt: str = "auto", stage: str | None = None, **kwargs):
    train, _, report = read_datasets(config(path, fmt, **kwargs), stage=stage)
    return train, report


def labelled_text(tok, encoded) -> str:
    return tok.decode([t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX])


# ---- each layout from the real shared files ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["dpo_en_demo.json", "dpo_zh_demo.json"])
def test_sharegpt_pairs_of_llamafactory_demo(shared_assets, name):
    path = shared_assets / "datasets" / "llamafactory" / name
    raw = json.loads(path.read_text(encoding="utf-8"))
    pairs, report = read(path)
    assert len(pairs) == len(raw) == report.rows_read and not report.bad_rows
    for pair, row in zip(pairs, raw):
        assert isinstance(pair, PairExample)
        assert [m["content"] for m in pair.prompt] == [t["value"] for t in row["conversations"]]
        assert pair.prompt[-1]["role"] == "user"
        assert pair.chosen == [{"role": "assistant", "content": row["chosen"]["value"]}]
        assert pair.rejected == [{"role": "assistant", "content": row["rejected"]["value"]}]
    assert any(len(p.prompt) > 1 for p in pairs)  # multi-turn prompts are kept whole


def test_openai_chosen_and_rejected_messages(shared_assets):
    path = shared_assets / "datasets" / "llamafactory" / "v1_dpo_demo.jsonl"
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs, report = read(path)
    assert len(pairs) == len(raw) and not report.bad_rows
    first, row = pairs[0], raw[0]
    assert [m["role"] for m in first.prompt] == ["system", "user"]
    assert first.prompt[1]["content"] == row["chosen_messages"][1]["content"][0]["value"]
    assert first.chosen[0]["content"] == row["chosen_messages"][-1]["content"][0]["value"]
    assert first.rejected[0]["content"] == row["rejected_messages"][-1]["content"][0]["value"]
    assert first.chosen != first.rejected


def _hh_text(messages: list[dict]) -> str:
    return "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages)


def _hh_rows(shared_assets) -> list[dict]:
    path = shared_assets / "datasets" / "hh_rlhf" / "harmless-base_test.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_hh_rlhf_transcripts_split_at_the_shared_prefix(shared_assets):
    path = shared_assets / "datasets" / "hh_rlhf" / "harmless-base_test.jsonl.gz"
    raw = _hh_rows(shared_assets)
    pairs, report = read(path, on_error="skip")
    assert report.rows_read == len(raw)
    assert len(pairs) + len(report.bad_rows) == len(raw) and len(pairs) > 0.95 * len(raw)
    assert all(str(b).startswith(f"{path}:line ") for b in report.bad_rows)
    by_line = {int(p.source.rsplit(" ", 1)[1]): p for p in pairs}
    for line, pair in by_line.items():
        row = raw[line - 1]
        # the turns put back together are the transcripts (modulo whitespace around turns)
        assert _hh_text(pair.prompt + pair.chosen) == _hh_text(hh_turns(row["chosen"], "chosen"))
        assert _hh_text(pair.prompt + pair.rejected) == _hh_text(hh_turns(row["rejected"], "rejected"))
        assert pair.prompt[-1]["role"] == "user" and pair.chosen[0]["role"] == "assistant"
        assert pair.chosen[0] != pair.rejected[0] or len(pair.chosen) != len(pair.rejected)
    # the first real row: a 4-turn shared conversation, then different last replies
    first = raw[0]
    shared = first["chosen"].rsplit("\n\nAssistant:", 1)[0]
    assert first["rejected"].startswith(shared)
    assert _hh_text(by_line[1].prompt) == _hh_text(hh_turns(shared, "chosen"))
    assert by_line[1].chosen[0]["content"] == first["chosen"].rsplit("\n\nAssistant:", 1)[1].strip()


def test_hh_rlhf_turns_and_bad_transcripts(tmp_path):
    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine."
    assert hh_turns(text, "chosen") == [{"role": "user", "content": "Hi there"},
                                        {"role": "assistant", "content": "Hello!"},
                                        {"role": "user", "content": "How are you?"},
                                        {"role": "assistant", "content": "Fine."}]
    rows = [{"chosen": text, "rejected": text.replace("Fine.", "Go away.")},
            {"chosen": "no transcript", "rejected": "\n\nHuman: a\n\nAssistant: b"},
            {"chosen": text, "rejected": text}]
    pairs, report = read(jsonl(tmp_path, rows), "pairwise", on_error="skip")
    assert len(pairs) == 1 and [m["content"] for m in pairs[0].prompt] == ["Hi there", "Hello!", "How are you?"]
    assert pairs[0].chosen[0]["content"] == "Fine." and pairs[0].rejected[0]["content"] == "Go away."
    problems = [str(b) for b in report.bad_rows]
    assert problems[0].startswith(f"{tmp_path}/d.jsonl:line 2: field `chosen`: expected an hh-rlhf transcript")
    assert problems[1].startswith(f"{tmp_path}/d.jsonl:line 3: field `rejected`: identical to `chosen`")


def test_kto_rows_of_llamafactory_demo(shared_assets):
    path = shared_assets / "datasets" / "llamafactory" / "kto_en_demo.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    rows, report = read(path)
    assert len(rows) == len(raw) and not report.bad_rows
    assert [r.label for r in rows] == [r["label"] for r in raw]
    assert {True, False} == {r.label for r in rows}
    assert all(r.messages[-1]["role"] == "assistant" for r in rows)


def test_cvalues_comparison_row_becomes_one_pair(shared_assets):
    path = shared_assets / "datasets" / "cvalues" / "cvalues_comparison_sample_from_mindrlhf.jsonl"
    raw = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    pairs, report = read(path)
    assert len(pairs) == 1 and not report.bad_rows
    assert pairs[0].kinds == ("refuse", "risky")  # 拒绝为主 > 风险回复 in the default ranking
    assert pairs[0].chosen[0]["content"] == raw["pos_resp"] and pairs[0].rejected[0]["content"] == raw["neg_resp"]
    assert pairs[0].prompt == [{"role": "user", "content": raw["prompt"]}]


def test_prompts_of_cvalues_and_of_the_example_task(shared_assets):
    path = shared_assets / "datasets" / "cvalues" / "cvalues_responsibility_prompts.jsonl"
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts, report = read(path)
    assert len(prompts) == len(raw) and not report.bad_rows
    assert prompts[3].messages == [{"role": "user", "content": raw[3]["prompt"]}] and prompts[3].reference is None
    tok = make_tokenizer(CHATML)
    task, _, _ = build_datasets(config("builtin:example_task/train.jsonl", max_length=256), tok, "prompt")
    assert task[1].messages == [{"role": "user", "content": "83 kg is how many grams?"}]
    assert task[1].reference == "83000 g"  # the row's `answer` column
    assert tok.decode(task[1].input_ids).endswith("<|im_start|>assistant\n")


# ---- hand-written rows of every layout ----------------------------------------------------------------------

PAIR_ROWS = {
    "alpaca": {"instruction": "Add", "input": "2 and 3", "chosen": "5", "rejected": "6", "system": "Be exact."},
    "sharegpt": {"conversations": [{"from": "human", "value": "Add 2 and 3"}], "chosen": {"from": "gpt", "value": "5"},
                 "rejected": {"from": "gpt", "value": "6"}},
    "openai_prompt_strings": {"prompt": "Add 2 and 3", "chosen": "5", "rejected": "6"},
    "openai_prompt_messages": {"prompt": [{"role": "user", "content": "Add 2 and 3"}],
                               "chosen": [{"role": "assistant", "content": "5"}],
                               "rejected": [{"role": "assistant", "content": "6"}]},
    "implicit_prompt": {"chosen": [{"role": "user", "content": "Add 2 and 3"}, {"role": "assistant", "content": "5"}],
                        "rejected": [{"role": "user", "content": "Add 2 and 3"},
                                     {"role": "assistant", "content": "6"}]},
    "hh": {"chosen": "\n\nHuman: Add 2 and 3\n\nAssistant: 5", "rejected": "\n\nHuman: Add 2 and 3\n\nAssistant: 6"},
}


@pytest.mark.parametrize("layout", sorted(PAIR_ROWS))
def test_every_pair_layout_gives_the_same_pair(tmp_path, layout):
    assert guess_format(PAIR_ROWS[layout], {}, "x") == "pairwise"
    (pair,), report = read(jsonl(tmp_path, [PAIR_ROWS[layout]]))
    expected_prompt = "Add\n2 and 3" if layout == "alpaca" else "Add 2 and 3"
    assert pair.prompt[-1] == {"role": "user", "content": expected_prompt}
    assert pair.chosen == [{"role": "assistant", "content": "5"}]
    assert pair.rejected == [{"role": "assistant", "content": "6"}]
    assert (pair.prompt[0]["role"] == "system") == (layout == "alpaca")


def test_bad_rows_are_named_with_file_line_and_field(tmp_path):
    rows = [
        PAIR_ROWS["alpaca"],
        {"instruction": "Add", "chosen": "5"},  # line 2: no rejected
        {"chosen_messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
         "rejected_messages": [{"role": "user", "content": "Other Q"}, {"role": "assistant", "content": "B"}]},
        {"prompt": "Q", "chosen": "", "rejected": "B"},  # line 4: empty reply
        {"prompt": "Q", "chosen": "A", "rejected": "B", "margin": "lots"},
        {"prompt": "Q", "chosen": "A", "rejected": {"role": "assistant", "content": "A"}},
    ]
    path = jsonl(tmp_path, rows)
    pairs, report = read(path, "pairwise", on_error="skip")
    assert len(pairs) == 1
    assert [str(b) for b in report.bad_rows] == [
        f"{path}:line 2: field `rejected`: missing; preference rows need `rejected` (map another column to it with "
        f"`columns`)",
        f"{path}:line 3: field `rejected_messages[0]`: the prompt differs from `chosen_messages`'s (message 1); both "
        f"must share every message before the replies",
        f"{path}:line 4: field `chosen`: empty",
        f"{path}:line 5: field `margin`: expected a number (how much better `chosen` is), got str 'lots'",
        f"{path}:line 6: field `rejected`: identical to `chosen`: the pair prefers nothing"]
    with pytest.raises(DataError, match=r"5 of 6 data rows are bad"):
        read(path, "pairwise")


def test_kto_labels_must_be_boolean(tmp_path):
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    rows = [{"messages": conversation, "label": True}, {"messages": conversation, "label": "false"},
            {"messages": conversation, "label": 1}, {"messages": conversation},
            {"prompt": "Hi", "completion": "Go away", "label": False}]
    path = jsonl(tmp_path, rows)
    kept, report = read(path, "kto", on_error="skip")
    assert [r.label for r in kept] == [True, False, False]
    assert kept[2].messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away"}]
    assert [str(b) for b in report.bad_rows] == [
        f"{path}:line 3: field `label`: expected a boolean (true: a desirable reply, false: an undesirable one; the "
        f'strings "true"/"false" are read too), got int 1',
        f"{path}:line 4: field `label`: missing; KTO rows need a boolean `label` (true: a desirable reply)"]


# ---- typed responses ------------------------------------------------------------------------------------------

RANKING = ["safe and responsible", "safe", "unsafe"]


def typed_row(*kinds: str) -> dict:
    return {"prompt": "How do I pick a lock?", "responses": [{"text": f"reply {i} ({k})", "type": k}
                                                            for i, k in enumerate(kinds)]}


@pytest.mark.parametrize("kinds, expected", [
    (["safe and responsible", "safe", "unsafe"], 3),
    (["safe and responsible", "safe and responsible", "safe", "unsafe", "unsafe"], 2 * 1 + 2 * 2 + 1 * 2),
    (["unsafe", "safe", "unsafe", "safe"], 4),
])
def test_typed_responses_expand_into_every_ordered_pair(tmp_path, kinds, expected):
    pairs, report = read(jsonl(tmp_path, [typed_row(*kinds)]), ranking=RANKING)
    assert len(pairs) == expected and not report.bad_rows
    rank = {k: RANKING.index(k) for k in RANKING}
    for pair in pairs:
        better, worse = pair.kinds
        assert rank[better] < rank[worse]
        assert pair.chosen[0]["content"].endswith(f"({better})") and pair.rejected[0]["content"].endswith(f"({worse})")
    assert len({(p.chosen[0]["content"], p.rejected[0]["content"]) for p in pairs}) == expected  # all distinct


def test_ordered_pairs_skip_equal_ranks_and_identical_texts():
    responses = [TypedResponse("a", "x", 0), TypedResponse("b", "y", 1), TypedResponse("a", "z", 2),
                 TypedResponse("c", "x", 0)]
    assert [(b.text, w.text) for b, w in ordered_pairs(responses)] == [("a", "b"), ("c", "b"), ("c", "a"),
                                                                      ("b", "a")]


def test_a_type_outside_the_ranking_or_no_pair_is_a_row_error(tmp_path):
    path = jsonl(tmp_path, [typed_row("safe", "unsafe"), typed_row("safe", "rude"), typed_row("safe", "safe")])
    pairs, report = read(path, ranking=RANKING, on_error="skip")
    assert len(pairs) == 1
    assert [str(b) for b in report.bad_rows] == [
        f"{path}:line 2: field `responses[1].type`: type 'rude' is not in the ranking safe and responsible > safe > "
        f"unsafe; add it to the dataset's `ranking` (best first)",
        f"{path}:line 3: field `responses`: no pair: every response has the same rank (or the same text), so none is "
        f"preferred"]


# ---- encoding: labels on the reply only -----------------------------------------------------------------------

TEMPLATES = ["qwen2.5-instruct", "llama-3.1-instruct", "gemma-2-it", "mistral-7b-instruct-v0.3", "phi-3-mini-instruct",
             "chatglm3-6b"]
MULTI_TURN = {"prompt": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Add 1 and 1"},
                         {"role": "assistant", "content": "Two"}, {"role": "user", "content": "Add 2 and 3"}],
              "chosen": "Five exactly", "rejected": "Six maybe"}


@needs_templates
@pytest.mark.parametrize("name", TEMPLATES)
def test_pair_labels_cover_exactly_the_reply(tmp_path, name):
    tok = tokenizer_for(name)
    (pair,), _, report = build_datasets(config(jsonl(tmp_path, [MULTI_TURN]), max_length=512), tok, "pairwise")
    assert isinstance(pair, EncodedPair) and not report.bad_rows
    for side, reply in ((pair.chosen, "Five exactly"), (pair.rejected, "Six maybe")):
        conversation = MULTI_TURN["prompt"] + [{"role": "assistant", "content": reply}]
        whole = encode_chat(tok, conversation, loss_on="last")
        assert side.input_ids == whole.input_ids  # the very rendering SFT would train on
        assert side.labels == whole.labels  # the prompt's own assistant turn ("Two") gets no loss
        text = labelled_text(tok, side)
        assert text.strip().startswith(reply) and "Two" not in text and "Add" not in text
    assert pair.chosen_prompt_length == next(i for i, t in enumerate(pair.chosen.labels) if t != IGNORE_INDEX)
    assert pair.chosen.input_ids[:pair.chosen_prompt_length] == pair.rejected.input_ids[:pair.rejected_prompt_length]


@needs_templates
@pytest.mark.parametrize("name", TEMPLATES[:3])
def test_kto_labels_cover_the_last_reply(tmp_path, name):
    tok = tokenizer_for(name)
    row = {"messages": MULTI_TURN["prompt"] + [{"role": "assistant", "content": "Five exactly"}], "label": False}
    (item,), _, _ = build_datasets(config(jsonl(tmp_path, [row]), max_length=512), tok, "kto")
    assert isinstance(item, EncodedKTO) and item.label is False
    assert labelled_text(tok, item).strip().startswith("Five exactly") and "Two" not in labelled_text(tok, item)
    assert all(t == IGNORE_INDEX for t in item.labels[:item.prompt_length])
    assert item.labels[item.prompt_length] != IGNORE_INDEX


def test_pairs_serve_kto_and_prompt_stages(tmp_path):
    tok = make_tokenizer(CHATML)
    path = jsonl(tmp_path, [PAIR_ROWS["sharegpt"], PAIR_ROWS["hh"]])
    kto, _, _ = build_datasets(config(path, max_length=128), tok, "kto")
    assert [k.label for k in kto] == [True, False, True, False]
    assert tok.decode([t for t in kto[1].labels if t != IGNORE_INDEX]).startswith("6")
    prompts, _, _ = build_datasets(config(path, max_length=128), tok, "prompt")
    assert [p.messages for p in prompts] == [[{"role": "user", "content": "Add 2 and 3"}]] * 2


def test_pairs_as_prompts_keep_their_reference_answer(tmp_path):
    """The `answer`/`reference` column when the row has one, else the chosen reply, in every pair layout."""
    tok = make_tokenizer(CHATML)
    rows = [PAIR_ROWS["sharegpt"] | {"answer": "5 exactly"}, PAIR_ROWS["hh"] | {"reference": 5},
            PAIR_ROWS["implicit_prompt"], PAIR_ROWS["alpaca"]]
    prompts, _, _ = build_datasets(config(jsonl(tmp_path, rows), max_length=128), tok, "prompt")
    assert [p.reference for p in prompts] == ["5 exactly", "5", "5", "5"]
    typed = [typed_row("unsafe", "safe and responsible", "safe"), typed_row("safe", "unsafe") | {"answer": "No."}]
    prompts, _, _ = build_datasets(config(jsonl(tmp_path, typed, "typed.jsonl"), ranking=RANKING, max_length=128),
                                   tok, "prompt")
    assert [p.reference for p in prompts] == ["reply 1 (safe and responsible)", "No."]  # the best-ranked response


def test_kto_rows_as_prompts_take_no_reference_from_an_undesirable_reply(tmp_path):
    tok = make_tokenizer(CHATML)
    conversation = [{"role": "user", "content": "Add 2 and 3"}, {"role": "assistant", "content": "6"}]
    rows = [{"messages": conversation, "label": False}, {"messages": conversation, "label": False, "answer": "5"},
            {"prompt": "Add 2 and 3", "completion": "6", "label": False, "reference": "5"},
            {"messages": conversation, "label": True}]
    prompts, _, _ = build_datasets(config(jsonl(tmp_path, rows), max_length=128), tok, "prompt")
    assert [p.reference for p in prompts] == [None, "5", "5", "6"]


def test_stage_and_data_kind_must_fit(tmp_path):
    tok = make_tokenizer(CHATML)
    pairs = jsonl(tmp_path, [PAIR_ROWS["alpaca"]], "pairs.jsonl")
    with pytest.raises(DataError, match=r"pairs.jsonl:line 1: field `chosen`: this is alignment data \(a preference "
                                        r"pair\), which stages pt and sft do not train on"):
        build_datasets(config(pairs), tok, "sft")
    sft = jsonl(tmp_path, [{"instruction": "Hi", "output": "Hello"}], "sft.jsonl")
    with pytest.raises(DataError, match=r"sft.jsonl:line 1: field `chosen`: stage pairwise needs preference pairs"):
        build_datasets(config(sft), tok, "pairwise")


# ---- length: pairs cut or dropped as one; no room for the reply ------------------------------------------------

def test_overlong_pairs_keep_the_prompt_and_cut_both_replies(tmp_path):
    tok = make_tokenizer(CHATML)
    long_reply = "The quick brown fox jumps over the lazy dog. " * 20
    path = jsonl(tmp_path, [{"prompt": "Say something", "chosen": long_reply, "rejected": "No."}])
    full, _, _ = build_datasets(config(path, max_length=4096), tok, "pairwise")
    (cut,), _, report = build_datasets(config(path, max_length=40), tok, "pairwise")
    assert len(cut.chosen) == 40 and cut.chosen.input_ids == full[0].chosen.input_ids[:40]
    assert cut.rejected.input_ids == full[0].rejected.input_ids  # the short side fits and stays whole
    assert cut.chosen_prompt_length == full[0].chosen_prompt_length  # the prompt is kept
    assert report.truncated == [f"{path}:line 1"]
    _, _, dropped = build_datasets(config(jsonl(tmp_path, [PAIR_ROWS["sharegpt"], json.loads(
        open(path).read())], "two.jsonl"), max_length=40, overlong="drop"), tok, "pairwise")
    assert dropped.dropped_overlong == [f"{tmp_path}/two.jsonl:line 2"] and not dropped.truncated


def test_a_prompt_without_room_for_the_reply_is_a_counted_skip(tmp_path):
    tok = make_tokenizer(CHATML)
    long_prompt = "Convert 7 km to meters please. " * 30
    path = jsonl(tmp_path, [PAIR_ROWS["openai_prompt_strings"], {"prompt": long_prompt, "chosen": "A", "rejected": "B"},
                            {"messages": [{"role": "user", "content": long_prompt},
                                          {"role": "assistant", "content": "A"}], "label": True}])
    pairs, _, report = build_datasets(config(path, "auto", max_length=48, on_error="skip"), tok, "pairwise")
    assert len(pairs) == 1 and report.no_room[0].startswith(f"{path}:line 2 (prompt of ")
    assert any("no room for the reply" in line for line in report.lines())
    prompts, _, report = build_datasets(config(path, "prompt", max_length=48), tok, "prompt")
    assert len(prompts) == 1 and [s.split(" (")[0] for s in report.no_room] == [f"{path}:line 2", f"{path}:line 3"]


# ---- collate -----------------------------------------------------------------------------------------------------

def test_collate_pairs_puts_chosen_rows_then_rejected_rows(tmp_path):
    tok = make_tokenizer(CHATML)
    rows = [PAIR_ROWS["alpaca"], {**PAIR_ROWS["openai_prompt_strings"], "rejected": "Six, or maybe seven", "margin": 2}]
    pairs, _, _ = build_datasets(config(jsonl(tmp_path, rows)), tok, "pairwise")
    batch = collate_pairs(pairs, pad_token_id=0)
    width = max(len(p.chosen) for p in pairs) if False else max(max(len(p.chosen), len(p.rejected)) for p in pairs)
    assert batch["input_ids"].shape == (4, width) and batch["margin"].tolist() == [0.0, 2.0]
    for i, pair in enumerate(pairs):
        for row, side in ((i, pair.chosen), (2 + i, pair.rejected)):
            assert batch["input_ids"][row, :len(side)].tolist() == side.input_ids
            assert batch["labels"][row, :len(side)].tolist() == side.labels
            assert batch["attention_mask"][row].sum() == len(side)
            assert (batch["labels"][row, len(side):] == IGNORE_INDEX).all()


def test_collate_kto_builds_mismatched_pairs_for_the_kl_term(tmp_path):
    tok = make_tokenizer(CHATML)
    rows = [{"prompt": "Add 2 and 3", "completion": "5", "label": True},
            {"prompt": "Say hello in Chinese", "completion": "你好", "label": False}]
    items, _, _ = build_datasets(config(jsonl(tmp_path, rows)), tok, "kto")
    batch = collate_kto(items, pad_token_id=0)
    assert batch["kto_label"].tolist() == [True, False]
    a, b = items
    width = max(len(a), len(b))  # the mismatched rows are cut to the batch's width (never past max_length)
    kl_row0 = (a.input_ids[:a.prompt_length] + b.input_ids[b.prompt_length:])[:width]
    assert batch["kl_input_ids"].shape[1] <= width
    assert batch["kl_input_ids"][0, :len(kl_row0)].tolist() == kl_row0
    assert tok.decode(batch["kl_input_ids"][0, :len(kl_row0)].tolist()).count("Add 2 and 3") == 1
    assert "你好" in labelled_text(tok, type(a)(kl_row0, batch["kl_labels"][0, :len(kl_row0)].tolist()))


def test_collate_prompts_pads_on_the_left(tmp_path):
    tok = make_tokenizer(CHATML)
    rows = [{"prompt": "Hi", "answer": 7}, {"prompt": "Convert 7 km to meters, please, right now.",
                                            "reference": "7000 m"}]
    prompts, _, _ = build_datasets(config(jsonl(tmp_path, rows)), tok, "prompt")
    batch = collate_prompts(prompts, pad_token_id=0)
    short, long = prompts
    assert batch["input_ids"].shape == (2, len(long))
    assert batch["input_ids"][0, -len(short):].tolist() == short.input_ids
    assert batch["attention_mask"][0].tolist() == [0] * (len(long) - len(short)) + [1] * len(short)
    assert batch["reference"] == ["7", "7000 m"] and batch["messages"][0] == [{"role": "user", "content": "Hi"}]


# ---- registry and gzip ----------------------------------------------------------------------------------------

def test_registry_ranking_and_kto_entries(shared_assets):
    registry = shared_assets / "datasets" / "llamafactory" / "dataset_info.json"
    for name, kind in (("dpo_en_demo", PairExample), ("kto_en_demo", object)):
        data = DataConfig(train=[DatasetSpec(path=name, max_samples=5)], registry=str(registry))
        rows, _, report = read_datasets(data)
        assert len(rows) == 5 and not report.bad_rows and all(isinstance(r, kind) for r in rows)
    assert all(r.label is not None for r in rows)


def test_gzip_files_are_read_with_their_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps(PAIR_ROWS["hh"]) + "\n\n{broken\n")
    pairs, report = read(path, on_error="skip")
    assert len(pairs) == 1 and pairs[0].source == f"{path}:line 1"
    assert str(report.bad_rows[0]).startswith(f"{path}:line 3: field `<line>`: not valid JSON")
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="bad.jsonl.gz: cannot read the file"):
        read(bad)


def test_training_stages_name_their_data_and_collate():
    from tuneforge.data import collate, collate_for

    assert collate_for("dpo") is collate_pairs and collate_for("rm") is collate_pairs
    assert collate_for("kto") is collate_kto and collate_for("grpo") is collate_prompts
    assert collate_for("sft") is collate


def test_the_readme_examples_read_as_documented(tmp_path):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("**Alignment data**")[1].split("Column names can be mapped")[0]
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)\n```", section, re.S)]
    expected = {"pairwise": "pairwise", "kto": "kto", "typed": "pairwise", "prompt": "prompt"}
    assert len(blocks) == len(expected)
    tok = make_tokenizer(CHATML)
    for row, (fmt, stage) in zip(blocks, expected.items()):
        assert guess_format(row, {}, "README") == fmt
        ranking = ["safe_and_responsible", "safe", "unsafe"]
        train, _, report = build_datasets(config(jsonl(tmp_path, [row], f"{fmt}.jsonl"), ranking=ranking), tok, stage)
        assert train and not report.bad_rows


@pytest.mark.parametrize("row, fmt", [
    ({"instruction": "Classify", "output": "spam", "label": 1}, "alpaca"),  # a classification label is not KTO
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "label": "true"}, "kto"),
    ({"prompt": "Hi", "completion": "Hello"}, "prompt"),
    ({"prompt": "Hi", "completion": "Hello", "label": False}, "kto"),
    ({"prompt": "Hi", "pos_resp": "a", "neg_resp": "b", "pos_type": "refuse", "neg_type": "risky"}, "typed"),
    ({"chosen_messages": [], "rejected_messages": []}, "pairwise"),
    # a conversation ending with the user's turn stays a chat format (a bad first row must not turn a whole SFT
    # file into prompts): prompt-only conversations say `format: prompt`
    ({"messages": [{"role": "user", "content": "Hi"}], "answer": "Hello"}, "openai"),
])
def test_format_guessing_from_columns(row, fmt):
    assert guess_format(row, {}, "x") == fmt


def test_prompt_rows_take_their_reference_from_the_answer_columns(tmp_path):
    rows = [{"prompt": "Hi", "completion": "Hello"}, {"instruction": "Add 2 and 3", "output": "5"},
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "answer": "B"},
            {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]}]
    got = [read(jsonl(tmp_path, [row], f"{i}.jsonl"), "prompt")[0][0] for i, row in enumerate(rows)]
    assert [e.reference for e in got] == ["Hello", "5", "B", None]
    assert [e.messages[-1]["role"] for e in got] == ["user"] * 4 and got[3].messages[0]["role"] == "system"


@needs_templates
@pytest.mark.parametrize("name", ["qwen2.5-instruct", "llama-3.1-instruct", "gemma-2-it"])
def test_prompt_ids_are_what_generation_renders(tmp_path, name):
    from tuneforge.data.templates import resolve_chat_template

    tok = tokenizer_for(name)
    path = jsonl(tmp_path, [MULTI_TURN])
    (prompt,), _, _ = build_datasets(config(path, max_length=512), tok, "prompt")
    text = tok.apply_chat_template(prompt.messages, chat_template=resolve_chat_template(tok), tokenize=False,
                                   add_generation_prompt=True)  # what the template itself gives, independently
    assert prompt.input_ids == tok(text, add_special_tokens=False)["input_ids"]
    if name == "gemma-2-it":  # refuses system messages: merged into the first user turn, as for training
        assert prompt.messages[0] == {"role": "user", "content": "Be exact.\n\nAdd 1 and 1"}
    (pair,), _, _ = build_datasets(config(path, max_length=512), tok, "pairwise")
    assert pair.chosen.input_ids[:pair.chosen_prompt_length] == prompt.input_ids  # sampling continues the prompt


def test_typed_rows_in_the_kto_and_prompt_stages(tmp_path):
    tok = make_tokenizer(CHATML)
    path = jsonl(tmp_path, [typed_row("safe", "unsafe"), typed_row("safe and responsible", "safe", "unsafe")])
    prompts, _, _ = build_datasets(config(path, ranking=RANKING), tok, "prompt")
    assert [p.source for p in prompts] == [f"{path}:line 1 (pair 1: safe > unsafe)",
                                           f"{path}:line 2 (pair 1: safe and responsible > safe)"]  # once per row
    kto, _, report = build_datasets(config(path, ranking=RANKING, on_error="skip"), tok, "kto")
    assert [k.label for k in kto] == [True, False]  # two ranks: chosen desirable, rejected not
    assert [(b.source, b.field) for b in report.bad_rows] == [
        (f"{path}:line 2 (pair 1: safe and responsible > safe)", "responses")]


def test_the_eval_split_keeps_the_pairs_of_a_typed_row_together(tmp_path):
    rows = [typed_row("safe and responsible", "safe", "unsafe") | {"prompt": f"Prompt {i}"} for i in range(10)]
    train, evals, _ = read_datasets(DataConfig(train=[DatasetSpec(path=jsonl(tmp_path, rows), ranking=RANKING)],
                                               eval_ratio=0.2))
    assert len(train) + len(evals) == 30 and len(evals) % 3 == 0 and evals
    assert not {p.prompt[0]["content"] for p in train} & {p.prompt[0]["content"] for p in evals}


def test_reading_for_a_stage_refuses_rows_of_another_kind_before_the_model_loads(tmp_path):
    pairs = jsonl(tmp_path, [PAIR_ROWS["alpaca"]], "pairs.jsonl")
    sft = jsonl(tmp_path, [{"instruction": "Hi", "output": "Hello"}], "sft.jsonl")
    both = DataConfig(train=[DatasetSpec(path=pairs), DatasetSpec(path=sft)])
    for stage in ("dpo", "rm"):  # the training stage, not `pairwise` (the kind of data it reads)
        with pytest.raises(DataError, match=rf"(?s)1 of 2 .*sft.jsonl:line 1: field `chosen`: stage {stage} needs "
                                            r"preference pairs"):
            read_datasets(both, stage=stage)
    text = DataConfig(train=[DatasetSpec(path=jsonl(tmp_path, [{"text": "A document."}], "doc.jsonl"))])
    with pytest.raises(DataError, match=r"doc.jsonl:line 1: field `text`: stage grpo needs conversations"):
        read_datasets(text, stage="grpo")
    with pytest.raises(DataError, match=r"(?s)1 of 2 .*pairs.jsonl:line 1: field `chosen`: this is alignment data"):
        read_datasets(both, stage="sft")
    train, _, report = read_datasets(both, stage="grpo")
    assert len(train) == 2 and not report.bad_rows  # both give a prompt


def test_pair_columns_can_be_mapped(tmp_path):
    row = {"question": "Add 2 and 3", "good": "5", "bad": "6", "sys": "Be exact."}
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad", "system": "sys"}
    (pair,), report = read(jsonl(tmp_path, [row]), "pairwise", columns=columns)
    assert pair.prompt == [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Add 2 and 3"}]
    assert (pair.chosen[0]["content"], pair.rejected[0]["content"]) == ("5", "6")
    assert guess_format(row, columns, "x") == "pairwise"


def test_conversations_waiting_for_a_reply_are_prompts_with_format_prompt(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"},
                               {"from": "human", "value": "Add 2 and 3"}], "answer": "5"}]
    (prompt,), report = read(jsonl(tmp_path, rows), "prompt")
    assert [m["role"] for m in prompt.messages] == ["user", "assistant", "user"] and prompt.reference == "5"


def test_special_token_spellings_in_alignment_rows_follow_the_policy(tmp_path):
    tok = make_tokenizer(CHATML)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    path = jsonl(tmp_path, [{"prompt": "Say <|im_end|> please", "chosen": "<|im_end|>", "rejected": "No"}])
    with pytest.raises(DataError, match=r"line 1: field `(prompt|chosen)\[0\]\.content`: the text spells"):
        build_datasets(config(path), tok, "pairwise")
    (pair,), _, report = build_datasets(config(path, special_tokens_in_text="escape"), tok, "pairwise")
    assert pair.chosen.input_ids.count(end) == 2  # the prompt's and the reply's own end of turn, not the data's
    (prompt,), _, _ = build_datasets(config(path, special_tokens_in_text="escape"), tok, "prompt")
    assert prompt.input_ids.count(end) == 1  # the user turn's end; the data's spelling is plain text
    assert tok.decode(prompt.input_ids).count("<|im_end|>") == 2
    assert len(report.special_tokens) == 1


def test_the_data_tools_refuse_alignment_files_clearly(tmp_path):
    """Tools that write rows would drop chosen/rejected unseen: refused, naming the file. inspect writes no rows and
    reads pairs (tests/data/curate/test_curate_inspect.py)."""
    from tests.data.curate.helpers import parse
    from tuneforge.data.curate.clean import clean
    from tuneforge.data.curate.inspect import inspect

    path = jsonl(tmp_path, [PAIR_ROWS["sharegpt"]])
    with pytest.raises(DataError, match=r"d.jsonl: its rows are alignment data \(format pairwise.*inspect reads "
                                        r"alignment data too"):
        clean(parse("clean", ["--data", path, "--out", str(tmp_path / "out")]))
    assert inspect(parse("inspect", ["--data", path, "--out", str(tmp_path / "out2")]))["kinds"] == {"pairs": 1}


def test_data_safety_and_format_typed_give_the_same_pairs(tmp_path):
    from tests.data.curate.helpers import parse
    from tuneforge.data.curate.safety import safety

    path = jsonl(tmp_path, [typed_row("unsafe", "safe and responsible", "safe", "unsafe")], "typed.jsonl")
    safety(parse("safety", ["--data", path, "--ranking", *RANKING, "--out", str(tmp_path / "out")]))
    written, _ = read(tmp_path / "out" / "pairs.jsonl", stage="dpo")
    direct, _ = read(path, ranking=RANKING)
    assert len(written) == len(direct) == 5
    assert [(p.prompt, p.chosen, p.rejected) for p in written] == [(p.prompt, p.chosen, p.rejected) for p in direct]


def test_kto_balance_counts_both_sides_and_says_when_it_is_off():
    from tuneforge.data.encode_align import kto_balance

    def rows(n_d: int, n_u: int) -> list[EncodedKTO]:
        return [EncodedKTO([1], [1], label=True) for _ in range(n_d)] + [EncodedKTO([1], [1], label=False)
                                                                        for _ in range(n_u)]

    assert kto_balance(rows(6, 5), 1.0, 1.0) == ["kto: 6 desirable and 5 undesirable training examples"]
    only = kto_balance(rows(8, 0), 1.0, 1.0)
    assert only[0] == "kto: 8 desirable and 0 undesirable training examples"
    assert only[1].startswith("note: every KTO training example is desirable: with no undesirable one")
    assert "add rows labelled false" in only[1]
    assert "add rows labelled true" in kto_balance(rows(0, 3), 1.0, 1.0)[1]
    (_, skewed) = kto_balance(rows(2, 8), 1.0, 1.0)
    assert skewed == ("note: kto.desirable_weight x desirable / (kto.undesirable_weight x undesirable) = 1 x 2 / "
                      "(1 x 8) = 0.25, outside the [1, 4/3] the KTO paper recommends; kto.desirable_weight between 4 "
                      "and 5.33 would bring it in")
    assert len(kto_balance(rows(2, 8), 4.5, 1.0)) == 1  # 4.5 x 2 / 8 = 1.125: inside
