"""Multiple-choice benchmarks in their published layouts: MMLU, C-Eval, CMMLU.

    questions = load_subjects("mmlu", "../shared/assets/eval/mmlu", split="test")
    prompt = build_prompt("mmlu", subject, dev_questions[:5], question)

Layouts (one CSV per subject):
- MMLU:  {dev,val,test}/{subject}_{split}.csv, headerless: question,A,B,C,D,answer
- C-Eval: {dev,val,test}/{subject}_{split}.csv with a header id,question,A,B,C,D,answer[,explanation]
  (the public test split has no answers, so C-Eval is scored on val)
- CMMLU: {dev,test}/{subject}.csv with a header ,Question,A,B,C,D,Answer
The folder may also be the published zip itself (`../shared/assets/eval/zips/mmlu.zip`, every subject): it is
unpacked once under $TUNEFORGE_CACHE/eval/. A subject-to-category mapping ({subject: {"name": ..., "category": ...}})
is read from `mapping.json` or `{benchmark}_mapping.json` in the folder (or beside the zip), or
`../zips/{benchmark}_mapping.json` beside it, when present.

Prompts follow lm-evaluation-harness so numbers compare with published ones: a description line, k solved
examples from the dev split separated by a blank line, then the question, lettered options and "Answer:"
("答案：" in Chinese); each option is scored by the log-likelihood of " A" ... " D" after it.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.errors import DataError, UserError

LETTERS = ("A", "B", "C", "D")


@dataclass
class Question:
    subject: str
    index: int
    question: str
    options: list[str]
    answer: str  # "A".."D"
    source: str = field(default="", repr=False)  # file:row, for error messages and predictions


@dataclass(frozen=True)
class Benchmark:
    name: str
    eval_split: str
    header: bool
    file_pattern: str  # how a subject's file is named in a split folder
    description: str  # {subject} is the subject's display name
    answer_cue: str


BENCHMARKS = {
    "mmlu": Benchmark("mmlu", "test", False, "{subject}_{split}.csv",
                      "The following are multiple choice questions (with answers) about {subject}.\n\n", "Answer:"),
    "ceval": Benchmark("ceval", "val", True, "{subject}_{split}.csv",
                       "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "答案："),
    "cmmlu": Benchmark("cmmlu", "test", True, "{subject}.csv",
                       "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n", "答案："),
}


def benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise UserError(f"Unknown multiple-choice benchmark `{name}`: choose one of {', '.join(BENCHMARKS)}.")
    return BENCHMARKS[name]


def unpacked(folder: Path) -> Path:
    """`folder` itself, or for a .zip the folder holding its split folders, unpacked once (into a temp folder
    renamed into place, so an interrupted unpack is redone rather than half used)."""
    folder = Path(folder)
    if folder.suffix.lower() != ".zip":
        return folder
    if not folder.is_file():
        raise UserError(f"{folder} does not exist: name a benchmark folder or its published zip.")
    from tuneforge.models.builtin import cache_root

    stat = folder.stat()
    dest = cache_root().parent / "eval" / f"{folder.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if not dest.is_dir():
        tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
        try:
            with zipfile.ZipFile(folder) as z:
                z.extractall(tmp)  # zipfile drops absolute and ".." parts of member names
        except (zipfile.BadZipFile, OSError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"{folder}: cannot unpack it ({e}). Re-download the benchmark's zip.") from e
        try:
            os.replace(tmp, dest)
        except OSError:  # another process unpacked it first
            shutil.rmtree(tmp, ignore_errors=True)
    holders = [p for p in [dest, *sorted(dest.rglob("*"))] if (p / "dev").is_dir()]
    return holders[0] if holders else dest


def subject_files(bench: Benchmark, folder: Path, split: str) -> dict[str, Path]:
    """{subject: csv path} of one split folder, sorted by subject."""
    split_dir = Path(folder) / split
    if not Path(folder).exists():  # the whole folder is missing, not a split of it
        raise UserError(f"{bench.name}: {folder} does not exist (a relative path counts from the current folder, "
                        f"{Path.cwd()}). Point `data_dir` (--data-dir) at a folder holding "
                        f"{bench.name}/{split}/*.csv, or {bench.name}:PATH at the benchmark's own folder or zip.")
    if not split_dir.is_dir():
        raise UserError(f"{bench.name}: no `{split}` folder in {folder}. Point `data_dir` (--data-dir) at a folder "
                        f"holding the published layout ({bench.name}/{split}/*.csv).")
    suffix = bench.file_pattern.format(subject="", split=split)
    return {p.name[: len(p.name) - len(suffix)]: p for p in sorted(split_dir.glob("*.csv"))
            if p.name.endswith(suffix)}


def _rows(bench: Benchmark, path: Path) -> list[list[str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if r]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read it as CSV ({e}).") from e
    return rows[1:] if bench.header else rows


def _parse_row(bench: Benchmark, row: list[str], subject: str, index: int, where: str) -> Question:
    # MMLU: q,A,B,C,D,ans; C-Eval: id,q,A,B,C,D,ans[,expl]; CMMLU: id,q,A,B,C,D,ans
    cells = row if bench.name == "mmlu" else row[1:]
    if len(cells) < 6:
        raise DataError(f"{where}: expected a question, four options and an answer, found {len(cells)} cells. "
                        f"Check that the file follows the {bench.name} layout.")
    answer = cells[5].strip().upper()
    if answer not in LETTERS:
        raise DataError(f"{where}: the answer is {cells[5]!r}, not one of A, B, C, D. {_answer_hint(bench, cells, index)}")
    return Question(subject, index, cells[0].strip(), [c.strip() for c in cells[1:5]], answer, where)


def _answer_hint(bench: Benchmark, cells: list[str], index: int) -> str:
    """What a bad answer cell most likely means: a header row in headerless MMLU, an unlabelled split, a typo."""
    if index == 0 and not bench.header and cells[5].strip().lower() == "answer":
        return "MMLU's CSVs have no header row: delete this line."
    if not cells[5].strip():
        return (f"Is this an unlabelled split? {bench.name} is scored on `{bench.eval_split}`, which must hold the "
                f"answers.")
    return "Fix this row's answer letter (or drop the row)."


def load_subject(bench: Benchmark, path: Path, subject: str) -> list[Question]:
    rows = _rows(bench, path)
    if not rows:  # an empty subject would drop out of every accuracy without a word
        raise DataError(f"{path} holds no questions: fill it or delete it (one row per question: "
                        f"{'id,' if bench.header else ''}question,A,B,C,D,answer).")
    return [_parse_row(bench, row, subject, i, f"{path}:{i + 1 + bench.header}") for i, row in enumerate(rows)]


def load_subjects(name: str, folder: Path, split: str | None = None,
                  subjects: list[str] | None = None) -> dict[str, list[Question]]:
    """{subject: questions} of one split (the benchmark's scored split by default)."""
    bench = benchmark(name)
    split = split or bench.eval_split
    files = subject_files(bench, folder, split)
    if subjects:
        missing = [s for s in subjects if s not in files]
        if missing:
            fix = (f" The dev split gives each subject its few-shot examples: add the file(s), or set `shots` to 0 "
                   f"({name}@0)." if split == "dev" else "")
            raise UserError(f"{name}: no {split} file for subject(s) {', '.join(missing)} in {Path(folder) / split} "
                            f"(expected {bench.file_pattern.format(subject=missing[0], split=split)}); present: "
                            f"{', '.join(files) or 'none'}.{fix}")
        files = {s: files[s] for s in subjects}
    return {s: load_subject(bench, p, s) for s, p in files.items()}


def load_mapping(name: str, folder: Path) -> dict[str, dict]:
    """{subject: {"name": display name, "category": ...}} when the folder (or beside it, or ../zips) has one."""
    folder = Path(folder)
    for path in (folder / "mapping.json", folder / f"{name}_mapping.json", folder.parent / f"{name}_mapping.json",
                 folder.parent / "zips" / f"{name}_mapping.json"):
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e}).") from e
    return {}


def display_name(subject: str, mapping: dict[str, dict]) -> str:
    return (mapping.get(subject) or {}).get("name") or subject.replace("_", " ")


def format_question(bench: Benchmark, q: Question) -> str:
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, q.options))
    return f"{q.question}\n{options}\n{bench.answer_cue}"


def build_prompt(bench: Benchmark, subject_name: str, shots: list[Question], q: Question) -> str:
    """The harness layout: description, k solved dev examples (each ending " X"), then the question to answer."""
    solved = "".join(f"{format_question(bench, s)} {s.answer}\n\n" for s in shots)
    return bench.description.format(subject=subject_name) + solved + format_question(bench, q)
