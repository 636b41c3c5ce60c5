"""Huge rows cost what max_length can use, and data text that spells a special token is kept, escaped or refused
(`data.special_tokens_in_text`) and counted."""

from __future__ import annotations

import json

import pytest

from tests.data.chat_fixtures import make_tokenizer
from tuneforge.configs.schema import DataConfig, DatasetSpec
from tuneforge.data import IGNORE_INDEX, build_datasets, encode, encode_chat
from tuneforge.data.encode import CHARS_PER_TOKEN
from tuneforge.data.templates import CHATML
from tuneforge.errors import DataError

WORDS = "The quick brown fox jumps over the lazy dog. Two plus two is four.\n"


def recording(tokenizer):
    """The tokenizer, recording the length of every text it tokenizes or renders."""
    base = type(tokenizer)

    class Recording(base):
        def __call__(self, text, *args, **kwargs):
            self.lengths.append(len(text))
            return base.__call__(self, text, *args, **kwargs)

        def apply_chat_template(self, *args, **kwargs):
            out = base.apply_chat_template(self, *args, **kwargs)
            self.lengths.append(len(out) if isinstance(out, str) else 0)
            return out

    tokenizer.__class__ = Recording
    tokenizer.lengths = []
    return tokenizer


def config(path, **kwargs) -> DataConfig:
    return DataConfig(train=[DatasetSpec(path=str(path))], **kwargs)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ---- huge rows ------------------------------------------------------------------------------------------------

def test_a_huge_reply_is_cut_before_it_is_rendered_and_tokenized(tmp_path):
    tokenizer = recording(make_tokenizer(CHATML))
    reply = WORDS * 30_000  # 2 MB
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Hi", "output": reply}])
    train, _, report = build_datasets(config(path, max_length=64), tokenizer, "sft")
    assert max(tokenizer.lengths) < 64 * CHARS_PER_TOKEN + 200  # the template's own text on top
    assert len(train[0]) == 64 and report.truncated == [f"{path}:line 1"]


def test_cutting_a_huge_message_truncates_exactly_like_max_length():
    tokenizer = make_tokenizer(CHATML)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": WORDS * 100}]  # 6700 chars
    assert len(messages[1]["content"]) > 64 * CHARS_PER_TOKEN
    capped = encode_chat(tokenizer, messages, max_length=64)
    whole = encode_chat(tokenizer, messages)
    assert capped.truncated and len(capped) < len(whole)
    assert capped.input_ids[:64] == whole.input_ids[:64] and capped.labels[:64] == whole.labels[:64]


def test_a_cut_reply_never_trains_its_end_marker(monkeypatch):
    """Were tokens longer than CHARS_PER_TOKEN characters, the cut text could fit in max_length: the ids then end
    where the cut content ends, so the model is never taught to end a turn after a reply cut short."""
    monkeypatch.setattr(encode, "CHARS_PER_TOKEN", 1)
    tokenizer = make_tokenizer(CHATML)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": WORDS * 3}]
    encoded = encode_chat(tokenizer, messages, max_length=64)  # contents cut to 64 characters: fewer tokens
    assert encoded.truncated and len(encoded) < 64
    assert tokenizer.decode(encoded.input_ids).endswith(messages[1]["content"][:64 - len("Hi")])
    assert "<|im_end|>" not in tokenizer.decode([t for t in encoded.labels if t != IGNORE_INDEX])


def test_a_huge_document_is_tokenized_in_windows_with_the_same_ids(tmp_path):
    tokenizer = recording(make_tokenizer(CHATML))
    text = WORDS * 15_000  # 1 MB
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": text}])
    train, _, report = build_datasets(config(path, max_length=64, packing=False), tokenizer, "pt")
    assert max(tokenizer.lengths) <= 64 * CHARS_PER_TOKEN
    whole = make_tokenizer(CHATML)(text)["input_ids"] + [tokenizer.eos_token_id]
    assert [t for e in train for t in e.input_ids] == whole
    assert report.split_documents == [f"{path}:line 1"]


# ---- text that spells special tokens ----------------------------------------------------------------------------

SPELLED = {"instruction": "Say <|im_end|> please", "output": "Here: <|im_end|> done."}


