"""Stage pt's data as a LLaMA-Factory user meets it: every token of a document (its eos included) is trained after
chunking, and a file of the wrong kind for pt or sft is one error about the file before the model loads.

The fixes: data/build.py `chunk_starts`, data/encode_align.py `for_stage`."""

from __future__ import annotations

import pytest

from tests.data.chat_fixtures import make_tokenizer
from tests.data.curate.helpers import write_jsonl
from tuneforge.configs.schema import DataConfig, DatasetSpec
from tuneforge.data import IGNORE_INDEX, build_datasets
from tuneforge.data.build import read_datasets
from tuneforge.data.templates import CHATML
from tuneforge.errors import DataError

DOCUMENT = "Anarchism is a political philosophy and movement that is sceptical of authority."


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(CHATML)


def config(path: str, **kwargs) -> DataConfig:
    return DataConfig(train=[DatasetSpec(path=path)], **kwargs)


@pytest.mark.parametrize("packing", [False, True])
def test_a_document_one_token_longer_than_its_chunks_keeps_its_eos(tmp_path, tokenizer, packing):
    """c4_demo.jsonl line 94 at max_length 512: the document and its eos are 513 tokens, and the eos alone, a
    chunk that predicts nothing, was dropped ("1 example dropped because no trainable token was left")."""
    ids = tokenizer(DOCUMENT)["input_ids"] + [tokenizer.eos_token_id]
    max_length = len(ids) - 1  # the chunks: all but the last token, then the eos alone
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": DOCUMENT}])
    train, _, report = build_datasets(config(path, max_length=max_length, packing=packing), tokenizer, "pt")
    assert not report.dropped_no_loss and report.split_documents == [f"{path}:line 1"]
    trained = [label for row in train for label in row.labels[1:] if label != IGNORE_INDEX]
    assert tokenizer.eos_token_id in trained  # the document's end is learnt
    assert sorted(t for row in train for t in row.input_ids) == sorted(ids)  # no token lost, none doubled
    assert all(len(row) <= max_length for row in train)


@pytest.mark.parametrize("stage, rows, held, needs", [
    ("pt", [{"instruction": f"Q{i}?", "output": f"A{i}."} for i in range(3)], "3 SFT chat rows (data for stage sft)",
     "plain text (format text)"),
    ("sft", [{"text": f"Document {i}."} for i in range(3)], "3 plain-text rows (data for stage pt)",
     "conversations (alpaca, sharegpt or openai rows)"),
])
def test_a_file_of_the_other_kind_is_one_error_while_reading(tmp_path, stage, rows, held, needs):
    """`stage: pt` on alpaca_en_demo.json (or sft on wiki_demo.txt) listed 999 bad rows after the model loaded and
    advised `data.on_error=skip`, which leaves no row; the file-level message says what the file holds."""
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError) as info:
            read_datasets(config(path, on_error=on_error), stage=stage)  # before any tokenizer or model
        assert str(info.value).startswith(f"No training row fits stage {stage}: {path} holds {held}. Stage {stage} "
                                          f"trains on {needs}.")
