"""LoRA through PEFT (Hu et al., 2021, https://arxiv.org/abs/2106.09685).

PEFT owns the layers and the adapter folder format, so a saved adapter loads with `peft.PeftModel.from_pretrained`.
Variants (rsLoRA, DoRA, PiSSA, LoRA+) reuse `LoraOptions` and override only what differs.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.configs.typed import opt
from tuneforge.errors import ConfigError
from tuneforge.methods import register
from tuneforge.methods.base import Method, save_peft, unwrap


@dataclass
class LoraOptions:
    rank: int = opt(8, "LoRA rank r: the width of the low-rank update. Raise it before switching to full tuning.")
    alpha: float = opt(16.0, "LoRA alpha: the update is scaled by alpha/r (alpha/sqrt(r) for rslora).")
    dropout: float = opt(0.0, "Dropout on the LoRA input.")
    target_modules: list[str] = opt(factory=lambda: ["all-linear"],
                                    help="Module names to adapt (e.g. [q_proj, v_proj]) or [all-linear].")
    modules_to_save: list[str] = opt(factory=list, help="Extra modules trained in full and saved with the adapter "
                                                        "(e.g. [embed_tokens, lm_head] when adding tokens).")
    bias: str = opt("none", "Which biases train alongside: none, all or lora_only.")


def peft_target_modules(opts: LoraOptions):
    if opts.target_modules == ["all-linear"]:
        return "all-linear"
    return list(opts.target_modules)


def check_target_names(model, targets: list[str], key: str, any_module: bool = False) -> None:
    """Each plain module name in `targets` must name a module: PEFT refuses only a target list where none matches
    (`[q_proj, vv_proj]` trained q_proj alone) and takes any `modules_to_save` name (a typo saved nothing extra),
    without a word."""
    import torch

    if targets == ["all-linear"]:
        return
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        kinds = (torch.nn.Linear, torch.nn.Embedding) if any_module else (torch.nn.Linear,)
        known = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, kinds)})
        what = "linear and embedding layers" if any_module else "linear layers"
        raise ConfigError(f"`{key}`: {', '.join(f'`{m}`' for m in missing)} names no module of this model. Its "
                          f"{what} are {', '.join(known)}{'' if any_module else ' (or use [all-linear])'}.")


class Lora(Method):
    name = "lora"
    section = "lora"
    Options = LoraOptions
    saves_adapter = True
    summary = "Low-rank updates on chosen linear layers (PEFT). The usual starting point."
    guide = "Start here on a chat model; raise the rank (or use all-linear) before going full."

    def validate(self, cfg):
        o = cfg.options(self.section)
        if o.rank < 1:
            raise ConfigError(f"`lora.rank` must be at least 1, got {o.rank}.")
        if not 0.0 <= o.dropout < 1.0:
            raise ConfigError(f"`lora.dropout` must be in [0, 1), got {o.dropout}.")
        if o.alpha <= 0:  # the update is scaled by alpha / rank: 0 trains nothing, a negative alpha flips it
            raise ConfigError(f"`lora.alpha` must be > 0 (the update is scaled by alpha / rank), got {o.alpha}.")
        if o.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"`lora.bias` must be none, all or lora_only, got {o.bias!r}.")
        if not o.target_modules:
            raise ConfigError("`lora.target_modules` is empty; use [all-linear] or name modules like [q_proj, v_proj].")

    def peft_config(self, opts: LoraOptions, tied: bool = False):
        """`tied`: the model ties lm_head to embed_tokens and the adapter trains one of them; PEFT then keeps the two
        one tensor (ensure_weight_tying). Without it each got its own trained copy, twice the trainable weights, and
        a merged export (tie_word_embeddings still true) kept only one of the two."""
        from peft import LoraConfig

        return LoraConfig(r=opts.rank, lora_alpha=opts.alpha, lora_dropout=opts.dropout,
                          target_modules=peft_target_modules(opts), modules_to_save=opts.modules_to_save or None,
                          bias=opts.bias, task_type="CAUSAL_LM", **({"ensure_weight_tying": True} if tied else {}),
                          **self.extra_peft_kwargs(opts))

    def extra_peft_kwargs(self, opts) -> dict:
        """What a LoRA variant changes in `peft.LoraConfig`."""
        return {}

    def apply(self, model, opts, cfg):
        from peft import get_peft_model

        check_target_names(model, opts.target_modules, f"{self.section}.target_modules")
        check_target_names(model, opts.modules_to_save or [], f"{self.section}.modules_to_save", any_module=True)
        try:
            return get_peft_model(model, self.peft_config(opts, trains_tied_embeddings(model, opts)))
        except ValueError as e:  # PEFT says which target modules were not found
            raise ConfigError(f"`{self.section}.target_modules`: {e}") from e

    def notes(self, model, tokenizer, cfg) -> list[str]:
        """A rank at least the smaller side of an adapted layer is no longer low-rank: the adapter then holds as many
        weights as that layer or more, and trains what full fine-tuning of it would, at a higher cost."""
        full = {}
        for name, module in unwrap(model).named_modules():
            ranks = getattr(module, "r", None)
            if isinstance(ranks, dict) and ranks and hasattr(module, "in_features"):
                side = min(module.in_features, module.out_features)
                if max(ranks.values()) >= side:
                    full.setdefault(name.rsplit(".", 1)[-1], (max(ranks.values()), module.in_features,
                                                             module.out_features))
        if not full:
            return []
        shown = ", ".join(f"{n} ({i}x{o})" for n, (_, i, o) in sorted(full.items()))
        rank = max(r for r, _, _ in full.values())
        return [f"note: {self.section}.rank {rank} is at least the smaller side of {shown}: those adapters are not "
                f"low-rank and hold as many weights as the layers or more; use a rank well below it, or method full "
                f"(or freeze) to train the layers themselves"]

    def save(self, model, out_dir):
        save_peft(model, out_dir)

    def load(self, base_model, path):
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, str(path))

    def merge(self, model):
        return unwrap(model).merge_and_unload()


register(Lora())


def trains_tied_embeddings(model, opts: LoraOptions) -> bool:
    """Whether `model` ties its output layer to its input embeddings and the adapter names either of them, in
    modules_to_save or an explicit target_modules list."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None or inputs.weight is not outputs.weight:
        return False
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module in (inputs, outputs)}
    targets = opts.target_modules if isinstance(opts.target_modules, list) else []
    return any(str(n).rsplit(".", 1)[-1] in names for n in [*(opts.modules_to_save or []), *targets])
