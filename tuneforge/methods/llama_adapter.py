"""LLaMA-Adapter through PEFT's AdaptionPrompt (Zhang et al., 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language
Models with Zero-init Attention", https://arxiv.org/abs/2303.16199): learned adaption prompts attended to by the top
layers, through a zero-initialised gate, so training starts exactly at the base model.

PEFT implements it for the model types in `peft.tuners.adaption_prompt.config.TRANSFORMERS_MODEL_CONFIG` (llama,
mistral, gpt2); other architectures are refused with a ConfigError rather than patched here, since a patched adapter
would not load with plain `peft.PeftModel.from_pretrained`. It does not merge (extra attention, no weight change).
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.configs.typed import opt
from tuneforge.errors import ConfigError
from tuneforge.methods import register
from tuneforge.methods.base import Method, unwrap


@dataclass
class LlamaAdapterOptions:
    adapter_len: int = opt(10, "Adaption prompt length (learned tokens per adapted layer).")
    adapter_layers: int = opt(0, "Adapt the top N layers (the paper: 30 of 32). 0: every layer.")


def supported_model_types() -> list[str]:
    from peft.tuners.adaption_prompt.config import TRANSFORMERS_MODEL_CONFIG

    return sorted(TRANSFORMERS_MODEL_CONFIG)


class LlamaAdapter(Method):
    name = "llama_adapter"
    section = "llama_adapter"
    Options = LlamaAdapterOptions
    mergeable = False
    saves_adapter = True
    # the model types are PEFT's TRANSFORMERS_MODEL_CONFIG (a test keeps these texts in step with it)
    summary = ("Zero-init gated adaption prompts in the top layers (PEFT AdaptionPrompt; model types llama, mistral, "
               "gpt2).")
    guide = "Instruction-following on a Llama, Mistral or GPT-2 model with few parameters and a gated, stable start."

    def supports(self, model_type):
        return model_type in supported_model_types()

    def validate(self, cfg):
        o = cfg.options(self.section)
        if o.adapter_len < 1:
            raise ConfigError(f"`llama_adapter.adapter_len` must be at least 1, got {o.adapter_len}.")
        if o.adapter_layers < 0:
            raise ConfigError(f"`llama_adapter.adapter_layers` must be 0 (all) or positive, got {o.adapter_layers}.")

    def apply(self, model, opts, cfg):
        from peft import AdaptionPromptConfig, get_peft_model

        config = unwrap(model).config
        if not self.supports(config.model_type):
            raise ConfigError(f"`method: llama_adapter` supports model types {', '.join(supported_model_types())} "
                              f"(PEFT AdaptionPrompt); this model is `{config.model_type}`. Use `prefix_tuning` or "
                              f"`p_tuning_v2` for a similar prompt-in-every-layer method.")
        n_layers = config.num_hidden_layers
        if opts.adapter_layers > n_layers:
            raise ConfigError(f"`llama_adapter.adapter_layers` is {opts.adapter_layers} but the model has only "
                              f"{n_layers} layers: set it to at most {n_layers} (0: every layer).")
        peft_config = AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=opts.adapter_len,
                                           adapter_layers=opts.adapter_layers or n_layers)
        return get_peft_model(model, peft_config)

    def load(self, base_model, path):
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, str(path))


register(LlamaAdapter())
