"""`tuneforge chat`: talk to a model (and optionally a trained adapter) in the terminal, with its chat template.

    tuneforge chat --model builtin:smollm2-135m-instruct
    tuneforge chat --model /tmp/tiny-llama --adapter outputs/run --system "Answer briefly."
    tuneforge chat --model outputs/full-run --prompt "What is 12 + 30?"     # one answer, then exit
    tuneforge chat --model M --temperature 0.7 --top-p 0.9 --seed 1        # sampled, reproducible

Replies stream as they are generated (through the generation engine, tuneforge.inference). In the conversation:
`/reset` forgets the history, `/system TEXT` sets a new system prompt and starts over (`/system` alone removes
it), `/help` lists the commands and `/exit` (or Ctrl-D) quits; Ctrl-C stops a reply mid-way. By default replies are
greedy (with a mild repetition penalty), so the same question gets the same answer, which makes before/after
comparisons of a fine-tune meaningful; `--temperature` > 0 samples, and `--seed` makes sampled replies repeatable.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tuneforge.configs.schema import ModelConfig
from tuneforge.configs.typed import opt
from tuneforge.errors import UserError


@dataclass
class ChatArgs:
    model: str | None = opt(None, "Base model: a local folder, a hub id or builtin:<name>. Default: the base recorded "
                                  "in --adapter, else builtin:smollm2-135m-instruct.")
    adapter: str | None = opt(None, "A trained adapter folder to apply: the output_dir of an adapter method (lora, "
                                    "adapter, prompt_tuning, ...), PEFT or TuneForge format.")
    system: str | None = opt(None, "A system prompt for the conversation (in the conversation: `/system TEXT` "
                                   "sets a new one, `/reset` clears the history, `/exit` quits).")
    prompt: str | None = opt(None, "Answer this one message and exit instead of starting a conversation.")
    max_new_tokens: int = opt(256, "The longest reply, in tokens.")
    temperature: float = opt(0.0, "Sampling temperature; 0 is greedy (the same question gets the same answer).")
    top_p: float = opt(1.0, "Sample only from the most likely tokens whose probabilities add up to top_p.")
    top_k: int = opt(0, "Sample only from the k most likely tokens (0: no limit).")
    seed: int | None = opt(None, "Seed for sampling: the same seed gives the same replies.")
    repetition_penalty: float = opt(1.1, "Penalty for repeating tokens (1.0: none); keeps small models out of "
                                         "loops.")
    chat_template: str | None = opt(None, "Override the chat template (chatml, llama3, qwen, default or a .jinja).")
    device: str = opt("auto", "Where the model runs: auto (the GPU when there is one), cpu, cuda or cuda:N.")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = opt(
        "auto", "Precision of the weights. auto: bf16 on a GPU that computes it, fp32 on CPU (bf16 on CPU is faster "
                "only with AVX512-BF16/AMX, and its replies can differ slightly from fp32's).")
    trust_remote_code: bool = opt(False, "Run Python code shipped with the model (only for sources you trust).")
    allow_pickle: bool = opt(False, "Allow pickle (.bin/.pt) weights, which can execute code when loaded.")


DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
# config.json fields that must agree between the model an adapter was trained on and the one it is put on
SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size")


def adapter_folder(adapter: str) -> Path:
    """The adapter folder, checked; anything else gets an error saying what it is."""
    folder = Path(adapter).expanduser()
    if not folder.is_dir():
        raise UserError(f"Adapter folder {adapter} does not exist. Pass the output_dir of a LoRA (or other "
                        f"adapter) training run, which holds adapter_config.json.")
    if (folder / "adapter_config.json").is_file():
        return folder
    if (folder / "config.json").is_file():
        raise UserError(f"{folder} holds a full model, not an adapter. Chat with it directly: "
                        f"`tuneforge chat --model {folder}`.")
    raise UserError(f"{folder} has no adapter_config.json, so it is not a PEFT adapter folder. Pass the output_dir "
                    f"of an adapter training run (LoRA etc.).")


def recorded_base(folder: Path) -> str | None:
    """The base model an adapter folder names (`base_model_name_or_path`: how the user named it, for TuneForge
    adapters; whatever the trainer wrote, for other PEFT adapters)."""
    try:
        base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return base if isinstance(base, str) and base else None


def _shape_of(name_or_path: str) -> dict | None:
    """The shape fields of a model's config.json, when it is on disk (never downloads or converts anything)."""
    if name_or_path.startswith("builtin:"):
        from tuneforge.models.builtin import cache_root

        folder = cache_root() / name_or_path.removeprefix("builtin:")
    else:
        folder = Path(name_or_path).expanduser()
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    config = config.get("text_config", config)
    return {k: config.get(k) for k in SHAPE_FIELDS}


