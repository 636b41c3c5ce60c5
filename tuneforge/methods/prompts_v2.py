"""`p_tuning_v2`: deep prompt tuning (Liu et al., 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning
Universally Across Scales and Tasks", https://arxiv.org/abs/2110.07602): learned key/value prefixes in the attention
of EVERY layer, trained directly (no MLP re-parameterisation).

This is a thin wrapper over PEFT: PEFT's prefix tuning with `prefix_projection=False` is exactly P-tuning v2 (its
`PrefixEncoder` is ported from the P-tuning v2 reference code: one [num_virtual_tokens, layers*2*kv_dim] table fed
to every layer as past key/values). So the result saves in PEFT format, loads with `peft.PeftModel.from_pretrained`,
and PEFT handles the prefix at generation time. What we add is the `text` initialisation (Li & Liang, 2021, found
initialising prefixes with the activations of real words more stable than random): the prefix starts as the model's
own keys/values for `init_text`, i.e. exactly as if that text had been prepended to every input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from tuneforge.configs.typed import opt
from tuneforge.errors import ConfigError
from tuneforge.methods import register
from tuneforge.methods.base import Method, unwrap
from tuneforge.methods.prompts import init_text_cut_note


@dataclass
class PTuningV2Options:
    num_virtual_tokens: int = opt(20, "Prefix length: learned key/value positions added to every layer.")
    init: Literal["random", "zero", "text"] = opt(
        "random", "Prefix initialisation: random (PEFT's default, N(0, 1); on a pretrained chat model the loss "
                  "starts far above the base's, SmolLM2-135M: 11.6 vs 2.2), zero, or text (the model's own keys/"
                  "values for `init_text`, as if that text were prepended; the most stable start, best for a "
                  "pretrained model).")
    init_text: str | None = opt(None, "Text for init: text (repeated or cut to num_virtual_tokens tokens).")


def fit_ids(ids: list[int], n: int) -> list[int]:
    """Repeat or cut token ids to exactly n (what PEFT's prompt tuning does for its text init)."""
    if not ids:
        raise ConfigError("`p_tuning_v2.init_text` tokenizes to no tokens; give a non-empty text.")
    return (ids * (n // len(ids) + 1))[:n]


@torch.no_grad()
def prefix_table_from_ids(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """The model's keys/values for `ids`, laid out as PEFT's prefix table: [n, layers * 2 * kv_heads * head_dim],
    where row t holds (K_0, V_0, K_1, V_1, ...) of position t (PEFT views it as [n, 2L, heads, head_dim])."""
    was_training = model.training
    model.eval()
    input_ids = torch.tensor([ids], device=next(model.parameters()).device)
    cache = model(input_ids=input_ids, use_cache=True).past_key_values
    model.train(was_training)
    per_layer = []
    for layer in cache.layers:  # keys/values: [1, kv_heads, n, head_dim]
        per_layer += [layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)]  # [n, kv_heads, head_dim]
    table = torch.stack(per_layer, dim=1)  # [n, 2L, kv_heads, head_dim]
    return table.reshape(len(ids), -1).float()


def _tokenizer_for(model: torch.nn.Module, cfg):
    from transformers import AutoTokenizer

    source = getattr(unwrap(model), "name_or_path", None) or getattr(getattr(cfg, "model", None), "name_or_path", None)
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"`p_tuning_v2.init: text` needs the model's tokenizer, which could not be loaded from "
                          f"{source!r} ({e}). Use `init: random`.") from e


class PTuningV2(Method):
    name = "p_tuning_v2"
    section = "p_tuning_v2"
    Options = PTuningV2Options
    mergeable = False
    saves_adapter = True
    packs = False
    summary = "Deep prompts: learned key/values at every layer, no re-parameterisation (PEFT prefix tuning)."
    guide = "Prompt-style tuning that approaches fine-tuning quality across model sizes (deep prompts)."

    def validate(self, cfg):
        o = cfg.options(self.section)
        if o.num_virtual_tokens < 1:
            raise ConfigError(f"`p_tuning_v2.num_virtual_tokens` must be at least 1, got {o.num_virtual_tokens}.")
        if o.init == "text" and not o.init_text:
            raise ConfigError("`p_tuning_v2.init: text` needs `p_tuning_v2.init_text` (e.g. \"Answer the question "
                              "briefly.\").")
        if o.init != "text" and o.init_text:
            raise ConfigError("`p_tuning_v2.init_text` is set but `p_tuning_v2.init` is not `text`; set init: text.")
        if cfg.training.gradient_checkpointing:  # get_peft_model raises a bare ValueError for this combination
            raise ConfigError("`training.gradient_checkpointing` does not work with `p_tuning_v2`: PEFT's prefix "
                              "tuning refuses gradient checkpointing. Set training.gradient_checkpointing: false "
                              "or use `lora`.")

    def peft_config(self, opts: PTuningV2Options):
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=opts.num_virtual_tokens,
                                  prefix_projection=False, init_weights="zero" if opts.init == "zero" else None)

    def apply(self, model, opts, cfg):
        from peft import get_peft_model

        table = None
        if opts.init == "text":
            ids = _tokenizer_for(model, cfg)(opts.init_text, add_special_tokens=False)["input_ids"]
            table = prefix_table_from_ids(unwrap(model), fit_ids(ids, opts.num_virtual_tokens))
        peft_model = get_peft_model(model, self.peft_config(opts))
        if table is not None:
            peft_model.prompt_encoder[peft_model.active_adapter].load_prompt_embeddings(table)
        return peft_model

    def notes(self, model, tokenizer, cfg):
        """`fit_ids` cuts an init_text longer than num_virtual_tokens; say so, as prompt_tuning does."""
        o = cfg.options(self.section)
        if o.init != "text":
            return []
        ids = tokenizer(o.init_text, add_special_tokens=False)["input_ids"]  # as `apply` tokenizes it
        return init_text_cut_note(self.section, ids, o.num_virtual_tokens, tokenizer)

    def load(self, base_model, path):
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, str(path))


register(PTuningV2())
