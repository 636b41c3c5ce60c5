"""`tuneforge data clean`: drop bad, degenerate and duplicate rows, and say which rule removed each one.

    tuneforge data clean --data alpaca.json --out data/clean
    tuneforge data clean --config examples/sft_lora_tiny.yaml --out data/clean --languages zh en
    tuneforge data clean --data alpaca.json --model builtin:smollm2-135m-instruct --max-tokens 1024 --out data/clean

Rules, checked in this order (the first that fires names the row's rule):
  bad_row          the data path refuses the row (unreadable, invalid conversation), as training would
  empty_answer     an answer that is empty, only punctuation, or a placeholder (`--placeholders`)
  too_short / too_long   characters of the whole row (`--min-chars`, `--max-chars`) or tokens of the row rendered
                   with the model's chat template (`--min-tokens`, `--max-tokens`, need `--model`)
  repeated_ngrams  an answer whose repeated n-grams are over `--max-repeated-ngram-share` of its n-grams (words of
                   prose only: code and tables repeat symbols by their nature)
  repeated_lines   an answer whose repeated lines are over `--max-repeated-line-share` of its lines
  char_run         one character repeated more than `--max-char-run` times in a row
  echo             an answer that only echoes the prompt (shingle Jaccard >= `--echo-jaccard`)
  language         the row's script-based language is not in `--languages` (when given)
  exact_duplicate  same text as an earlier kept row after NFKC, lowercase and whitespace collapse (contents, tool
                   calls and tool schemas: `text.row_text`)
  near_duplicate   Jaccard >= `--jaccard` with an earlier kept row (MinHash LSH, verified exactly; see dedup.py)

Writes `clean.jsonl` (kept rows as OpenAI `messages` or `text` rows with their `source`), `rejected.jsonl` (each
removed row with its source, rule, detail, the original row, and for duplicates the source it duplicates),
`report.json` (rows_in = rows_kept + sum of the per-rule counts) and `report.md`. Rows stream through: memory holds
the duplicate indexes, not the rows.
"""

from __future__ import annotations

import functools
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass

from tuneforge.configs.typed import opt
from tuneforge.data.curate import dedup, rows
from tuneforge.data.curate.text import (
    LANGUAGE_ALIASES,
    LANGUAGES,
    count_units,
    language,
    mostly_cjk,
    normalize,
    plain_text,
    prompt_and_answers,
    prose_units,
    row_text,
    shingles,
)
from tuneforge.errors import DataError, UserError

RULES = ("bad_row", "empty_answer", "too_short", "too_long", "repeated_ngrams", "repeated_lines", "char_run", "echo",
         "language", "exact_duplicate", "near_duplicate")

PLACEHOLDERS = ["n/a", "todo", "tbd", "<noinput>", "<nooutput>", "no output", "no answer", "暂无", "略", "同上"]


@dataclass(kw_only=True)
class CleanArgs(rows.SourceArgs):
    exact_dedup: bool = opt(True, "Drop exact duplicates (after NFKC, lowercase, whitespace collapse; all fields).")
    near_dedup: bool = opt(True, "Drop near duplicates (MinHash LSH, checked by exact Jaccard).")
    jaccard: float = opt(0.8, "Near-duplicate threshold: Jaccard similarity of the two rows' shingle sets.")
    word_ngram: int = opt(3, "Shingle size in words for space-separated text.")
    char_ngram: int = opt(5, "Shingle size in characters for Chinese (and other CJK) text.")
    num_perm: int = opt(128, "MinHash permutations (more: better estimates, more memory and time).")
    min_chars: int = opt(0, "Drop rows with fewer characters (all fields together). 0: no limit.")
    max_chars: int = opt(0, "Drop rows with more characters (all fields together). 0: no limit.")
    model: str | None = opt(None, "Model whose tokenizer and chat template count tokens (for --min/--max-tokens).")
    chat_template: str | None = opt(None, "Override the model's chat template (a built-in name or a .jinja).")
    min_tokens: int = opt(0, "Drop rows shorter than this in tokens (needs --model). 0: no limit.")
    max_tokens: int = opt(0, "Drop rows longer than this in tokens (needs --model), e.g. data.max_length. 0: none.")
    repeat_ngram: int = opt(3, "n of the repeated-n-gram filter (in words; doubled for CJK characters).")
    max_repeated_ngram_share: float = opt(0.5, "Drop answers whose repeated n-grams (occurrences after the first) "
                                               "are more than this share of all n-grams (answers of 20+ n-grams). "
                                               "1 disables.")
    max_repeated_line_share: float = opt(0.5, "Drop answers of 4+ lines (of 3+ words each) whose repeated lines "
                                              "are more than this share. 1 disables.")
    max_char_run: int = opt(40, "Drop rows with one character repeated more than this many times in a row (not "
                                "counting spaces and the markdown rule characters - = _ * # ~). 0 disables.")
    placeholders: list[str] = opt(factory=lambda: list(PLACEHOLDERS), help="Answers that count as empty "
                                  "(compared lowercased, without surrounding punctuation).")
    echo_jaccard: float = opt(0.9, "Drop answers whose shingle Jaccard with the prompt is at least this (an "
                                   "answer that repeats the question). 0 disables.")
    languages: list[str] = opt(factory=list, help="Keep only rows in these script-based languages (zh, en, ja, "
                                                  "ko, ru, ar). Empty: keep every language.")


