"""Continued pre-training: plain text, packed into full rows, loss on every token.

    tuneforge train examples/pt_tiny.yaml

Reads top to bottom: set up the run, the model with its method, the data, train, save.
"""

from __future__ import annotations

from tuneforge.training.loop import Stage, Trainer, TrainResult, describe_model
from tuneforge.training.setup import save_final, setup_data, setup_model, setup_run


class PretrainStage(Stage):
    """Next-token cross-entropy on every text token; packed documents never attend to each other."""


def run(cfg, log=print) -> TrainResult:
    runtime = setup_run(cfg)
    model, tokenizer, method = setup_model(cfg, runtime)
    if runtime.is_main:
        log(describe_model(model, method))
    train, evals, collate = setup_data(cfg, tokenizer, "pt", runtime, log)
    trainer = Trainer(cfg, runtime, model, method, train, evals, collate, PretrainStage(), log)
    result = trainer.train()
    if result.finished:
        save_final(cfg, model, method, tokenizer, runtime)
    if runtime.is_main and result.finished:
        log(f"done: {result.steps} steps, final loss {result.final_loss}, eval loss {result.eval_loss}; "
            f"saved to {cfg.output_dir}")
    return result
