"""Bundled preference data for the alignment stages, built from the example task's own generator (no outside data).

    python scripts/make_preference_data.py        # rewrites tuneforge/assets/example_prefs/{train,heldout}.jsonl

Each row: `prompt` (the task's question), `chosen` (its correct short answer), `rejected` (a third each: a near miss
such as a sum off by 1-9 or a unit factor off by 10, another question's answer, or either after a rambling opening),
plus `rejected_kind`, `answer` and `family`: OpenAI-style pairwise rows (`format: pairwise`). Families:
arithmetic and units (the ones the real-model proofs use) and strings; held-out rows use unseen templates and values.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from tuneforge.data.example_task import make_rows

OUT = Path(__file__).resolve().parent.parent / "tuneforge" / "assets" / "example_prefs"
FAMILIES = ("arithmetic", "units", "strings")
RAMBLE = {"en": "Hmm, that is an interesting question. Let me think about it for a while before answering. I believe "
                "it is ",
          "zh": "嗯，这是个有意思的问题。让我想一想再回答。我觉得是 "}


def wrong_answer(answer: str, family: str, rng: random.Random) -> str:
    if family == "strings":
        return rng.choice([answer.lower(), answer[::-1], answer.capitalize()])
    number = re.search(r"\d+", answer)
    value = int(number.group())
    wrong = value + rng.choice([-1, 1]) * rng.randint(1, 9) if family == "arithmetic" else \
        rng.choice([value // 10, value * 10, value + 100])
    return answer[:number.start()] + str(max(wrong, 0) if wrong != value else value + 1) + answer[number.end():]


def widen_units_value(row: dict, rng: random.Random) -> dict:
    """Half the training unit rows with a value v >= 10 ask about 10 * v instead (230 kg; never a held-out value:
    those are the multiples of 5 below 100). Without them every training value ends in a non-zero digit, so "the
    answer has exactly 3 trailing zeros" (kg -> g) was right on every training pair; a reward model learned that
    instead of the conversion and preferred "5000 g" for the held-out "50 kg"."""
    if row["family"] != "units" or rng.random() < 0.5:
        return row
    question = row["messages"][0]["content"]
    value, converted = int(re.search(r"\d+", question).group()), int(re.search(r"\d+", row["answer"]).group())
    if value < 10:
        return row
    question = re.sub(r"\d+", str(value * 10), question, count=1)
    answer = re.sub(r"\d+", str(converted * 10), row["answer"], count=1)
    return {**row, "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "answer": answer}


def pairs(n: int, heldout: bool, seed: int = 0) -> list[dict]:
    """n pairs; the rejected reply is, a third each: a near miss (`wrong_answer`), the answer to another question of
    the same family and language, or one of those two after a rambling opening. `rejected_kind` names which."""
    rng = random.Random(f"prefs-{seed}-{heldout}")
    rows = [r if heldout else widen_units_value(r, rng) for r in make_rows(FAMILIES, n, heldout, seed)]
    answers: dict[tuple, list[str]] = {}
    for row in rows:
        answers.setdefault((row["family"], row["lang"]), []).append(row["answer"])
    out = []
    for row in rows:
        kind = rng.choice(["near miss", "another answer", "rambling"])
        others = [a for a in answers[row["family"], row["lang"]] if a != row["answer"]]
        another = kind == "another answer" or (kind == "rambling" and rng.random() < 0.5)
        wrong = rng.choice(others) if another else wrong_answer(row["answer"], row["family"], rng)
        if kind == "rambling":
            wrong = RAMBLE[row["lang"]] + wrong
        out.append({"prompt": row["messages"][0]["content"], "chosen": row["answer"], "rejected": wrong,
                    "rejected_kind": kind, "answer": row["answer"], "family": row["family"]})
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", pairs(1200, False)), ("heldout", pairs(150, True))):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (OUT / f"{name}.jsonl").write_text(text, encoding="utf-8")
        print(f"{OUT / name}.jsonl: {len(rows)} pairs")


if __name__ == "__main__":
    main()
