"""`tuneforge data mix`: several datasets -> one training set of a target size, with exact per-dataset counts.

    tuneforge data mix --data en.jsonl zh.jsonl code.json --strategy temperature --T 2 --size 20000 --out data/mix

Strategies (the share r_m of dataset m, with e_m its number of rows):
  proportional  r_m = e_m / sum(e)                         (the natural mixture)
  temperature   r_m proportional to min(e_m, K)^(1/T)       (T5, Raffel et al. 2020, section 3.5.2: T=1 is
                proportional with sizes capped at K; larger T flattens towards uniform)
  equal         r_m = 1 / M

Counts: size * r_m rounded down, then the rows left over go one each to the datasets with the largest remainders
(ties: the earlier dataset), so the counts sum to `--size` exactly. A dataset asked for more rows than it has is
repeated: every row k times and a seeded sample of the rest (the report says so). Rows are sampled without
replacement with `--seed` and the result is shuffled with it. A training config mixes the same way with
`data.mix: {strategy: temperature, T: 2, K: ..., size: ...}` (build.read_datasets, seeded by `data.seed`). Writes mix.jsonl (OpenAI `messages` / `text` rows with
`source` and `dataset`), report.json and report.md; prints the shares.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from tuneforge.configs.typed import opt
from tuneforge.data.build import bad_row_listing
from tuneforge.data.curate import rows
from tuneforge.errors import DataError, UserError, counted

STRATEGIES = ("proportional", "temperature", "equal")


@dataclass(kw_only=True)
class MixArgs(rows.SourceArgs):
    strategy: Literal["proportional", "temperature", "equal"] = opt(
        "temperature", "How shares follow dataset sizes: proportional, temperature (T5) or equal.")
    T: float = opt(2.0, "Temperature of the `temperature` strategy: 1 = proportional, larger = closer to equal.")
    K: int | None = opt(None, "Cap on a dataset's size in the `temperature` strategy (T5's K): no dataset counts "
                              "as bigger than K rows. Default: no cap.")
    size: int | None = opt(None, "Rows in the mixture. Default: the rows of all datasets together.")
    seed: int = opt(0, "Seed for sampling and shuffling (same seed, same mixture).")
    shuffle: bool = opt(True, "Shuffle the mixture (else datasets follow one another in the order given).")
    on_error: Literal["raise", "skip"] = opt("raise", "Bad rows: raise (list them and stop) or skip (count them).")
    weights: list[float] = opt(factory=list, help="Your own share per dataset, in the order of the datasets (as "
                                                  "LLaMA-Factory's interleave_probs); relative, so 0.5 0.3 or 5 3 "
                                                  "give the same mixture. Given: replaces --strategy.")


def weights(sizes: list[int], strategy: str, T: float = 1.0, K: int | None = None) -> list:
    """Unnormalised shares (ints where they are exact, so proportional and equal counts are exact rationals)."""
    if strategy == "equal":
        return [1] * len(sizes)
    if strategy == "proportional":
        return list(sizes)
    if strategy == "temperature":
        return [min(e, K if K is not None else e) ** (1 / T) for e in sizes]
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")


def rates(sizes: list[int], strategy: str, T: float = 1.0, K: int | None = None) -> list[float]:
    """The share of each dataset (they sum to 1); see the module docstring."""
    w = weights(sizes, strategy, T, K)
    return [float(Fraction(x) / sum(map(Fraction, w))) for x in w]


def allocate(size: int, weights: list) -> list[int]:
    """Largest-remainder rounding of size * w_m / sum(w): counts that sum to `size` exactly (ties: the earlier
    dataset). Computed in exact rationals of the given weights, so no float rounding moves a row."""
    total = sum(map(Fraction, weights))
    quotas = [Fraction(w) * size / total for w in weights]
    counts = [math.floor(q) for q in quotas]
    left = size - sum(counts)
    order = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[:left]:
        counts[i] += 1
    return counts


def sample(n_rows: int, count: int, rng: random.Random) -> list[int]:
    """Row indices for `count` draws from `n_rows` rows: each row `count // n_rows` times, plus a sample of the
    rest without replacement, in original order."""
    full, rest = divmod(count, n_rows)
    picked = sorted(rng.sample(range(n_rows), rest))
    return sorted(list(range(n_rows)) * full + picked)


def draw(groups: list[list], strategy: str, T: float, K: int | None, size: int, seed: int,
         shuffle: bool = True, given: list | None = None) -> tuple[list[tuple[int, object]], list[int]]:
    """The mixture of `groups` (one list of items per dataset): ([(group index, item)], counts per group). The one
    implementation behind `tuneforge data mix` and a training config's `data.mix`; a function of the seed alone.
    `given`: the user's own weights (`--weights`), used instead of the strategy's."""
    counts = allocate(size, given or weights([len(g) for g in groups], strategy, T, K))
    rng = random.Random(seed)
    picked = [(m, group[i]) for m, (group, count) in enumerate(zip(groups, counts))
              for i in sample(len(group), count, rng)]
    if shuffle:
        rng.shuffle(picked)
    return picked, counts


def mix_cli(args: MixArgs) -> int:
    report = mix(args)
    print(f"{report['size']} rows ({report['strategy']}{settings(report)}; seed {report['seed']}) -> "
          f"{report['out']}/mix.jsonl")
    for d in report["datasets"]:
        note = f"  repeated x{d['repeat']:.2f}" if d["repeat"] > 1 else ""
        print(f"  {d['share']:7.2%}  {d['count']:>8} of {d['rows']:>8}  {d['name']}{note}")
    bad = report["bad_rows_skipped"]
    if bad:  # the rows --on-error skip left out: said where the user looks, not only in report.json
        print(f"  {counted(len(bad), 'bad row')} skipped (--on-error skip; each listed in report.json), first: "
              f"{bad[0]}")
    return 0


def mix(args: MixArgs) -> dict:
    _check(args)
    sources = rows.sources_of(args)
    out = rows.prepare_out_for(args.out, sources, ["mix.jsonl", "report.json", "report.md"])
    given = own_weights(args.weights, sources.specs)
    datasets, bad = _read(sources, args)
    sizes = [len(examples) for _, examples in datasets]
    shares = [float(w / sum(given)) for w in given] if given else rates(sizes, args.strategy, args.T, args.K)
    size = args.size if args.size is not None else sum(sizes)
    picked, counts = draw([examples for _, examples in datasets], args.strategy, args.T, args.K, size, args.seed,
                          args.shuffle, given)
    with rows.AtomicWriter(out / "mix.jsonl") as w:
        for m, (source, example) in picked:
            w.write_row(rows.example_row(example, source=source, dataset=datasets[m][0]))
    report = {"out": str(out), "strategy": "weights" if given else args.strategy, "weights": args.weights or None,
              "T": args.T, "K": args.K, "seed": args.seed, "size": size,
              "bad_rows_skipped": bad,
              "datasets": [{"name": name, "rows": e, "share": round(s, 6), "count": c, "repeat": round(c / e, 4)}
                           for (name, _), e, s, c in zip(datasets, sizes, shares, counts)]}
    rows.write_json(out / "report.json", report)
    rows.write_text(out / "report.md", report_md(report))
    return report


def _check(args: MixArgs) -> None:
    if args.T <= 0:
        raise UserError(f"`--T` must be > 0 (1 = proportional, larger = closer to equal), got {args.T}.")
    if args.K is not None and args.K < 1:
        raise UserError(f"`--K` must be at least 1 row, got {args.K}.")
    if args.size is not None and args.size < 1:
        raise UserError(f"`--size` must be at least 1, got {args.size}.")


def own_weights(given: list[float], specs: list) -> list[Fraction]:
    """`--weights` as exact fractions (0.3 is 3/10, not the nearest binary float), or [] when not given; one per
    dataset, none negative, not all zero. They need not sum to 1: the shares are weight / sum."""
    if not given:
        return []
    if len(given) != len(specs):
        names = ", ".join(spec.path for spec in specs)
        raise UserError(f"`--weights` has {counted(len(given), 'value')} but there are "
                        f"{counted(len(specs), 'dataset')} ({names}): give one weight per dataset, in the same order.")
    if any(not w >= 0 or math.isinf(w) for w in given) or not sum(given) > 0:
        raise UserError(f"`--weights {' '.join(map(str, given))}`: weights must be finite, 0 or more, and not all 0 "
                        f"(they are relative: 0.5 0.3 0.2 or 5 3 2).")
    return [Fraction(str(w)) for w in given]


def _read(sources: rows.Sources, args: MixArgs) -> tuple[list[tuple[str, list]], list[str]]:
    """[(dataset name, [(source, Example)])] per spec, and the bad rows (raised unless on_error is skip)."""
    per_spec: list[list] = [[] for _ in sources.specs]
    bad, kinds = [], rows.OneKind("mix")
    for row in rows.iter_rows(sources):
        kinds.check(row)
        if row.bad is not None:
            bad.append(row.bad)
        else:
            per_spec[row.spec_index].append((row.source, row.example))
    if bad and args.on_error == "raise":
        listing, more = bad_row_listing(bad, 20)
        raise DataError(f"{counted(len(bad), 'row is', 'rows are')} bad:\n{listing}{more}\nFix them, clean the data first "
                        f"(`tuneforge data clean`), or pass `--on-error skip` to mix without them.")
    named = [(spec.path, examples) for spec, examples in zip(sources.specs, per_spec)]
    empty = [name for name, examples in named if not examples]
    if empty:
        raise DataError(f"Dataset {empty[0]} has no usable rows; a mixture cannot draw from it. Remove it from "
                        f"the list or fix its rows.")
    return named, [str(b) for b in bad]


def settings(report: dict) -> str:
    """The settings the strategy used (T and K mean nothing to the others), for the console and report.md."""
    if report["strategy"] == "temperature":
        return f" T={report['T']}, K={report['K']}"
    if report["strategy"] == "weights":
        total = sum(Fraction(str(w)) for w in report["weights"])
        scaled = "" if total == 1 else f"; they sum to {float(total):g}, so each share is weight / {float(total):g}"
        return f" {' '.join(f'{w:g}' for w in report['weights'])}{scaled}"
    return ""


def report_md(report: dict) -> str:
    lines = ["# tuneforge data mix", "", f"{report['size']} rows, strategy `{report['strategy']}`{settings(report)}; "
             f"seed {report['seed']}.", "", "| dataset | rows | share | count | note |", "|---|---|---|---|---|"]
    for d in report["datasets"]:
        note = f"repeated x{d['repeat']:.2f}" if d["repeat"] > 1 else ""
        lines.append(f"| {d['name']} | {d['rows']} | {d['share']:.2%} | {d['count']} | {note} |")
    if report["bad_rows_skipped"]:
        bad = report["bad_rows_skipped"]
        lines += ["", f"{counted(len(bad), 'bad row')} skipped (first: {bad[0]})."]
    return "\n".join(lines) + "\n"
