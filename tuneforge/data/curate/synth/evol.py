"""evol_instruct: harder and more varied instructions by evolution (Evol-Instruct, WizardLM, Xu et al. 2023).

Each round picks, per instruction (seeded), in-breadth evolution with probability --breadth-share, else one of the
five in-depth operations; the teacher rewrites the instruction, then answers the rewritten one. Failed evolutions
are eliminated (parse.evolution_problem: no information gain, a "sorry"/empty answer, copied prompt words) and,
as in the paper, their instruction goes back into the pool for the next round. Every successful evolution is one
row (instruction = the evolved one, answer = the teacher's), with the operation and the round.
"""

from __future__ import annotations

import random

from tuneforge.data.curate.synth import chat_row, prompt_of, texts_of, user
from tuneforge.data.curate.synth.parse import clean_evolved, evolution_problem
from tuneforge.errors import DataError

DEPTH_HEAD = ("I want you to act as a Prompt Rewriter. Your objective is to rewrite a given prompt into a more "
              "complex version to make famous AI systems (e.g., ChatGPT and GPT4) a bit harder to handle. The "
              "rewritten prompt must be reasonable, understood and answered by humans, and must not omit the "
              "non-text parts such as tables and code in #Given Prompt#. Make it more complex with this method:\n")
DEPTH = {
    "add_constraints": "Add one more constraint or requirement to #Given Prompt#.",
    "deepen": "If #Given Prompt# contains inquiries about certain issues, increase the depth and breadth of the "
              "inquiry.",
    "concretize": "Replace general concepts in #Given Prompt# with more specific concepts.",
    "increase_reasoning": "If #Given Prompt# can be solved with just a few simple thinking processes, rewrite it to "
                          "explicitly request multiple-step reasoning.",
    "complicate_input": "Add complex input data to #Given Prompt#, such as a table, code or a formula that the "
                        "task must work on.",
}
DEPTH_TAIL = ("\nThe #Rewritten Prompt# may add only 10 to 20 words to #Given Prompt#. '#Given Prompt#', "
              "'#Rewritten Prompt#', 'given prompt' and 'rewritten prompt' must not appear in #Rewritten Prompt#.\n"
              "#Given Prompt#:\n{instruction}\n#Rewritten Prompt#:\n")
BREADTH = ("I want you to act as a Prompt Creator. Draw inspiration from #Given Prompt# to create a brand new "
           "prompt. It should belong to the same domain as #Given Prompt# but be even rarer. Its length and "
           "complexity should be similar. '#Given Prompt#', '#Created Prompt#', 'given prompt' and 'created "
           "prompt' must not appear in #Created Prompt#.\n#Given Prompt#:\n{instruction}\n#Created Prompt#:\n")
OPERATIONS = (*DEPTH, "breadth")


def evolve_prompt(operation: str, instruction: str) -> str:
    if operation == "breadth":
        return BREADTH.format(instruction=instruction)
    return DEPTH_HEAD + DEPTH[operation] + DEPTH_TAIL.format(instruction=instruction)


def pick(rng: random.Random, breadth_share: float) -> str:
    return "breadth" if rng.random() < breadth_share else rng.choice(list(DEPTH))


def run(args, teacher, files, result) -> None:
    pool = texts_of(files, result, prompt_of, "prompt")
    if not pool:
        raise DataError(f"No instructions in {', '.join(map(str, files))}: rows need an instruction (alpaca "
                        f"`instruction`, `prompt`, or a user turn in `messages`/`conversations`).")
    ops_used: dict[str, int] = {}
    for round_ in range(1, args.rounds + 1):
        ops = [pick(random.Random(f"{args.seed}:{round_}:{i}"), args.breadth_share) for i in range(len(pool))]
        evolved = teacher.complete([user(evolve_prompt(op, text)) for op, (_, text) in zip(ops, pool)])
        evolved = [clean_evolved(e) if isinstance(e, str) else e for e in evolved]
        answerable = [i for i, e in enumerate(evolved) if e]
        answers = dict(zip(answerable, teacher.complete([user(evolved[i]) for i in answerable])))
        next_pool = []
        for i, ((source, original), op) in enumerate(zip(pool, ops)):
            if not isinstance(evolved[i], str):  # the request failed: its rule (teacher_failed, no_content...)
                result.reject(evolved[i].rule, source=source, instruction=original, operation=op,
                              error=evolved[i].error)
                next_pool.append((source, original))
                continue
            answer = answers.get(i)
            rule = evolution_problem(original, evolved[i], answer if isinstance(answer, str) else None)
            if rule == "no_answer":  # the answering request failed: count it by how
                rule = answer.rule
            if rule:
                result.reject(rule, source=source, instruction=original, evolved=evolved[i], operation=op,
                              round=round_, answer=answer if isinstance(answer, str) else None)
                next_pool.append((source, original))  # failed: back into the pool (the paper's rule)
                continue
            ops_used[op] = ops_used.get(op, 0) + 1
            result.keep(chat_row(evolved[i], answers[i], source=source, operation=op, round=round_,
                                 evolved_from=original, method="evol_instruct"))
            next_pool.append((source, evolved[i]))
        pool = next_pool
    result.extra["operations"] = ops_used
