"""`tuneforge chat`: one-shot --prompt through the CLI, adapters, the conversation loop and its errors."""

from __future__ import annotations

import io
import json

import pytest
import torch

from tuneforge.cli import main as cli_main
from tuneforge.configs.schema import ModelConfig
from tuneforge.errors import UserError
from tuneforge.inference.chat import ChatArgs, chat_engine, load_for_chat, repl, reply
from tuneforge.models.loading import load_model_and_tokenizer


def _expected(folder, messages):
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(folder)))
    return reply(model, tok, messages, ChatArgs())


def test_prompt_prints_one_reply(tiny_llama_dir, capsys):
    assert cli_main(["chat", "--model", str(tiny_llama_dir), "--prompt", "What is 12 + 30?",
                     "--system", "Answer briefly."]) == 0
    out = capsys.readouterr().out
    expected = _expected(tiny_llama_dir, [{"role": "system", "content": "Answer briefly."},
                                          {"role": "user", "content": "What is 12 + 30?"}])
    assert expected and out == expected + "\n"


@pytest.fixture
def lora_adapter(tiny_qwen2_dir, tmp_path):
    """A LoRA adapter with random (non-zero) B matrices, so it changes what the model computes."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_qwen2_dir)))
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules="all-linear",
                                                  init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", peft_model


def test_adapter_changes_the_model(tiny_qwen2_dir, lora_adapter, capsys):
    adapter_dir, trained = lora_adapter
    base, tok = load_for_chat(ChatArgs(model=str(tiny_qwen2_dir)))
    adapted, _ = load_for_chat(ChatArgs(model=str(tiny_qwen2_dir), adapter=str(adapter_dir)))
    ids = tok("What is 12 + 30?", return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits, adapted_logits, trained_logits = base(ids).logits, adapted(ids).logits, trained(ids).logits
    assert not torch.allclose(base_logits, adapted_logits, atol=1e-3)
    torch.testing.assert_close(adapted_logits, trained_logits)  # the adapter that was saved is the one applied
    assert cli_main(["chat", "--model", str(tiny_qwen2_dir), "--adapter", str(adapter_dir), "--prompt", "Hi"]) == 0
    messages = [{"role": "user", "content": "Hi"}]
    assert capsys.readouterr().out == reply(adapted, tok, messages, ChatArgs()) + "\n"


def test_conversation_keeps_history_and_resets(tiny_llama_dir):
    args = ChatArgs(model=str(tiny_llama_dir), system="Be brief.", max_new_tokens=6)
    model, tok = load_for_chat(args)
    out = io.StringIO()
    repl(model, tok, args, stdin=io.StringIO("Hello\nWhat is 2 + 3?\n/reset\nWhat is 2 + 3?\n/exit\nnever read\n"),
         out=out)
    lines = out.getvalue().splitlines()
    system = [{"role": "system", "content": "Be brief."}]
    first = reply(model, tok, system + [{"role": "user", "content": "Hello"}], args)
    second = reply(model, tok, system + [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
                                         {"role": "user", "content": "What is 2 + 3?"}], args)
    fresh = reply(model, tok, system + [{"role": "user", "content": "What is 2 + 3?"}], args)
    assert lines == [first, second, "(conversation cleared)", fresh]
    assert second != fresh  # the history really was part of the second prompt


def test_a_message_past_the_context_is_dropped_and_the_conversation_goes_on(tiny_llama_dir):
    """One over-long message used to end the whole session (the error left the loop); it is refused without
    dropping the earlier conversation to make room for it."""
    args = ChatArgs(model=str(tiny_llama_dir), max_new_tokens=4)
    model, tok = load_for_chat(args)
    too_long = "hello " * (model.config.max_position_embeddings + 10)
    out = io.StringIO()
    repl(model, tok, args, stdin=io.StringIO(f"Hi\n{too_long}\nAgain\n"), out=out)
    lines = [line for line in out.getvalue().splitlines() if line]
    first = reply(model, tok, [{"role": "user", "content": "Hi"}], args)
    assert lines[0] == first and lines[1].startswith("error: The message is "), lines
    assert "one message must fit on its own); send a shorter message." in lines[1] and "not kept" in lines[1]
    kept = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": first},
            {"role": "user", "content": "Again"}]  # the refused message is gone, the earlier exchange is not
    assert lines[2:] == [reply(model, tok, kept, args)]


def test_a_long_conversation_drops_its_oldest_exchanges(tiny_llama_dir):
    """A conversation past the context used to refuse every further message ("send a shorter one") although each
    was short; now the oldest exchanges make room, and the user is told."""
    args = ChatArgs(model=str(tiny_llama_dir), system="Be brief.", max_new_tokens=4)
    model, tok = load_for_chat(args)
    model.config.max_position_embeddings = 160  # a small context, so a few messages fill it
    messages = [" ".join(f"w{i}{j}" for j in range(12)) for i in range(6)]
    out = io.StringIO()
    repl(model, tok, args, stdin=io.StringIO("\n".join(messages) + "\n"), out=out)
    lines = out.getvalue().splitlines()
    notes = [i for i, line in enumerate(lines) if line.startswith("(dropped the ")]
    assert notes and not any(line.startswith("error") for line in lines), lines
    assert lines[notes[0]] == "(dropped the 2 oldest messages to fit the model's context of 160 tokens)"
    replies = [line for line in lines if not line.startswith("(dropped")]
    assert len(replies) == len(messages)
    turn = notes[0]  # the reply after the first note answers messages[turn] without the first exchange
    system = [{"role": "system", "content": "Be brief."}]
    history = [m for i in range(turn) for m in ({"role": "user", "content": messages[i]},
                                                {"role": "assistant", "content": replies[i]})]
    full = system + history + [{"role": "user", "content": messages[turn]}]
    engine = chat_engine(model, tok)
    assert engine.room_after(engine.encode(full)) < args.max_new_tokens  # it really had to drop
    assert lines[notes[0] + 1] == reply(model, tok, system + full[3:], args)


def test_end_of_input_quits(tiny_llama_dir):
    args = ChatArgs(model=str(tiny_llama_dir), max_new_tokens=4)
    model, tok = load_for_chat(args)
    out = io.StringIO()
    repl(model, tok, args, stdin=io.StringIO("Hi\n"), out=out)
    assert len(out.getvalue().splitlines()) == 1


def test_adapter_errors(tiny_llama_dir, tmp_path, capsys):
    with pytest.raises(UserError, match="does not exist"):
        load_for_chat(ChatArgs(model=str(tiny_llama_dir), adapter=str(tmp_path / "missing")))
    with pytest.raises(UserError, match="full model"):
        load_for_chat(ChatArgs(model=str(tiny_llama_dir), adapter=str(tiny_llama_dir)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="adapter_config.json"):
        load_for_chat(ChatArgs(model=str(tiny_llama_dir), adapter=str(tmp_path / "empty")))


def test_missing_model_folder_through_cli(tmp_path, capsys):
    assert cli_main(["chat", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and "Traceback" not in err


def _train_lora(model_name: str, out, monkeypatch, repo_root, *extra: str):
    """A 2-step TuneForge LoRA run (the real save path: portable base reference, model card); `extra` overrides."""
    from tuneforge.configs.schema import load_train_config
    from tuneforge.train import run_config

    monkeypatch.chdir(repo_root)
    cfg = load_train_config("examples/sft_lora_tiny.yaml", [
        f"model.name_or_path={model_name}", f"output_dir={out}", "training.max_steps=2", "training.batch_size=2",
        "training.save_steps=0", "training.eval_steps=0", "data.eval_ratio=0", "training.progress_bar=false",
        "training.plot_loss=false", "data.max_length=64", "lora.target_modules=[all-linear]", *extra])
    run_config(cfg, log=lambda _: None)
    return out


@pytest.fixture
def builtin_tiny(tiny_qwen2_dir, monkeypatch):
    """`builtin:tiny` resolves to the tiny Qwen2 folder, as builtin:smollm2-135m-instruct resolves to its cache."""
    from tuneforge.models import builtin

    monkeypatch.setitem(builtin.BUILTIN_MODELS, "tiny", lambda: tiny_qwen2_dir)
    return "builtin:tiny"


def test_adapter_without_model_uses_the_recorded_base(builtin_tiny, tiny_qwen2_dir, tmp_path, monkeypatch, capsys):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = _train_lora(builtin_tiny, tmp_path / "run", monkeypatch, root)
    recorded = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
    assert recorded == "builtin:tiny"  # as the user named it, not the resolved folder
    model, tok = load_for_chat(ChatArgs(adapter=str(out)))  # no --model
    reference, _ = load_for_chat(ChatArgs(model=str(tiny_qwen2_dir), adapter=str(out)))
    ids = tok("What is 12 + 30?", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    assert cli_main(["chat", "--adapter", str(out), "--prompt", "Hi", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == reply(reference, tok, [{"role": "user", "content": "Hi"}],
                                            ChatArgs(max_new_tokens=4)) + "\n"


def test_a_stopped_run_says_where_it_stopped_and_how_to_finish_it(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """chat, export and serve on a stopped run (or its checkpoint) said "not a PEFT adapter folder"; the command
    they give instead really finishes the run."""
    import shlex
    from pathlib import Path

    from tuneforge.configs.schema import load_train_config
    from tuneforge.inference.serve.main import ServeArgs, build_state
    from tuneforge.train import run_config

    run = _train_lora(str(tiny_llama_dir), tmp_path / "run", monkeypatch, Path(__file__).resolve().parents[2],
                      "training.max_steps=4", "training.save_steps=2", "training.stop_after_steps=2")
    assert not (run / "adapter_config.json").exists() and (run / "checkpoint-2").is_dir()
    command = f"tuneforge train {run / 'tuneforge_config.yaml'} training.resume=auto"
    for folder in (run, run / "checkpoint-2"):  # as --model too: it said "no config.json, point at a model folder"
        for verb in (["chat", "--adapter", str(folder), "--prompt", "hi"], ["chat", "--model", str(folder)],
                     ["export", "--adapter", str(folder), "--out", str(tmp_path / "merged")],
                     ["export", "--model", str(folder), "--out", str(tmp_path / "merged")]):
            assert cli_main(verb) == 2
            err = capsys.readouterr().err
            assert "stopped at step 2 of 4 (checkpoint-2)" in err and f"`{command}`" in err, (verb, err)
            assert "To use it as it is at step 2, end the run there: add `training.max_steps=2`" in err
            assert "not a PEFT adapter folder" not in err and "Traceback" not in err
    with pytest.raises(UserError, match=r"^Adapter `x`: .*stopped at step 2 of 4 \(checkpoint-2\)"):
        build_state(ServeArgs(model=str(tiny_llama_dir), adapter=[f"x={run}"]))
    args = shlex.split(command) + ["training.max_steps=2"]  # the advice for the model as it is at step 2, followed
    assert run_config(load_train_config(args[2], args[3:]), log=lambda _: None).steps == 2
    assert (run / "adapter_config.json").is_file()
    load_for_chat(ChatArgs(adapter=str(run)))
    for args in (ChatArgs(adapter=str(run / "checkpoint-2")), ChatArgs(model=str(run / "checkpoint-2"))):
        with pytest.raises(UserError, match=rf"checkpoint-2 is a training checkpoint \(step 2 of 4\).*Pass {run} "):
            load_for_chat(args)


def test_adapter_on_a_base_of_another_shape_is_a_clear_error(tiny_qwen2_dir, tiny_llama_dir, tmp_path, monkeypatch,
                                                               capsys):
    from pathlib import Path

    out = _train_lora(str(tiny_qwen2_dir), tmp_path / "run", monkeypatch, Path(__file__).resolve().parents[2])
    assert cli_main(["chat", "--model", str(tiny_llama_dir), "--adapter", str(out), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "does not fit the base model" in err and str(tiny_qwen2_dir) in err and "model_type qwen2 vs llama" in err
    assert "Traceback" not in err


def test_peft_size_mismatch_becomes_a_user_error(tiny_qwen2_dir, tiny_llama_dir, tmp_path):
    """The recorded base is not on disk (so shapes cannot be compared first): PEFT's failure is translated."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_qwen2_dir)))
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])).save_pretrained(
        tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": "someone/gone"}), encoding="utf-8")
    with pytest.raises(UserError, match=r"does not fit the base model .*size mismatch.*trained on `someone/gone`"):
        load_for_chat(ChatArgs(model=str(tiny_llama_dir), adapter=str(tmp_path / "adapter")))


def test_recorded_base_that_is_a_missing_relative_folder(tmp_path, monkeypatch):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "runs/gone"}))
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="trained on the model folder `runs/gone`, which does not exist here"):
        load_for_chat(ChatArgs(adapter="adapter"))
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="does not say which base model"):
        load_for_chat(ChatArgs(adapter="adapter"))
