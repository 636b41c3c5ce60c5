"""Prompt-based methods through PEFT: `prompt_tuning`, `p_tuning`, `prefix_tuning` (`p_tuning_v2`: prompts_v2.py).

The base model stays frozen; what trains are virtual tokens (soft prompts) or per-layer key/value prefixes. PEFT's
`PeftModelForCausalLM` adds them in `forward` AND in `generate`, so a loaded adapter generates with its prompts.
None of them merges: there is no weight change equivalent to extra attention positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tuneforge.configs.typed import opt
from tuneforge.errors import ConfigError
from tuneforge.methods import register
from tuneforge.methods.base import Method, unwrap


class PromptMethod(Method):
    """Shared plumbing: PEFT prompt-learning config -> `get_peft_model`; PEFT folder format; no merge."""

    mergeable = False
    saves_adapter = True
    packs = False

    def validate(self, cfg):
        n = cfg.options(self.section).num_virtual_tokens
        if n < 1:
            raise ConfigError(f"`{self.section}.num_virtual_tokens` must be at least 1, got {n}.")

    def peft_config(self, opts, model, cfg):
        raise NotImplementedError

    def apply(self, model, opts, cfg):
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(opts, model, cfg))

    def load(self, base_model, path):
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, str(path))


@dataclass
class PromptTuningOptions:
    num_virtual_tokens: int = opt(20, "Soft-prompt length: learned embeddings put before every input.")
    init: Literal["random", "text"] = opt("random", "Start the soft prompt from random vectors or from the "
                                                    "embeddings of `init_text` (more stable, Lester et al.).")
    init_text: str | None = opt(None, "Text for init: text, e.g. 'Answer the question politely:' (its tokens are "
                                      "repeated or cut to num_virtual_tokens).")


def tokenizer_path(model, cfg) -> str:
    """A local folder with the model's tokenizer: where the model was loaded from, else `model.name_or_path`."""
    for candidate in (getattr(unwrap(model), "name_or_path", ""), cfg.model.name_or_path):
        if candidate and Path(candidate).is_dir():
            return str(candidate)
    raise ConfigError(f"`prompt_tuning.init: text` needs the model's tokenizer, but `model.name_or_path` "
                      f"({cfg.model.name_or_path!r}) is not a local folder. Use a local model folder or "
                      f"`prompt_tuning.init: random`.")


def init_text_cut_note(section: str, ids: list[int], n: int, tokenizer, counted: str = "") -> list[str]:
    """The note for an init_text of more tokens than `num_virtual_tokens`: only its first n tokens start the prompt,
    so its end (often the part that names the task) would otherwise be left out without a word. `counted`: how the
    tokens were counted, when that is not plain (PEFT counts the tokenizer's special tokens)."""
    if len(ids) <= n:
        return []  # a shorter text is repeated to fill the prompt, as the option's help says
    return [f"note: `{section}.init_text` is {len(ids)} tokens{counted} but `{section}.num_virtual_tokens` is {n}: "
            f"the prompt starts from the first {n} ({tokenizer.decode(ids[:n])!r}) and the rest "
            f"({tokenizer.decode(ids[n:])!r}) is not used. Set `{section}.num_virtual_tokens: {len(ids)}` to start "
            f"from the whole text, or shorten it"]


class PromptTuning(PromptMethod):
    """Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning",
    https://arxiv.org/abs/2104.08691): a trained soft prompt of `num_virtual_tokens` input embeddings."""

    name = "prompt_tuning"
    section = "prompt_tuning"
    Options = PromptTuningOptions
    summary = "A learned soft prompt (virtual input embeddings); the fewest trainable parameters (PEFT)."
    guide = "Many tasks on one frozen large model, with a few thousand parameters per task."

    def validate(self, cfg):
        super().validate(cfg)
        o = cfg.options(self.section)
        if o.init == "text" and not (o.init_text or "").strip():
            raise ConfigError("`prompt_tuning.init: text` needs `prompt_tuning.init_text`, e.g. 'Answer briefly:'.")
        if o.init != "text" and o.init_text:  # PEFT ignores the text under random init: the prompt would start random
            raise ConfigError("`prompt_tuning.init_text` is set but `prompt_tuning.init` is `random`, which ignores "
                              "it; set `prompt_tuning.init: text` to start from the text, or remove init_text.")

    def apply(self, model, opts, cfg):
        """PEFT loads the tokenizer itself to tokenize init_text (it takes no tokenizer or ids), so none is loaded
        here; a text of no tokens makes it divide by zero, which is said as a config error."""
        try:
            return super().apply(model, opts, cfg)
        except ZeroDivisionError as e:  # PEFT repeats the text's tokens len(prompt) / len(tokens) times
            if opts.init != "text":
                raise
            raise ConfigError(f"`prompt_tuning.init_text` {opts.init_text!r} gives no tokens with the tokenizer in "
                              f"{tokenizer_path(model, cfg)}; use a text of real words.") from e

    def peft_config(self, opts, model, cfg):
        from peft import PromptTuningConfig

        if opts.init == "random":
            return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=opts.num_virtual_tokens,
                                      prompt_tuning_init="RANDOM")
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=opts.num_virtual_tokens,
                                  prompt_tuning_init="TEXT", prompt_tuning_init_text=opts.init_text,
                                  tokenizer_name_or_path=tokenizer_path(model, cfg))

    def notes(self, model, tokenizer, cfg):
        """PEFT cuts an init_text longer than num_virtual_tokens to its first tokens without a word. Counted with the
        run's tokenizer (loaded from the same folder PEFT's is), tokenized as PEFT does: special tokens included."""
        config = getattr(unwrap(model), "peft_config", {}).get("default")
        if config is None or not getattr(config, "prompt_tuning_init_text", None):
            return []
        text = config.prompt_tuning_init_text
        ids = tokenizer(text)["input_ids"]
        if not tokenizer(text, add_special_tokens=False)["input_ids"]:  # PEFT started from the special tokens alone
            return [f"note: `{self.section}.init_text` {text!r} gives no tokens of its own with this tokenizer: the "
                    f"prompt starts from its special tokens only ({tokenizer.decode(ids)!r}). Use a text of real "
                    f"words, or `{self.section}.init: random`"]
        return init_text_cut_note(self.section, ids, config.num_virtual_tokens, tokenizer,
                                  " (counting the tokenizer's special tokens, as PEFT does)")


