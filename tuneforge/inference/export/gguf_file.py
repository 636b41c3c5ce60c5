"""One GGUF file for llama.cpp and Ollama, written with the `gguf` package (llama.cpp's own gguf-py).

    write_gguf(model, tokenizer, Path("out/model-q8_0.gguf"), kind="q8_0")

What llama.cpp's converter (convert_hf_to_gguf.py) does for these architectures, and no more:
- architectures `llama` (Llama 2/3, SmolLM2, Mistral-style dense) and `qwen2` (Qwen2/2.5, with q/k/v biases);
- tensor names from gguf-py's own name map (`get_tensor_name_map`); the output layer is left out when tied;
- for `llama` the q/k projection rows are permuted from Hugging Face's rotary layout (first half / second half of
  each head) to llama.cpp's interleaved pairs; qwen2 uses llama.cpp's NEOX rotary, which is HF's layout as is;
- types: 1-D tensors (norms, biases) stay f32; 2-D ones become f32, f16, bf16 or q8_0; a tensor whose rows are
  not a multiple of q8_0's 32-value block falls back to f16, as llama.cpp's converter does;
- the tokenizer as a byte-level BPE (`tokenizer.ggml.model = gpt2`) with its merges, token types (control for
  special tokens, user-defined for other added ones, unused for padding rows), the pre-tokenizer name that
  selects llama.cpp's split regex, bos/eos/pad/eot ids, add_bos, and the chat template.
Sentencepiece tokenizers (Llama 2, Mistral v0.1) and other architectures are refused with the way out: export a
Hugging Face folder and run llama.cpp's convert_hf_to_gguf.py on it.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from tuneforge.errors import UserError

KINDS = ("f32", "f16", "bf16", "q8_0")
ARCHS = {"llama": "LLAMA", "qwen2": "QWEN2"}  # transformers model_type -> gguf.MODEL_ARCH member
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
Q8_BLOCK = 32


def _split_regex(digits: str) -> str:
    from tuneforge.models.tokenizer import SPLIT_PATTERN

    return SPLIT_PATTERN.replace("DIGITS", digits)


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for how this tokenizer splits text before BPE (`tokenizer.ggml.pre`). llama.cpp itself
    recognises a tokenizer by hashing its output on a test text; we read the split rule from tokenizer.json."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    parts = spec.get("pretokenizers", [spec]) if spec else []
    kinds = [p.get("type") for p in parts]
    regexes = [(p.get("pattern") or {}).get("Regex") for p in parts if p.get("type") == "Split"]
    if regexes == [_split_regex("{1,3}")]:
        return "llama-bpe"  # Llama 3: numbers in groups of up to three digits
    if regexes == [_split_regex("")]:
        return "qwen2"  # Qwen2: every digit on its own
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"  # SmolLM/StarCoder: single digits, then GPT-2's split
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    print(f"warning: unknown pre-tokenizer {kinds} {regexes}; writing tokenizer.ggml.pre=default. llama.cpp may "
          f"split text differently from this tokenizer; check a few prompts.", file=sys.stderr)
    return "default"


def _check_byte_level(tokenizer) -> None:
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    model_type = (spec.get("model") or {}).get("type")
    if model_type != "BPE" or "ByteLevel" not in json.dumps(spec.get("decoder")):
        raise UserError(f"GGUF export writes byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM2, GPT-2 style); this "
                        f"tokenizer is {model_type or type(tokenizer).__name__} without a byte-level decoder "
                        f"(e.g. sentencepiece). Export a Hugging Face folder (--format hf) and convert it with "
                        f"llama.cpp's convert_hf_to_gguf.py.")


def vocab_with_types(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every row of the embedding as (token text, gguf.TokenType), like llama.cpp's converter: special added
    tokens are CONTROL, other added tokens USER_DEFINED, rows past the tokenizer [PADi] UNUSED."""
    from gguf import TokenType

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(reverse) >= vocab_size:
        raise UserError(f"The tokenizer has token ids up to {max(reverse)} but the model's embedding has only "
                        f"{vocab_size} rows; resize the embeddings (model.resize_token_embeddings) before exporting.")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(reverse[i])
            types.append(TokenType.NORMAL if i not in added else
                         TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
    return tokens, [int(t) for t in types]


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant message (<|im_end|>, <|eot_id|>)."""
    marker = "TUNEFORGE_END_OF_TURN_PROBE"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # no template, or one that needs other roles: no end-of-turn token to record
        return None
    ids = tokenizer(text.split(marker, 1)[-1], add_special_tokens=False)["input_ids"]
    return ids[0] if ids and ids[0] in tokenizer.added_tokens_decoder else None


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    import gguf

    _check_byte_level(tokenizer)
    tokens, types = vocab_with_types(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="tuneforge-gguf-tok-") as tmp:
        # gguf-py's SpecialVocab reads merges, special ids, add_bos and the chat template from the saved files,
        # exactly as llama.cpp's converter does
        tokenizer.save_pretrained(tmp, save_jinja_files=False)
        gguf_log = logging.getLogger("gguf.vocab")
        level, gguf_log.level = gguf_log.level, logging.ERROR  # its pair-template notes concern BERT-style pairs
        try:
            special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
        finally:
            gguf_log.setLevel(level)
    if not special.merges:
        raise UserError("The tokenizer has no BPE merges to write into the GGUF file; llama.cpp cannot tokenize "
                        "without them. Export a Hugging Face folder (--format hf) instead.")
    special.add_to_gguf(writer, quiet=True)
    eot = end_of_turn_id(tokenizer)
    if eot is not None and eot != tokenizer.eos_token_id:
        writer.add_eot_token_id(eot)


def _rope(config) -> dict:
    """Rotary settings across transformers versions (`rope_parameters` in 5.x, `rope_theta`/`rope_scaling` before)."""
    rope = dict(getattr(config, "rope_scaling", None) or {})
    rope.update(getattr(config, "rope_parameters", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    return rope


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_hparams(writer, config, name: str, kind: str) -> None:
    import gguf

    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_rope_freq_base(float(_rope(config)["rope_theta"]))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[kind]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    rope = _rope(config)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope["rope_type"] not in ("default", "llama3"):  # llama3 goes in as the rope_freqs tensor
        raise UserError(f"GGUF export does not write rope scaling `{rope['rope_type']}` yet; export a Hugging Face "
                        f"folder (--format hf) and convert it with llama.cpp's convert_hf_to_gguf.py.")


def llama3_rope_factors(config) -> np.ndarray | None:
    """Llama 3.1+ long-context rotary scaling as llama.cpp stores it: one factor per frequency (`rope_freqs`)."""
    rope = _rope(config)
    if rope["rope_type"] != "llama3":
        return None
    dim, base, factor = head_dim(config), float(rope["rope_theta"]), float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    factors = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def permute_rotary(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotary layout (each head: first half, second half) -> llama.cpp's (interleaved pairs), on the rows
    of q/k weights or biases. transformers' GGUF loader undoes exactly this."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def encode(data: np.ndarray, kind: str):
    """(array, raw gguf type or None) for one tensor in the requested kind."""
    from gguf import GGMLQuantizationType, quants

    if data.ndim <= 1 or kind == "f32":
        return data.astype(np.float32), None
    if kind == "f16" or (kind == "q8_0" and data.shape[-1] % Q8_BLOCK):
        return data.astype(np.float16), None
    qtype = GGMLQuantizationType.BF16 if kind == "bf16" else GGMLQuantizationType.Q8_0
    return quants.quantize(data.astype(np.float32), qtype), qtype


def gguf_tensors(model, arch: str):
    """(gguf name, float32 array) for every weight, in llama.cpp's names and layout."""
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCHS[arch]), config.num_hidden_layers)
    if (factors := llama3_rope_factors(config)) is not None:
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        stem, suffix = hf_name.rsplit(".", 1)
        name = name_map.get_name(stem)
        if name is None:
            raise UserError(f"GGUF export does not know where tensor `{hf_name}` goes in llama.cpp's `{arch}` "
                            f"layout. Export a Hugging Face folder (--format hf) instead.")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if arch == "llama" and name.endswith(".attn_q"):
            data = permute_rotary(data, config.num_attention_heads)
        elif arch == "llama" and name.endswith(".attn_k"):
            data = permute_rotary(data, config.num_key_value_heads)
        yield f"{name}.{suffix}", data


