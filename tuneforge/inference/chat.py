"""`tuneforge chat`: talk to a model (and optionally a trained adapter) in the terminal, with its chat template.

    tuneforge chat --model builtin:smollm2-135m-instruct
    tuneforge chat --model /tmp/tiny-llama --adapter outputs/run --system "Answer briefly."
    tuneforge chat --model outputs/full-run --prompt "What is 12 + 30?"     # one answer, then exit
    tuneforge chat --model M --temperature 0.7 --top-p 0.9 --seed 1        # sampled, reproducible

Replies stream as they are generated (through the generation engine, tuneforge.inference). In the conversation:
`/reset` forgets the history, `/system TEXT` sets a new system prompt and starts over (`/system` alone removes it),
`/help` lists the commands and `/exit` (or Ctrl-D, or Ctrl-C at the prompt) quits; `//text` sends `/text` as a
message; Ctrl-C stops a reply mid-way. A conversation that outgrows the model's context drops its oldest exchanges,
and says so. By default replies are greedy (with a mild repetition penalty), so the same question gets the same
answer, which makes before/after comparisons of a fine-tune meaningful; `--temperature` > 0 samples, and `--seed`
makes sampled replies repeatable.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from tuneforge.configs.schema import ModelConfig
from tuneforge.configs.typed import opt
from tuneforge.errors import UserError
from tuneforge.models.adapter_loading import (
    adapter_folder,
    base_for,
    check_base_matches,
    check_model_folder,
    load_adapter,
    recorded_base,
)


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


def load_for_chat(args: ChatArgs):
    """(model, tokenizer) through the one loading path, with the adapter applied when given."""
    from tuneforge.models.loading import inference_placement, load_model_and_tokenizer

    device, dtype = inference_placement(args.device, args.dtype)  # checked before minutes of loading
    base, template = base_for(args.adapter, args.model, args.chat_template)
    model_cfg = ModelConfig(name_or_path=base, trust_remote_code=args.trust_remote_code,
                            allow_pickle=args.allow_pickle, chat_template=template)
    check_model_folder(base)  # a stopped run or a checkpoint-N: say how to finish it, not "no config.json"
    if args.adapter:  # refuse a base of another shape before loading it (a 7B model takes minutes)
        folder = adapter_folder(args.adapter)
        check_base_matches(folder, recorded_base(folder), base)
    model, tokenizer = load_model_and_tokenizer(model_cfg, dtype=dtype, device=device)
    if args.adapter:
        model = load_adapter(model, args.adapter, base)
    return model.eval(), tokenizer


def greedy_note(args: ChatArgs) -> str | None:
    """What to say when sampling options are given without --temperature: greedy decoding ignores them, and
    identical replies for two seeds would otherwise look like a broken --seed."""
    given = [flag for flag, unset in (("--top-p", args.top_p == 1.0), ("--top-k", args.top_k == 0),
                                      ("--seed", args.seed is None)) if not unset]
    if args.temperature > 0 or not given:
        return None
    verb = "applies" if len(given) == 1 else "apply"
    return (f"note: {', '.join(given)} only {verb} when sampling; with --temperature 0 (the default) replies are "
            f"greedy. Add e.g. --temperature 0.7 to sample.")


def cli_flag(name: str) -> str:
    """The command-line flag of a ChatArgs field (top_p -> --top-p), as errors must name what the user typed."""
    return "--" + name.replace("_", "-")


def sampling_params(args: ChatArgs):
    from tuneforge.inference import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed,
                          repetition_penalty=args.repetition_penalty).validate(spell=cli_flag)


def chat_engine(model, tokenizer):
    """The engine for one conversation: the model with its active adapter (the one just loaded)."""
    from tuneforge.inference import Engine
    from tuneforge.inference.adapters import active_adapter

    return Engine(model, tokenizer, max_batch_size=1, default_adapter=active_adapter(model))


def reply(model, tokenizer, history: list[dict], args: ChatArgs) -> str:
    """The whole reply to `history` (what the streaming conversation shows, without streaming)."""
    return chat_engine(model, tokenizer).generate([history], sampling_params(args))[0].text.strip()


EMPTY_REPLY = {"stop": "(empty reply: the model ended its turn at once)",
               "length": "(empty reply: only whitespace within --max-new-tokens)"}


def stream_reply(engine, history: list[dict], params, out) -> str:
    """Write the reply to `out` piece by piece as the engine produces it, without the whitespace around it (as
    `reply` strips it); returns the reply. Ctrl-C stops it (the request is cancelled) and keeps what was shown. A
    reply with no text gets a note, as a blank line looks like a hang or a display fault."""
    shown, spaces = [], ""  # whitespace is written only once more text follows it
    stream = engine.stream(history, params)
    try:
        for delta in stream:
            if delta.finish_reason is not None and not shown and not delta.text.strip():
                out.write(EMPTY_REPLY.get(delta.finish_reason, "(empty reply)"))
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


def _line_reader(stdin, interactive: bool) -> Callable[[], str]:
    """A function returning the next user line, raising EOFError at end of input (as input() does). A terminal
    gets input() for line editing and history."""
    if interactive and stdin is sys.stdin:
        return lambda: input("you> ")

    def read() -> str:
        line = stdin.readline()
        if not line:
            raise EOFError
        return line

    return read


COMMANDS = "/reset clears the conversation, /system TEXT sets a new system prompt, /help, /exit quits."


def repl(model, tokenizer, args: ChatArgs, stdin=None, out=None, read_line: Callable[[], str] | None = None) -> None:
    """Read user lines until /exit, end of input or Ctrl-C at the prompt, streaming an answer to each with the whole
    conversation as context. A terminal gets prompts and `assistant>`; piped input gets one reply per line.
    `read_line` (tests): reads a line as input() does, raising EOFError / KeyboardInterrupt for Ctrl-D / Ctrl-C."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    interactive = read_line is not None or stdin.isatty()
    read_line = read_line or _line_reader(stdin, interactive)
    if interactive:
        print(f"Type a message; {COMMANDS}", file=out)
    engine, params = chat_engine(model, tokenizer), sampling_params(args)
    system = args.system
    history = _system_turn(system)
    while True:
        try:
            line = read_line()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: the user is done, not a failure
            if interactive:
                out.write("\n")  # the shell prompt starts on its own line, not after `you> ^C`
                out.flush()
            break
        text = line.strip()
        if text == "/exit":
            break
        if text.startswith("//"):  # a message that itself starts with "/" (a path, a regex): sent with one "/"
            text = text[1:]
        elif text.startswith("/"):
            system, history = _command(text, system, history, out)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        try:
            history = _fit_context(engine, history, params.max_new_tokens, out)
            if interactive:
                out.write("assistant> ")
            answer = stream_reply(engine, history, params, out)
        except UserError as e:  # e.g. a message that does not fit even alone: say so, drop it, keep the conversation
            history.pop()
            out.write(f"error: {e} That message was not kept.\n")
            out.flush()
            continue
        history.append({"role": "assistant", "content": answer})