# ---- streaming, slash commands, sampling options -----------------------------------------------------------------

def test_system_command_and_help(tiny_llama_dir):
    args = ChatArgs(model=str(tiny_llama_dir), max_new_tokens=6)
    model, tok = load_for_chat(args)
    out = io.StringIO()
    repl(model, tok, args, stdin=io.StringIO("/system Be brief.\nHello\n/help\n/nope\n/system\nHello\n"), out=out)
    lines = out.getvalue().splitlines()
    with_system = reply(model, tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
                        args)
    without = reply(model, tok, [{"role": "user", "content": "Hello"}], args)
    assert with_system != without
    assert lines[0] == "(new system prompt; conversation cleared)" and lines[1] == with_system
    assert lines[2].startswith("Commands: /reset") and lines[3].startswith("Unknown command /nope.")
    assert lines[4] == "(no system prompt; conversation cleared)" and lines[5] == without
    assert "begin it with //" in lines[3]


def test_a_double_slash_sends_a_message_that_starts_with_a_slash(tiny_llama_dir):
    args = ChatArgs(model=str(tiny_llama_dir), max_new_tokens=6)
    model, tok = load_for_chat(args)
    out = io.StringIO()
    repl(model, tok, args, stdin=io.StringIO("//etc/hosts?\n"), out=out)
    assert out.getvalue().splitlines() == [reply(model, tok, [{"role": "user", "content": "/etc/hosts?"}], args)]


