"""`tuneforge data inspect`: what is in a dataset before training on it.

    tuneforge data inspect --data alpaca.json --out reports/alpaca
    tuneforge data inspect --config examples/sft_lora_tiny.yaml --model builtin:smollm2-135m-instruct --out reports/sft
    tuneforge data inspect --config examples/sft_lora_tiny.yaml --show 2 --out reports/sft

Counts (rows, bad rows by source, rows per dataset), characters per row, turns per conversation, script-based
languages, empty and duplicate fields (per raw column, plus whole rows, prompts and answers after normalisation).
With `--model`, every row is encoded as training encodes it (build.encode_examples, with the config's stage and
data settings: `data.system`, the special-token policy, max_length): token lengths before the max_length cut (a
pair's longer side, as max_length applies per side), how many rows `--max-length` cuts or skips, and the share of
the tokens training keeps that get loss (`--loss-on`). Writes report.json, report.md and PNG histograms
(lengths.png, turns.png, languages.png). `--show N` prints the first N rows encoded the same way, trained tokens
marked (show.py). Alignment rows (preference pairs, typed rows as their pairs, KTO rows, prompts) are read too: a
pair counts as its prompt and both replies for the text counts.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, NamedTuple

from tuneforge.configs.typed import opt
from tuneforge.data.curate import rows
from tuneforge.data.curate.text import (
    language,
    normalize,
    plain_text,
    prompt_and_answers,
    row_text,
    turns,
)
from tuneforge.data.placeholders import file_of, placeholders_in
from tuneforge.data.types import (
    IGNORE_INDEX,
    DataReport,
    EncodedPair,
    EncodedPrompt,
    Example,
    PairExample,
    placeholder_warning,
)
from tuneforge.errors import DataError, UserError, counted


@dataclass(kw_only=True)
class InspectArgs(rows.SourceArgs):
    model: str | None = opt(None, "Model whose tokenizer and chat template measure tokens (local folder, hub id or "
                                  "builtin:<name>). Without it lengths are in characters only; with --show and "
                                  "--config, the config's model.")
    chat_template: str | None = opt(None, "Override the model's chat template (a built-in name or a .jinja; with "
                                          "--config, default: its model.chat_template).")
    max_length: int | None = opt(None, "The data.max_length to check: rows longer in tokens are counted as cut "
                                       "(default: the config's data.max_length, else 1024).")
    loss_on: Literal["assistant", "all", "last"] | None = opt(
        None, "Which tokens get loss, as data.loss_on (default: the config's, else assistant).")
    show: int = opt(0, "Print the first N rows encoded as training encodes them (the config's stage, data settings, "
                       "model and chat template): the text the model sees, trained tokens between {+ and +}, and "
                       "token counts. Needs a model (--model, or --config).")
    bins: int = opt(40, "Histogram bins in the length plot.")
    shown: int = opt(20, "How many bad rows to list in the report.")


def inspect_cli(args: InspectArgs) -> int:
    report = inspect(args)
    print(Path(report["out"], "report.md").read_text(encoding="utf-8"))
    if report.get("shown"):
        print(report["shown"], end="")
    return 0


# A max_length no row reaches: a row that training cuts is encoded again with it for its whole length.
UNCUT = 2**40


class Measure(NamedTuple):
    """One row as training encodes it, before the max_length cut: `longest`, its longest sequence (what max_length
    applies to: a pair's longer side, a whole document; for a row that is not cut, the length training builds) and
    `tokens`, all of its tokens (both sides of a pair); after the cut: `kept`, the tokens training keeps (0 for a
    row it skips) and `loss`, those of them that get loss. `cut`: max_length truncated, split or dropped the row;
    `no_room`: its prompt leaves no room for the reply within max_length, so training skips it. `stage`: the data
    stage that encoded it."""

    longest: int
    tokens: int
    kept: int
    loss: int
    cut: bool
    no_room: bool
    stage: str


def token_counter(tokenizer, template: str | None, data_cfg=None, config_stage: str | None = None):
    """Example -> Measure, through the very encoder `tuneforge train` uses (build.encode_examples: the stage's
    encoding with the data settings, so `data.system`, the content cap, the special-token policy and max_length
    apply as in training; default: DataConfig's). The stage is the config's, else the one the row's kind trains
    (show.stage_for). Raises DataError with training's reason for a row training rejects."""
    from tuneforge.data import build
    from tuneforge.data.curate.show import data_config, stage_for

    data_cfg = data_cfg if data_cfg is not None else data_config(None, None, None)

    def encode(example, cfg, stage):
        report = DataReport()
        items = build.encode_examples([example], tokenizer, stage, cfg, template, report)
        if report.bad_rows:
            raise DataError(report.bad_rows[0].problem)
        return items, report

    def count(example) -> Measure:
        stage = stage_for(example, config_stage)
        items, report = encode(example, data_cfg, stage)
        cut = bool(report.truncated or report.dropped_overlong or report.split_documents)
        whole = encode(example, replace(data_cfg, max_length=UNCUT), stage)[0] if cut or report.no_room else items
        return Measure(max(map(longest, whole), default=0), sum(map(length, whole)), sum(map(length, items)),
                       sum(map(trained, items)), cut, bool(report.no_room), stage)

    return count


def length(item) -> int:
    return len(item.chosen) + len(item.rejected) if isinstance(item, EncodedPair) else len(item)


def longest(item) -> int:
    return max(len(item.chosen), len(item.rejected)) if isinstance(item, EncodedPair) else len(item)


def trained(item) -> int:
    """Tokens that get loss (position 0 is never predicted); a prompt for sampling has none."""
    if isinstance(item, EncodedPair):
        return trained(item.chosen) + trained(item.rejected)
    if isinstance(item, EncodedPrompt):
        return 0
    return sum(1 for label in item.labels[1:] if label != IGNORE_INDEX)


def chat_view(example):
    """A preference pair seen as one conversation for the text counts (characters, turns, languages, duplicates):
    its prompt, then both replies."""
    if isinstance(example, PairExample):
        return Example(example.source, messages=[*example.prompt, *example.chosen, *example.rejected],
                       tools=example.tools)
    return example


class Stats:
    """Everything inspect counts, accumulated one row at a time (lengths as compact arrays)."""

    def __init__(self):
        self.rows, self.bad, self.per_dataset = 0, [], Counter()
        self.chars, self.tokens = array("I"), array("I")
        self.total, self.kept_tokens, self.loss_tokens, self.render_errors = 0, 0, 0, []
        self.cut, self.no_room, self.no_loss, self.stages = 0, 0, 0, Counter()
        self.turns, self.languages, self.kinds = Counter(), Counter(), Counter()
        self.empty, self.dup = Counter(), Counter()
        self.placeholders: dict[str, list] = {}  # file -> [rows, names] with `{{name}}` placeholders
        self._seen: dict[str, set] = defaultdict(set)

    def seen(self, field: str, value: str) -> bool:
        """Whether `value` was seen before in `field` (8-byte hashes, so 100k rows stay small)."""
        key = hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest()
        if key in self._seen[field]:
            self.dup[field] += 1
            return True
        self._seen[field].add(key)
        return False

    def add(self, row: rows.Row, counter) -> None:
        self.rows += 1
        self.per_dataset[row.dataset] += 1
        for key, value in (row.raw or {}).items():
            if isinstance(value, str):
                if not value.strip():
                    self.empty[f"column `{key}`"] += 1
                else:
                    self.seen(f"column `{key}`", value)
        if row.bad is not None:
            self.bad.append(str(row.bad))
            return
        self._add_example(row, counter)

    def _add_example(self, row: rows.Row, counter) -> None:
        from tuneforge.data.build import kind_of

        self.kinds[kind_of(row.example)] += 1
        names = placeholders_in(row.example)
        if names:
            found = self.placeholders.setdefault(file_of(row.source), [0, set()])
            found[0] += 1
            found[1] |= names
        example = chat_view(row.example)
        text = row_text(example)
        self.chars.append(len(text))
        self.turns[turns(example)] += 1
        self.languages[language(plain_text(example))] += 1
        self.seen("whole row (normalised)", normalize(text))
        prompt, answers = prompt_and_answers(example)
        if example.messages is not None:
            self.seen("prompt (normalised)", normalize(prompt))
            if answers:  # a prompt row has none: 600 "duplicate" empty answers would be noise
                self.seen("answer (normalised)", normalize("\n".join(answers)))
        if counter is not None:
            try:
                measure = counter(row.example)
            except DataError as e:
                self.render_errors.append(f"{row.source}: {e}")
                return
            if measure.longest:  # a row training drops for having nothing to learn has no length to show
                self.tokens.append(measure.longest)
            self.stages[measure.stage] += 1
            self.total += measure.tokens
            self.kept_tokens += measure.kept
            self.loss_tokens += measure.loss
            self.cut += measure.cut
            self.no_room += measure.no_room
            self.no_loss += not (measure.kept or measure.cut or measure.no_room)


def inspect(args: InspectArgs) -> dict:
    from tuneforge.data.curate import show

    config = load_config(args)
    args = settled(args, config)
    sources = rows.sources_of(args)
    out = rows.prepare_out_for(args.out, sources, ["report.json", "report.md", "lengths.png", "turns.png",
                                                   "languages.png"])
    counter = tokenizer = template = None
    data_cfg, stage = show.data_config(config, args.max_length, args.loss_on), config.stage if config else None
    if args.model:
        tokenizer, template = rows.load_tokenizer(args.model, args.chat_template)
        counter = token_counter(tokenizer, template, data_cfg, stage)
    stats, shown = Stats(), []
    for row in rows.iter_rows(sources, alignment=True):
        stats.add(row, counter)
        if len(shown) < args.show and row.example is not None:
            shown.append(row)
    report = summarize(stats, args, str(out), data_cfg.overlong)
    if args.show:
        report["shown"] = show.show_rows(shown, tokenizer, template, data_cfg, stage)
    plot(stats, args, out)
    rows.write_json(out / "report.json", report)
    rows.write_text(out / "report.md", report_md(report))
    return report


def load_config(args: InspectArgs):
    from tuneforge.configs.schema import load_train_config

    return load_train_config(args.config) if args.config else None


def settled(args: InspectArgs, config) -> InspectArgs:
    """The options with the config's settings where the command line left them out: its data.max_length and
    data.loss_on, and for --show its model and chat template (the encoding shown must be the one training uses)."""
    from dataclasses import replace

    data = config.data if config is not None else None
    model = args.model or (config.model.name_or_path if config is not None and args.show else None)
    if args.show and not model:
        raise UserError("`--show` prints rows encoded with a model's tokenizer and chat template: give `--model "
                        "NAME` (local folder, hub id or builtin:<name>) or `--config train.yaml` for its model.")
    if args.show < 0:
        raise UserError(f"`--show` is a number of rows (0: none), got {args.show}.")
    template = args.chat_template or (config.model.chat_template if config is not None and model
                                      and model == config.model.name_or_path else None)
    return replace(args, model=model, chat_template=template,
                   max_length=args.max_length or (data.max_length if data else 1024),
                   loss_on=args.loss_on or (data.loss_on if data else "assistant"))


def describe(values) -> dict:
    """min / mean / percentiles / max of a list of lengths (empty: {})."""
    if not values:
        return {}
    ordered = sorted(values)

    def pct(p: float) -> int:
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    return {"min": ordered[0], "mean": round(sum(ordered) / len(ordered), 1), "p50": pct(50), "p90": pct(90),
            "p99": pct(99), "max": ordered[-1]}


def summarize(stats: Stats, args: InspectArgs, out: str, overlong: str = "truncate") -> dict:
    total = stats.total
    report = {"out": out, "rows": stats.rows, "bad_rows": len(stats.bad), "bad_rows_first": stats.bad[:args.shown],
              "rows_per_dataset": dict(stats.per_dataset), "kinds": dict(stats.kinds),
              "chars": describe(stats.chars), "turns": dict(sorted(stats.turns.items())),
              "languages": dict(stats.languages.most_common()), "empty_fields": dict(stats.empty),
              "duplicate_fields": dict(stats.dup),
              "placeholder_warnings": [placeholder_warning(file, n, sorted(names))
                                       for file, (n, names) in stats.placeholders.items()]}
    if args.model:
        kept = stats.kept_tokens
        report["tokens"] = {"model": args.model, **describe(stats.tokens), "total": total, "kept": kept,
                            "loss_tokens": stats.loss_tokens, "loss_on": args.loss_on,
                            "loss_share": round(stats.loss_tokens / kept, 4) if kept else 0.0,
                            "max_length": args.max_length, "overlong": overlong, "rows_cut": stats.cut,
                            "rows_no_room": stats.no_room, "rows_no_loss": stats.no_loss,
                            "stages": dict(stats.stages),
                            "render_errors": len(stats.render_errors),
                            "render_errors_first": stats.render_errors[:args.shown]}
    return report


def plot(stats: Stats, args: InspectArgs, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, unit = (stats.tokens, "tokens") if args.model else (stats.chars, "characters")
    fig, ax = plt.subplots(figsize=(7, 4))
    # a long tail squeezes the body into one bar: clip at p99 (or just past max_length) and say so
    stats_ = describe(lengths)
    upper = max(stats_.get("p99", 1), int(args.max_length * 1.1) if args.model else 0, 1)
    ax.hist([min(n, upper) for n in lengths], bins=args.bins, range=(0, upper), color="#4878a8")
    if args.model:
        ax.axvline(args.max_length, color="#c03030", linestyle="--", label=f"max_length {args.max_length}")
        ax.legend()
    tail = sum(1 for n in lengths if n > upper)
    ax.set(xlabel=f"{unit} per row" + (f" ({tail} rows over {upper} in the last bar)" if tail else ""),
           ylabel="rows", title=f"Row length ({unit})")
    _save(fig, out / "lengths.png")
    for name, counts, xlabel in (("turns", stats.turns, "user turns per row"),
                                 ("languages", stats.languages, "language (by script)")):
        fig, ax = plt.subplots(figsize=(7, 4))
        keys = sorted(counts) if name == "turns" else [k for k, _ in counts.most_common()]
        ax.bar([str(k) for k in keys], [counts[k] for k in keys], color="#4878a8")
        ax.set(xlabel=xlabel, ylabel="rows")
        _save(fig, out / f"{name}.png")


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def report_md(report: dict) -> str:
    lines = ["# tuneforge data inspect", "", f"**{counted(report['rows'], 'row')}**, {report['bad_rows']} bad "
             f"(rejected by the data path), kinds: {report['kinds']}.", "", "| dataset | rows |", "|---|---|"]
    lines += [f"| {name} | {n} |" for name, n in report["rows_per_dataset"].items()]
    lines += ["", f"Characters per row: {report['chars']}", f"User turns per row: {report['turns']}",
              f"Languages (script-based): {report['languages']}", ""]
    if "tokens" in report:
        lines += tokens_md(report["tokens"], report["kinds"])
    fields = sorted(set(report["empty_fields"]) | set(report["duplicate_fields"]))
    lines += ["| field | empty | duplicate values |", "|---|---|---|"] if fields else ["No empty or duplicate fields."]
    for field in fields:
        lines.append(f"| {field} | {report['empty_fields'].get(field, 0)} | "
                     f"{report['duplicate_fields'].get(field, 0)} |")
    for warning in report["placeholder_warnings"]:  # a paragraph each: a line right after a table joins it
        lines += ["", f"Warning: {warning}"]
    if report["bad_rows_first"]:
        lines += ["", "Bad rows:", ""] + [f"- {b}" for b in report["bad_rows_first"]]
    lines += ["", "![lengths](lengths.png) ![turns](turns.png) ![languages](languages.png)"]
    return "\n".join(lines) + "\n"


def tokens_md(t: dict, kinds: dict) -> list[str]:
    """The token lines of report.md: lengths as training encodes the rows, what max_length does to them, the loss
    share of what training keeps, and the rows training would reject or skip."""
    lines = [f"Tokens per row as training encodes them with `{t['model']}`'s chat template, before the max_length "
             f"cut{' (a pair: its longer side)' if 'pairs' in kinds else ''}: min {t.get('min')}, p50 {t.get('p50')}, "
             f"p90 {t.get('p90')}, p99 {t.get('p99')}, max {t.get('max')}.",
             f"Rows longer than max_length {t['max_length']}: {t['rows_cut']} ({cut_md(t['overlong'], kinds)}).",
             f"Loss tokens ({loss_on_md(t['loss_on'], t['stages'])}): {t['loss_tokens']} of the {t['kept']} tokens "
             f"training keeps ({t['loss_share']:.1%}"
             + (f"; {t['total']} before the cut)." if t["kept"] != t["total"] else ").")]
    if t["rows_no_room"]:
        lines.append(f"Rows whose prompt leaves no room for a reply within max_length (training skips them; raise "
                     f"data.max_length or shorten the prompts): {t['rows_no_room']}.")
    if t["rows_no_loss"]:
        lines.append(f"Rows with no token to learn (training drops them): {t['rows_no_loss']}.")
    if t["render_errors"]:
        lines += ["", f"Rows training would reject ({t['render_errors']}):", ""]
        lines += [f"- {e}" for e in t["render_errors_first"]]
    return lines + [""]


def cut_md(overlong: str, kinds: dict) -> str:
    """What training does with a row longer than max_length, for the kinds of rows present."""
    chats = "dropped (data.overlong: drop)" if overlong == "drop" else "truncated"
    if set(kinds) == {"text"}:
        return "split into max_length chunks, as stage pt does"
    return chats + ("; a text document is split into chunks" if "text" in kinds else "")


def loss_on_md(loss_on: str, stages: dict) -> str:
    """Which tokens get loss, per data stage that encoded the rows (data.loss_on applies to sft only)."""
    parts = {"sft": f"sft rows: data.loss_on {loss_on}", "pairwise": "pairs: each reply",
             "kto": "KTO rows: the last reply", "pt": "text: every token",
             "prompt": "prompts for ppo/grpo sampling: none"}
    return "; ".join(parts[stage] for stage in stages if stage in parts) or f"data.loss_on {loss_on}"
