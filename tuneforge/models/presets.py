"""Tiny random-init models in Hugging Face format, shaped like real model families, for tests and experiments.

    tuneforge init-model tiny-llama --out /tmp/tiny-llama
    tuneforge init-model tiny-qwen2 --out /tmp/tiny-qwen2 --seed 1 --hidden-size 128 --layers 4

Each preset writes config.json, model.safetensors, generation_config.json, tokenizer.json and tokenizer_config.json
(with the chat template). The tokenizer is a byte-level BPE trained on our own bundled text (tokenizer.py); the
weights are random with a fixed seed, so the same preset and seed give byte-identical files. The folder is
written to a temp path and renamed, so an interrupted run never leaves a half-written model behind.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneforge.configs.typed import opt
from tuneforge.errors import UserError, did_you_mean
from tuneforge.models.tokenizer import TokenizerSpec, train_tokenizer

# Llama-3-Instruct chat format: bos, then per message a header with the role, the stripped content and <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first -%}{{ bos_token }}{%- endif -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)

# ChatML as Qwen2/Qwen2.5-Instruct write it: a default system turn, tools listed in the system turn, tool calls
# as <tool_call> JSON in assistant turns and consecutive tool results merged into one user turn.
CHATML_TEMPLATE = """{%- set default_system = 'You are a helpful assistant.' -%}
{%- if messages[0]['role'] == 'system' -%}
    {%- set system = messages[0]['content'] -%}{%- set rest = messages[1:] -%}
{%- else -%}
    {%- set system = default_system -%}{%- set rest = messages -%}
{%- endif -%}
{{- '<|im_start|>system\\n' + system -}}
{%- if tools -%}
    {{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'
        'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}
    {%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '
        '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": '
        '<args-json-object>}\\n</tool_call>' -}}
{%- endif -%}
{{- '<|im_end|>\\n' -}}
{%- for message in rest -%}
    {%- if message['role'] == 'tool' -%}
        {%- if loop.first or rest[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
        {{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' -}}
        {%- if loop.last or rest[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}
    {%- else -%}
        {{- '<|im_start|>' + message['role'] -}}
        {%- if message['content'] -%}{{- '\\n' + message['content'] -}}{%- endif -%}
        {%- for call in message.get('tool_calls') or [] -%}
            {%- set call = call['function'] if call['function'] is defined else call -%}
            {{- '\\n<tool_call>\\n{"name": "' + call['name'] + '", "arguments": ' + (call['arguments'] | tojson)
                + '}\\n</tool_call>' -}}
        {%- endfor -%}
        {{- '<|im_end|>\\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"""


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    model_type: str  # transformers model_type: llama, qwen2
    tokenizer: TokenizerSpec
    eos_tokens: tuple[str, ...]  # generation stops at any of these (generation_config.eos_token_id)
    config: dict  # architecture fields beyond the shared tiny shapes
    vocab_multiple: int = 1  # round the embedding size up (Qwen pads its embedding past the tokenizer's size)


TINY_SHAPES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.02)

PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset(
        name="tiny-llama",
        summary="Llama-3 layout: <|begin_of_text|> prepended, header/<|eot_id|> chat format",
        model_type="llama",
        tokenizer=TokenizerSpec(
            special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>", "<|finetune_right_pad_id|>"),
            bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>", add_bos=True,
            digits="triples", chat_template=LLAMA3_TEMPLATE),
        eos_tokens=("<|end_of_text|>", "<|eot_id|>"),
        config=dict(rope_theta=500000.0, rms_norm_eps=1e-5),
    ),
    Preset(
        name="tiny-qwen2",
        summary="Qwen2.5 layout: ChatML <|im_start|>/<|im_end|>, q/k/v biases, padded vocab",
        model_type="qwen2",
        tokenizer=TokenizerSpec(
            special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            bos=None, eos="<|im_end|>", pad="<|endoftext|>", add_bos=False, digits="single",
            chat_template=CHATML_TEMPLATE),
        eos_tokens=("<|im_end|>", "<|endoftext|>"),
        config=dict(rope_theta=1000000.0, rms_norm_eps=1e-6),
        vocab_multiple=64,
    ),
]}


@dataclass
class InitModelArgs:
    name: str = dataclasses.field(metadata={"positional": True, "help": "Preset: " + "; ".join(
        f"{p.name} ({p.summary})" for p in PRESETS.values())})
    out: str = opt(help="Folder to write the model to (must not exist unless --force).")
    seed: int = opt(0, "Random seed for the weights (same preset + seed = identical files).")
    hidden_size: int | None = opt(None, "Override the hidden size (preset: 64; a multiple of 8).")
    layers: int | None = opt(None, "Override the number of transformer blocks (preset: 2).")
    vocab_size: int = opt(1536, "Learned BPE tokens (before special tokens); at least 300.")
    tie_embeddings: bool = opt(False, "Share the input embedding with the output layer (as Qwen2.5-0.5B and "
                                      "SmolLM2 do).")
    force: bool = opt(False, "Replace --out if it exists.")


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"Unknown model preset `{name}`.{did_you_mean(name, PRESETS)}")
    return PRESETS[name]


def build_config(preset: Preset, tokenizer, hidden_size: int | None = None, layers: int | None = None,
                 tie_embeddings: bool = False):
    """The transformers config: tiny shapes, the preset's architecture fields, ids of the special tokens."""
    from transformers import AutoConfig

    shapes = dict(TINY_SHAPES)
    if hidden_size is not None:
        if hidden_size < 8 or hidden_size % (2 * shapes["num_attention_heads"]):
            raise UserError(f"--hidden-size {hidden_size} must be a positive multiple of 8 (4 heads with an even "
                            f"head size). Try 64, 128 or 256.")
        shapes.update(hidden_size=hidden_size, intermediate_size=2 * hidden_size)
    if layers is not None:
        if layers < 1:
            raise UserError(f"--layers must be at least 1, got {layers}.")
        shapes["num_hidden_layers"] = layers
    # Untied by default, although several small real models tie: a random model with tied embeddings mostly
    # repeats its last input token, so its greedy replies come out blank (useless for generation tests).
    architecture = dict(preset.config, tie_word_embeddings=tie_embeddings)
    vocab = -(-len(tokenizer) // preset.vocab_multiple) * preset.vocab_multiple
    return AutoConfig.for_model(
        preset.model_type, vocab_size=vocab, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **shapes, **architecture)


def build_model(preset: Preset, config, tokenizer, seed: int):
    """Random weights from `seed`, without disturbing the caller's global RNG."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in preset.eos_tokens]
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos_ids,
                                               pad_token_id=config.pad_token_id)
    return model


def write_model(model, tokenizer, folder: Path, **save_kwargs) -> None:
    """save_pretrained both, keeping the chat template inside tokenizer_config.json (read by every transformers
    version) and recording the legacy `rope_theta` key that transformers < 5 reads. `save_kwargs` go to the
    model's save_pretrained (e.g. max_shard_size)."""
    model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
    tokenizer.save_pretrained(folder, save_jinja_files=False)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tok_config_path = folder / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text(encoding="utf-8"))
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"  # v5 writes its internal class name; v4 can't load it
    tok_config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_replaceable(out: Path) -> None:
    """--force replaces a model folder, never a file or a folder of other things: a mistyped --out (the project
    folder, a data folder) would otherwise be deleted whole, without a word."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a model folder; --force does not replace files. Pick another "
                        f"--out folder.")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and "config.json" not in entries:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise UserError(f"--out {out} is not a model folder (no config.json; it holds {shown}), so --force will not "
                        f"delete it. Pick another --out folder, or empty this one yourself.")


def init_model(name: str, out: str | Path, seed: int = 0, hidden_size: int | None = None,
               layers: int | None = None, vocab_size: int = 1536, tie_embeddings: bool = False,
               force: bool = False) -> Path:
    """Write preset `name` to `out` (atomically) and return the folder."""
    from tuneforge.models.loading import atomic_folder

    preset = get_preset(name)
    out = Path(out).expanduser()
    if force:
        _check_replaceable(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists. Choose another --out folder or pass --force to replace it.")
    if vocab_size < 300:
        raise UserError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs the 256 byte tokens plus "
                        f"merges. Use 1000-2000.")
    tokenizer = train_tokenizer(preset.tokenizer, vocab_size)
    config = build_config(preset, tokenizer, hidden_size, layers, tie_embeddings)
    model = build_model(preset, config, tokenizer, seed)
    with atomic_folder(out) as tmp:
        write_model(model, tokenizer, tmp)
    return out


def init_model_cli(args: InitModelArgs) -> int:
    t0 = time.perf_counter()
    out = init_model(args.name, args.out, seed=args.seed, hidden_size=args.hidden_size, layers=args.layers,
                     vocab_size=args.vocab_size, tie_embeddings=args.tie_embeddings, force=args.force)
    n_params = sum(p.stat().st_size for p in out.glob("*.safetensors")) // 4
    print(f"Wrote {args.name} (about {n_params / 1e3:.0f}K parameters, seed {args.seed}) to {out} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0
