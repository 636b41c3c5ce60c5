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
`rejected.jsonl` (every dropped item with its rule, input rows without the field the method needs included),
`report.json` / `report.md` (counts per rule, teacher request counts, skipped files, notes) and `progress.jsonl`
(finished teacher requests: rerun the same command into the same `--out` to resume). `--out` must lie outside the
inputs (a rerun would read the outputs as input). A run where every teacher request failed is an error.
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
from tuneforge.data.build import bad_row_listing
from tuneforge.data.curate import rows
from tuneforge.data.curate.synth.teacher import (
    Teacher,
    TeacherArgs,
    at_least,
    check_answered,
    check_teacher_args,
    failure_summary,
    resume_hint,
)
from tuneforge.data.types import BadRow
from tuneforge.errors import DataError, UserError, counted

METHODS = ("self_instruct", "evol_instruct", "qa_from_docs", "backtranslate")


@dataclass(kw_only=True)
class SynthArgs(TeacherArgs):
    method: Literal["self_instruct", "evol_instruct", "qa_from_docs", "backtranslate"] = dataclasses.field(
        metadata={"positional": True, "help": "self_instruct, evol_instruct, qa_from_docs or backtranslate."})
    out: str = opt(help="Output folder (created; rerun into it to resume an interrupted run).")
    data: list[str] = opt(factory=list, help="Input files or folders: seed tasks (self_instruct), instructions "
                                             "(evol_instruct), documents (qa_from_docs), responses (backtranslate).")
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
    with resume_hint(args.out):
        report = synth(args)
    print(f"{args.method}: {counted(report['rows'], 'row')} -> {report['out']}/{args.method}.jsonl "
          f"(teacher: {teacher_counts(report['teacher'])})")
    for rule, count in report["rejected"].items():
        print(f"  {rule:<24} {count}")
    print_notes(report)
    return 0


def teacher_counts(t: dict) -> str:
    repeated = f", {t['repeated']} repeated in this run (asked once)" if t.get("repeated") else ""
    return f"{t['answered']} answered{repeated}, {t['reused']} reused from progress, {t['failed']} failed"


def print_notes(report: dict) -> None:
    """What the console must say besides the counts: failed requests' first errors, skipped inputs, targets."""
    if report["teacher"]["failed"]:
        print(f"  warning: {failure_summary(report['teacher'])}")
    for note in report.get("notes", []):
        print(f"  note: {note}")


# count flags and their least value; shares and scores are checked by range in check_args
COUNT_FLAGS = (("num_instructions", 1), ("batch", 1), ("max_rounds", 1), ("rounds", 1), ("questions", 1),
               ("candidates", 1), ("max_chars", 100), ("overlap", 0))


def check_args(args: SynthArgs) -> None:
    """Refuse a count or range no run can use, naming the flag, before anything is read or asked."""
    for name, low in COUNT_FLAGS:
        at_least(name.replace("_", "-"), getattr(args, name), low)
    if args.overlap >= args.max_chars // 2:
        raise UserError(f"`--overlap` must be less than half of `--max-chars` ({args.max_chars}), got {args.overlap}.")
    if not 0 < args.max_rouge <= 1:
        raise UserError(f"`--max-rouge` must be in (0, 1] (a ROUGE-L F1; 1 drops exact copies only), got "
                        f"{args.max_rouge}.")
    for name in ("breadth_share", "min_grounded"):
        if not 0 <= getattr(args, name) <= 1:
            raise UserError(f"`--{name.replace('_', '-')}` is a share: it must be from 0 to 1, got "
                            f"{getattr(args, name)}.")
    if not 1 <= args.min_score <= 5:
        raise UserError(f"`--min-score` must be from 1 to 5 (the teacher's 1-5 scale), got {args.min_score}.")
    check_teacher_args(args)


def synth(args: SynthArgs) -> dict:
    from tuneforge.data.curate.synth import backtranslate, docs, evol, self_instruct

    run = {"self_instruct": self_instruct.run, "evol_instruct": evol.run, "qa_from_docs": docs.run,
           "backtranslate": backtranslate.run}[args.method]
    check_args(args)
    if not args.data:
        raise UserError(f"`data synth {args.method}` needs input: `--data PATH ...`.")
    refuse_out_among_inputs(args.out, args.data)
    files = [p.resolve() for p in input_paths(args.data)]
    out = rows.prepare_out(args.out, files, [f"{args.method}.jsonl", "rejected.jsonl", "report.json", "report.md",
                                             "progress.jsonl"])
    teacher = Teacher(args, out / "progress.jsonl")
    result = Result()
    run(args, teacher, files, result)
    check_answered(teacher)
    return result.write(out, args, teacher)


