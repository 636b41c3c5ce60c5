"""backtranslate: instructions for given responses (instruction back-translation, Humpback, Li et al. 2023).

For each response the teacher writes --candidates candidate instructions (self-augmentation: "what request does
this text answer?"), then scores each (instruction, response) pair on the paper's 1-5 quality scale (self-curation).
The best-scored candidate is kept when it scores --min-score or more (ties: the earlier candidate). Rules:
`no_instruction` (every candidate empty), `unscored` (no score could be parsed from any judgement), `low_score`;
an item whose requests all failed is counted by how (teacher_failed, teacher_rejected, no_content).
"""

from __future__ import annotations

from tuneforge.data.curate.synth import chat_row, response_of, texts_of, user
from tuneforge.data.curate.synth.parse import clean_instruction, parse_score
from tuneforge.data.curate.synth.teacher import Failed
from tuneforge.errors import DataError

ASK = ("Below is a response written by an AI assistant. Write the instruction a user gave that this is the answer "
       "to. Reply with the instruction only.\n\nResponse:\n{response}\n\nInstruction:")
SCORE = ("Below is an instruction from a user and a candidate answer. Evaluate whether the answer is a good example "
         "of how an AI assistant should respond to the instruction, on a 5-point scale:\n1: not relevant, or "
         "missing or off-topic content.\n2: addresses most of the request but not directly.\n3: helpful but not "
         "written by an AI assistant (a blog post, a web page).\n4: written from an AI assistant's perspective, "
         "complete and clear, may have minor issues.\n5: a perfect answer from an AI assistant.\nReason briefly, "
         "then write the score on the last line as \"Score: <1-5>\".\n\nInstruction: {instruction}\n\n"
         "Answer: {response}")


def run(args, teacher, files, result) -> None:
    items = texts_of(files, result, response_of, "response")
    if not items:
        raise DataError(f"No responses in {', '.join(map(str, files))}: rows need `output`, `response`, `text` or "
                        f"an assistant turn.")
    asks = [(i, k) for i in range(len(items)) for k in range(args.candidates)]
    replies = _ask_all(args, teacher, items, asks)
    failures: dict[int, Failed] = {}  # the first failed request of each item, to count it by when nothing is left
    candidates: dict[int, list[str]] = {i: [] for i in range(len(items))}
    for (i, _), reply in zip(asks, replies):
        if isinstance(reply, Failed):
            failures.setdefault(i, reply)
        text = clean_instruction(reply) if reply else ""
        if text and text not in candidates[i]:
            candidates[i].append(text)
    pairs = [(i, c) for i in range(len(items)) for c in candidates[i]]
    judged = teacher.complete([user(SCORE.format(instruction=c, response=items[i][1])) for i, c in pairs],
                              temperature=0.0)
    scores: dict[int, list[tuple[int | None, str]]] = {}
    for (i, c), reply in zip(pairs, judged):
        if isinstance(reply, Failed):
            failures.setdefault(i, reply)
            continue
        scores.setdefault(i, []).append((parse_score(reply), c))
    for i, (source, response) in enumerate(items):
        if not scores.get(i) and i in failures:
            result.reject(failures[i].rule, source=source, response=response, error=failures[i].error)
        else:
            _choose(i, source, response, scores.get(i, []), args.min_score, result)


def _ask_all(args, teacher, items, asks) -> list[str | Failed]:
    """One concurrent batch per candidate index. `seed` differs per candidate: different samples from the
    teacher, and a distinct request key (so progress.jsonl keeps each)."""
    replies: dict[tuple[int, int], str | Failed] = {}
    for k in range(args.candidates):
        idx = [i for i, kk in asks if kk == k]
        for i, reply in zip(idx, teacher.complete([user(ASK.format(response=items[i][1])) for i in idx],
                                                  seed=args.seed + k)):
            replies[(i, k)] = reply
    return [replies[a] for a in asks]


def _choose(i, source, response, scored, min_score, result) -> None:
    if not scored:
        result.reject("no_instruction", source=source, response=response)
        return
    valid = [(s, c) for s, c in scored if s is not None]
    if not valid:
        result.reject("unscored", source=source, response=response, candidates=[c for _, c in scored])
        return
    best_score = max(s for s, _ in valid)
    best = next(c for s, c in valid if s == best_score)
    if best_score < min_score:
        result.reject("low_score", source=source, response=response, instruction=best, score=best_score)
        return
    result.keep(chat_row(best, response, source=source, score=best_score, method="backtranslate"))
