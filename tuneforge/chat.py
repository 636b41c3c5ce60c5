"""`tuneforge chat`: talk to a model (and optionally a trained adapter) in the terminal, with its chat template.

    tuneforge chat --model builtin:smollm2-135m-instruct
    tuneforge chat --model /tmp/tiny-llama --adapter outputs/run --system "Answer briefly."
    tuneforge chat --model outputs/full-run --prompt "What is 12 + 30?"     # one answer, then exit

In the conversation, `/reset` forgets the history and `/exit` (or Ctrl-D) quits. Replies are greedy (with a mild
repetition penalty), so the same question gets the same answer, which makes before/after comparisons of a
fine-tune meaningful.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from tuneforge.configs.schema import ModelConfig
from tuneforge.configs.typed import opt
from tuneforge.errors import UserError


@dataclass
class ChatArgs:
    model: str = opt("builtin:smollm2-135m-instruct", "Base model: a local folder, a hub id or builtin:<name>.")
    adapter: str | None = opt(None, "A trained adapter folder to apply: the output_dir of an adapter method (lora, "
                                    "adapter, prompt_tuning, ...), PEFT or TuneForge format.")
    system: str | None = opt(None, "A system prompt for the conversation.")
    prompt: str | None = opt(None, "Answer this one message and exit instead of starting a conversation.")
    max_new_tokens: int = opt(256, "The longest reply, in tokens.")
    repetition_penalty: float = opt(1.1, "Penalty for repeating tokens (1.0: plain greedy); keeps small models "
                                         "out of loops.")
    chat_template: str | None = opt(None, "Override the chat template (chatml, llama3, qwen, default or a .jinja).")
    trust_remote_code: bool = opt(False, "Run Python code shipped with the model (only for sources you trust).")
    allow_pickle: bool = opt(False, "Allow pickle (.bin/.pt) weights, which can execute code when loaded.")


def load_adapter(model, adapter: str):
    """Put an adapter folder (PEFT or TuneForge format) on `model`; anything else gets an error saying what it is."""
    folder = Path(adapter).expanduser()
    if not folder.is_dir():
        raise UserError(f"Adapter folder {adapter} does not exist. Pass the output_dir of a LoRA (or other "
                        f"adapter) training run, which holds adapter_config.json.")
    if (folder / "adapter_config.json").is_file():
        from tuneforge.methods.adapters import load_adapter_folder

        return load_adapter_folder(model, folder)  # PEFT folders and TuneForge's own (bottleneck adapters)
    if (folder / "config.json").is_file():
        raise UserError(f"{folder} holds a full model, not an adapter. Chat with it directly: "
                        f"`tuneforge chat --model {folder}`.")
    raise UserError(f"{folder} has no adapter_config.json, so it is not a PEFT adapter folder. Pass the output_dir "
                    f"of an adapter training run (LoRA etc.).")


def load_for_chat(args: ChatArgs):
    """(model, tokenizer) through the one loading path, with the adapter applied when given."""
    from tuneforge.models.loading import load_model_and_tokenizer

    model_cfg = ModelConfig(name_or_path=args.model, trust_remote_code=args.trust_remote_code,
                            allow_pickle=args.allow_pickle, chat_template=args.chat_template)
    model, tokenizer = load_model_and_tokenizer(model_cfg)
    if args.adapter:
        model = load_adapter(model, args.adapter)
    return model.eval(), tokenizer


def reply(model, tokenizer, history: list[dict], args: ChatArgs) -> str:
    from tuneforge.inference import generate_replies

    return generate_replies(model, tokenizer, [history], max_new_tokens=args.max_new_tokens, batch_size=1,
                            repetition_penalty=args.repetition_penalty)[0]


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


def repl(model, tokenizer, args: ChatArgs, stdin=None, out=None) -> None:
    """Read user lines until /exit or end of input, answering each with the whole conversation as context."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    interactive = stdin.isatty()
    if interactive:
        print("Type a message; /reset clears the conversation, /exit quits.", file=out)
    history = _system_turn(args.system)
    while True:
        line = _read_line(stdin, interactive)
        if line is None:
            break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            history = _system_turn(args.system)
            print("(conversation cleared)", file=out, flush=True)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        answer = reply(model, tokenizer, history, args)
        history.append({"role": "assistant", "content": answer})
        print(f"assistant> {answer}" if interactive else answer, file=out, flush=True)


def chat_cli(args: ChatArgs) -> int:
    model, tokenizer = load_for_chat(args)
    if args.prompt is not None:
        messages = _system_turn(args.system) + [{"role": "user", "content": args.prompt}]
        print(reply(model, tokenizer, messages, args), flush=True)
        return 0
    repl(model, tokenizer, args)
    return 0
