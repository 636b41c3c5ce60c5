"""Training stages, one file each: `RECIPES[stage]` is the module whose `run(cfg)` trains that stage."""

RECIPES = {"pt": "tuneforge.recipes.pt", "sft": "tuneforge.recipes.sft", "rm": "tuneforge.recipes.rm",
           "dpo": "tuneforge.recipes.dpo", "kto": "tuneforge.recipes.kto", "coh": "tuneforge.recipes.coh",
           "ppo": "tuneforge.recipes.ppo", "grpo": "tuneforge.recipes.grpo"}
