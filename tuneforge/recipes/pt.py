"""Continued pre-training: plain text, packed into full rows, loss on every token.

    tuneforge train examples/pt_tiny.yaml

What is specific to this stage is its loss (the Stage below); the run itself (runtime, model +
method, data, train, save) is `tuneforge.training.setup.run_stage`.
"""

from __future__ import annotations

from tuneforge.training.loop import Stage, TrainResult
from tuneforge.training.setup import run_stage


class PretrainStage(Stage):
    """Next-token cross-entropy on every text token; packed documents never attend to each other."""


def run(cfg, log=print) -> TrainResult:
    return run_stage(cfg, "pt", PretrainStage(), log)
