"""Score a model on a multiple-choice benchmark (MMLU, C-Eval, CMMLU) by option log-likelihood.

    metrics = run_multiple_choice(model, tokenizer, MCSettings(benchmark="mmlu", data_dir=...), out_dir)

Every question's prompt, option scores, prediction and answer go to `predictions.jsonl` (also the resume cache).
Accuracy is reported per subject, per category (when a mapping exists) and overall, both micro (over questions)
and macro (mean over subjects), under those names.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from tuneforge.errors import UserError
from tuneforge.eval.benchmarks import (
    LETTERS,
    benchmark,
    build_prompt,
    display_name,
    load_mapping,
    load_subjects,
    subject_files,
    unpacked,
)
from tuneforge.eval.loglik import continuation_logprobs
from tuneforge.eval.store import ItemStore, input_key


@dataclass
class MCSettings:
    benchmark: str
    data_dir: str  # the benchmark's folder (holding dev/, test/ ...) or its published .zip
    shots: int = 5
    limit: int | None = None  # questions per subject
    subjects: list[str] | None = None
    chat_template: bool = False  # lm-evaluation-harness scores raw text; True wraps the prompt as a user turn
    option_text: bool = False  # score the full option text instead of the letter
    batch_size: int = 8


def _context_and_options(tokenizer, bench, prompt: str, q, settings: MCSettings) -> tuple[str | list[int], list[str]]:
    """The text (or, with the chat template, the engine's prompt ids) and the continuations to score."""
    options = list(q.options) if settings.option_text else list(LETTERS)
    if settings.chat_template:
        from tuneforge.inference.engine import encode_chat

        return encode_chat(tokenizer, [{"role": "user", "content": prompt}]), options
    return prompt, [" " + o for o in options]


def _check_shots(settings: MCSettings, dev: dict[str, list]) -> None:
    """More shots than a subject's dev split holds would silently use fewer, under the report's "K-shot" label."""
    short = {s: len(qs) for s, qs in dev.items() if len(qs) < settings.shots}
    if short:
        subject, n = min(short.items(), key=lambda kv: kv[1])
        raise UserError(f"{settings.benchmark}: shots={settings.shots}, but the dev split of {len(short)} subject(s) "
                        f"holds fewer examples ({subject}: {n}). Set `shots` (--shots, or {settings.benchmark}@K) "
                        f"to {n} or less.")


def check_benchmark(settings: MCSettings) -> None:
    """The benchmark's folder (or zip) has test questions that parse and its dev split holds the shots:
    `tuneforge eval` runs it for every task before the first model loads, so a bad `shots`, folder or row (a header
    line, an answer that is no letter) fails in a second instead of after that model's load and earlier tasks.
    Reading every CSV takes well under a second, even for MMLU's 14,042 test questions."""
    bench = benchmark(settings.benchmark)
    folder = unpacked(Path(settings.data_dir))
    subjects = settings.subjects or list(subject_files(bench, folder, bench.eval_split))
    if not settings.subjects:
        _check_no_stray_files(bench, folder, bench.eval_split)
    if not subjects:
        raise UserError(f"{settings.benchmark}: no question files in {folder / bench.eval_split} (expected "
                        f"{bench.file_pattern.format(subject='SUBJECT', split=bench.eval_split)}). Point `data_dir` "
                        f"(or {settings.benchmark}:PATH) at a folder in the published layout.")
    load_subjects(settings.benchmark, folder, None, subjects)
    if settings.shots:
        _check_shots(settings, load_subjects(settings.benchmark, folder, "dev", subjects))


def _check_no_stray_files(bench, folder: Path, split: str) -> None:
    """A CSV in the scored split not named as the layout names subjects (`college_physics.csv` in mmlu/test) would
    be left out of both accuracies without a word."""
    named = {p.name for p in subject_files(bench, folder, split).values()}
    stray = [p.name for p in sorted((folder / split).glob("*.csv")) if p.name not in named]
    if stray:
        more = f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""
        expected = bench.file_pattern.format(subject=Path(stray[0]).stem, split=split)
        raise UserError(f"{bench.name}: {folder / split} holds {stray[0]}{more}, not named as a subject's file "
                        f"({bench.file_pattern.format(subject='SUBJECT', split=split)}), so it would not be scored. "
                        f"Rename it ({expected}) or move it out of the folder.")


def _pending(settings: MCSettings, store: ItemStore):
    """(question, prompt) for every question not yet scored under these settings."""
    bench = benchmark(settings.benchmark)
    folder = unpacked(Path(settings.data_dir))
    tests = load_subjects(settings.benchmark, folder, None, settings.subjects)
    dev = load_subjects(settings.benchmark, folder, "dev", list(tests)) if settings.shots else {}
    _check_shots(settings, dev)
    mapping = load_mapping(settings.benchmark, Path(settings.data_dir))  # beside a zip, not in the unpacked copy
    done = store.done()
    items, reused = [], {}
    for subject, questions in tests.items():
        shots = dev.get(subject, [])[: settings.shots]
        for q in questions[: settings.limit]:
            prompt = build_prompt(bench, display_name(subject, mapping), shots, q)
            saved = done.get(f"{subject}/{q.index}", {})
            if saved.get("input_key") == input_key([prompt, q.answer]):  # an edited CSV keeps its row numbers
                reused[saved["id"]] = saved
            else:
                items.append((q, prompt))
    return bench, mapping, items, reused


def run_multiple_choice(model, tokenizer, settings: MCSettings, out_dir: Path, progress: bool = True) -> dict:
    store = ItemStore(Path(out_dir) / "predictions.jsonl", asdict(settings) | {"limit": None, "batch_size": None})
    bench, mapping, items, done = _pending(settings, store)
    records = list(done.values())
    step = max(1, settings.batch_size)
    for start in tqdm(range(0, len(items), step), desc=settings.benchmark, disable=not progress, unit="batch"):
        chunk = items[start: start + step]
        requests = [_context_and_options(tokenizer, bench, prompt, q, settings) for q, prompt in chunk]
        scores = continuation_logprobs(model, tokenizer, requests, batch_size=step)
        for (q, prompt), (context, _), option_scores in zip(chunk, requests, scores):
            pred = LETTERS[max(range(len(option_scores)), key=option_scores.__getitem__)]
            shown = context if isinstance(context, str) else tokenizer.decode(context)
            tokens = len(context) if not isinstance(context, str) else len(tokenizer(context).input_ids)
            record = {"id": f"{q.subject}/{q.index}", "subject": q.subject, "prompt": shown,
                      "scores": dict(zip(LETTERS, option_scores)), "prediction": pred, "answer": q.answer,
                      "correct": pred == q.answer, "input_key": input_key([prompt, q.answer]),
                      "context_tokens": tokens}
            store.add(record)
            records.append(record)
    return accuracy_table(records, mapping) | {"over_context": over_context(model, records),
                                               "chat_template": settings.chat_template, "shots": settings.shots}


def over_context(model, records: list[dict]) -> int:
    """Questions whose prompt and answer do not fit the model's context (max_position_embeddings): scored past
    the positions the model was trained on, which no error reports and which makes the score meaningless (5-shot
    MMLU reaches ~3,100 tokens). Lower the shots when this is not 0. Records saved before the count count 0."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return sum(r.get("context_tokens", 0) >= limit for r in records) if limit else 0


def accuracy_table(records: list[dict], mapping: dict[str, dict]) -> dict:
    """accuracy_micro (over questions), accuracy_macro (mean of subjects), and per subject / category."""
    by_subject: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        by_subject[r["subject"]].append(bool(r["correct"]))
    if not by_subject:
        return {"accuracy_micro": 0.0, "accuracy_macro": 0.0, "questions": 0}
    subject_acc = {s: sum(v) / len(v) for s, v in sorted(by_subject.items())}
    table = {"accuracy_micro": sum(sum(v) for v in by_subject.values()) / sum(len(v) for v in by_subject.values()),
             "accuracy_macro": sum(subject_acc.values()) / len(subject_acc),
             "questions": sum(len(v) for v in by_subject.values())}
    by_category: dict[str, list[bool]] = defaultdict(list)
    for s, v in by_subject.items():
        category = (mapping.get(s) or {}).get("category")
        if category:
            by_category[category].extend(v)
    table |= {f"category/{c}": sum(v) / len(v) for c, v in sorted(by_category.items())}
    table |= {f"subject/{s}": a for s, a in subject_acc.items()}
    return table
