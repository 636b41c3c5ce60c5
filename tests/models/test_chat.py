"""`tuneforge chat`: one-shot --prompt through the CLI, adapters, the conversation loop and its errors."""

from __future__ import annotations

import io

import pytest
import torch

from tuneforge.chat import ChatArgs, load_for_chat, repl, reply
from tuneforge.cli import main as cli_main
from tuneforge.configs.schema import ModelConfig
from tuneforge.errors import UserError
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
