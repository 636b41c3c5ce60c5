"""self_instruct: new tasks from seed tasks (Self-Instruct, Wang et al. 2022).

Each round sends `--batch` prompts; each lists 6 seed instructions and 2 already generated ones (fewer while there
are none), numbered, and asks the teacher to continue the list. The new items are parsed and filtered, in order:
`unparsed` (no numbered item), the paper's rules (`too_short` < 3 words, `too_long` > 150, `blocked_keyword`
image/graph/picture/file/map/draw/plot/go to/... or "Write a program", `starts_with_punctuation`, `non_ascii_start`),
then `similar` (ROUGE-L >= --max-rouge to a seed or kept instruction). Rounds continue until --num-instructions are
kept or --max-rounds have run (a note then says the target was missed). Then one request per kept instruction asks
for an input (or none) and the output; `no_output` drops those whose reply has no output. The prompts are a
function of the seed and of earlier replies, so a resumed run asks the same questions again and finds them in
progress.jsonl. A prompt identical to one already sent in the run (few seeds, nothing kept yet) is drawn again,
up to DRAWS times, since the same prompt gets the same cached reply and adds nothing new.
"""

from __future__ import annotations

import random

from tuneforge.data.curate.synth import chat_row, instruction_of, texts_of, user
from tuneforge.data.curate.synth.parse import instruction_problem, parse_instance, parse_instructions, rouge_l
from tuneforge.errors import DataError, counted

SEEDS_SHOWN, MACHINE_SHOWN = 6, 2
DRAWS = 20  # tries at a prompt not yet sent in this run

LIST_PROMPT = "Come up with a series of tasks:\n\n"
INSTANCE_PROMPT = ("Complete the task below. If it needs an input (a text, a list, a question to work on), write "
                   "one; else write `Input: None`. Then write the output.\n\nTask: {instruction}\n\n"
                   "Answer in this format:\nInput: <the input or None>\nOutput: <the output>")


def run(args, teacher, files, result) -> None:
    seeds = texts_of(files, result, instruction_of, "instruction")
    if not seeds:
        raise DataError(f"No seed tasks in {', '.join(map(str, files))}: rows need an `instruction` (the Stanford "
                        f"Alpaca seed_tasks.jsonl format: id, name, instruction, instances).")
    kept, rounds = generate(args, teacher, [s for _, s in seeds], result)
    replies = teacher.complete([user(INSTANCE_PROMPT.format(instruction=i)) for i in kept])
    for instruction, reply in zip(kept, replies):
        instance = parse_instance(reply) if reply else None
        if instance is None:
            result.reject("no_output" if isinstance(reply, str) else reply.rule, instruction=instruction,
                          reply=reply or None)
            continue
        given, output = instance
        prompt = f"{instruction}\n\n{given}" if given else instruction
        result.keep(chat_row(prompt, output, instruction=instruction, input=given, method="self_instruct"))
    result.extra.update(seed_tasks=len(seeds), instructions_kept=len(kept), rounds=rounds)
    if len(kept) < args.num_instructions:
        result.note(f"target not reached: --num-instructions {args.num_instructions}, got {len(kept)} after "
                    f"{counted(rounds, 'round')} (--max-rounds {args.max_rounds}); raise --max-rounds, or see "
                    f"the rules that dropped the rest.")


def generate(args, teacher, seeds: list[str], result) -> tuple[list[str], int]:
    """Instructions kept after the filters (at most --num-instructions, in the order they were accepted) and the
    rounds run."""
    kept: list[str] = []
    sent: set[str] = set()
    rounds = 0
    while rounds < args.max_rounds and len(kept) < args.num_instructions:
        prompts = [fresh_prompt(seeds, kept, f"{args.seed}:{rounds}:{b}", sent) for b in range(args.batch)]
        replies = teacher.complete([user(p) for p, _ in prompts])
        for (_, next_number), reply in zip(prompts, replies):
            if not isinstance(reply, str):
                result.reject(reply.rule, round=rounds, error=reply.error)
                continue
            items = parse_instructions(reply, next_number)
            if not items:
                result.reject("unparsed", reply=reply)
            for item in items:
                if len(kept) >= args.num_instructions:
                    break
                rule = instruction_problem(item) or _similar(item, seeds, kept, args.max_rouge)
                if rule:
                    result.reject(rule, instruction=item)
                else:
                    kept.append(item)
        rounds += 1
    return kept, rounds


def fresh_prompt(seeds: list[str], kept: list[str], seed: str, sent: set[str]) -> tuple[str, int]:
    """A list prompt not sent before in this run when one of DRAWS seeded draws gives one (else the last draw)."""
    for draw in range(DRAWS):
        prompt, number = list_prompt(seeds, kept, random.Random(f"{seed}:{draw}" if draw else seed))
        if prompt not in sent:
            break
    sent.add(prompt)
    return prompt, number


def list_prompt(seeds: list[str], kept: list[str], rng: random.Random) -> tuple[str, int]:
    """The prompt (numbered example tasks) and the number the teacher continues at."""
    shown = rng.sample(seeds, min(SEEDS_SHOWN, len(seeds)))
    shown += rng.sample(kept, min(MACHINE_SHOWN, len(kept)))
    rng.shuffle(shown)
    listing = "".join(f"{n}. {text}\n" for n, text in enumerate(shown, start=1))
    return f"{LIST_PROMPT}{listing}{len(shown) + 1}.", len(shown) + 1


def _similar(item: str, seeds: list[str], kept: list[str], limit: float) -> str | None:
    if any(rouge_l(item, other) >= limit for other in kept) or any(rouge_l(item, s) >= limit for s in seeds):
        return "similar"
    return None