def clean_cli(args: CleanArgs) -> int:
    report = clean(args)
    print(f"{report['rows_in']} rows in, {report['rows_kept']} kept -> {report['out']}/clean.jsonl")
    for rule, count in report["rejected"].items():
        if count:
            print(f"  {rule:<16} {count}")
    return 0


def clean(args: CleanArgs) -> dict:
    """Run the rules over every row (see the module docstring); returns the report that is also written."""
    _check(args)
    sources = rows.sources_of(args)
    out = rows.prepare_out_for(args.out, sources, ["clean.jsonl", "rejected.jsonl", "report.json", "report.md"])
    encoder = _encoder(args)
    exact = dedup.ExactIndex()
    near = dedup.NearIndex(args.jaccard, args.num_perm, args.word_ngram, args.char_ngram, workdir=out)
    counts, examples, started, rows_in, kinds = Counter(), {}, time.perf_counter(), 0, rows.OneKind("clean")
    try:
        with rows.AtomicWriter(out / "clean.jsonl") as kept, rows.AtomicWriter(out / "rejected.jsonl") as rejected:
            for row in rows.iter_rows(sources):
                rows_in += 1
                kinds.check(row)
                verdict = judge(row, args, encoder) or _duplicate(row, args, exact, near)
                if verdict is None:
                    kept.write_row(rows.example_row(row.example, source=row.source))
                    continue
                counts[verdict["rule"]] += 1
                examples.setdefault(verdict["rule"], row.source)
                rejected.write_row({"source": row.source, **verdict, "row": row.raw})
    finally:
        near.close()
    report = {"out": str(out), "rows_in": rows_in, "rows_kept": rows_in - sum(counts.values()),
              "rejected": {rule: counts[rule] for rule in RULES}, "first_rejected": examples,
              "seconds": round(time.perf_counter() - started, 2), "settings": _settings(args)}
    rows.write_json(out / "report.json", report)
    rows.write_text(out / "report.md", report_md(report))
    return report


def _check(args: CleanArgs) -> None:
    if (args.min_tokens or args.max_tokens) and not args.model:
        raise UserError("`--min-tokens`/`--max-tokens` count tokens with a model's tokenizer and chat template: "
                        "add `--model PATH_OR_NAME` (e.g. the model you will train), or use --min/--max-chars.")
    if not 0 < args.jaccard <= 1:
        raise UserError(f"`--jaccard` must be in (0, 1], got {args.jaccard}.")
    if args.word_ngram < 1 or args.char_ngram < 1 or args.repeat_ngram < 1:
        raise UserError("`--word-ngram`, `--char-ngram` and `--repeat-ngram` must be at least 1.")
    if args.num_perm < 16:
        raise UserError(f"`--num-perm` must be at least 16 (the LSH needs several bands), got {args.num_perm}.")
    _check_languages(args.languages)


