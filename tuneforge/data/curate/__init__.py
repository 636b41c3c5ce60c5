"""`tuneforge data <sub-verb>`: turn raw rows into a clean, balanced training set, with a report of every row.

    tuneforge data inspect --data alpaca.json --model builtin:smollm2-135m-instruct --out reports/raw
    tuneforge data clean   --data alpaca.json --out data/clean
    tuneforge data mix     --data clean.jsonl zh.jsonl --strategy temperature --T 2 --size 20000 --out data/mix
    tuneforge data safety  --data cvalues_comparison.jsonl --out data/safety
    tuneforge data safety  --distill --data risky_prompts.jsonl --out data/distill --base-url URL --model NAME
    tuneforge data synth   self_instruct --data seed_tasks.jsonl --out data/synth --base-url URL --model NAME

Each sub-verb reads the same dataset specs as `data.train` (`--data`, or `--config train.yaml`), writes into
`--out DIR` (rows as .jsonl that `tuneforge train` reads, report.json + report.md) and never overwrites its input.
One module per sub-verb (synth/: a package, one module per method; distill.py: `safety --distill`); rows.py holds the shared reading and atomic writing.
"""

from __future__ import annotations

from pathlib import Path

SUBVERBS = {
    "inspect": ("tuneforge.data.curate.inspect:inspect_cli", "tuneforge.data.curate.inspect:InspectArgs",
                "Counts, token lengths with the model's chat template, turns, languages, empty/duplicate fields."),
    "clean": ("tuneforge.data.curate.clean:clean_cli", "tuneforge.data.curate.clean:CleanArgs",
              "Drop exact/near duplicates and degenerate rows; every removed row listed with its rule."),
    "mix": ("tuneforge.data.curate.mix:mix_cli", "tuneforge.data.curate.mix:MixArgs",
            "Mix datasets to a target size: proportional, temperature (T5) or equal shares."),
    "safety": ("tuneforge.data.curate.safety:safety_cli", "tuneforge.data.curate.safety:SafetyArgs",
               "Typed safety responses (CValues style) -> every ordered preference pair; --distill: safety "
               "context distillation through a teacher."),
    "synth": ("tuneforge.data.curate.synth:synth_cli", "tuneforge.data.curate.synth:SynthArgs",
              "Build rows with a teacher endpoint: self_instruct, evol_instruct, qa_from_docs, backtranslate."),
}


def subverb_help() -> str:
    rows = "\n".join(f"  {name:<8} {help_}" for name, (_, _, help_) in SUBVERBS.items())
    return f"sub-verbs:\n{rows}\n\n`tuneforge data <sub-verb> --help` for its options."


def usage() -> str:
    return f"usage: tuneforge data <sub-verb> [options]\n\n{subverb_help()}"


def data_cli(argv: list[str]) -> int:
    """Dispatch `tuneforge data <sub-verb> ...` to the sub-verb's function with its parsed, typed options."""
    from tuneforge.cli import Verb, _load, parse_verb_args
    from tuneforge.errors import UserError, did_you_mean

    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] not in SUBVERBS:
        raise UserError(f"`tuneforge data {argv[0]}`: no such sub-verb.{did_you_mean(argv[0], SUBVERBS)} "
                        f"Sub-verbs: {', '.join(SUBVERBS)}.")
    target, args, help_ = SUBVERBS[argv[0]]
    verb = Verb(f"data {argv[0]}", target, args, help_)
    parsed = parse_verb_args(verb, argv[1:])
    out = Path(parsed.out).expanduser() if getattr(parsed, "out", None) else None
    existed = out is None or out.exists()
    try:
        return int(_load(target)(parsed) or 0)
    except UserError:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a refused run leaves no empty output folder behind (the folder was made before the check)
        raise