def check_base_matches(folder: Path, recorded: str | None, given: str) -> None:
    """Refuse an adapter on a base of another shape before PEFT fails with a size-mismatch traceback."""
    if recorded is None or recorded == given:
        return
    want, have = _shape_of(recorded), _shape_of(given)
    if want is None or have is None:
        return  # one of them is not on disk: the load itself is the check (see load_adapter)
    diff = {k: (want[k], have[k]) for k in SHAPE_FIELDS if want[k] is not None and want[k] != have[k]}
    if diff:
        shown = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in diff.items())
        raise UserError(_mismatch(folder, recorded, given, shown))


def _mismatch(folder: Path, recorded: str | None, given: str, detail: str) -> str:
    trained = f"was trained on `{recorded}`" if recorded else "records no base model"
    return (f"The adapter {folder} does not fit the base model `{given}` ({detail}): it {trained}. Leave out "
            f"--model to use the recorded base, or pass the model it was trained on.")


def load_adapter(model, adapter: str, given: str | None = None):
    """Put an adapter folder (PEFT or TuneForge format) on `model` (loaded from `given`); a base of another shape
    is a UserError naming both models, never PEFT's size-mismatch traceback."""
    folder = adapter_folder(adapter)
    recorded = recorded_base(folder)
    if given is not None:
        check_base_matches(folder, recorded, given)
    from tuneforge.methods.adapters import load_adapter_folder

    try:
        return load_adapter_folder(model, folder)  # PEFT folders and TuneForge's own (bottleneck adapters)
    except (RuntimeError, ValueError, KeyError) as e:  # size mismatch, missing target modules, unknown keys
        detail = str(e).strip().splitlines()
        raise UserError(_mismatch(folder, recorded, given or "the given model",
                                  detail[-1].strip().rstrip(".")[:300] if detail else type(e).__name__)) from e


def _base_for(args: ChatArgs) -> tuple[str, str | None]:
    """(base model to load, chat template override): --model, else the adapter's recorded base, else the default.
    A template override the run was trained with is kept unless --chat-template says otherwise."""
    if not args.adapter:
        return args.model or DEFAULT_MODEL, args.chat_template
    folder = adapter_folder(args.adapter)
    template = args.chat_template or _trained_template(folder)
    if args.model:
        return args.model, template
    base = recorded_base(folder)
    if base is None:
        raise UserError(f"The adapter {folder} does not say which base model it was trained on "
                        f"(no base_model_name_or_path in adapter_config.json). Pass it with --model.")
    from tuneforge.models.loading import looks_local

    if looks_local(base) and not Path(base).expanduser().exists():
        raise UserError(f"The adapter {folder} was trained on the model folder `{base}`, which does not exist here "
                        f"(a relative path counts from where training ran). Pass the base model with --model.")
    return base, template


def _trained_template(folder: Path) -> str | None:
    """The `model.chat_template` override recorded in the run's tuneforge_config.yaml, if any."""
    import yaml

    try:
        config = yaml.safe_load((folder / "tuneforge_config.yaml").read_text(encoding="utf-8"))
        return (config.get("model") or {}).get("chat_template")
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def load_for_chat(args: ChatArgs):
    """(model, tokenizer) through the one loading path, with the adapter applied when given."""
    from tuneforge.models.loading import inference_placement, load_model_and_tokenizer

    device, dtype = inference_placement(args.device, args.dtype)  # checked before minutes of loading
    base, template = _base_for(args)
    model_cfg = ModelConfig(name_or_path=base, trust_remote_code=args.trust_remote_code,
                            allow_pickle=args.allow_pickle, chat_template=template)
    if args.adapter:  # refuse a base of another shape before loading it (a 7B model takes minutes)
        folder = adapter_folder(args.adapter)
        check_base_matches(folder, recorded_base(folder), base)
    model, tokenizer = load_model_and_tokenizer(model_cfg, dtype=dtype, device=device)
    if args.adapter:
        model = load_adapter(model, args.adapter, base)
    return model.eval(), tokenizer


