"""What a fine-tuning method is: one small registered unit.

A method says how to prepare a loaded model for training (freeze, inject adapters), which parameters train (and
in which optimizer groups), how to save the result, how to load it back onto a base model, and whether/how it
merges. Adding a method = one file in this package + one import line in `tuneforge/methods/__init__.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tuneforge.errors import UserError


@dataclass
class NoOptions:
    """This method has no options of its own."""


class Method:
    """Base class; subclasses override what differs. Instances are stateless and shared."""

    name: str = ""
    section: str | None = None  # the config section holding `Options` (several methods may share one)
    Options: type = NoOptions
    mergeable: bool = True
    summary: str = ""  # one line for `tuneforge methods` and the README table
    guide: str = ""  # when to choose it, one line (README table)
    saves_adapter: bool = False  # True: output folder is a PEFT adapter, not a full model
    # False: virtual tokens or prefix keys go before the input, so a packed (or padding-free) row would give them to
    # its first example only and let its examples attend to each other: such rows are refused for the method
    packs: bool = True

    def supports(self, model_type: str) -> bool:
        """Whether the method can be applied to this architecture (a transformers `model_type`)."""
        return True

    def validate(self, cfg) -> None:
        """Refuse impossible option combinations before any work starts (raise ConfigError)."""

    def apply(self, model: torch.nn.Module, opts, cfg) -> torch.nn.Module:
        """Prepare `model` for training: freeze/inject. Returns the model to train."""
        raise NotImplementedError

    def param_groups(self, model: torch.nn.Module, opts, lr: float, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups. Default: every trainable parameter at `lr`."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]

    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        """Write the training result in Hugging Face (or PEFT) folder format."""
        from peft import PeftModel

        if isinstance(unwrap(model), PeftModel):
            return save_peft(model, out_dir)
        unwrap(model).save_pretrained(out_dir, safe_serialization=True)

    def load(self, base_model: torch.nn.Module, path: Path) -> torch.nn.Module:
        """Put a saved result back on a freshly loaded base model (for chat/eval). Full-model methods save a whole
        model, which is loaded directly instead, so the default is an error."""
        raise UserError(f"{path} holds a full model saved by `{self.name}`; pass it as --model, not --adapter.")

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        """A plain transformers model with the method folded into its weights."""
        if not self.mergeable:
            raise UserError(f"Method `{self.name}` cannot be merged into the base weights: it adds computation "
                            f"that has no equivalent weight change. Serve it as base model + adapter instead.")
        return unwrap(model)

    def notes(self, model: torch.nn.Module, tokenizer, cfg) -> list[str]:
        """What the user should hear about the method on this model once it is applied (said after the trainable
        parameter count); `tokenizer` and `cfg` are the run's. Default: nothing."""
        return []

    def trainable_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The trainable tensors, by name: what a resumable checkpoint must hold."""
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under DDP/FSDP wrappers (their `.module`)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def save_peft(model: torch.nn.Module, out_dir: Path, **kwargs) -> None:
    """PEFT's `save_pretrained`, told whether the embedding matrices belong in the adapter. Left on "auto", PEFT
    re-reads the base model's config to guess whether the vocabulary was resized (from the Hub for a hub id: a
    network call, and offline a raw "Could not find a config file" warning) and warns whichever way it decides. We
    know: the embeddings differ from the base's only where our loader resized them (`vocab_resized`); a LoRA on
    embed_tokens/lm_head saves its own A/B matrices either way."""
    peft_model = unwrap(model)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True,
                               save_embedding_layers=vocab_resized(peft_model), **kwargs)


def vocab_resized(model: torch.nn.Module) -> bool:
    """Whether `load_model_and_tokenizer` added embedding rows (a new pad token) to this model or the one under it."""
    from tuneforge.models.loading import VOCAB_RESIZED

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, VOCAB_RESIZED, False))


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        if hasattr(p, "quant_state") or p.dtype == torch.uint8:  # packed 4-bit weights hold 2 params per byte
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def freeze_all(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
