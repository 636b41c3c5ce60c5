"""`bitfit`: train only the bias terms (Ben Zaken et al., 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models", https://arxiv.org/abs/2106.10199), optionally with the norm weights.

Hand-written because PEFT has no BitFit (its `bias="all"` option only rides along with LoRA). It is a freezing rule,
nothing is injected: the trained tensors are the model's own, so merging is trivial and the result is saved as a
full Hugging Face model folder (simple to load anywhere; the few changed tensors are not saved separately).

Many current decoders (Llama, Mistral) have no bias at all; Qwen2 has biases on q/k/v only. For a bias-free model,
`apply` refuses to train nothing and suggests `include_norms` or another method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuneforge.configs.typed import opt
from tuneforge.errors import ConfigError
from tuneforge.methods import register
from tuneforge.methods.base import Method, freeze_all, unwrap


@dataclass
class BitFitOptions:
    include_norms: bool = opt(False, "Also train the LayerNorm/RMSNorm weights (needed for models without biases, "
                                     "such as Llama).")


def is_norm(module: torch.nn.Module) -> bool:
    """LayerNorm, RMSNorm and the model-specific copies transformers defines (LlamaRMSNorm, Qwen2RMSNorm, ...)."""
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)) or type(module).__name__.endswith(
        ("LayerNorm", "RMSNorm"))


def bitfit_parameter_names(model: torch.nn.Module, include_norms: bool) -> list[str]:
    """Names of the parameters BitFit trains: every `*.bias`, plus all norm parameters when asked."""
    names = {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"}
    if include_norms:
        for mod_name, module in model.named_modules():
            if is_norm(module):
                names.update(f"{mod_name}.{n}" if mod_name else n for n, _ in module.named_parameters(recurse=False))
    return sorted(names)


class BitFit(Method):
    name = "bitfit"
    section = "bitfit"
    Options = BitFitOptions
    summary = "Only bias terms train (optionally norm weights too); a tiny share of parameters. Merges trivially."
    guide = "A very cheap baseline for models with biases (Qwen2 q/k/v); on bias-free Llama it has little to train."

    def apply(self, model, opts, cfg):
        base = unwrap(model)
        names = set(bitfit_parameter_names(base, opts.include_norms))
        if not names:
            kind = type(base).__name__
            if opts.include_norms:
                raise ConfigError(f"Method `bitfit`: this model ({kind}) has neither bias terms nor norm layers, so "
                                  f"nothing would train. Choose another method (e.g. `lora`).")
            raise ConfigError(f"Method `bitfit`: this model ({kind}) has no bias terms, so BitFit would train "
                              f"nothing. Set `bitfit.include_norms: true` to also train the LayerNorm/RMSNorm "
                              f"weights, or choose another method (e.g. `lora` or `ia3`).")
        freeze_all(base)
        for n, p in base.named_parameters():
            if n in names:
                p.requires_grad_(True)
        return model

    def merge(self, model):
        return unwrap(model)  # the trained biases/norms are the model's own tensors


register(BitFit())