def test_sampling_options_on_the_command_line(tiny_llama_dir, capsys):
    base = ["chat", "--model", str(tiny_llama_dir), "--prompt", "Hi", "--max-new-tokens", "12"]
    sampled = ["--temperature", "1.0", "--top-p", "0.95", "--top-k", "50", "--repetition-penalty", "1.0"]
    outputs = []
    for extra in ([], sampled + ["--seed", "1"], sampled + ["--seed", "1"], sampled + ["--seed", "2"]):
        assert cli_main(base + extra) == 0
        outputs.append(capsys.readouterr().out)
    greedy, first, again, other = outputs
    assert first == again and first != other and first != greedy


def test_bad_sampling_option_names_the_flag(tiny_llama_dir, capsys):
    """The error named the engine's field (`temperature`, `top_p`), not the flag the user typed."""
    for flag, value, rule in (("--temperature", "-1", ">= 0"), ("--top-p", "2", "in (0, 1]"),
                              ("--repetition-penalty", "0", "> 0")):
        assert cli_main(["chat", "--model", str(tiny_llama_dir), "--prompt", "Hi", flag, value]) == 2
        err = capsys.readouterr().err
        assert f"`{flag}` is {float(value)!r}; it must be {rule}" in err and "Traceback" not in err, err


def test_sampling_options_without_temperature_say_they_do_nothing(tiny_llama_dir, capsys):
    """--seed/--top-p/--top-k with the default greedy decoding changed nothing, silently: two seeds, one reply."""
    base = ["chat", "--model", str(tiny_llama_dir), "--prompt", "Hi", "--max-new-tokens", "4"]
    assert cli_main(base + ["--seed", "1", "--top-k", "5"]) == 0
    err = capsys.readouterr().err
    assert "note: --top-k, --seed only apply when sampling" in err and "--temperature 0.7" in err
    assert cli_main(base + ["--seed", "1", "--temperature", "0.7"]) == 0
    assert "note:" not in capsys.readouterr().err


