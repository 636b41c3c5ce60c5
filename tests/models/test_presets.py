"""`tuneforge init-model`: presets load with plain transformers, templates render, files are deterministic and
written atomically."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneforge.cli import main as cli_main
from tuneforge.errors import UserError
from tuneforge.models.presets import PRESETS, init_model

CHAT = [{"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 12 + 30? 十二加三十是多少？"},
        {"role": "assistant", "content": "42"}]
EXPECTED_TEXT = {
    "tiny-llama": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer briefly.<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nWhat is 12 + 30? 十二加三十是多少？<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n42<|eot_id|>"),
    "tiny-qwen2": ("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nWhat is 12 + 30? "
                   "十二加三十是多少？<|im_end|>\n<|im_start|>assistant\n42<|im_end|>\n"),
}


@pytest.fixture(params=sorted(PRESETS))
def preset_dir(request, tiny_llama_dir, tiny_qwen2_dir):
    return request.param, {"tiny-llama": tiny_llama_dir, "tiny-qwen2": tiny_qwen2_dir}[request.param]


def test_files_and_plain_transformers_load(preset_dir):
    name, folder = preset_dir
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json"):
        assert (folder / f).is_file(), f
    assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.model_type == PRESETS[name].model_type
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert model.config.num_attention_heads == 4 and model.config.num_key_value_heads == 2
    assert 1000 <= len(tok) <= model.config.vocab_size
    assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id and model.config.eos_token_id == tok.eos_token_id
    assert tok.convert_tokens_to_ids(PRESETS[name].eos_tokens[0]) in model.generation_config.eos_token_id
    out = model(**tok("hello 你好", return_tensors="pt"))
    assert out.logits.shape[-1] == model.config.vocab_size and torch.isfinite(out.logits).all()


def test_architecture_details(tiny_llama_dir, tiny_qwen2_dir):
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    qwen = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir)
    assert llama.model.layers[0].self_attn.q_proj.bias is None
    assert qwen.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2 has q/k/v biases
    assert not llama.config.tie_word_embeddings and not qwen.config.tie_word_embeddings
    assert qwen.config.vocab_size % 64 == 0  # padded past the tokenizer, as Qwen does


def test_tied_embeddings_option(tmp_path):
    folder = init_model("tiny-qwen2", tmp_path / "tied", tie_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_chat_template_renders_and_ids_roundtrip(preset_dir):
    name, folder = preset_dir
    tok = AutoTokenizer.from_pretrained(folder)
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert text == EXPECTED_TEXT[name]
    ids = tok.apply_chat_template(CHAT, tokenize=True)["input_ids"]
    assert ids == tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n" if name == "tiny-llama"
                           else "<|im_start|>assistant\n")
    # special tokens are single ids, at the end of the vocabulary like in the real families
    for special in PRESETS[name].tokenizer.special_tokens:
        assert tok.convert_ids_to_tokens(tok(special, add_special_tokens=False).input_ids) == [special]
        assert tok.convert_tokens_to_ids(special) >= len(tok) - len(PRESETS[name].tokenizer.special_tokens)


def test_bos_and_digit_conventions(tiny_llama_dir, tiny_qwen2_dir):
    llama, qwen = AutoTokenizer.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    assert llama("hi").input_ids[0] == llama.bos_token_id  # Llama-3 prepends <|begin_of_text|>
    assert qwen.bos_token is None and qwen("hi").input_ids == qwen("hi", add_special_tokens=False).input_ids
    assert qwen.tokenize("12345")[:5] == ["1", "2", "3", "4", "5"]  # Qwen2: one token per digit
    assert all(len(t) <= 3 for t in llama.tokenize("1234567"))  # Llama-3: digit groups of at most three


def test_qwen2_template_tools_and_tool_turns(tiny_qwen2_dir):
    tok = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Add 2 and 3."},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
                {"role": "tool", "content": "5"}, {"role": "tool", "content": "ok"}]
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools")
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>' in text
    assert text.endswith("<|im_start|>user\n<tool_response>\n5\n</tool_response>\n<tool_response>\nok\n"
                         "</tool_response><|im_end|>\n")


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_deterministic_per_seed(tmp_path, tiny_qwen2_dir):
    a = init_model("tiny-qwen2", tmp_path / "a", seed=0)
    b = init_model("tiny-qwen2", tmp_path / "b", seed=1)
    assert _files(a) == _files(tiny_qwen2_dir)  # same preset + seed: byte-identical, tokenizer included
    assert _files(b)["model.safetensors"] != _files(a)["model.safetensors"]
    assert _files(b)["tokenizer.json"] == _files(a)["tokenizer.json"]


def test_overrides_change_shapes(tmp_path):
    folder = init_model("tiny-llama", tmp_path / "m", hidden_size=128, layers=3, vocab_size=800)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.hidden_size == 128 and model.config.num_hidden_layers == 3
    assert model.config.vocab_size == 800 + len(PRESETS["tiny-llama"].tokenizer.special_tokens)
    with pytest.raises(UserError, match="hidden-size"):
        init_model("tiny-llama", tmp_path / "bad", hidden_size=60)
    assert not (tmp_path / "bad").exists()


def test_existing_out_refused_unless_force_and_no_temp_left(tmp_path, capsys):
    out = tmp_path / "m"
    assert cli_main(["init-model", "tiny-llama", "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp folder left behind
    before = (out / "model.safetensors").read_bytes()
    (out / "marker").write_text("x")
    assert cli_main(["init-model", "tiny-llama", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and (out / "marker").exists()
    assert cli_main(["init-model", "tiny-llama", "--out", str(out), "--force"]) == 0
    assert not (out / "marker").exists() and (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import tuneforge.models.presets as presets

    def broken(model, tokenizer, folder):
        (folder / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(presets, "write_model", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        init_model("tiny-qwen2", tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_unknown_preset_suggests_closest(capsys, tmp_path):
    assert cli_main(["init-model", "tiny-qwen", "--out", str(tmp_path / "x")]) == 2
    assert "Did you mean `tiny-qwen2`?" in capsys.readouterr().err


def test_cli_options_reach_the_model(tmp_path, capsys):
    out = tmp_path / "m"
    assert cli_main(["init-model", "tiny-qwen2", "--out", str(out), "--seed", "1", "--layers", "3",
                     "--hidden-size", "32", "--tie-embeddings"]) == 0
    assert "Wrote tiny-qwen2" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert (config["num_hidden_layers"], config["hidden_size"], config["tie_word_embeddings"]) == (3, 32, True)
    assert (out / "model.safetensors").read_bytes() == (init_model(
        "tiny-qwen2", tmp_path / "api", seed=1, layers=3, hidden_size=32, tie_embeddings=True)
        / "model.safetensors").read_bytes()
