"""`tuneforge <verb>`: one table of verbs; each verb's --help is generated from its typed config.

    tuneforge train examples/sft_lora_tiny.yaml training.max_steps=10
    tuneforge init-model tiny-llama --out /tmp/tiny
    tuneforge chat --model /tmp/tiny
    tuneforge methods
    tuneforge convert-config llama3_lora_sft.yaml --out tuneforge.yaml
    tuneforge --version

Every verb's `--help` has the same layout: usage, what it does, its options, examples (taken from the docstring of
the verb's module, which starts with the exact commands) and notes.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import textwrap
import time
import typing
import warnings
from dataclasses import MISSING, fields
from pathlib import Path
from types import UnionType
from typing import Literal, get_args, get_origin

from tuneforge.configs.typed import coerce, field_help_rows, help_of, type_name
from tuneforge.errors import ArgParser, UserError


@dataclasses.dataclass
class Verb:
    name: str
    target: str  # "module:function"; the function takes the parsed args dataclass (or the train argv)
    args: str | None  # "module:Dataclass" whose fields become --options (None: the verb parses its own argv)
    help: str
    notes: str = ""  # shown at the end of `--help`
    subverbs: bool = False  # `tuneforge data clean --help`: the verb dispatches sub-verbs and answers their --help


VERBS = [
    Verb("train", "tuneforge.train:main", None, "Run a training stage from a YAML config (+ key=value overrides)."),
    Verb("init-model", "tuneforge.models.presets:init_model_cli", "tuneforge.models.presets:InitModelArgs",
         "Write a tiny random-init model (HF format, with a trained BPE tokenizer) from a preset."),
    Verb("chat", "tuneforge.inference.chat:chat_cli", "tuneforge.inference.chat:ChatArgs",
         "Chat in the terminal with a model (and optional adapter) using its chat template.",
         "In the conversation: /reset forgets the history, /system TEXT sets a new system prompt and starts over, "
         "/help lists the commands, /exit (or Ctrl-D) quits. With --adapter and no --model, the base model "
         "recorded in the adapter is loaded."),
    Verb("methods", "tuneforge.cli:list_methods", None, "List the fine-tuning methods and what they train."),
    Verb("quickstart", "tuneforge.quickstart:quickstart_cli", "tuneforge.quickstart:QuickstartArgs",
         "Fine-tune the built-in chat model on the bundled task and show answers and accuracy before/after."),
    Verb("estimate", "tuneforge.estimate.memory:estimate_cli", "tuneforge.estimate.memory:EstimateArgs",
         "Estimate trainable parameters and memory per GPU for each fine-tuning method, side by side."),
    Verb("convert-config", "tuneforge.configs.llamafactory:convert_cli", "tuneforge.configs.llamafactory:ConvertArgs",
         "Translate a LLaMA-Factory training YAML into a TuneForge config and list what has no equivalent."),
    Verb("eval", "tuneforge.eval.run:eval_cli", None, "Evaluate models/adapters side by side (MMLU-style, GSM8K, "
         "BLEU/ROUGE, perplexity, safety, LLM judge) into one report.", "Or a YAML config (first argument) with "
         "keys models (a list of {model, adapter, name, chat_template}), tasks, data_dir, out, limit, task_limits, "
         "shots, gsm8k_shots, cot, mc_chat_template, option_text, max_new_tokens, batch_size, baseline, "
         "judge.{url,model,api_key_env,rubric,concurrency,max_tokens,retries,timeout}, "
         "safety.{detector,max_new_tokens}, progress; key=value overrides after it (README: Evaluate)."),
    Verb("export", "tuneforge.inference.export.cli:export_cli", "tuneforge.inference.export.cli:ExportArgs",
         "Merge an adapter into its base and write a Hugging Face folder or a GGUF file (llama.cpp, Ollama)."),
    Verb("data", "tuneforge.data.curate:data_cli", None,
         "Data tools: `data inspect|clean|mix|synth|safety`, each with its own --help; outputs train-ready .jsonl.",
         subverbs=True),
    Verb("serve", "tuneforge.inference.serve.main:serve_cli", "tuneforge.inference.serve.main:ServeArgs",
         "Serve a model and its adapters over an OpenAI-compatible HTTP API (chat, completions, streaming, tools)."),
]


def _load(ref: str):
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def _scalar_type(tp):
    """argparse's `type=` for int/float fields (also optional ones), so `--gpus 8` parses as 8."""
    args = [a for a in get_args(tp) if a is not type(None)] if get_origin(tp) in (typing.Union, UnionType) else [tp]
    return args[0] if len(args) == 1 and args[0] in (int, float) else None


