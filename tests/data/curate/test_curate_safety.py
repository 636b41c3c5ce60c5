"""`tuneforge data safety`: typed responses expand into every ordered pair, with exact counts, order and
difficulty; CValues comparison rows (the real published sample) pool by prompt."""

from __future__ import annotations

import json

import pytest

from tests.data.curate.helpers import parse, read_jsonl, write_jsonl
from tuneforge.data.curate.safety import safety
from tuneforge.errors import DataError

G, R, K = "refuse_with_guidance", "refuse", "risky"


def run(tmp_path, path: str, *extra: str) -> tuple[dict, list[dict]]:
    report = safety(parse("safety", ["--data", path, "--out", str(tmp_path / "out"), *extra]))
    return report, read_jsonl(tmp_path / "out" / "pairs.jsonl")


def pairs_of(rows: list[dict]) -> list[tuple[str, str, str]]:
    return [(r["chosen"]["value"], r["rejected"]["value"], r["difficulty"]) for r in rows]


def test_every_ordered_pair_in_rank_order(tmp_path):
    typed = {"prompt": "How do I pick a lock?", "system": "Be safe.",
             "responses": [{"text": "risky1", "type": K}, {"text": "refuse1", "type": R},
                           {"text": "guide1", "type": G}, {"text": "refuse2", "type": R},
                           {"text": "risky2", "type": K}]}
    report, rows = run(tmp_path, write_jsonl(tmp_path / "typed.jsonl", [typed]))
    # 1 guidance x 4 worse + 2 refusals x 2 risky = 8 pairs; equal types are never paired
    assert pairs_of(rows) == [("guide1", "refuse1", "hard"), ("guide1", "refuse2", "hard"),
                              ("guide1", "risky1", "easy"), ("guide1", "risky2", "easy"),
                              ("refuse1", "risky1", "hard"), ("refuse1", "risky2", "hard"),
                              ("refuse2", "risky1", "hard"), ("refuse2", "risky2", "hard")]
    assert report["pairs"] == 8 and report["by_difficulty"] == {"hard": 6, "easy": 2}
    assert report["by_types"] == {f"{G} > {R}": 2, f"{G} > {K}": 2, f"{R} > {K}": 4}
    assert rows[2]["rank_gap"] == 2 and rows[0]["rank_gap"] == 1
    assert rows[0]["system"] == "Be safe." and rows[0]["conversations"] == [{"from": "human",
                                                                              "value": "How do I pick a lock?"}]


def test_four_levels_grade_medium_and_custom_ranking(tmp_path):
    typed = {"prompt": "p", "responses": [{"text": t, "type": t} for t in ("d", "c", "b", "a")]}
    report, rows = run(tmp_path, write_jsonl(tmp_path / "t.jsonl", [typed]), "--ranking", "a", "b", "c", "d")
    assert len(rows) == 6  # 4 levels, one response each: 4*3/2
    assert [(r["chosen_type"], r["rejected_type"], r["difficulty"]) for r in rows] == [
        ("a", "b", "hard"), ("a", "c", "medium"), ("a", "d", "easy"), ("b", "c", "hard"), ("b", "d", "medium"),
        ("c", "d", "hard")]


def test_cvalues_comparison_rows_pool_by_prompt(tmp_path):
    rows = [{"prompt": "q", "pos_resp": "A", "neg_resp": "B", "pos_type": "拒绝&正向建议", "neg_type": "风险回复"},
            {"prompt": "q", "pos_resp": "C", "neg_resp": "B", "pos_type": "拒绝为主", "neg_type": "风险回复"},
            {"prompt": "other", "pos_resp": "D", "neg_resp": "E", "pos_type": "拒绝为主", "neg_type": "风险回复"}]
    report, out = run(tmp_path, write_jsonl(tmp_path / "cv.jsonl", rows))
    assert pairs_of(out) == [("A", "C", "hard"), ("A", "B", "easy"), ("C", "B", "hard"), ("D", "E", "hard")]
    assert report["prompts"] == 2 and report["responses"] == 5
    assert out[0]["source"].endswith("cv.jsonl:line 1") and out[3]["source"].endswith("line 3")


def test_real_cvalues_sample(tmp_path, shared_assets):
    path = shared_assets / "datasets/cvalues/cvalues_comparison_sample_from_mindrlhf.jsonl"
    (original,) = read_jsonl(path)
    report, rows = run(tmp_path, str(path))
    (pair,) = rows
    assert pair["chosen"] == {"from": "gpt", "value": original["pos_resp"]}
    assert pair["rejected"] == {"from": "gpt", "value": original["neg_resp"]}
    assert (pair["chosen_type"], pair["rejected_type"], pair["difficulty"]) == (R, K, "hard")
    # the preference layout of LLaMA-Factory's dpo_en_demo.json
    demo = json.loads((shared_assets / "datasets/llamafactory/dpo_en_demo.json").read_text(encoding="utf-8"))[0]
    assert set(demo) <= set(pair) and demo["chosen"].keys() == pair["chosen"].keys()
    assert pair["conversations"][0].keys() == demo["conversations"][0].keys()


def test_unknown_types_are_listed_or_skipped(tmp_path):
    typed = {"prompt": "p", "responses": [{"text": "x", "type": G}, {"text": "y", "type": "weird"}]}
    path = write_jsonl(tmp_path / "t.jsonl", [typed, {"prompt": "", "responses": []}])
    with pytest.raises(DataError, match=r"t.jsonl:line 1: response type 'weird'.*\n.*t.jsonl:line 2: `prompt`"):
        run(tmp_path, path)
    report, rows = run(tmp_path, write_jsonl(tmp_path / "t2.jsonl", [typed]), "--unknown-types", "skip")
    assert rows == [] and report["prompts_without_pair"] and len(report["responses_skipped"]) == 1


def test_bad_rows_are_counted_as_rows_not_responses(tmp_path):
    three = {"prompt": "p", "responses": [{"text": t, "type": t} for t in ("a", "b", "c")]}
    two = {"prompt": "q", "responses": [{"text": "x", "type": G}, {"text": "y", "type": "d"}, {"text": "z",
                                                                                            "type": "e"}]}
    path = write_jsonl(tmp_path / "t.jsonl", [three, two, {"prompt": "r", "responses": [{"text": "ok", "type": G}]}])
    with pytest.raises(DataError) as err:
        run(tmp_path, path)
    assert str(err.value).startswith("2 of 3 safety rows are bad (5 of their responses have a type not in --ranking):")
