"""`tuneforge data inspect`: what is in a dataset before training on it.

    tuneforge data inspect --data alpaca.json --out reports/alpaca
    tuneforge data inspect --config examples/sft_lora_tiny.yaml --model builtin:smollm2-135m-instruct --out reports/sft
    tuneforge data inspect --config examples/sft_lora_tiny.yaml --show 2 --out reports/sft

Counts (rows, bad rows by source, rows per dataset), characters per row, turns per conversation, script-based
languages, empty and duplicate fields (per raw column, plus whole rows, prompts and answers after normalisation).
With `--model`, every row is rendered with the model's chat template through the training encoder: token lengths,
the share of tokens that get loss (`--loss-on`), and how many rows `--max-length` would cut. Writes report.json,
report.md and PNG histograms (lengths.png, turns.png, languages.png). `--show N` prints the first N rows encoded as
training encodes them, trained tokens marked (show.py). Alignment rows (preference pairs, KTO rows, prompts) are
read too: a pair counts as its prompt and both replies, its tokens as both sides rendered whole, as DPO renders them.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tuneforge.configs.typed import opt
from tuneforge.data.curate import rows
from tuneforge.data.curate.text import language, normalize, plain_text, prompt_and_answers, row_text, turns
from tuneforge.data.placeholders import file_of, placeholders_in
from tuneforge.data.types import IGNORE_INDEX, Example, PairExample, placeholder_warning
from tuneforge.errors import DataError, UserError


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


def token_counter(tokenizer, template: str, loss_on: str = "assistant"):
    """Example -> (tokens, loss tokens, longest sequence), rendered exactly as `tuneforge train` renders it. A pair
    is both sides rendered whole (as encode_align.encode_pair renders them; max_length applies to each side), a KTO
    row has loss on its last reply, a prompt row is the prompt with the generation prompt (no loss)."""
    from tuneforge.data.encode import encode_chat, encode_prompt

    def trained(encoded) -> int:
        return sum(1 for label in encoded.labels[1:] if label != IGNORE_INDEX)

    def count(example) -> tuple[int, int, int]:
        if isinstance(example, PairExample):
            skip = sum(m["role"] == "assistant" for m in example.prompt)
            sides = [encode_chat(tokenizer, example.prompt + reply, tools=example.tools, chat_template=template,
                                 skip_turns=skip) for reply in (example.chosen, example.rejected)]
            return sum(map(len, sides)), sum(map(trained, sides)), max(map(len, sides))
        if example.text is not None:
            n = len(tokenizer(example.text)["input_ids"]) + (tokenizer.eos_token_id is not None)  # as stage pt
            return n, n - 1, n
        if example.messages[-1]["role"] != "assistant":  # a prompt for sampling
            n = len(encode_prompt(tokenizer, example.messages, tools=example.tools, chat_template=template)[0])
            return n, 0, n
        encoded = encode_chat(tokenizer, example.messages, tools=example.tools, chat_template=template,
                              loss_on="last" if example.label is not None else loss_on)
        return len(encoded), trained(encoded), len(encoded)

    return count


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
        self.loss_tokens, self.cut, self.render_errors = 0, 0, []
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

    def add(self, row: rows.Row, counter, max_length: int) -> None:
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
        self._add_example(row, counter, max_length)

    def _add_example(self, row: rows.Row, counter, max_length: int) -> None:
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
            self.seen("answer (normalised)", normalize("\n".join(answers)))
        if counter is not None:
            try:
                n, loss, longest = counter(row.example)
            except DataError as e:
                self.render_errors.append(f"{row.source}: {e}")
                return
            self.tokens.append(n)
            self.loss_tokens += loss
            self.cut += longest > max_length


def inspect(args: InspectArgs) -> dict:
    from tuneforge.data.curate import show

    config = load_config(args)
    args = settled(args, config)
    sources = rows.sources_of(args)
    out = rows.prepare_out(args.out, rows.input_files(sources), ["report.json", "report.md", "lengths.png",
                                                               "turns.png", "languages.png"])
    counter = tokenizer = template = None
    if args.model:
        tokenizer, template = rows.load_tokenizer(args.model, args.chat_template)
        counter = token_counter(tokenizer, template, args.loss_on)
    stats, shown = Stats(), []
    for row in rows.iter_rows(sources, alignment=True):
        stats.add(row, counter, args.max_length)
        if len(shown) < args.show and row.example is not None:
            shown.append(row)
    report = summarize(stats, args, str(out))
    if args.show:
        data_cfg = show.data_config(config, args.max_length, args.loss_on)
        report["shown"] = show.show_rows(shown, tokenizer, template, data_cfg, config.stage if config else None)
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


def summarize(stats: Stats, args: InspectArgs, out: str) -> dict:
    total = sum(stats.tokens)
    report = {"out": out, "rows": stats.rows, "bad_rows": len(stats.bad), "bad_rows_first": stats.bad[:args.shown],
              "rows_per_dataset": dict(stats.per_dataset), "kinds": dict(stats.kinds),
              "chars": describe(stats.chars), "turns": dict(sorted(stats.turns.items())),
              "languages": dict(stats.languages.most_common()), "empty_fields": dict(stats.empty),
              "duplicate_fields": dict(stats.dup),
              "placeholder_warnings": [placeholder_warning(file, n, sorted(names))
                                       for file, (n, names) in stats.placeholders.items()]}
    if args.model:
        report["tokens"] = {"model": args.model, **describe(stats.tokens), "total": total,
                            "loss_tokens": stats.loss_tokens, "loss_on": args.loss_on,
                            "loss_share": round(stats.loss_tokens / total, 4) if total else 0.0,
                            "max_length": args.max_length, "rows_cut": stats.cut,
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
    lines = ["# tuneforge data inspect", "", f"**{report['rows']} rows**, {report['bad_rows']} bad "
             f"(rejected by the data path), kinds: {report['kinds']}.", "", "| dataset | rows |", "|---|---|"]
    lines += [f"| {name} | {n} |" for name, n in report["rows_per_dataset"].items()]
    lines += ["", f"Characters per row: {report['chars']}", f"User turns per row: {report['turns']}",
              f"Languages (script-based): {report['languages']}", ""]
    if "tokens" in report:
        t = report["tokens"]
        lines += [f"Tokens per row with `{t['model']}`'s chat template: min {t.get('min')}, p50 {t.get('p50')}, p90 "
                  f"{t.get('p90')}, p99 {t.get('p99')}, max {t.get('max')}.",
                  f"Loss tokens ({t['loss_on']}): {t['loss_tokens']} of {t['total']} ({t['loss_share']:.1%}).",
                  f"Rows longer than max_length {t['max_length']} (truncated in sft, split into chunks in pt): "
                  f"{t['rows_cut']}.", ""]
    lines += ["| field | empty | duplicate values |", "|---|---|---|"]
    for field in sorted(set(report["empty_fields"]) | set(report["duplicate_fields"])):
        lines.append(f"| {field} | {report['empty_fields'].get(field, 0)} | "
                     f"{report['duplicate_fields'].get(field, 0)} |")
    lines += [f"Warning: {w}" for w in report["placeholder_warnings"]] + [""] * bool(report["placeholder_warnings"])
    if report["bad_rows_first"]:
        lines += ["", "Bad rows:", ""] + [f"- {b}" for b in report["bad_rows_first"]]
    lines += ["", "![lengths](lengths.png) ![turns](turns.png) ![languages](languages.png)"]
    return "\n".join(lines) + "\n"