def gguf_arch(config) -> str:
    if config.model_type not in ARCHS:
        raise UserError(f"GGUF export supports the {', '.join(ARCHS)} architectures; this model is "
                        f"`{config.model_type}`. Export a Hugging Face folder (--format hf) and convert it with "
                        f"llama.cpp's convert_hf_to_gguf.py.")
    return config.model_type


def write_gguf(model, tokenizer, path: Path, kind: str, name: str = "model") -> Path:
    """Write `model` (a plain transformers causal LM, merged) and its tokenizer as one GGUF file at `path`."""
    import gguf

    if kind not in KINDS:
        raise UserError(f"GGUF tensor type {kind!r} is not supported; choose one of {', '.join(KINDS)}.")
    arch = gguf_arch(model.config)
    writer = gguf.GGUFWriter(str(path), arch)
    add_hparams(writer, model.config, name, kind)
    add_tokenizer(writer, tokenizer, model.config.vocab_size)
    for tensor_name, data in gguf_tensors(model, arch):
        array, raw_dtype = encode(data, kind)
        writer.add_tensor(tensor_name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def ollama_modelfile(gguf_name: str, tokenizer, stop_ids: list[int]) -> str:
    """An Ollama Modelfile next to the GGUF: the file and its stop tokens (Ollama reads the chat template from
    the GGUF metadata)."""
    lines = [f"FROM ./{gguf_name}"]
    for token in tokenizer.convert_ids_to_tokens(stop_ids):
        lines.append(f"PARAMETER stop {json.dumps(token)}")
    return "\n".join(lines) + "\n"
