"""LoRA variants through PEFT: rsLoRA, DoRA, PiSSA, OLoRA, LoRA+ (and LoftQ, which lives in `qlora.py`).

All of them read their LoRA shape from the shared `lora` config section (rank, alpha, dropout, target_modules,
modules_to_save, bias) and differ only in what `peft.LoraConfig` gets or, for LoRA+, in the optimizer groups.
Saved folders are ordinary PEFT LoRA adapters: `peft.PeftModel.from_pretrained(base, folder)` loads them onto the
unmodified base model.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from tuneforge.configs.typed import opt
from tuneforge.errors import ConfigError
from tuneforge.methods import get_method, register
from tuneforge.methods.base import save_peft, unwrap
from tuneforge.methods.lora import Lora


class LoraVariant(Lora):
    """A LoRA variant configured by the `lora` section (validation and PEFT wiring come from `Lora`)."""

    section = "lora"
    uses_sections = ("lora",)  # every config section this method reads (for the resolved-config dump)


class RsLora(LoraVariant):
    """rsLoRA (Kalajdzievski, 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA",
    https://arxiv.org/abs/2312.03732): scale the update by alpha/sqrt(r) instead of alpha/r, so high ranks keep
    learning instead of having their updates shrunk."""

    name = "rslora"
    summary = "LoRA scaled by alpha/sqrt(r): higher ranks keep learning (PEFT use_rslora)."
    guide = "LoRA with rank 64+: keeps the effective step size stable as the rank grows."

    def extra_peft_kwargs(self, opts):
        return {"use_rslora": True}


class Dora(LoraVariant):
    """DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", https://arxiv.org/abs/2402.09353):
    split each weight into magnitude (a trained vector per output feature) and direction (updated by LoRA)."""

    name = "dora"
    summary = "LoRA on the direction plus a trained magnitude vector per output (PEFT use_dora). Slower, closer to full."
    guide = "When LoRA lags full fine-tuning at the same rank and you can afford ~1.5x step time."

    def extra_peft_kwargs(self, opts):
        return {"use_dora": True}


class MutatingInitLora(LoraVariant):
    """A LoRA whose initialisation moves part of each base weight into the adapter (W = W_res + B0 A0).

    Training happens on the residual base W_res, so the raw adapter only fits that mutated base. On save we convert
    it with PEFT into a plain LoRA of rank 2r for the ORIGINAL base (A' = [A; A0], B' = [B, -B0]): the saved folder
    loads with `PeftModel.from_pretrained` onto the unmodified model. The initial adapter is kept in memory on the
    model; the init is deterministic, so resuming re-creates the same W_res.
    """

    init: str = ""

    def extra_peft_kwargs(self, opts):
        return {"init_lora_weights": self.init}

    def apply(self, model, opts, cfg):
        from peft.utils import get_peft_model_state_dict

        model = super().apply(model, opts, cfg)
        initial = get_peft_model_state_dict(model)
        model.tuneforge_initial_adapter = {k: v.detach().clone() for k, v in initial.items()}
        return model

    def save(self, model, out_dir):
        from safetensors.torch import save_file

        peft_model = unwrap(model)
        initial = getattr(peft_model, "tuneforge_initial_adapter", None)
        if initial is None:  # loaded from an already converted folder: it is a plain LoRA now
            return super().save(model, out_dir)
        with tempfile.TemporaryDirectory() as tmp:
            init_dir = Path(tmp) / "initial"  # PEFT writes the config here and loads it as adapter "initial"
            init_dir.mkdir()
            save_file({k: v.contiguous() for k, v in initial.items()}, str(init_dir / "adapter_model.safetensors"))
            trainable = [p for p in peft_model.parameters() if p.requires_grad]
            with warnings.catch_warnings():
                # PEFT loads the initial adapter beside the trained one to convert it, and warns that PiSSA/OLoRA
                # "should not be used with other adapters; consider converting": this is that conversion
                warnings.filterwarnings("ignore", message=r"(PiSSA|OLoRA|CorDA) changes the base weights")
                save_peft(peft_model, out_dir, path_initial_model_for_weight_conversion=str(init_dir))
            for p in trainable:  # loading/deleting the helper adapter must not change what trains
                p.requires_grad_(True)


class Pissa(MutatingInitLora):
    """PiSSA (Meng et al., 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language
    Models", https://arxiv.org/abs/2404.02948): initialise A and B from the top-r singular vectors of each weight and
    freeze the residual, so training starts on the principal directions (faster convergence than zero-init B)."""

    name = "pissa"
    init = "pissa"
    summary = "LoRA initialised from the top singular vectors of each weight (PEFT); saved as a plain LoRA."
    guide = "Faster convergence than LoRA at the same rank; the saved adapter is a plain LoRA for the original base."


class Olora(MutatingInitLora):
    """OLoRA (Büyükakyüz, 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models",
    https://arxiv.org/abs/2406.01775): initialise A and B from a QR decomposition of each weight (orthonormal B)."""

    name = "olora"
    init = "olora"
    summary = "LoRA initialised from a QR decomposition of each weight (PEFT); saved as a plain LoRA."
    guide = "Like PiSSA with a cheaper QR init; the saved adapter is a plain LoRA for the original base."


@dataclass
class LoraPlusOptions:
    ratio: float = opt(16.0, "LoRA+ learning-rate ratio: the B matrices train at lr * ratio, the A matrices at lr. "
                             "The paper suggests 2**4 = 16. The LoRA shape comes from the `lora` section.")


class LoraPlus(LoraVariant):
    """LoRA+ (Hayou et al., 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models",
    https://arxiv.org/abs/2402.12354): the same adapter as LoRA, trained with a higher learning rate for B than for A.

    Options: `lora_plus.ratio`, plus the usual `lora` section for the adapter shape. The groups follow PEFT's
    `peft.optimizers.create_loraplus_optimizer`; we build groups rather than call it because the training loop owns
    optimizer construction (schedule, resume, 8-bit optimizers).
    """

    name = "lora_plus"
    section = "lora_plus"
    Options = LoraPlusOptions
    uses_sections = ("lora", "lora_plus")
    summary = "LoRA with a higher learning rate (lr * ratio) for the B matrices (LoRA+ optimizer groups)."
    guide = "Same cost as LoRA, often faster convergence: set lora_plus.ratio (paper: 16)."

    def validate(self, cfg):
        get_method("lora").validate(cfg)
        ratio = cfg.options("lora_plus").ratio
        if ratio <= 0:
            raise ConfigError(f"`lora_plus.ratio` must be positive (the paper uses 16), got {ratio}.")

    def apply(self, model, opts, cfg):
        return get_method("lora").apply(model, cfg.options("lora"), cfg)

    def param_groups(self, model, opts, lr, weight_decay):
        a_params, b_params = [], []
        for name, p in unwrap(model).named_parameters():
            if p.requires_grad:
                (b_params if is_lora_b(name) else a_params).append(p)
        groups = [{"params": a_params, "lr": lr, "weight_decay": weight_decay},
                  {"params": b_params, "lr": lr * opts.ratio, "weight_decay": weight_decay}]
        return [g for g in groups if g["params"]]


def is_lora_b(name: str) -> bool:
    """B (up-projection) matrices of PEFT LoRA layers, in linear and embedding layers."""
    return ".lora_B." in name or ".lora_embedding_B." in name


register(RsLora())
register(Dora())
register(Pissa())
register(Olora())
register(LoraPlus())