def test_special_token_spellings_are_refused_by_default(tmp_path):
    tokenizer = make_tokenizer(CHATML)
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Hi", "output": "Hello"}, SPELLED])
    assert DataConfig().special_tokens_in_text == "error"
    with pytest.raises(DataError, match=r"line 2: field `output`: .*special token '<\|im_end\|>'"):  # the row's own
        build_datasets(config(path), tokenizer, "sft")
    train, _, report = build_datasets(config(path, on_error="skip"), tokenizer, "sft")
    assert len(train) == 1 and len(report.bad_rows) == 1


def test_keep_counts_them_and_lets_them_act_as_the_token(tmp_path):
    tokenizer = make_tokenizer(CHATML)
    path = write_jsonl(tmp_path / "d.jsonl", [SPELLED])
    train, _, report = build_datasets(config(path, special_tokens_in_text="keep"), tokenizer, "sft")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert train[0].input_ids.count(end) == 4  # two written by the template, two by the data
    assert report.special_tokens == [f"{path}:line 1 ('<|im_end|>', kept)"]
    assert any("1 row spells a special token" in line for line in report.lines())


def test_escape_tokenizes_them_as_plain_text(tmp_path):
    tokenizer = make_tokenizer(CHATML)
    path = write_jsonl(tmp_path / "d.jsonl", [SPELLED])
    train, _, report = build_datasets(config(path, special_tokens_in_text="escape"), tokenizer, "sft")
    ids, labels = train[0].input_ids, train[0].labels
    specials = set(tokenizer.added_tokens_decoder)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids.count(end) == 2  # only the template's own end-of-turn markers
    plain = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                                          tokenize=True)["input_ids"]
    assert [t for t in ids if t in specials] == [t for t in plain if t in specials]  # none from the data
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(
        [{"role": "user", "content": SPELLED["instruction"]}, {"role": "assistant", "content": SPELLED["output"]}],
        tokenize=False)
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]).strip() == "Here: <|im_end|> done.<|im_end|>"
    assert report.special_tokens == [f"{path}:line 1 ('<|im_end|>', escaped)"]


def test_escape_in_pre_training_text(tmp_path):
    tokenizer = make_tokenizer(CHATML)
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "one <|im_start|> two <|endoftext|> three"}])
    train, _, _ = build_datasets(config(path, special_tokens_in_text="escape", packing=False), tokenizer, "pt")
    ids = train[0].input_ids
    assert [t for t in ids if t in tokenizer.added_tokens_decoder] == [tokenizer.eos_token_id] and ids[-1] == \
        tokenizer.eos_token_id
    assert tokenizer.decode(ids[:-1]) == "one <|im_start|> two <|endoftext|> three"


def test_ten_thousand_turns_are_not_rendered_whole():
    tokenizer = recording(make_tokenizer(CHATML))
    turns = [{"role": role, "content": f"{role} says {k}: {WORDS}"} for k in range(5000)
             for role in ("user", "assistant")]
    encoded = encode_chat(tokenizer, turns, max_length=64)
    assert encoded.truncated and max(tokenizer.lengths) < 64 * CHARS_PER_TOKEN * 2
    assert len(tokenizer.lengths) < 200  # prompts are rendered per assistant turn: only those before the cut
    whole = encode_chat(make_tokenizer(CHATML), turns[:40])
    assert encoded.input_ids[:64] == whole.input_ids[:64] and encoded.labels[:64] == whole.labels[:64]
    last = encode_chat(tokenizer, turns, max_length=64, loss_on="last")  # the last turn is far past the cut
    assert all(label == IGNORE_INDEX for label in last.labels)


def test_windows_keep_the_tokenizers_own_bos_and_eos():
    from tokenizers import processors

    from tuneforge.data.build import tokenize_document

    tokenizer = make_tokenizer(None)
    bos, eos = tokenizer.convert_tokens_to_ids("<s>"), tokenizer.convert_tokens_to_ids("</s>")
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)])
    text = WORDS * 300
    windowed = tokenize_document(tokenizer, text, 500)
    assert windowed == tokenizer(text)["input_ids"] and windowed[0] == bos and windowed[-1] == eos
    assert windowed.count(bos) == 1 and windowed.count(eos) == 1
