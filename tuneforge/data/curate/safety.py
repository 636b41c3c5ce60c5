"""`tuneforge data safety`: typed safety responses -> every ordered preference pair, with graded difficulty.

    tuneforge data safety --data cvalues_comparison.jsonl --out data/safety
    tuneforge data safety --data typed.jsonl --ranking safe_helpful safe unsafe --out data/safety

CValues (Xu et al. 2023) labels each response to a risky prompt with a type and ranks the types: a refusal with
positive guidance > a plain refusal > a risky answer. Every response of a better type paired with every response of
a worse type gives one (chosen, rejected) pair; pairs of adjacent types are the hard ones for a reward model.

Input rows (JSON, JSON lines or CSV; rows with the same prompt are pooled, in order of appearance):
  typed responses        {"prompt": ..., "responses": [{"text": ..., "type": ...}, ...], "system": optional}
  CValues comparison     {"prompt", "pos_resp", "neg_resp", "pos_type", "neg_type"} (the published schema; its
                         type names 拒绝&正向建议 / 拒绝为主 / 风险回复 read as refuse_with_guidance / refuse / risky)

`--ranking` lists the types best first (default: refuse_with_guidance refuse risky). For every prompt, responses
are ordered by rank (then by appearance) and each pair (better, worse) with different ranks becomes one row, in that
order; responses of equal rank and identical texts are never paired. rank_gap = rank(rejected) - rank(chosen);
difficulty is `hard` for gap 1, `easy` for the largest possible gap (when above 1), `medium` in between.

Output `pairs.jsonl` in the sharegpt preference layout (LLaMA-Factory's dpo_en_demo.json): `conversations` (the
prompt as a human turn), `chosen` and `rejected` message objects ({from: gpt, value}), optional `system`, plus
chosen_type, rejected_type, rank_gap, difficulty and source. report.json / report.md count pairs by type and
difficulty and list prompts that gave no pair.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

from tuneforge.configs.typed import opt
from tuneforge.data import readers
from tuneforge.data.curate import rows
from tuneforge.data.preference import DEFAULT_RANKING, ordered_pairs, typed_responses
from tuneforge.data.preference import TYPE_ALIASES as ALIASES
from tuneforge.data.preference import TypedResponse as Response
from tuneforge.data.types import BadRow, RowProblem
from tuneforge.errors import DataError, UserError


@dataclass(kw_only=True)
class SafetyArgs:
    out: str = opt(help="Output folder (created; files in it are replaced atomically, never an input file).")
    data: list[str] = opt(factory=list, help="Files or folders of typed-response or CValues comparison rows.")
    ranking: list[str] = opt(factory=lambda: list(DEFAULT_RANKING), help="Response types, best first. CValues "
                             "names (拒绝&正向建议, 拒绝为主, 风险回复) are read as the default names.")
    unknown_types: Literal["raise", "skip"] = opt("raise", "A response whose type is not in --ranking: raise (list them) or skip.")


@dataclass
class Prompt:
    prompt: str
    system: str | None
    responses: list[Response]
    source: str  # the first row that named it


def expand(prompt: Prompt, levels: int) -> list[dict]:
    """Every (better, worse) pair of one prompt's responses as preference rows, best pairs first: the data path's
    own expansion (`tuneforge.data.preference.ordered_pairs`, which `format: typed` training data uses too)."""
    return [pair_row(prompt, chosen, rejected, rejected.rank - chosen.rank,
                     difficulty(rejected.rank - chosen.rank, levels))
            for chosen, rejected in ordered_pairs(prompt.responses)]


def difficulty(gap: int, levels: int) -> str:
    if gap == 1:
        return "hard"
    return "easy" if gap == levels - 1 else "medium"


def pair_row(prompt: Prompt, chosen: Response, rejected: Response, gap: int, level: str) -> dict:
    row = {"conversations": [{"from": "human", "value": prompt.prompt}],
           "chosen": {"from": "gpt", "value": chosen.text}, "rejected": {"from": "gpt", "value": rejected.text},
           "chosen_type": chosen.type, "rejected_type": rejected.type, "rank_gap": gap, "difficulty": level,
           "source": prompt.source}
    if prompt.system:
        row = {"system": prompt.system, **row}
    return row


def safety_cli(args: SafetyArgs) -> int:
    report = safety(args)
    print(f"{report['prompts']} prompts, {report['responses']} responses -> {report['pairs']} pairs "
          f"({report['by_difficulty']}) -> {report['out']}/pairs.jsonl")
    return 0


def safety(args: SafetyArgs) -> dict:
    if not args.data:
        raise UserError("No input: name files of typed responses or CValues comparison rows with `--data PATH`.")
    ranking = [ALIASES.get(t, t) for t in args.ranking]
    if len(set(ranking)) != len(ranking) or len(ranking) < 2:
        raise UserError(f"`--ranking` needs two or more distinct types, best first; got {args.ranking}.")
    sources = rows.Sources([_spec(p) for p in args.data], None, None)
    out = rows.prepare_out(args.out, rows.input_files(sources), ["pairs.jsonl", "report.json", "report.md"])
    prompts, skipped = read_prompts(sources, ranking, args.unknown_types)
    counts, levels, no_pair = Counter(), Counter(), []
    with rows.AtomicWriter(out / "pairs.jsonl") as w:
        for prompt in prompts:
            pairs = expand(prompt, len(ranking))
            if not pairs:
                no_pair.append(prompt.source)
            for pair in pairs:
                w.write_row(pair)
                counts[f"{pair['chosen_type']} > {pair['rejected_type']}"] += 1
                levels[pair["difficulty"]] += 1
    report = {"out": str(out), "ranking": ranking, "prompts": len(prompts),
              "responses": sum(len(p.responses) for p in prompts), "pairs": sum(counts.values()),
              "by_types": dict(counts), "by_difficulty": dict(levels), "prompts_without_pair": no_pair,
              "responses_skipped": skipped}
    rows.write_json(out / "report.json", report)
    rows.write_text(out / "report.md", report_md(report))
    return report


def _spec(path: str):
    from tuneforge.configs.schema import DatasetSpec

    return DatasetSpec(path=path)


def read_prompts(sources: rows.Sources, ranking: list[str], unknown: str = "raise") -> tuple[list[Prompt], list]:
    """Typed responses pooled by prompt, in order of first appearance; (prompts, skipped responses)."""
    by_text: dict[tuple, Prompt] = {}
    bad, skipped = [], []
    for spec in sources.specs:
        _, local = rows.resolved(spec, sources)
        for raw in readers.read_local(local):
            if isinstance(raw, BadRow):
                bad.append(str(raw))
                continue
            try:
                prompt, system, typed = parse_row(raw.data)
            except ValueError as e:
                bad.append(f"{raw.source}: {e}")
                continue
            entry = by_text.setdefault((prompt, system), Prompt(prompt, system, [], raw.source))
            for text, kind in typed:
                name = ALIASES.get(kind, kind)
                if name not in ranking:
                    (skipped if unknown == "skip" else bad).append(
                        f"{raw.source}: response type {kind!r} is not in --ranking {' > '.join(ranking)}")
                    continue
                if all(r.text != text or r.type != name for r in entry.responses):
                    entry.responses.append(Response(text, name, ranking.index(name), raw.source))
    if bad:
        listing = "\n".join(f"  - {b}" for b in bad[:20])
        raise DataError(f"{len(bad)} safety rows are bad:\n{listing}\nRows need `prompt` and either `responses` "
                        f"([{{text, type}}, ...]) or CValues' pos_resp/neg_resp/pos_type/neg_type; types must be "
                        f"named in --ranking (or pass --unknown-types skip).")
    return list(by_text.values()), skipped


def parse_row(data: dict) -> tuple[str, str | None, list[tuple[str, str]]]:
    """(prompt, system, [(response text, type)]) of one row in either input layout; ValueError says what is wrong."""
    prompt, system = data.get("prompt"), data.get("system") or None
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("`prompt` is missing or empty")
    try:  # the layouts as the data path reads them (format typed)
        typed = [(text, kind) for _, text, kind in typed_responses(data, {})]
    except RowProblem as e:
        raise ValueError(f"`{e.field}`: {e.problem}") from None
    return prompt, system, typed


def report_md(report: dict) -> str:
    lines = ["# tuneforge data safety", "", f"Ranking: {' > '.join(report['ranking'])}.", "",
             f"{report['prompts']} prompts, {report['responses']} responses, **{report['pairs']} pairs**.", "",
             "| chosen > rejected | pairs |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["by_types"].items()]
    lines += ["", f"By difficulty: {report['by_difficulty']}."]
    if report["prompts_without_pair"]:
        lines += ["", f"{len(report['prompts_without_pair'])} prompts gave no pair (all responses of one type), "
                      f"first: {report['prompts_without_pair'][0]}."]
    return "\n".join(lines) + "\n"
