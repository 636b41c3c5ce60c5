"""Reward model: the base model plus a scalar head, trained on preference pairs with the Bradley-Terry loss.

    tuneforge train examples/rm_tiny.yaml

Each pair is rendered with the chat template (same encoder as SFT); the B chosen and B rejected rows of a
micro-batch go through the model as one batch, the head reads each row's last real token (found from the attention
mask: pad == eos tokenizers are safe), and the loss is -log sigmoid(r_chosen - r_rejected - margin)
(tuneforge/losses/reward.py). Logged: pairwise accuracy (share of pairs with r_chosen > r_rejected).

The output folder is a Hugging Face sequence classifier with one label (for adapter methods: the merged weights and
the head, with the adapter itself kept beside it in `adapter/`), loadable with
`AutoModelForSequenceClassification.from_pretrained(output_dir, num_labels=1)` or TuneForge's
`tuneforge.models.reward.load_reward_model(output_dir)`, which PPO uses.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tuneforge.errors import ConfigError
from tuneforge.losses import reward_pairwise_loss
from tuneforge.methods.base import unwrap
from tuneforge.models.reward import RewardModel, pick_pad_token, save_reward_model, transformer_of
from tuneforge.training.loop import Stage, Trainer, TrainResult
from tuneforge.training.metrics import record_metric
from tuneforge.training.model_card import record_base
from tuneforge.training.setup import done_line, read_data, save_final, setup_data, setup_model, setup_run


class RewardStage(Stage):
    """One Bradley-Terry term per pair; rows 0..B-1 are the chosen replies, rows B..2B-1 their rejected ones."""

    def __init__(self, use_margin: bool):
        self.use_margin = use_margin

    def targets(self, batch: dict) -> int:
        return int(batch["margin"].shape[0])

    def head_positions(self, batch: dict) -> int:
        return 0  # the LM's output layer never runs: the score head reads the hidden states

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        scores = model(**model_inputs(batch))
        chosen, rejected = scores.chunk(2)
        losses, metrics = reward_pairwise_loss(chosen, rejected, batch["margin"] if self.use_margin else None)
        return losses.sum(), {"accuracy": metrics["rewards/accuracies"],  # per pair: averaged over the step
                              "reward_margin": metrics["rewards/margins"]}


def model_inputs(batch: dict) -> dict:
    """What the reward model takes from a batch: padded rows, or one padding-free row with its sequence ids."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "sequence_ids") if k in batch}


@torch.no_grad()
def pairwise_accuracy(model, items: list, collate, batch_size: int, device) -> float:
    """Share of pairs whose chosen reply scores higher than the rejected one."""
    model.eval()
    wins = 0
    for start in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in model_inputs(collate(items[start:start + batch_size])).items()}
        chosen, rejected = model(**batch).chunk(2)
        wins += int((chosen > rejected).sum())
    model.train()
    return wins / max(len(items), 1)


def run(cfg, log=print) -> TrainResult:
    runtime = setup_run(cfg, log)
    rows = read_data(cfg)
    model, tokenizer, method = setup_model(cfg, runtime, extend=RewardModel, log=log)
    train, evals, collate = setup_data(cfg, tokenizer, "rm", runtime, log, read=rows)
    result = Trainer(cfg, runtime, model, method, train, evals, collate, RewardStage(cfg.rm.margin), log).train()
    if not result.finished:
        return result
    if evals and (runtime.is_main or runtime.sharded):  # a sharded model's forward gathers its weights: every rank runs it
        accuracy = pairwise_accuracy(unwrap(model), evals, collate, cfg.training.batch_size, runtime.device)
        if runtime.is_main:
            log(f"eval pairwise accuracy {accuracy:.3f} on {len(evals)} pairs")
            record_metric(Path(cfg.output_dir) / "metrics.jsonl", result.steps, "eval_pairwise_accuracy", accuracy)
    last_ids = {side.input_ids[-1] for pair in train + evals for side in (pair.chosen, pair.rejected)}
    pad_id = pick_pad_token(tokenizer, last_ids)
    if pad_id is None:
        raise ConfigError("Every special token of this tokenizer ends some training text, so no pad token keeps "
                          "transformers' sequence-classification pooling (last token that is not pad) right.")

    def write(folder, trained: RewardModel):  # `trained`: gathered to this process when the model is sharded
        if method.saves_adapter:
            method.save(trained.lm, folder / "adapter")  # the adapter kept beside the merged model
            record_base(folder / "adapter", cfg.model.name_or_path)
        lm = method.merge(trained.lm)
        save_reward_model(transformer_of(lm), trained.score, lm.config, tokenizer, folder, pad_id)

    save_final(cfg, model, method, tokenizer, runtime, write=write)
    if runtime.is_main:
        log(done_line(result, cfg.output_dir, "reward model saved to"))
    return result
