"""Model shapes for `tuneforge estimate`: the numbers that decide parameter counts, and where to get them.

A `ModelShape` describes a Llama-style decoder (Llama 1/2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2): token embedding,
`layers` blocks of [RMSNorm, attention with q/k/v/o projections (grouped-query when kv_heads < heads), RMSNorm,
SwiGLU MLP with gate/up/down projections], a final RMSNorm and an LM head (tied to the embedding or not).

The presets copy the real `config.json` of the named Hugging Face checkpoints (cited per entry), so the estimator
runs with no network. Their parameter counts match the published totals exactly (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from tuneforge.errors import UserError, did_you_mean

# model_type values whose modeling code is the Llama-style block above (checked against transformers' modeling files)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    head_dim: int = 0  # 0: hidden // heads
    qkv_bias: bool = False  # Qwen2 has biases on q/k/v (not on o)
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3 normalises q and k per head (two RMSNorm weights of head_dim per layer)
    model_type: str = "llama"
    source: str = "preset"
    context: int = 0  # max_position_embeddings: the positions the model was built for (0: unknown)

    @property
    def d_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.d_head

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.d_head

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear projection in one block, by its module name."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def biases_per_layer(self) -> int:
        qkv = (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        o = self.hidden if self.o_bias else 0
        mlp = (2 * self.intermediate + self.hidden) if self.mlp_bias else 0
        return qkv + o + mlp

    def norms_per_layer(self) -> int:
        """RMSNorm weights in one block: input and post-attention norms (+ Qwen3's q/k norms)."""
        return 2 * self.hidden + (2 * self.d_head if self.qk_norm else 0)

    def linear_weights_per_layer(self) -> int:
        return sum(i * o for i, o in self.linears().values())

    def layer_params(self) -> int:
        return self.linear_weights_per_layer() + self.biases_per_layer() + self.norms_per_layer()

    def embedding_params(self) -> int:
        """Input embedding plus the LM head when it is a separate matrix."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    def total_params(self) -> int:
        return self.embedding_params() + self.layers * self.layer_params() + self.hidden  # + final norm


def _preset(name, hidden, layers, heads, kv_heads, intermediate, vocab, tied, **kw) -> ModelShape:
    return ModelShape(name=name, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                      intermediate=intermediate, vocab=vocab, tied_embeddings=tied, **kw)


# Numbers from each checkpoint's config.json on the Hugging Face Hub (hidden_size, num_hidden_layers,
# num_attention_heads, num_key_value_heads, intermediate_size, vocab_size, tie_word_embeddings,
# max_position_embeddings as `context`).
PRESETS: dict[str, ModelShape] = {p.name: p for p in [
    # huggyllama/llama-7b (same shapes as meta-llama/Llama-2-7b-hf, whose context is 4096): 6,738,415,616 params
    _preset("llama-7b", 4096, 32, 32, 32, 11008, 32000, False, context=2048),
    # meta-llama/Llama-2-13b-hf: 13,015,864,320 params
    _preset("llama2-13b", 5120, 40, 40, 40, 13824, 32000, False, context=4096),
    # meta-llama/Meta-Llama-3-8B: 8,030,261,248 params (GQA, 8 kv heads)
    _preset("llama3-8b", 4096, 32, 32, 8, 14336, 128256, False, context=8192),
    # meta-llama/Meta-Llama-3-70B: 70,553,706,496 params
    _preset("llama3-70b", 8192, 80, 64, 8, 28672, 128256, False, context=8192),
    # Qwen/Qwen2-7B: 7,615,616,512 params (q/k/v biases)
    _preset("qwen2-7b", 3584, 28, 28, 4, 18944, 152064, False, qkv_bias=True, model_type="qwen2", context=131072),
    # Qwen/Qwen2.5-0.5B: 494,032,768 params (tied embeddings)
    _preset("qwen2.5-0.5b", 896, 24, 14, 2, 4864, 151936, True, qkv_bias=True, model_type="qwen2", context=32768),
    # Qwen/Qwen2.5-7B: same shapes as Qwen2-7B
    _preset("qwen2.5-7b", 3584, 28, 28, 4, 18944, 152064, False, qkv_bias=True, model_type="qwen2", context=131072),
    # mistralai/Mistral-7B-v0.1: 7,241,732,096 params
    _preset("mistral-7b", 4096, 32, 32, 8, 14336, 32000, False, model_type="mistral", context=32768),
    # HuggingFaceTB/SmolLM2-135M (and -Instruct): 134,515,008 params (tied embeddings)
    _preset("smollm2-135m", 576, 30, 9, 3, 1536, 49152, True, context=8192),
]}

# TuneForge's built-in model (`model.name_or_path: builtin:smollm2-135m-instruct`) and other spellings of a preset
ALIASES = {"builtin:smollm2-135m-instruct": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m",
           "llama2-7b": "llama-7b", "mistral-7b-v0.1": "mistral-7b"}
ALIAS_CONTEXT = {"llama2-7b": 4096}  # an alias with the shapes of its preset but a longer context (Llama-2-7b-hf)


def shape_from_hf_config(cfg, name: str, source: str) -> ModelShape:
    """A `ModelShape` from a transformers `PretrainedConfig` (class defaults already applied by AutoConfig)."""
    model_type = getattr(cfg, "model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"`tuneforge estimate --model {name}`: model_type `{model_type}` ({source}) is not supported; "
                        f"the estimator knows Llama-style decoders ({', '.join(SUPPORTED_MODEL_TYPES)}). Use a preset "
                        f"with similar shapes instead ({', '.join(PRESETS)}).")
    heads = cfg.num_attention_heads
    attention_bias = bool(getattr(cfg, "attention_bias", False))
    return ModelShape(
        name=name, hidden=cfg.hidden_size, layers=cfg.num_hidden_layers, heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, intermediate=cfg.intermediate_size,
        vocab=cfg.vocab_size, tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        head_dim=getattr(cfg, "head_dim", None) or 0,
        qkv_bias=True if model_type == "qwen2" else (attention_bias and model_type != "mistral"),
        o_bias=attention_bias and model_type in ("llama", "qwen3"),
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)) and model_type == "llama",
        qk_norm=model_type == "qwen3", model_type=model_type, source=source,
        context=int(getattr(cfg, "max_position_embeddings", None) or 0))


def resolve_shape(model: str) -> ModelShape:
    """`model` is a folder (or file) with config.json, a preset name, or a Hugging Face Hub id (`org/name`)."""
    path = Path(model).expanduser()
    if path.is_dir() or path.name == "config.json":
        return _from_local(path, model)
    if path.is_file():  # a weights file or a config of another name: "no such folder" sent users looking for it
        raise UserError(f"`--model {model}` is a file; pass the model folder that holds config.json "
                        f"({path.parent}), or a preset ({', '.join(PRESETS)}).")
    name = ALIASES.get(model.lower(), model.lower())
    if name in PRESETS:
        context = ALIAS_CONTEXT.get(model.lower())
        return replace(PRESETS[name], context=context) if context else PRESETS[name]
    from tuneforge.models.loading import looks_local

    if "/" not in model or model.startswith((".", "/", "~")) or looks_local(model):
        what = ("no such preset" if "/" not in model and not model.startswith((".", "~"))
                else f"no such folder (relative paths count from {Path.cwd()})")
        hint = did_you_mean(model.lower(), PRESETS, list_choices=False)
        raise UserError(f"`--model {model}`: {what}.{hint} Pass a preset "
                        f"({', '.join(PRESETS)}), a folder containing config.json, or a Hub id like "
                        f"`Qwen/Qwen2.5-7B`.")
    return _from_hub(model)


def _from_local(path, model: str) -> ModelShape:
    from transformers import AutoConfig

    config_file = path if path.name == "config.json" else path / "config.json"
    if not config_file.is_file() and (path / "adapter_config.json").is_file():
        raise UserError(f"`--model {model}` holds an adapter (adapter_config.json), not a model; estimate the base it "
                        f"was trained on instead{_recorded_base(path)}, with the adapter's method in --methods.")
    if not config_file.is_file():
        raise UserError(f"`--model {model}`: {config_file} does not exist. Pass a Hugging Face model folder "
                        f"(it holds config.json) or a preset ({', '.join(PRESETS)}).")
    try:
        cfg = AutoConfig.from_pretrained(str(config_file.parent))
    except (ValueError, OSError, KeyError) as e:
        raise UserError(f"`--model {model}`: could not read {config_file}: {e}. Fix the file or use a preset "
                        f"({', '.join(PRESETS)}).") from e
    return shape_from_hf_config(cfg, model, str(config_file))


def _from_hub(model: str) -> ModelShape:
    from transformers import AutoConfig

    from tuneforge.models.loading import hub_reachable

    try:  # config.json only, no weights; offline, only the local hub cache (not half a minute of retries)
        cfg = AutoConfig.from_pretrained(model, local_files_only=not hub_reachable())
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"`--model {model}`: could not fetch its config.json from the Hugging Face Hub ({first}). "
                        f"Without network access, download config.json and pass its folder, or use a preset "
                        f"({', '.join(PRESETS)}).") from e
    return shape_from_hf_config(cfg, model, f"hub:{model}")


def _recorded_base(adapter: Path) -> str:
    """`: --model BASE` from the adapter's own record, or "" when it names none."""
    import json

    try:
        base = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return ""
    return f": --model {base}" if isinstance(base, str) and base else ""