@dataclass
class PTuningOptions:
    num_virtual_tokens: int = opt(20, "Number of virtual tokens produced by the prompt encoder.")
    encoder: Literal["mlp", "lstm"] = opt("mlp", "Re-parameterisation of the virtual tokens: mlp (3 layers, "
                                                 "recommended by PEFT) or lstm (bidirectional LSTM + MLP, the paper).")
    encoder_hidden_size: int = opt(128, "Hidden size of the prompt encoder.")
    encoder_num_layers: int = opt(2, "LSTM layers (lstm encoder only).")
    encoder_dropout: float = opt(0.0, "Dropout inside the LSTM (lstm encoder with 2+ layers only).")


class PTuning(PromptMethod):
    """P-tuning (Liu et al., 2021, "GPT Understands, Too", https://arxiv.org/abs/2103.10385): virtual tokens produced
    by a small prompt encoder (MLP or LSTM) from trained embeddings. Saved adapters hold the encoder's output, so
    inference needs no encoder."""

    name = "p_tuning"
    section = "p_tuning"
    Options = PTuningOptions
    summary = "Virtual tokens from a trained MLP/LSTM prompt encoder (PEFT PromptEncoder)."
    guide = "Prompt tuning that trains more stably on small models (an MLP/LSTM re-parameterises the prompt)."

    def validate(self, cfg):
        super().validate(cfg)
        o = cfg.options(self.section)
        if o.encoder_hidden_size < 1 or o.encoder_num_layers < 1:
            raise ConfigError("`p_tuning.encoder_hidden_size` and `p_tuning.encoder_num_layers` must be at least 1.")
        if not 0.0 <= o.encoder_dropout < 1.0:
            raise ConfigError(f"`p_tuning.encoder_dropout` must be in [0, 1), got {o.encoder_dropout}.")

    def peft_config(self, opts, model, cfg):
        from peft import PromptEncoderConfig

        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=opts.num_virtual_tokens,
                                   encoder_reparameterization_type=opts.encoder.upper(),
                                   encoder_hidden_size=opts.encoder_hidden_size,
                                   encoder_num_layers=opts.encoder_num_layers, encoder_dropout=opts.encoder_dropout)


@dataclass
class PrefixTuningOptions:
    num_virtual_tokens: int = opt(20, "Prefix length: learned key/value positions in every attention layer.")
    projection: bool = opt(True, "Re-parameterise the prefix through a 2-layer MLP while training (Li & Liang); "
                                 "false trains the key/value table directly (like p_tuning_v2).")
    encoder_hidden_size: int = opt(128, "Hidden size of the projection MLP (projection: true only).")


class PrefixTuning(PromptMethod):
    """Prefix tuning (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
    https://arxiv.org/abs/2101.00190): trained key/value prefixes at every layer, optionally produced by an MLP."""

    name = "prefix_tuning"
    section = "prefix_tuning"
    Options = PrefixTuningOptions
    summary = "Learned key/value prefixes in every attention layer, with or without an MLP (PEFT)."
    guide = "Generation tasks with a frozen model; stronger than prompt tuning on small models."

    def validate(self, cfg):
        super().validate(cfg)
        if cfg.options(self.section).encoder_hidden_size < 1:
            raise ConfigError("`prefix_tuning.encoder_hidden_size` must be at least 1.")
        if cfg.training.gradient_checkpointing:  # get_peft_model raises a bare ValueError for this combination
            raise ConfigError("`training.gradient_checkpointing` does not work with `prefix_tuning`: PEFT's prefix "
                              "tuning refuses gradient checkpointing. Set training.gradient_checkpointing: false "
                              "or use `lora`.")

    def peft_config(self, opts, model, cfg):
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=opts.num_virtual_tokens,
                                  prefix_projection=opts.projection, encoder_hidden_size=opts.encoder_hidden_size)


register(PromptTuning())
register(PTuning())
register(PrefixTuning())