def refuse_out_among_inputs(out: str, data: list[str]) -> None:
    """`--out` may not be an input folder, hold an input, or lie inside an input folder: the outputs would mix with
    the inputs, and a rerun (the way to resume) would read report.md or the rows as input."""
    folder = Path(out).expanduser().resolve()
    for given in data:
        path = Path(given).expanduser().resolve()
        if folder == path or folder in path.parents or path in folder.parents:
            raise UserError(f"`--out {out}` overlaps the input `--data {given}` (the same folder, inside it, or "
                            f"holding it): the outputs would mix with the inputs and a rerun would read them as "
                            f"input. Write to a folder outside the inputs, e.g. `--out {Path(given).name}_synth` "
                            f"next to it.")


class Result:
    """Kept rows, rejected items with their rule, and per-rule counts of one synth run."""

    def __init__(self):
        self.kept: list[dict] = []
        self.rejected: list[dict] = []
        self.counts: Counter = Counter()
        self.extra: dict = {}
        self.notes: list[str] = []  # printed on the console and written to the report
        self.skipped_files: list[dict] = []

    def keep(self, row: dict) -> None:
        self.kept.append(row)

    def reject(self, rule: str, **item) -> None:
        self.counts[rule] += 1
        self.rejected.append({"rule": rule, **item})

    def note(self, text: str) -> None:
        self.notes.append(text)

    def skip_file(self, path: Path, reason: str) -> None:
        self.skipped_files.append({"file": str(path), "reason": reason})

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
        if self.skipped_files:
            report["skipped_files"] = self.skipped_files
            shown = ", ".join(f"{s['file']} ({s['reason']})" for s in self.skipped_files[:5])
            more = f" and {len(self.skipped_files) - 5} more" if len(self.skipped_files) > 5 else ""
            self.notes.insert(0, f"{counted(len(self.skipped_files), 'input file')} skipped: {shown}{more}.")
        if self.notes:
            report["notes"] = self.notes
        rows.write_json(out / "report.json", report)
        rows.write_text(out / "report.md", report_md(report))
        return report


def report_md(report: dict) -> str:
    t = report["teacher"]
    title = "safety --distill" if report["method"] == "distill" else f"synth {report['method']}"
    repeated = f", {t['repeated']} repeated within the run (asked once)" if t.get("repeated") else ""
    lines = [f"# tuneforge data {title}", "", f"**{counted(report['rows'], 'row')}** kept.", "",
             f"Teacher `{t['model']}` at {t['base_url']}: {counted(t['answered'], 'request')} answered{repeated}, "
             f"{t['reused']} reused from progress.jsonl, {counted(t['retried'], 'retry', 'retries')}, "
             f"{t['failed']} failed.", ""]
    if t["failed"]:
        lines += [failure_summary(t), ""]
    lines += [f"- {note}" for note in report.get("notes", [])] + ([""] if report.get("notes") else [])
    lines += ["| rule | dropped |", "|---|---|"] + [f"| {rule} | {n} |" for rule, n in report["rejected"].items()]
    shown = ("out", "method", "rows", "rejected", "teacher", "notes")
    extra = {k: v for k, v in report.items() if k not in shown}
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


def raw_rows(files: list[Path], result: Result | None = None):
    """(source, row mapping) of every data file, through the data path's readers (row guard, bad bytes); a bad row
    raises DataError naming it. Files of no data format (found in a folder) are listed in `result`."""
    bad = []
    for file in files:
        if readers.data_suffix(file) not in readers.READERS:
            if result is not None:
                result.skip_file(file, f"not a data file; rows are read from {', '.join(readers.READERS)}")
            continue
        for raw in readers.read_local(file):
            if isinstance(raw, BadRow):
                bad.append(raw)
            else:
                yield raw.source, raw.data
    if bad:
        listing, more = bad_row_listing(bad, 20)
        raise DataError(f"{len(bad)} input rows are bad:\n{listing}{more}\nFix them or clean the data first "
                        f"(`tuneforge data clean`).")


def texts_of(files: list[Path], result: Result, get, needs: str) -> list[tuple[str, str]]:
    """(source, text) of every input row where `get` finds the text the method needs; each row without it is
    rejected as `input_without_<needs>` (with its keys) and the first few are named in a note."""
    found, missing = [], []
    for source, row in raw_rows(files, result):
        text = get(row)
        if text:
            found.append((source, text))
        else:
            missing.append(source)
            result.reject(f"input_without_{needs}", source=source, keys=sorted(row))
    if missing and found:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        result.note(f"{counted(len(missing), 'input row')} without {needs} skipped (see rejected.jsonl): "
                    f"{', '.join(missing[:5])}{more}.")
    return found


def instruction_of(row: dict) -> str | None:
    """A Self-Instruct seed task's `instruction` (the Stanford Alpaca seed_tasks.jsonl format)."""
    text = row.get("instruction")
    return text.strip() if isinstance(text, str) and text.strip() else None


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