def sampling_params(args: ChatArgs):
    from tuneforge.inference import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, repetition_penalty=args.repetition_penalty).validate()


def chat_engine(model, tokenizer):
    """The engine for one conversation: the model with its active adapter (the one just loaded)."""
    from tuneforge.inference import Engine
    from tuneforge.inference.adapters import active_adapter

    return Engine(model, tokenizer, max_batch_size=1, default_adapter=active_adapter(model))


def reply(model, tokenizer, history: list[dict], args: ChatArgs) -> str:
    """The whole reply to `history` (what the streaming conversation shows, without streaming)."""
    return chat_engine(model, tokenizer).generate([history], sampling_params(args))[0].text.strip()


def stream_reply(engine, history: list[dict], params, out) -> str:
    """Write the reply to `out` piece by piece as the engine produces it, without the whitespace around it (as
    `reply` strips it); returns the reply. Ctrl-C stops it (the request is cancelled) and keeps what was shown."""
    shown, spaces = [], ""  # whitespace is written only once more text follows it
    stream = engine.stream(history, params)
    try:
        for delta in stream:
            text = delta.text if shown else delta.text.lstrip()
            core = text.rstrip()
            if core:
                shown.append(spaces + core)
                out.write(spaces + core)
                out.flush()
                spaces = text[len(core):]
            else:
                spaces += text
    except KeyboardInterrupt:
        stream.close()
        out.write(" [stopped]")
    out.write("\n")
    out.flush()
    return "".join(shown)


def _system_turn(system: str | None) -> list[dict]:
    return [{"role": "system", "content": system}] if system else []


def _read_line(stdin, interactive: bool) -> str | None:
    """The next user line, or None at end of input. A terminal gets input() for line editing and history."""
    if interactive and stdin is sys.stdin:
        try:
            return input("you> ")
        except EOFError:
            return None
    line = stdin.readline()
    return line if line else None


COMMANDS = "/reset clears the conversation, /system TEXT sets a new system prompt, /help, /exit quits."


def repl(model, tokenizer, args: ChatArgs, stdin=None, out=None) -> None:
    """Read user lines until /exit or end of input, streaming an answer to each with the whole conversation as
    context. A terminal gets prompts and `assistant>`; piped input gets one reply per line."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    interactive = stdin.isatty()
    if interactive:
        print(f"Type a message; {COMMANDS}", file=out)
    engine, params = chat_engine(model, tokenizer), sampling_params(args)
    system = args.system
    history = _system_turn(system)
    while True:
        line = _read_line(stdin, interactive)
        if line is None:
            break
        text = line.strip()
        if text == "/exit":
            break
        if text.startswith("/"):
            system, history = _command(text, system, history, out)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        if interactive:
            out.write("assistant> ")
        answer = stream_reply(engine, history, params, out)
        history.append({"role": "assistant", "content": answer})


def _command(text: str, system: str | None, history: list[dict], out) -> tuple[str | None, list[dict]]:
    """A slash command: returns the (system prompt, history) after it."""
    name, _, rest = text.partition(" ")
    if name == "/reset":
        print("(conversation cleared)", file=out, flush=True)
        return system, _system_turn(system)
    if name == "/system":
        system = rest.strip() or None
        print("(new system prompt; conversation cleared)" if system else "(no system prompt; conversation cleared)",
              file=out, flush=True)
        return system, _system_turn(system)
    print(f"Commands: {COMMANDS}" if name == "/help" else f"Unknown command {name}. Commands: {COMMANDS}",
          file=out, flush=True)
    return system, history


def chat_cli(args: ChatArgs) -> int:
    model, tokenizer = load_for_chat(args)
    if args.prompt is not None:
        messages = _system_turn(args.system) + [{"role": "user", "content": args.prompt}]
        stream_reply(chat_engine(model, tokenizer), messages, sampling_params(args), sys.stdout)
        return 0
    repl(model, tokenizer, args)
    return 0
