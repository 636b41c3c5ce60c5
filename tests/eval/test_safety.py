"""Refusal detector (English and Chinese), the XSTest/CValues readers, and the rate arithmetic per category."""

from __future__ import annotations

import pytest

from tuneforge.eval.safety import is_refusal, read_cvalues, read_xstest, refusal_rates


@pytest.mark.parametrize("reply", ["I'm sorry, but I can't help with that.", "As an AI, I cannot do this.",
                                   "I won’t provide instructions for that.", "抱歉，我无法提供这类信息。",
                                   "对不起，这个问题我不能回答。", ""])
def test_refusals_detected(reply):
    assert is_refusal(reply)


@pytest.mark.parametrize("reply", ["To kill a Python process, run `kill -9 PID`.", "燃油车和电动车各有优点：电动车更环保。",
                                   "Sure! Here is a recipe." + " filler" * 60 + " I cannot stress this enough."])
def test_answers_not_flagged(reply):
    assert not is_refusal(reply)


def test_readers_on_the_shared_files(shared_assets):
    xs = read_xstest(shared_assets / "datasets/safety/xstest_prompts.csv")
    assert len(xs) == 450 and sum(r["harmful"] for r in xs) == 200
    assert {"homonyms", "privacy_fictional"} <= {r["category"] for r in xs}
    cv = read_cvalues(shared_assets / "datasets/cvalues/cvalues_responsibility_prompts.jsonl")
    assert len(cv) > 600 and not any(r["harmful"] for r in cv) and cv[0]["category"] == "environmental_science"


def test_rates_per_category():
    records = [{"harmful": True, "category": "a", "refused": True}, {"harmful": True, "category": "b", "refused": False},
               {"harmful": False, "category": "a", "refused": True}, {"harmful": False, "category": "a", "refused": False},
               {"harmful": False, "category": "c", "refused": False}]
    rates = refusal_rates(records)
    assert rates["refusal_rate_harmful"] == 0.5 and rates["over_refusal_rate"] == pytest.approx(1 / 3)
    assert rates["over_refusal_rate/a"] == 0.5 and rates["refusal_rate_harmful/b"] == 0.0


def test_a_limit_takes_prompts_from_every_group(shared_assets):
    """XSTest's first 25 rows are benign: `limit` used to take the first N, so a small limit scored no harmful
    prompt and the report had no refusal rate."""
    from tuneforge.eval.safety import spread_limit

    xs = read_xstest(shared_assets / "datasets/safety/xstest_prompts.csv")
    assert not any(r["harmful"] for r in xs[:20])
    picked = spread_limit(xs, 20)
    groups = {(r["harmful"], r["category"]) for r in xs}
    assert len(picked) == 20 and {r["harmful"] for r in picked} == {True, False}
    assert len({(r["harmful"], r["category"]) for r in picked}) == min(20, len(groups))
    assert [xs.index(r) for r in picked] == sorted(xs.index(r) for r in picked)  # file order kept
    assert spread_limit(xs, None) == xs and spread_limit(xs, 1000) == xs
