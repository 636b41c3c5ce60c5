"""`tuneforge train CONFIG.yaml [key=value ...]`: load and check the config, then run its stage's recipe.

    tuneforge train examples/sft_lora_tiny.yaml training.max_steps=20 lora.rank=16
"""

from __future__ import annotations

import importlib

from tuneforge.configs.schema import load_train_config
from tuneforge.configs.typed import parse_override
from tuneforge.errors import UserError
from tuneforge.recipes import RECIPES
from tuneforge.training.interrupt import set_command


def run_config(cfg, log=print):
    recipe = importlib.import_module(RECIPES[cfg.stage])
    return recipe.run(cfg, log=log)


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        config = next((a for a in argv if a.endswith((".yaml", ".yml")) and "=" not in a), None)
        if config is not None:  # `tuneforge train training.lr=1e-4 run.yaml`
            rest = [a for a in argv if a != config]
            for item in rest:  # a flag (`--resume`) is said as such, not moved into a suggestion that fails too
                parse_override(item)
            rest = " ".join(rest)
            raise UserError(f"The config file comes first, then the overrides: `tuneforge train {config} {rest}`.")
        raise UserError("Usage: tuneforge train CONFIG.yaml [key=value ...]; see `tuneforge train --help`.")
    cfg = load_train_config(argv[0], argv[1:])
    set_command(argv)
    try:
        result = run_config(cfg)
    finally:
        set_command(None)  # a later in-process run (tests, notebooks) must not print these arguments
    # a run stopped by SIGINT/SIGTERM (checkpoint saved) exits like the signal would: schedulers see "not done"
    return 128 + result.interrupted if getattr(result, "interrupted", None) else 0
