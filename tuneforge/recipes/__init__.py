"""Training stages, one file each: `RECIPES[stage]` is the module whose `run(cfg)` trains that stage."""

RECIPES = {"pt": "tuneforge.recipes.pt", "sft": "tuneforge.recipes.sft", "ppo": "tuneforge.recipes.ppo",
           "grpo": "tuneforge.recipes.grpo"}
