"""`full` (every weight trains) and `freeze` (only the last N blocks, or modules matching patterns)."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import torch

from tuneforge.configs.typed import opt
from tuneforge.errors import ConfigError
from tuneforge.methods import register
from tuneforge.methods.base import Method, freeze_all, unwrap


class Full(Method):
    name = "full"
    summary = "Every weight trains. Most memory (16 bytes/param with mixed-precision AdamW); best ceiling."
    guide = "You have the memory (16 bytes/param) and lots of data, or LoRA at high rank still underfits."

    def apply(self, model, opts, cfg):
        for p in model.parameters():
            p.requires_grad_(True)
        return model


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The stack of transformer blocks (e.g. `model.layers` for Llama/Qwen2): the longest ModuleList."""
    best = None
    for name, module in unwrap(model).named_modules():
        if isinstance(module, torch.nn.ModuleList) and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise ConfigError("Could not find the transformer blocks of this model; use `freeze.trainable_modules` "
                          "patterns instead of `freeze.trainable_layers`.")
    return best


@dataclass
class FreezeOptions:
    trainable_layers: int = opt(2, "Train the last N transformer blocks (negative: the first |N|). 0: none, use "
                                   "trainable_modules only.")
    trainable_modules: list[str] = opt(factory=list, help="Also train parameters whose names match these patterns "
                                       "(glob like `*.mlp.*` or regex like `re:.*norm.*`).")
    layer_lr_decay: float = opt(1.0, "Layer-wise learning-rate decay: block k below the top trains at "
                                     "lr * decay**k (1.0 = same lr everywhere).")


def _matches(name: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"*{pattern}*"):
            return True
    return False


class Freeze(Method):
    name = "freeze"
    section = "freeze"
    Options = FreezeOptions
    summary = "Only the last N blocks (or named modules) train; the rest is frozen."
    guide = "A middle ground on one GPU: adapt the top layers fully when LoRA is not enough and full is too big."

    def validate(self, cfg):
        o = cfg.options("freeze")
        if o.trainable_layers == 0 and not o.trainable_modules:
            raise ConfigError("`freeze.trainable_layers` is 0 and `freeze.trainable_modules` is empty: nothing "
                              "would train. Set one of them.")
        if not 0.0 < o.layer_lr_decay <= 1.0:
            raise ConfigError(f"`freeze.layer_lr_decay` must be in (0, 1], got {o.layer_lr_decay}.")

    def trainable_blocks(self, model, opts) -> list[tuple[int, str]]:
        """(depth below the top, parameter-name prefix) of each trainable block."""
        stack_name, layers = decoder_layers(model)
        n = opts.trainable_layers
        if abs(n) > len(layers):
            raise ConfigError(f"`freeze.trainable_layers` is {n} but the model has only {len(layers)} blocks: set "
                              f"it to at most {len(layers)} (from the top; -N counts from the bottom), or use "
                              f"`method: full` to train every weight.")
        idx = range(len(layers) - n, len(layers)) if n > 0 else range(0, -n)
        return [(len(layers) - 1 - i, f"{stack_name}.{i}.") for i in idx]

    def apply(self, model, opts, cfg):
        freeze_all(model)
        prefixes = [p for _, p in self.trainable_blocks(model, opts)] if opts.trainable_layers else []
        names = [name for name, _ in unwrap(model).named_parameters()]
        unmatched = [pattern for pattern in opts.trainable_modules if not any(_matches(n, [pattern]) for n in names)]
        if unmatched:  # a typo (`embed_token`) would train less than asked, without a word
            raise ConfigError(f"`freeze.trainable_modules`: {', '.join(f'`{u}`' for u in unmatched)} matched no "
                              f"parameter of this model. Parameter names look like {', '.join(names[:3])}; fix or "
                              f"drop the pattern.")
        for name, p in unwrap(model).named_parameters():
            if any(name.startswith(pre) for pre in prefixes) or _matches(name, opts.trainable_modules):
                p.requires_grad_(True)
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(f"`freeze.trainable_modules` {opts.trainable_modules} matched no parameter names.")
        return model

    def param_groups(self, model, opts, lr, weight_decay):
        if opts.layer_lr_decay == 1.0 or not opts.trainable_layers:
            return super().param_groups(model, opts, lr, weight_decay)
        blocks = self.trainable_blocks(model, opts)
        groups: dict[int, list] = {}
        for name, p in unwrap(model).named_parameters():
            if not p.requires_grad:
                continue
            depth = next((d for d, pre in blocks if name.startswith(pre)), 0)
            groups.setdefault(depth, []).append(p)
        return [{"params": ps, "lr": lr * opts.layer_lr_decay ** d, "weight_decay": weight_decay}
                for d, ps in sorted(groups.items())]


register(Full())
register(Freeze())
