"""Bundled preference data for the alignment stages, built from the example task's own generator (no outside data).

    python scripts/make_preference_data.py        # rewrites tuneforge/assets/example_prefs/{train,heldout}.jsonl

Each row: `prompt` (the task's question), `chosen` (its correct short answer), `rejected` (a wrong answer, a third of
them rambling before it), plus `answer` and `family`: OpenAI-style pairwise rows (`format: pairwise`). Families:
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


def pairs(n: int, heldout: bool, seed: int = 0) -> list[dict]:
    rng = random.Random(f"prefs-{seed}-{heldout}")
    out = []
    for row in make_rows(FAMILIES, n, heldout, seed):
        wrong = wrong_answer(row["answer"], row["family"], rng)
        if rng.random() < 1 / 3:
            wrong = RAMBLE[row["lang"]] + wrong
        out.append({"prompt": row["messages"][0]["content"], "chosen": row["answer"], "rejected": wrong,
                    "answer": row["answer"], "family": row["family"]})
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", pairs(600, False)), ("heldout", pairs(150, True))):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (OUT / f"{name}.jsonl").write_text(text, encoding="utf-8")
        print(f"{OUT / name}.jsonl: {len(rows)} pairs")


if __name__ == "__main__":
    main()