def _examples(verb: Verb) -> str:
    """The example commands of a verb: the `tuneforge <verb> ...` lines of its module's docstring."""
    doc = importlib.import_module(verb.target.split(":")[0]).__doc__ or ""
    lines = [line.strip() for line in doc.splitlines() if line.strip().startswith(f"tuneforge {verb.name}")]
    return "\n".join(f"  {line}" for line in lines)


def _new_parser(verb: Verb, extra: str = "") -> argparse.ArgumentParser:
    """The parser (and so the --help layout) every verb shares: usage, description, options, examples, notes."""
    examples = _examples(verb)
    if verb.subverbs:  # `tuneforge data --help` lists what can follow `data` (its own usage line said nothing)
        extra = _load(verb.target.split(":")[0] + ":subverb_help")()
    parts = [f"examples:\n{examples}" if examples else "", extra, textwrap.fill(verb.notes, width=100)]
    return ArgParser(prog=f"tuneforge {verb.name}", description=verb.help,
                     usage=f"tuneforge {verb.name} <sub-verb> [options]" if verb.subverbs else None,
                     epilog="\n\n".join(p for p in parts if p) or None,
                     formatter_class=argparse.RawDescriptionHelpFormatter)


def _arg_parser_for(verb: Verb) -> argparse.ArgumentParser:
    if verb.name == "train":
        return _train_parser(verb)
    parser = _new_parser(verb)
    if verb.name == "eval":  # parses its own argv (a config file or flags); its flags' help is the config's
        return _load("tuneforge.eval.run:flag_parser")(parser)
    if verb.args is None:
        return parser
    cls = _load(verb.args)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        required = f.default is MISSING and f.default_factory is MISSING
        default = None if required else (f.default if f.default is not MISSING else f.default_factory())
        text = f"{help_of(f)} [{type_name(tp)}; default: {default}]" if not required else help_of(f)
        if f.metadata.get("positional"):
            parser.add_argument(f.name, help=help_of(f), nargs=None if required else "?", default=default)
        elif tp is bool:
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=text)
        elif get_origin(tp) is list:
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, nargs="*", default=default, help=text)
        else:
            choices = get_args(tp) if get_origin(tp) is Literal else None
            parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=default, required=required,
                                choices=choices, help=text, type=_scalar_type(tp))
    return parser


def parse_verb_args(verb: Verb, argv: list[str]):
    cls = _load(verb.args)
    ns = _arg_parser_for(verb).parse_args(argv)
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields(cls):
        value = getattr(ns, f.name)
        values[f.name] = value if value is None else coerce(value, hints[f.name], f"--{f.name.replace('_', '-')}")
    return cls(**values)


def _train_parser(verb: Verb) -> argparse.ArgumentParser:
    from tuneforge.configs.schema import TrainConfig, _method_sections

    lines = ["config keys (any key can be overridden on the command line with dots for nesting, e.g.",
             "training.lr=1e-4 data.max_length=256 lora.rank=16):"]
    for key, tp, default, text in field_help_rows(TrainConfig):
        if key == "method_options":
            continue
        lines.append(f"  {key:<34} {text} [{tp}; default: {default}]")
    for section, cls in _method_sections().items():
        for key, tp, default, text in field_help_rows(cls, prefix=section + "."):
            lines.append(f"  {key:<34} {text} [{tp}; default: {default}]")
    parser = _new_parser(verb, "\n".join(lines))
    parser.add_argument("config", metavar="CONFIG.yaml", help="The training config (see examples/).")
    parser.add_argument("overrides", metavar="key=value", nargs="*", help="Config overrides, e.g. training.lr=1e-4.")
    return parser


