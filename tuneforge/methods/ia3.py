"""IA3 through PEFT (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", https://arxiv.org/abs/2205.05638): learned vectors that rescale the keys, values and feed-forward
activations. Tiny (one number per channel), and it merges: a rescaled layer is a layer with rescaled weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.configs.typed import opt
from tuneforge.errors import ConfigError
from tuneforge.methods import register
from tuneforge.methods.base import Method, unwrap


@dataclass
class IA3Options:
    target_modules: list[str] = opt(factory=list, help="Modules whose activations are rescaled, e.g. [k_proj, "
                                    "v_proj, down_proj], or [all-linear]. Empty: PEFT's default for the "
                                    "architecture.")
    feedforward_modules: list[str] = opt(factory=list, help="Which of target_modules are feed-forward layers (their "
                                         "INPUT is rescaled, e.g. [down_proj]). Empty: PEFT's default.")


class IA3(Method):
    name = "ia3"
    section = "ia3"
    Options = IA3Options
    saves_adapter = True
    summary = "Learned rescaling vectors on keys, values and feed-forward activations (PEFT); tiny and mergeable."
    guide = "The smallest mergeable adapter; try it when LoRA overfits a small dataset."

    def validate(self, cfg):
        o = cfg.options(self.section)
        if o.feedforward_modules and not o.target_modules:
            raise ConfigError("`ia3.feedforward_modules` is set but `ia3.target_modules` is empty; name the targets "
                              "too, e.g. target_modules: [k_proj, v_proj, down_proj].")
        extra = sorted(set(o.feedforward_modules) - set(o.target_modules))
        if extra and o.target_modules != ["all-linear"]:
            raise ConfigError(f"`ia3.feedforward_modules` {extra} must also be listed in `ia3.target_modules`.")

    def peft_config(self, opts: IA3Options):
        from peft import IA3Config

        if not opts.target_modules:
            return IA3Config(task_type="CAUSAL_LM")
        if opts.target_modules == ["all-linear"]:  # offered by the unknown-target error; PEFT wants a string
            # PEFT's default feed-forward layers (down_proj, ...) unless named
            return IA3Config(task_type="CAUSAL_LM", target_modules="all-linear",
                             feedforward_modules=list(opts.feedforward_modules) or None)
        return IA3Config(task_type="CAUSAL_LM", target_modules=list(opts.target_modules),
                         feedforward_modules=list(opts.feedforward_modules))

    def apply(self, model, opts, cfg):
        from peft import get_peft_model

        from tuneforge.methods.lora import check_target_names

        # PEFT refuses only a list where no name matches, and says so without naming a valid one
        check_target_names(model, list(opts.target_modules), f"{self.section}.target_modules")
        try:
            return get_peft_model(model, self.peft_config(opts))
        except ValueError as e:  # unknown architecture without defaults, or targets not found
            raise ConfigError(f"`ia3.target_modules`: {e}") from e

    def load(self, base_model, path):
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, str(path))

    def merge(self, model):
        return unwrap(model).merge_and_unload()


register(IA3())
