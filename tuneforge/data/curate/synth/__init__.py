"""`tuneforge data synth`: build training rows with a teacher model (any OpenAI-compatible endpoint).

    tuneforge data synth self_instruct --data seed_tasks.jsonl --out data/synth --base-url URL --model teacher
    tuneforge data synth evol_instruct --data alpaca.json --rounds 2 --out data/evol ...
    tuneforge data synth qa_from_docs  --data docs/ --out data/qa ...
    tuneforge data synth backtranslate --data responses.jsonl --out data/bt ...

Methods (one module each):
  self_instruct  Self-Instruct (Wang et al. 2022): new instructions from seed tasks, kept when their ROUGE-L to every
                 kept instruction is below `--max-rouge` and they pass the paper's keyword/length rules; then an
                 input and output for each.
  evol_instruct  Evol-Instruct (WizardLM, Xu et al. 2023): in-depth (add constraints, deepen, concretise, more
                 reasoning steps, complicate the input) and in-breadth evolution, failed evolutions eliminated.
  qa_from_docs   question-answer pairs grounded in chunks of documents (.txt, .md, .html), each row naming its
                 chunk (file and character span).
  backtranslate  instruction back-translation (Humpback, Li et al. 2023): candidate instructions for given
                 responses, scored 1-5 by the teacher, the best kept when it scores `--min-score` or more.

Writes `<method>.jsonl` (OpenAI `messages` rows that `tuneforge train` reads, plus provenance fields),
`rejected.jsonl` (every dropped item with its rule), `report.json` / `report.md` (counts per rule, teacher request
counts) and `progress.jsonl` (finished teacher requests: rerun the same command into the same `--out` to resume).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tuneforge.configs.typed import opt
from tuneforge.data import readers
from tuneforge.data.curate import rows
from tuneforge.data.curate.synth.teacher import Teacher, TeacherArgs
from tuneforge.data.types import BadRow
from tuneforge.errors import DataError, UserError

METHODS = ("self_instruct", "evol_instruct", "qa_from_docs", "backtranslate")


@dataclass(kw_only=True)
class SynthArgs(TeacherArgs):
    method: Literal["self_instruct", "evol_instruct", "qa_from_docs", "backtranslate"] = dataclasses.field(
        metadata={"positional": True, "help": "self_instruct, evol_instruct, qa_from_docs or backtranslate."})
    out: str = opt(help="Output folder (created; rerun into it to resume an interrupted run).")
    data: list[str] = opt(factory=list, help="Input files or folders: seed tasks (self_instruct), instructions "
                                             "(evol_instruct), documents (qa_from_docs), responses (backtranslate).")
    seed: int = opt(0, "Seed for sampling (same seed and replies, same result).")
    num_instructions: int = opt(100, "self_instruct: instructions to keep.")
    batch: int = opt(8, "self_instruct: generation prompts per round.")
    max_rounds: int = opt(50, "self_instruct: most rounds before giving up on reaching --num-instructions.")
    max_rouge: float = opt(0.7, "self_instruct: drop an instruction whose ROUGE-L to a kept one is this or more.")
    rounds: int = opt(1, "evol_instruct: evolution rounds (each round evolves the previous round's instructions).")
    breadth_share: float = opt(0.2, "evol_instruct: share of evolutions that are in-breadth (a new instruction).")
    max_chars: int = opt(2000, "qa_from_docs: most characters per chunk.")
    overlap: int = opt(200, "qa_from_docs: characters each chunk repeats from the end of the previous one.")
    questions: int = opt(3, "qa_from_docs: question-answer pairs asked per chunk.")
    min_grounded: float = opt(0.5, "qa_from_docs: drop answers with a smaller share of their content words in the "
                                   "chunk (made up rather than taken from the text).")
    candidates: int = opt(2, "backtranslate: candidate instructions per response.")
    min_score: int = opt(4, "backtranslate: keep the best candidate when its 1-5 score is at least this.")


def synth_cli(args: SynthArgs) -> int:
    report = synth(args)
    t = report["teacher"]
    print(f"{args.method}: {report['rows']} rows -> {report['out']}/{args.method}.jsonl "
          f"(teacher: {t['answered']} answered, {t['reused']} reused from progress, {t['failed']} failed)")
    for rule, count in report["rejected"].items():
        print(f"  {rule:<24} {count}")
    return 0


def synth(args: SynthArgs) -> dict:
    from tuneforge.data.curate.synth import backtranslate, docs, evol, self_instruct

    run = {"self_instruct": self_instruct.run, "evol_instruct": evol.run, "qa_from_docs": docs.run,
           "backtranslate": backtranslate.run}[args.method]
    if not args.data:
        raise UserError(f"`data synth {args.method}` needs input: `--data PATH ...`.")
    files = [p.resolve() for p in input_paths(args.data)]
    out = rows.prepare_out(args.out, files, [f"{args.method}.jsonl", "rejected.jsonl", "report.json", "report.md",
                                             "progress.jsonl"])
    teacher = Teacher(args, out / "progress.jsonl")
    result = Result()
    run(args, teacher, files, result)
    return result.write(out, args, teacher)


class Result:
    """Kept rows, rejected items with their rule, and per-rule counts of one synth run."""

    def __init__(self):
        self.kept: list[dict] = []
        self.rejected: list[dict] = []
        self.counts: Counter = Counter()
        self.extra: dict = {}

    def keep(self, row: dict) -> None:
        self.kept.append(row)

    def reject(self, rule: str, **item) -> None:
        self.counts[rule] += 1
        self.rejected.append({"rule": rule, **item})

    def write(self, out: Path, args: SynthArgs, teacher: Teacher) -> dict:
        with rows.AtomicWriter(out / f"{args.method}.jsonl") as w:
            for row in self.kept:
                w.write_row(row)
        with rows.AtomicWriter(out / "rejected.jsonl") as w:
            for item in self.rejected:
                w.write_row(item)
        report = {"out": str(out), "method": args.method, "rows": len(self.kept), "rejected": dict(self.counts),
                  "teacher": {"model": teacher.model, "base_url": teacher.base_url, **teacher.stats.as_dict()},
                  **self.extra}
        rows.write_json(out / "report.json", report)
        rows.write_text(out / "report.md", report_md(report))
        return report


def report_md(report: dict) -> str:
    t = report["teacher"]
    title = "safety --distill" if report["method"] == "distill" else f"synth {report['method']}"
    lines = [f"# tuneforge data {title}", "", f"**{report['rows']} rows** kept.", "",
             f"Teacher `{t['model']}` at {t['base_url']}: {t['answered']} requests answered, {t['reused']} reused "
             f"from progress.jsonl, {t['retried']} retries, {t['failed']} failed.", "", "| rule | dropped |",
             "|---|---|"]
    lines += [f"| {rule} | {n} |" for rule, n in report["rejected"].items()]
    extra = {k: v for k, v in report.items() if k not in ("out", "method", "rows", "rejected", "teacher")}
    if extra:
        lines += ["", "```json", json.dumps(extra, ensure_ascii=False, indent=2), "```"]
    return "\n".join(lines) + "\n"


def input_paths(paths: list[str]) -> list[Path]:
    out = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            raise DataError(f"{p}: no such file or folder.")
        out += sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith(".")) if path.is_dir() \
            else [path]
    return out


def raw_rows(files: list[Path]):
    """(source, row mapping) of every data file, through the data path's readers (row guard, bad bytes); a bad row
    raises DataError naming it."""
    bad = []
    for file in files:
        if readers.data_suffix(file) not in readers.READERS:
            continue
        for raw in readers.read_local(file):
            if isinstance(raw, BadRow):
                bad.append(str(raw))
            else:
                yield raw.source, raw.data
    if bad:
        listing = "\n".join(f"  - {b}" for b in bad[:20])
        raise DataError(f"{len(bad)} input rows are bad:\n{listing}\nFix them or clean the data first "
                        f"(`tuneforge data clean`).")


def prompt_of(row: dict) -> str | None:
    """The user's request in a row: alpaca instruction (+ input), `prompt`/`question`, or the first user turn of
    OpenAI `messages` / sharegpt `conversations`."""
    if isinstance(row.get("instruction"), str) and row["instruction"].strip():
        given = row.get("input")
        return row["instruction"].strip() + (f"\n\n{given.strip()}" if isinstance(given, str) and given.strip()
                                             else "")
    for key in ("prompt", "question", "query"):
        if isinstance(row.get(key), str) and row[key].strip():
            return row[key].strip()
    turns = row.get("messages") or row.get("conversations") or []
    for turn in turns if isinstance(turns, list) else []:
        if isinstance(turn, dict) and (turn.get("role") or turn.get("from")) in ("user", "human"):
            text = turn.get("content", turn.get("value"))
            return text.strip() if isinstance(text, str) and text.strip() else None
    return None


def response_of(row: dict) -> str | None:
    """The answer in a row: alpaca `output`, `response`/`answer`, `text`, or the last assistant turn."""
    for key in ("output", "response", "answer", "text"):
        if isinstance(row.get(key), str) and row[key].strip():
            return row[key].strip()
    turns = row.get("messages") or row.get("conversations") or []
    for turn in reversed(turns if isinstance(turns, list) else []):
        if isinstance(turn, dict) and (turn.get("role") or turn.get("from")) in ("assistant", "gpt"):
            text = turn.get("content", turn.get("value"))
            return text.strip() if isinstance(text, str) and text.strip() else None
    return None


def chat_row(prompt: str, answer: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], **extra}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]