def _check_languages(asked: list[str]) -> None:
    """Refuse a language the script-based filter cannot answer: `--languages zh-CN` or `fr` would otherwise drop
    every row as `language`, with nothing said until the output is found empty."""
    unknown = [name for name in asked if name not in LANGUAGES]
    if not unknown:
        return
    fixes = {name: LANGUAGE_ALIASES[name.lower()] for name in unknown if name.lower() in LANGUAGE_ALIASES}
    fix = f" Use {', '.join(f'`{v}` for `{k}`' for k, v in fixes.items())}." if fixes else ""
    raise UserError(f"`--languages {' '.join(unknown)}`: the language filter tells languages apart by script and "
                    f"knows {', '.join(LANGUAGES)} (`en` is any Latin-script text, English, French or German alike; "
                    f"`none` is text without letters).{fix}")


def _settings(args: CleanArgs) -> dict:
    return {k: v for k, v in asdict(args).items() if k not in ("out", "placeholders")}


def _encoder(args: CleanArgs):
    """A function Example -> token count, or None without --model."""
    if not args.model:
        return None
    from tuneforge.data.curate.inspect import token_counter

    tokenizer, template = rows.load_tokenizer(args.model, args.chat_template)
    return token_counter(tokenizer, template)


# ---- the rules ------------------------------------------------------------------------------------------------

def judge(row: rows.Row, args: CleanArgs, encoder=None) -> dict | None:
    """The first quality rule a row breaks, as {rule, detail}, or None (duplicates are checked afterwards)."""
    if row.bad is not None:
        return {"rule": "empty_answer" if row.empty_answer else "bad_row", "detail": f"field `{row.bad.field}`: {row.bad.problem}"}
    example = row.example
    prompt, answers = prompt_and_answers(example)
    for check in (_placeholder, _length, _repetition, _echo, _language):
        verdict = check(example, prompt, answers, args, encoder)
        if verdict is not None:
            return verdict
    return None


_PUNCT = re.compile(r"^[\W_]+|[\W_]+$")


@functools.lru_cache(maxsize=4)
def _normalized(placeholders: tuple[str, ...]) -> frozenset[str]:
    return frozenset(_PUNCT.sub("", normalize(p)) for p in placeholders) | frozenset(map(normalize, placeholders))


def _placeholder(example, prompt, answers, args, encoder):
    placeholders = _normalized(tuple(args.placeholders))
    for answer in answers:
        bare = _PUNCT.sub("", normalize(answer))
        if not bare:
            return {"rule": "empty_answer", "detail": f"answer {answer!r} has no letters or digits"}
        if bare in placeholders or normalize(answer) in placeholders:
            return {"rule": "empty_answer", "detail": f"answer {answer!r} is a placeholder"}
    return None


def _length(example, prompt, answers, args, encoder):
    chars = len(row_text(example))
    if args.min_chars and chars < args.min_chars:
        return {"rule": "too_short", "detail": f"{chars} characters < --min-chars {args.min_chars}"}
    if args.max_chars and chars > args.max_chars:
        return {"rule": "too_long", "detail": f"{chars} characters > --max-chars {args.max_chars}"}
    if encoder is not None and (args.min_tokens or args.max_tokens):
        try:
            tokens = encoder(example)[0]
        except DataError as e:  # the template cannot render it: training would refuse it too
            return {"rule": "bad_row", "detail": f"the chat template cannot render the row: {e}"}
        if args.min_tokens and tokens < args.min_tokens:
            return {"rule": "too_short", "detail": f"{tokens} tokens < --min-tokens {args.min_tokens}"}
        if args.max_tokens and tokens > args.max_tokens:
            return {"rule": "too_long", "detail": f"{tokens} tokens > --max-tokens {args.max_tokens}"}
    return None


def _repetition(example, prompt, answers, args, encoder):
    for answer in answers:
        share = repeated_ngram_share(answer, args.repeat_ngram)
        if share > args.max_repeated_ngram_share:
            return {"rule": "repeated_ngrams", "detail": f"{share:.0%} of the answer's n-grams are repeats"}
        share = repeated_line_share(answer)
        if share > args.max_repeated_line_share:
            return {"rule": "repeated_lines", "detail": f"{share:.0%} of the answer's lines are repeats"}
    run = char_run(row_text(example), args.max_char_run) if args.max_char_run else None
    if run is not None:
        return {"rule": "char_run", "detail": f"{run[1]!r} repeated {run[0]} times in a row"}
    return None