def _read_until(fd: int, marker: bytes, alive=lambda: True, timeout: float = 180) -> list[bytes]:
    """Chunks read from a pty's main side until `marker` has appeared."""
    import os
    import select
    import time

    chunks, deadline = [], time.monotonic() + timeout
    while marker not in b"".join(chunks):
        assert time.monotonic() < deadline and alive(), b"".join(chunks)
        if select.select([fd], [], [], 0.5)[0]:
            chunks.append(os.read(fd, 65536))
    return chunks


def _reply_chunks(chunks: list[bytes]) -> list[bytes]:
    assert b"assistant> " in b"".join(chunks)
    return [c for c in chunks if c.strip() and b"you> " not in c and b"Hello" not in c and b"assistant> " != c]


def test_streams_to_a_terminal(tiny_qwen2_dir):
    """The conversation on a pseudo-terminal: the reply arrives in several pieces before it ends."""
    import os
    import pty
    import threading

    args = ChatArgs(model=str(tiny_qwen2_dir), max_new_tokens=120, repetition_penalty=1.0)
    model, tok = load_for_chat(args)
    main, child = pty.openpty()
    with os.fdopen(child, "r", closefd=False) as stdin, os.fdopen(child, "w", closefd=False) as out:
        thread = threading.Thread(target=repl, args=(model, tok, args, stdin, out), daemon=True)
        thread.start()
        _read_until(main, b"quits.")
        os.write(main, b"Hello\n")
        chunks = _read_until(main, b"assistant> ") + _read_until(main, b"\n", thread.is_alive)
        os.write(main, b"/exit\n")
        thread.join(timeout=60)
    os.close(main)
    os.close(child)
    assert not thread.is_alive()
    assert len(_reply_chunks(chunks)) > 1  # text arrived in pieces before the reply ended


