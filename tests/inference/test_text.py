"""TextStream: incremental detokenisation never splits a character, never shows part of a stop string, and adds up
to what `tokenizer.decode` gives for the whole reply."""

from __future__ import annotations

import pytest

from tuneforge.configs.schema import ModelConfig
from tuneforge.inference.text import TextStream
from tuneforge.models.loading import load_tokenizer

TEXT = "Hello, 世界! Les élèves ont mangé 🍕🍣 à 12:30 — 好吃吗？ ok"


@pytest.fixture(scope="module")
def tok(tiny_qwen2_dir):
    return load_tokenizer(ModelConfig(name_or_path=str(tiny_qwen2_dir)))


def _feed(tok, ids: list[int], stop=()) -> tuple[list[str], TextStream]:
    stream = TextStream(tok, stop)
    pieces = []
    for token in ids:
        pieces.append(stream.add(token))
        if stream.stopped:
            break
    pieces.append(stream.flush())
    return pieces, stream


def test_pieces_add_up_to_decode_and_never_split_a_character(tok):
    ids = tok(TEXT, add_special_tokens=False).input_ids
    pieces, _ = _feed(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == TEXT
    assert not any("\ufffd" in p for p in pieces)
    # The byte-level tokenizer splits some characters over several tokens: those steps showed nothing yet.
    assert "" in pieces[:-1] and sum(bool(p) for p in pieces) > 10


def test_special_tokens_are_not_shown(tok):
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok("42", add_special_tokens=False).input_ids + [end] + tok(" more", add_special_tokens=False).input_ids
    assert "".join(_feed(tok, ids)[0]) == "42 more"


@pytest.mark.parametrize("stop, shown", [
    (["好吃"], "Hello, 世界! Les élèves ont mangé 🍕🍣 à 12:30 — "),
    (["12:3", "never"], "Hello, 世界! Les élèves ont mangé 🍕🍣 à "),
    (["mangé 🍕X", "Les é"], "Hello, 世界! "),
])
def test_stop_strings_cut_the_text_and_are_never_streamed(tok, stop, shown):
    ids = tok(TEXT, add_special_tokens=False).input_ids
    pieces, stream = _feed(tok, ids, stop)
    assert stream.stopped and "".join(pieces) == shown
    streamed = ""
    for piece in pieces:  # at no point did the client see text beyond what it finally gets
        streamed += piece
        assert shown.startswith(streamed)


def test_a_held_back_prefix_is_released_when_it_is_not_a_stop(tok):
    ids = tok(TEXT, add_special_tokens=False).input_ids
    stream, streamed, held = TextStream(tok, ["mangé 🍕X"]), "", False
    for token in ids:
        streamed += stream.add(token)
        held |= stream.text.endswith("mangé 🍕") and "mangé" not in streamed  # decoded, not yet shown
    assert held and not stream.stopped and streamed + stream.flush() == TEXT


def test_a_stop_string_completed_by_the_last_token(tok):
    ids = tok("the end. STOP", add_special_tokens=False).input_ids
    pieces, stream = _feed(tok, ids, [" STOP"])
    assert stream.stopped and "".join(pieces) == "the end."
