"""Supervised fine-tuning: chat rows rendered with the model's chat template, loss on the assistant turns.

    tuneforge train examples/sft_lora_tiny.yaml

Reads top to bottom: set up the run, the model with its method, the data, train, save.
"""

from __future__ import annotations

from tuneforge.training.loop import Stage, Trainer, TrainResult, describe_model
from tuneforge.training.setup import save_final, setup_data, setup_model, setup_run


class SFTStage(Stage):
    """Next-token cross-entropy on the label tokens (assistant replies by default; see `data.loss_on`)."""


def run(cfg, log=print) -> TrainResult:
    runtime = setup_run(cfg)
    model, tokenizer, method = setup_model(cfg, runtime)
    if runtime.is_main:
        log(describe_model(model, method))
    train, evals, collate = setup_data(cfg, tokenizer, "sft", runtime, log)
    trainer = Trainer(cfg, runtime, model, method, train, evals, collate, SFTStage(), log)
    result = trainer.train()
    if result.finished:
        save_final(cfg, model, method, tokenizer, runtime)
    if runtime.is_main and result.finished:
        log(f"done: {result.steps} steps, final loss {result.final_loss}, eval loss {result.eval_loss}; "
            f"saved to {cfg.output_dir}")
    return result