@pytest.mark.slow
def test_streams_through_a_terminal_in_a_real_process(tiny_qwen2_dir):
    """`tuneforge chat` in a pseudo-terminal, as a user runs it (input() line editing, prompts on stderr)."""
    import os
    import pty
    import subprocess
    import sys

    main, child = pty.openpty()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "chat", "--model", str(tiny_qwen2_dir),
                             "--max-new-tokens", "200", "--repetition-penalty", "1.0"],
                            stdin=child, stdout=child, stderr=child, env=env, close_fds=True)  # input() prompts on stderr
    os.close(child)
    alive = lambda: proc.poll() is None  # noqa: E731
    try:
        _read_until(main, b"you> ", alive)
        os.write(main, b"Hello\n")
        chunks = _read_until(main, b"you> ", alive)
        assert len(_reply_chunks(chunks)) > 1
        os.write(main, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main)


def test_one_message_past_the_context_in_chats_words(tiny_llama_dir, capsys):
    """`--prompt` too long for the context got the engine's "shorten the conversation" (there is none, and chat
    drops older exchanges by itself): it says one message must fit on its own."""
    too_long = "hello " * 2100  # past the tiny model's 2048 positions
    assert cli_main(["chat", "--model", str(tiny_llama_dir), "--prompt", too_long, "--system", "Be brief."]) == 2
    err = capsys.readouterr().err
    assert "error: The message is " in err and "with the system prompt, more than the model's context of 2048" in err
    assert "one message must fit on its own); send a shorter message (or a shorter system prompt: --system" in err
    assert "shorten the conversation" not in err


def _interrupting(answers):
    """A stand-in for input(): each item is returned as the typed line, or raised (EOFError: Ctrl-D,
    KeyboardInterrupt: Ctrl-C)."""
    items = iter(answers)

    def read_line():
        item = next(items)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        return item

    return read_line


@pytest.mark.parametrize("key", [KeyboardInterrupt, EOFError])
def test_ctrl_c_or_ctrl_d_at_the_prompt_ends_the_session_on_a_new_line(tiny_llama_dir, key):
    """Ctrl-C at the prompt left the loop with KeyboardInterrupt (the CLI exited 130, printing `interrupted` after
    `you> ^C`); now it ends the session like Ctrl-D and /exit, on a line of its own."""
    args = ChatArgs(model=str(tiny_llama_dir), max_new_tokens=4)
    model, tok = load_for_chat(args)
    out = io.StringIO()
    repl(model, tok, args, out=out, read_line=_interrupting(["Hi", key]))
    first = reply(model, tok, [{"role": "user", "content": "Hi"}], args)
    assert out.getvalue().splitlines()[1:] == [f"assistant> {first}", ""]  # "": the prompt's line ended


def test_ctrl_c_at_the_prompt_exits_0_through_the_cli(tiny_llama_dir, monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    def ctrl_c(prompt):
        raise KeyboardInterrupt

    monkeypatch.setattr("sys.stdin", Terminal())
    monkeypatch.setattr("builtins.input", ctrl_c)
    assert cli_main(["chat", "--model", str(tiny_llama_dir)]) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("quits.\n\n") and "interrupted" not in captured.err


def test_ctrl_c_while_a_reply_streams_stops_it_and_the_conversation_goes_on(tiny_qwen2_dir):
    args = ChatArgs(model=str(tiny_qwen2_dir), max_new_tokens=40, repetition_penalty=1.0)
    model, tok = load_for_chat(args)
    full = reply(model, tok, [{"role": "user", "content": "Hello"}], args)
    calls = []

    def ctrl_c_at_the_sixth_step(module, inputs):
        calls.append(1)
        if len(calls) == 6:  # mid-step, as a real Ctrl-C lands: inside the model's forward
            raise KeyboardInterrupt

    hook = model.register_forward_pre_hook(ctrl_c_at_the_sixth_step)
    out = io.StringIO()
    try:
        repl(model, tok, args, out=out, read_line=_interrupting(["Hello", "Again", EOFError]))
    finally:
        hook.remove()
    lines = out.getvalue().splitlines()
    assert lines[1].startswith("assistant> ") and lines[1].endswith(" [stopped]"), lines
    partial = lines[1].removeprefix("assistant> ").removesuffix(" [stopped]")
    assert full.startswith(partial) and partial != full
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": partial},
               {"role": "user", "content": "Again"}]  # the stopped reply stays, as shown
    assert lines[2] == "assistant> " + reply(model, tok, history, args)


