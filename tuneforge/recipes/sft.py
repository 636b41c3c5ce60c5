"""Supervised fine-tuning: chat rows rendered with the model's chat template, loss on the assistant turns.

    tuneforge train examples/sft_lora_tiny.yaml

What is specific to this stage is its loss (the Stage below); the run itself (runtime, model +
method, data, train, save) is `tuneforge.training.setup.run_stage`.
"""

from __future__ import annotations

from tuneforge.training.loop import Stage, TrainResult
from tuneforge.training.setup import run_stage


class SFTStage(Stage):
    """Next-token cross-entropy on the label tokens (assistant replies by default; see `data.loss_on`)."""


def run(cfg, log=print) -> TrainResult:
    return run_stage(cfg, "sft", SFTStage(), log)