def _echo(example, prompt, answers, args, encoder):
    if not args.echo_jaccard or not prompt:
        return None
    asked = shingles(prompt, args.word_ngram, args.char_ngram)
    for answer in answers:
        said = shingles(answer, args.word_ngram, args.char_ngram)
        both = len(asked | said)
        if both and len(asked & said) / both >= args.echo_jaccard:
            return {"rule": "echo", "detail": f"the answer repeats the prompt (Jaccard "
                                              f"{len(asked & said) / both:.2f})"}
    return None


def _language(example, prompt, answers, args, encoder):
    if not args.languages:
        return None
    found = language(plain_text(example))
    if found not in args.languages:
        return {"rule": "language", "detail": f"language {found}, not in --languages {' '.join(args.languages)}"}
    return None


def _duplicate(row: rows.Row, args: CleanArgs, exact: dedup.ExactIndex, near: dedup.NearIndex) -> dict | None:
    """Exact, then near duplicate of a kept row; a row that is neither is added to both indexes."""
    text = row_text(row.example)
    key, first = exact.find(text)
    if args.exact_dedup and first is not None:
        return {"rule": "exact_duplicate", "detail": f"same text as {first}", "duplicate_of": first}
    if args.near_dedup:
        hashes = near.hashes(text)
        signature = near.signature(hashes)
        match = near.find(hashes, signature)
        if match is not None:
            return {"rule": "near_duplicate", "detail": f"Jaccard {match.jaccard} with {match.source}",
                    "duplicate_of": match.source, "jaccard": match.jaccard,
                    "jaccard_estimated": match.jaccard_estimated}
        near.add(hashes, signature, row.source)
    exact.add(key, row.source)
    return None


# ---- measures -------------------------------------------------------------------------------------------------

def repeated_ngram_share(text: str, n: int) -> float:
    """Share of the text's n-grams (over its words of prose, `prose_units`; 2n for mostly-CJK text) that repeat an
    earlier n-gram; 0 for texts of fewer than 20 n-grams, where repeats say little. Symbols, digits and one-letter
    words are left out, so a regex or a truth table is not taken for a degenerate loop."""
    seq = prose_units(text)
    if mostly_cjk(text):
        n *= 2
    grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    if len(grams) < 20:
        return 0.0
    return 1 - len(set(grams)) / len(grams)


def repeated_line_share(text: str) -> float:
    """Share of lines (of 3+ words: closing tags and separators repeat legitimately) equal after normalisation to
    an earlier line; 0 for answers of fewer than 4 such lines."""
    lines = [normalize(line) for line in text.splitlines() if count_units(line) >= 3]
    if len(lines) < 4:
        return 0.0
    return 1 - len(set(lines)) / len(lines)


def char_run(text: str, limit: int) -> tuple[int, str] | None:
    """(length, character) of the first run of one character longer than `limit`, not counting spaces and
    markdown rules (- = _ * # ~), or None. One regex search, so long rows cost no Python loop."""
    match = re.search(r"([^\s\-=_*#~])\1{%d,}" % limit, text)
    return (len(match.group()), match.group(1)) if match else None


def report_md(report: dict) -> str:
    lines = ["# tuneforge data clean", "", f"{report['rows_in']} rows in, **{report['rows_kept']} kept**, "
             f"{report['rows_in'] - report['rows_kept']} removed ({report['seconds']} s).", "",
             "| rule | rows removed | first removed |", "|---|---|---|"]
    for rule, count in report["rejected"].items():
        lines.append(f"| {rule} | {count} | {report['first_rejected'].get(rule, '')} |")
    lines += ["", "Every removed row is in `rejected.jsonl` with its source, rule and detail.", "", "Settings:", ""]
    lines += [f"- `{k}`: {v}" for k, v in report["settings"].items()]
    return "\n".join(lines) + "\n"