def list_methods(argv: list[str]) -> int:
    """One line per method: its name, whether it merges into the base weights, and what it trains."""
    from tuneforge.methods import METHODS

    for name, m in METHODS.items():
        merge = "merges" if m.mergeable else "no merge"
        print(f"{name:<16} {merge:<9} {m.summary}")
    return 0


def _top_help() -> str:
    width = max(len(v.name) for v in VERBS)
    rows = "\n".join(f"  {v.name:<{width}}  {v.help}" for v in VERBS)
    return (f"usage: tuneforge <verb> [options]\n\nverbs:\n{rows}\n\noptions:\n  -h, --help     show this help\n"
            f"  -V, --version  print the TuneForge version\n\n`tuneforge <verb> --help` for a verb's options.")


def _quiet_broken_pipe() -> int:
    """The reader of our output went away (`tuneforge train --help | head`): stop without a traceback, and point
    stdout at /dev/null so the interpreter's final flush does not complain either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (e.g. captured by a test)
        pass
    return 141  # 128 + SIGPIPE, what a shell reports for a command stopped by a closed pipe


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        return _quiet_broken_pipe()


def _print_user_error(message: str, wait_s: float = 2.0) -> None:
    """Print a user error once per machine under torchrun, not once per process. The config and data checks run the
    same on every process, so local rank 0 prints the paragraph and leaves its text in torchrun's per-attempt folder
    (torchrun removes it); another local rank prints its own only if rank 0's is missing or different, so an error
    that one process alone hits is never hidden."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")  # <attempt folder>/<local rank>/error.json, per worker
    local_rank = os.environ.get("LOCAL_RANK")
    if not error_file or local_rank is None or int(os.environ.get("LOCAL_WORLD_SIZE", "1")) < 2:
        print(f"error: {message}", file=sys.stderr)
        return
    shared = Path(error_file).parent.parent / "tuneforge_error_local_rank0.txt"
    if local_rank == "0":
        try:
            tmp = shared.with_suffix(".tmp")
            tmp.write_text(message, encoding="utf-8")
            tmp.replace(shared)  # whole or absent: another rank never reads half a message
        except OSError:
            pass
        print(f"error: {message}", file=sys.stderr)
        return
    deadline = time.monotonic() + wait_s
    while not shared.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        same = shared.read_text(encoding="utf-8") == message
    except OSError:
        same = False
    if not same:
        print(f"error (rank {os.environ.get('RANK', local_rank)}): {message}", file=sys.stderr)


def _main(argv: list[str]) -> int:
    # PEFT reads transformers' deprecated `is_gradient_checkpointing` on every wrap: noise the user cannot act on
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    if not argv or argv[0] in ("-h", "--help", "help"):
        if len(argv) > 1 and argv[1] in {v.name for v in VERBS}:  # `tuneforge help train`: that verb's help
            return _main([argv[1], "--help"])
        print(_top_help())
        return 0
    if argv[0] in ("-V", "--version", "version"):
        from tuneforge import __version__

        print(f"tuneforge {__version__}")
        return 0
    by_name = {v.name: v for v in VERBS}
    verb = by_name.get(argv[0])
    if verb is None:
        from tuneforge.errors import did_you_mean

        print(f"tuneforge: unknown verb `{argv[0]}`.{did_you_mean(argv[0], by_name)}", file=sys.stderr)
        return 2
    rest = argv[1:]
    wants_help = any(a in ("-h", "--help") for a in (rest[:1] if verb.subverbs else rest))
    if wants_help or (verb.name == "train" and not rest):
        print(_arg_parser_for(verb).format_help(), end="")
        return 0
    if verb.name == "methods":
        _arg_parser_for(verb).parse_args(rest)  # no options: anything else is an error with the usage line
    try:
        func = _load(verb.target)
        result = func(parse_verb_args(verb, rest) if verb.args else rest)
    except UserError as e:
        _print_user_error(str(e))
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # a sub-verb's argparse (--help, a bad option): its status, also when called in-process
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
