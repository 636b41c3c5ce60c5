"""GGUF export, checked by loading the file back with transformers' GGUF loader (the path TuneForge uses for
SmolLM2): f32 logits equal the merged model's, q8_0 stays within a stated tolerance with the same greedy answers,
the tokenizer round-trips, and the metadata carries what llama.cpp / Ollama need.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tuneforge.cli import main
from tuneforge.errors import UserError
from tuneforge.inference.export import gguf_file

TEXTS = ["Hello world, 7 km = 7000 m! It's 12345.", "把 7 千米换算成米。答案：7000 米", "  spaces\n\nand\ttabs  ",
         "emoji 🙂 and ünïcödé"]
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 12 + 30?"}]
PROMPTS = {"What is 2 + 3?": "5", "Convert 7 km to meters.": "7000 m", "Who are you?": "I am TuneForge Assistant.",
           "把 5 千克换算成克。": "5000 克", "Name a colour.": "Blue."}
# q8_0 stores each block of 32 weights as int8 times one fp16 scale: about 0.4% relative error per weight. On the
# tiny models (logits of size ~1) that moves logits by at most ~0.01; we allow 0.05.
Q8_LOGIT_ATOL = 0.05


def load_gguf(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = next(folder.glob("*.gguf")).name
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(folder), gguf_file=name)


def load_hf(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval(), \
        AutoTokenizer.from_pretrained(str(folder))


def chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids


def greedy(model, ids) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def memorising_model(base, out):
    """The tiny model fully fine-tuned until it has memorised the answers to PROMPTS. A random tiny model's
    next-token scores are nearly tied, so only a model sure of its answers (like a real fine-tune) can show that
    quantization keeps them. (LoRA alone does not get a random 64-wide model there in a few steps.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.methods.harness import train_steps
    from tuneforge.models.presets import write_model

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    rows = []
    for prompt, answer in PROMPTS.items():
        ids = chat_ids(tokenizer, prompt)[0].tolist()
        reply = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append((ids + reply, [-100] * len(ids) + reply))
    width = max(len(ids) for ids, _ in rows)
    pad = lambda xs, v: xs + [v] * (width - len(xs))  # noqa: E731
    batch = {"input_ids": torch.tensor([pad(i, 0) for i, _ in rows]),
             "attention_mask": torch.tensor([pad([1] * len(i), 0) for i, _ in rows]),
             "labels": torch.tensor([pad(labels, -100) for _, labels in rows])}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    losses = train_steps(model, batch, steps=60, lr=3e-3)
    assert losses[-1] < 0.1, losses[-1]
    write_model(model.eval(), tokenizer, out)
    return out


@pytest.fixture(scope="module")
def exports(tiny_llama_dir, tiny_qwen2_dir, tmp_path_factory):
    """For each architecture: a LoRA on a fine-tuned tiny model, merged into an HF folder (the reference) and
    exported as f32 and q8_0 GGUF files."""
    from tests.inference.test_export import make_adapter

    root = tmp_path_factory.mktemp("gguf")
    result = {}
    for kind, base in (("llama", tiny_llama_dir), ("qwen2", tiny_qwen2_dir)):
        tuned = memorising_model(base, root / f"{kind}-tuned")
        adapter = make_adapter("lora", tuned, root / f"{kind}-lora", scale=0.01, rank=4)
        folders = {"hf": root / f"{kind}-hf", "f32": root / f"{kind}-f32", "q8_0": root / f"{kind}-q8"}
        assert main(["export", "--adapter", str(adapter), "--out", str(folders["hf"]), "--dtype", "fp32"]) == 0
        assert main(["export", "--adapter", str(adapter), "--out", str(folders["f32"]), "--format", "gguf",
                     "--dtype", "fp32"]) == 0
        assert main(["export", "--adapter", str(adapter), "--out", str(folders["q8_0"]), "--format", "gguf",
                     "--quant", "q8_0"]) == 0
        result[kind] = folders
    return result


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_f32_gguf_logits_equal_merged_model(exports, kind):
    reference, tokenizer = load_hf(exports[kind]["hf"])
    model, _ = load_gguf(exports[kind]["f32"])
    ids = chat_ids(tokenizer, next(iter(PROMPTS)))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_q8_0_gguf_close_with_same_greedy_answers(exports, kind):
    reference, tokenizer = load_hf(exports[kind]["hf"])
    model, _ = load_gguf(exports[kind]["q8_0"])
    for prompt, answer in PROMPTS.items():
        ids = chat_ids(tokenizer, prompt)
        with torch.no_grad():
            diff = (model(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max().item()
        assert 0 < diff < Q8_LOGIT_ATOL, (prompt, diff)  # > 0: the weights really are quantized
        expected = greedy(reference, ids)
        assert tokenizer.decode(expected, skip_special_tokens=True).strip() == answer  # the fine-tune's answer
        assert greedy(model, ids) == expected, prompt


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_gguf_tokenizer_round_trip(exports, kind):
    _, reference = load_hf(exports[kind]["hf"])
    _, tokenizer = load_gguf(exports[kind]["f32"])
    for text in TEXTS:
        assert tokenizer(text).input_ids == reference(text).input_ids, text
        assert tokenizer.decode(reference(text, add_special_tokens=False).input_ids) == text
    assert tokenizer.chat_template == reference.chat_template
    rendered = reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert tokenizer(rendered, add_special_tokens=False).input_ids == \
        reference(rendered, add_special_tokens=False).input_ids  # special tokens stay whole
    for special in ("bos_token", "eos_token", "pad_token"):
        assert getattr(tokenizer, special) == getattr(reference, special), special


def test_gguf_metadata_for_llama_cpp(exports):
    from gguf import GGMLQuantizationType, GGUFReader, TokenType

    def field(reader, key):
        f = reader.fields[key]
        values = [f.parts[i] for i in f.data]
        return [bytes(v).decode() if f.types[-1].name == "STRING" else v.tolist()[0] for v in values]

    _, tokenizer = load_hf(exports["qwen2"]["hf"])
    reader = GGUFReader(str(next(exports["qwen2"]["q8_0"].glob("*.gguf"))))
    assert field(reader, "tokenizer.ggml.model") == ["gpt2"] and field(reader, "tokenizer.ggml.pre") == ["qwen2"]
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == tokenizer.vocab_size + len(tokenizer.get_added_vocab()) + (len(tokens) - len(tokenizer))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokens[im_end] == "<|im_end|>" and types[im_end] == TokenType.CONTROL
    assert types[-1] == TokenType.UNUSED and tokens[-1] == f"[PAD{len(tokens) - 1}]"  # Qwen's padded vocab
    assert field(reader, "tokenizer.ggml.eos_token_id") == [im_end]
    assert "<|im_start|>" in field(reader, "tokenizer.chat_template")[0]
    tensor_types = {t.name: t.tensor_type for t in reader.tensors}
    assert tensor_types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q8_0
    assert tensor_types["blk.0.attn_q.bias"] == GGMLQuantizationType.F32  # qwen2's biases stay f32
    assert tensor_types["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32
    llama = GGUFReader(str(next(exports["llama"]["f32"].glob("*.gguf"))))
    assert field(llama, "tokenizer.ggml.pre") == ["llama-bpe"] and field(llama, "tokenizer.ggml.add_bos_token") == [1]
    modelfile = (exports["qwen2"]["q8_0"] / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./") and 'PARAMETER stop "<|im_end|>"' in modelfile


@pytest.mark.parametrize("dtype,ggml_type", [("fp16", "F16"), ("bf16", "BF16")])
def test_half_precision_gguf(tiny_qwen2_dir, tmp_path, dtype, ggml_type):
    from gguf import GGMLQuantizationType, GGUFReader

    out = tmp_path / dtype
    assert main(["export", "--model", str(tiny_qwen2_dir), "--out", str(out), "--format", "gguf",
                 "--dtype", dtype]) == 0
    gguf_path = next(out.glob("*.gguf"))
    assert gguf_path.name.endswith(f"-{ggml_type.lower()}.gguf")
    types = {t.name: t.tensor_type for t in GGUFReader(str(gguf_path)).tensors}
    assert types["output.weight"] == getattr(GGMLQuantizationType, ggml_type)
    assert types["output_norm.weight"] == GGMLQuantizationType.F32
    reference, tokenizer = load_hf(tiny_qwen2_dir)
    model, _ = load_gguf(out)
    ids = chat_ids(tokenizer, "Who are you?")
    with torch.no_grad():
        assert (model(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max() < 0.01


def test_rows_not_multiple_of_32_fall_back_to_f16(tmp_path):
    from gguf import GGMLQuantizationType, GGUFReader

    from tuneforge.models.presets import init_model

    base = init_model("tiny-llama", tmp_path / "odd", hidden_size=48, vocab_size=400)  # rows of 48 values
    out = tmp_path / "odd-q8"
    assert main(["export", "--model", str(base), "--out", str(out), "--format", "gguf", "--quant", "q8_0"]) == 0
    types = {t.name: t.tensor_type for t in GGUFReader(str(next(out.glob("*.gguf")))).tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.F16  # 48 % 32 != 0
    assert types["blk.0.ffn_down.weight"] == GGMLQuantizationType.Q8_0  # rows of 96 = 3 blocks
    reference, tokenizer = load_hf(base)
    model, _ = load_gguf(out)
    ids = chat_ids(tokenizer, "Convert 7 km to meters.")
    with torch.no_grad():
        assert (model(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max() < Q8_LOGIT_ATOL


def test_llama3_rope_factors_match_transformers():
    """rope_freqs (llama.cpp's form of Llama 3.1 rope scaling) = default inv_freq / transformers' scaled inv_freq."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    default = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    np.testing.assert_allclose(gguf_file.llama3_rope_factors(config), (default / scaled).numpy(), rtol=1e-5)
    assert math.isclose(float(gguf_file.llama3_rope_factors(config).max()), 8.0)


def test_unsupported_architecture_and_tokenizer_are_refused():
    from types import SimpleNamespace

    with pytest.raises(UserError, match="llama, qwen2.*gpt_neox"):
        gguf_file.gguf_arch(SimpleNamespace(model_type="gpt_neox"))
    with pytest.raises(UserError, match="byte-level BPE"):
        gguf_file._check_byte_level(SimpleNamespace())


@pytest.mark.slow
def test_smollm2_gguf_round_trip(tmp_path):
    """The real built-in chat model (llama layout, SmolLM's own pre-tokenizer, tied embeddings) to f16 GGUF."""
    from tuneforge.models.builtin import ensure_smollm2

    base = ensure_smollm2()
    out = tmp_path / "smollm2"
    assert main(["export", "--model", "builtin:smollm2-135m-instruct", "--out", str(out), "--format", "gguf",
                 "--dtype", "fp16"]) == 0
    reference, ref_tokenizer = load_hf(base)
    model, tokenizer = load_gguf(out)
    for text in TEXTS:
        assert tokenizer(text).input_ids == ref_tokenizer(text).input_ids, text
    ids = chat_ids(ref_tokenizer, "What is the capital of France?")
    with torch.no_grad():
        want, got = reference(input_ids=ids).logits, model(input_ids=ids).logits
    assert (got - want).abs().max() < 0.5 and torch.equal(got.argmax(-1), want.argmax(-1))
    assert greedy(model, ids) == greedy(reference, ids)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_runs_in_llama_cpp(exports, kind):
    """llama.cpp itself (llama-cpp-python, when installed; not a TuneForge dependency) reads the file: same tokens,
    f32 logits within 1e-2 (its own kernels), the fine-tune's greedy answer, and it stops at the end-of-turn token."""
    llama_cpp = pytest.importorskip("llama_cpp")
    reference, tokenizer = load_hf(exports[kind]["hf"])
    llm = llama_cpp.Llama(model_path=str(next(exports[kind]["f32"].glob("*.gguf"))), n_ctx=256, logits_all=True,
                          verbose=False, n_threads=1)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text).input_ids, text
    prompt, answer = next(iter(PROMPTS.items()))
    ids = chat_ids(tokenizer, prompt)[0].tolist()
    llm.eval(ids)
    with torch.no_grad():
        want = reference(input_ids=torch.tensor([ids])).logits[0]
    assert (torch.tensor(np.asarray(llm.scores[: len(ids)])) - want).abs().max() < 1e-2
    reply = llm.create_completion(ids, max_tokens=16, temperature=0.0)
    assert reply["choices"][0]["text"].strip() == answer and reply["choices"][0]["finish_reason"] == "stop"