def _fit_context(engine, history: list[dict], max_new_tokens: int, out) -> list[dict]:
    """The conversation without its oldest exchanges, as few as leave room for a reply (max_new_tokens, at most half
    the context), so a long conversation goes on; the system prompt and the new message always stay (a UserError
    when they alone do not fit)."""
    keep = 1 if history and history[0]["role"] == "system" else 0
    alone = engine.encode(history[:keep] + history[-1:])
    if engine.room_after(alone) <= 0:  # refused before any older message is dropped: the conversation stays whole
        raise _too_long(len(alone), engine.context_length, keep == 1)
    room, dropped = min(max_new_tokens, engine.context_length // 2), 0
    while len(history) - keep > 2 and engine.room_after(engine.encode(history)) < room:
        history = history[:keep] + history[keep + 2:]  # one user message and its reply
        dropped += 2
    if dropped:
        print(f"(dropped the {dropped} oldest messages to fit the model's context of {engine.context_length} "
              f"tokens)", file=out, flush=True)
    return history


def _too_long(tokens: int, context: int, with_system: bool) -> UserError:
    """Chat's "context is full": earlier exchanges are dropped by themselves, so only one message (with the system
    prompt) that fills the context alone can get here. A lower --max-new-tokens would not help: the reply is
    already cut to whatever room is left."""
    system = " with the system prompt" if with_system else ""
    shorter = " (or a shorter system prompt: --system, or /system in the conversation)" if with_system else ""
    return UserError(f"The message is {tokens} tokens{system}, more than the model's context of {context} tokens "
                     f"even without the earlier conversation (chat drops older exchanges by itself, but one message "
                     f"must fit on its own); send a shorter message{shorter}.")


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
    print(f"Commands: {COMMANDS}" if name == "/help" else f"Unknown command {name}. Commands: {COMMANDS} To send "
          f"a message that starts with /, begin it with // (sent with one /).", file=out, flush=True)
    return system, history


def chat_cli(args: ChatArgs) -> int:
    params = sampling_params(args)  # a bad value is refused before minutes of loading
    if note := greedy_note(args):
        print(note, file=sys.stderr)
    model, tokenizer = load_for_chat(args)
    if args.prompt is not None:
        engine = chat_engine(model, tokenizer)
        messages = _fit_context(engine, _system_turn(args.system) + [{"role": "user", "content": args.prompt}],
                                params.max_new_tokens, sys.stdout)  # only refuses, in chat's words: nothing to drop
        stream_reply(engine, messages, params, sys.stdout)
        return 0
    repl(model, tokenizer, args)
    return 0