def test_a_reply_that_ends_at_once_says_so(tiny_llama_dir, capsys):
    """The model's first token ends its turn: a blank line was shown, which looks like a hang or a display bug."""
    args = ChatArgs(model=str(tiny_llama_dir), max_new_tokens=4)
    model, tok = load_for_chat(args)
    end = tok.convert_tokens_to_ids("<|eot_id|>")

    def end_of_turn_first(module, inputs, logits):
        forced = torch.full_like(logits, -1e4)
        forced[..., end] = 0.0
        return forced

    hook = model.lm_head.register_forward_hook(end_of_turn_first)
    out = io.StringIO()
    try:
        repl(model, tok, args, stdin=io.StringIO("Hi\nAgain\n"), out=out)
    finally:
        hook.remove()
    assert out.getvalue() == "(empty reply: the model ended its turn at once)\n" * 2


MARKED_CHATML = ("{#- a template of this run's own -#}{%- for message in messages %}{{- '<|im_start|>' + message['role'] "
                 "+ '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}"
                 "{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def test_a_relative_template_path_of_a_run_works_from_anywhere(tiny_qwen2_dir, tmp_path, monkeypatch):
    """`model.chat_template: my.jinja` was recorded as written, so chat and export from another directory (or
    with the run folder moved) failed with "not an existing .jinja file"; the run's saved template is used."""
    import shutil
    from pathlib import Path

    import yaml

    from tuneforge.configs.schema import load_train_config
    from tuneforge.models.adapter_loading import trained_template
    from tuneforge.train import run_config

    root = Path(__file__).resolve().parents[2]
    work = tmp_path / "work"
    work.mkdir()
    (work / "my.jinja").write_text(MARKED_CHATML, encoding="utf-8")
    monkeypatch.chdir(work)  # training runs where my.jinja is, and names it relatively
    cfg = load_train_config(str(root / "examples/sft_lora_tiny.yaml"), [
        f"model.name_or_path={tiny_qwen2_dir}", "model.chat_template=my.jinja", "output_dir=run",
        f"data.train=[{root / 'tuneforge/assets/example_task/train.jsonl'}]", "training.max_steps=1",
        "training.batch_size=2", "training.save_steps=0", "training.eval_steps=0", "data.eval_ratio=0",
        "training.progress_bar=false", "training.plot_loss=false", "data.max_length=64"])
    run_config(cfg, log=lambda _: None)
    run = work / "run"
    recorded = yaml.safe_load((run / "tuneforge_config.yaml").read_text(encoding="utf-8"))["model"]["chat_template"]
    assert recorded == str((work / "my.jinja").resolve())  # `tuneforge train run/tuneforge_config.yaml` from anywhere
    monkeypatch.chdir(tmp_path)  # elsewhere: my.jinja is not here
    _, tok = load_for_chat(ChatArgs(adapter=str(run)))
    assert tok.chat_template == MARKED_CHATML
    moved = shutil.move(str(run), str(tmp_path / "moved"))
    (work / "my.jinja").unlink()  # the run folder alone, elsewhere, as when it is copied to another machine
    _, tok = load_for_chat(ChatArgs(adapter=moved))
    assert tok.chat_template == MARKED_CHATML == trained_template(Path(moved))


def test_a_recorded_template_file_that_is_gone_says_how_to_go_on(tmp_path):
    """No saved copy in the run folder and no file at the recorded path: the error names the run's config and the
    flag, not `model.chat_template` (a key of a config the user is not running)."""
    from tuneforge.models.adapter_loading import trained_template

    (tmp_path / "tuneforge_config.yaml").write_text("model:\n  chat_template: gone/my.jinja\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"tuneforge_config.yaml records `model.chat_template: gone/my.jinja`, a "
                                        r"template file that does not exist here .* --chat-template PATH"):
        trained_template(tmp_path)
    (tmp_path / "tuneforge_config.yaml").write_text("model:\n  chat_template: chatml\n", encoding="utf-8")
    assert trained_template(tmp_path) == "chatml"  # a built-in name is no file: kept as it is
