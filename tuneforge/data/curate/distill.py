"""`tuneforge data safety --distill`: safety context distillation (Llama 2, Touvron et al. 2023, section 4.2.4).

The teacher answers each prompt with a safety system prompt (`--safety-system`, default below: a preprompt in the
style of the paper's); the training row is the prompt and that answer *without* the system prompt, so the tuned
model behaves as if it had it. Prompts come from any rows with a request (alpaca `instruction`, `prompt`, CValues'
`prompt`, or the first user turn; a prompt repeated in several rows is asked once); rows that already have a
system prompt keep theirs in the generation request after the safety one, and in the training row. Rules:
`input_without_prompt`, `duplicate_prompt` (the prompt and system prompt of an earlier row: asked and written once),
`teacher_failed` (or `teacher_rejected`, `no_content`), `empty_answer`. Writes distill.jsonl
(OpenAI `messages` rows with `source`), rejected.jsonl, report.json / report.md, progress.jsonl (resumable, as for
`data synth`).
"""

from __future__ import annotations

from tuneforge.data.curate import rows
from tuneforge.errors import DataError, UserError, counted

SAFETY_SYSTEM = ("You are a safe and responsible assistant. Answer helpfully and honestly, but do not give "
                 "instructions or content that could cause harm (violence, crime, self-harm, hate, dangerous "
                 "goods, privacy violations). When a request is risky, decline the harmful part, explain briefly "
                 "why, and offer safe, positive guidance or alternatives.")


def distill_cli(args) -> int:
    from tuneforge.data.curate.synth import print_notes, teacher_counts
    from tuneforge.data.curate.synth.teacher import resume_hint

    with resume_hint(args.out):
        report = distill(args)
    print(f"{counted(report['rows'], 'distilled row')} -> {report['out']}/distill.jsonl (teacher: "
          f"{teacher_counts(report['teacher'])}); dropped: {report['rejected'] or 'none'}")
    print_notes(report)
    return 0


def distill(args) -> dict:
    from tuneforge.data.curate.synth import Result, input_paths, refuse_out_among_inputs, texts_of
    from tuneforge.data.curate.synth.teacher import Teacher, check_answered, check_teacher_args

    if not args.data:
        raise UserError("No prompts: name files of prompts (alpaca, `prompt` rows, CValues) with `--data PATH`.")
    if not args.safety_system.strip():
        raise UserError("`--safety-system` is empty: distillation needs the safety prompt to generate with.")
    check_teacher_args(args)
    refuse_out_among_inputs(args.out, args.data)
    files = [p.resolve() for p in input_paths(args.data)]
    out = rows.prepare_out(args.out, files, ["distill.jsonl", "rejected.jsonl", "report.json", "report.md",
                                             "progress.jsonl"])
    result = Result()
    prompts, first = [], {}
    for source, (text, own) in texts_of(files, result, _prompt_and_system, "prompt"):
        if (text, own) in first:  # CValues has several rows per prompt: each prompt once, the rest counted
            result.reject("duplicate_prompt", source=source, prompt=text, duplicate_of=first[text, own])
        else:
            first[text, own] = source
            prompts.append((source, text, own))
    if not prompts:
        raise DataError(f"No prompts in {', '.join(map(str, files))}: rows need `instruction`, `prompt` or a user "
                        f"turn.")
    teacher = Teacher(args, out / "progress.jsonl")
    system = args.safety_system.strip()
    requests = [[{"role": "system", "content": f"{system}\n\n{own}" if own else system},
                 {"role": "user", "content": text}] for _, text, own in prompts]
    for (source, text, own), answer in zip(prompts, teacher.complete(requests)):
        if not isinstance(answer, str):
            result.reject(answer.rule, source=source, prompt=text, error=answer.error)
        elif not answer.strip():
            result.reject("empty_answer", source=source, prompt=text)
        else:
            messages = ([{"role": "system", "content": own}] if own else []) + [
                {"role": "user", "content": text}, {"role": "assistant", "content": answer.strip()}]
            result.keep({"messages": messages, "source": source, "method": "safety_context_distillation"})
    result.extra["safety_system"] = system
    check_answered(teacher)
    return result.write(out, _Named("distill"), teacher)


def _prompt_and_system(row: dict) -> tuple[str, str | None] | None:
    from tuneforge.data.curate.synth import prompt_of

    text, own = prompt_of(row), row.get("system") if isinstance(row.get("system"), str) else None
    return (text, own) if text else None


class _Named:
    """Result.write names its files after `method`."""

    def __init__(self, method: str):
        self.method = method
