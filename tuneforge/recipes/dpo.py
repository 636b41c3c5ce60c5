"""Direct preference optimisation and its family: DPO, IPO, SLiC hinge, robust DPO, SimPO and ORPO.

    tuneforge train examples/dpo_tiny.yaml
    tuneforge train examples/dpo_tiny.yaml dpo.loss=simpo dpo.beta=2.0

Each pair (prompt, chosen, rejected) is rendered with the chat template through the same encoder as SFT; the B
chosen and B rejected rows of a micro-batch go through the model as one batch of 2B rows, and only the reply tokens
count (sequence log-probs from the chunked helper in tuneforge/losses/logprobs.py). The losses themselves are pure
functions in tuneforge/losses/preference.py, with their papers.

The reference model (sigmoid, ipo, hinge, robust) is either live, computed at every step (an adapter method: the
same model with the adapters off, no second copy; otherwise a frozen copy), or `dpo.precompute_reference: true`:
one pass over the data before training, then no reference forward at all. Both give the same loss.
"""

from __future__ import annotations

import torch

from tuneforge.losses import dpo_loss, orpo_loss, simpo_loss
from tuneforge.training.loop import Stage, Trainer, TrainResult
from tuneforge.training.reference import Reference, make_reference, precompute, response_logps, with_reference
from tuneforge.training.setup import done_line, read_data, save_final, setup_data, setup_model, setup_run

REFERENCE_FREE = ("simpo", "orpo")


class DPOStage(Stage):
    """One loss term per pair: the chosen rows are the first half of the batch, their rejected rows the second."""

    def __init__(self, opts, reference: Reference | None):
        self.opts, self.reference = opts, reference

    def targets(self, batch: dict) -> int:
        return int(batch["margin"].shape[0])

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        policy = response_logps(model, batch, self.logits_at_labels)
        losses, metrics = self.pair_losses(policy, self.reference_sums(batch))
        if self.opts.sft_weight > 0:  # RPO: the chosen reply's per-token NLL keeps it likely
            losses = losses + self.opts.sft_weight * -policy.mean.chunk(2)[0]
        return losses.sum(), metrics  # per pair: the trainer averages them over the whole step

    def reference_sums(self, batch: dict) -> torch.Tensor | None:
        if self.opts.loss in REFERENCE_FREE:
            return None
        if "ref_logps" in batch:  # precomputed before training
            return batch["ref_logps"]
        return self.reference.logps(batch, self.logits_at_labels).sum

    def pair_losses(self, policy, ref_sums: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        o = self.opts
        if o.loss == "simpo":
            return simpo_loss(*policy.mean.chunk(2), beta=o.beta, gamma=o.simpo_gamma,
                              label_smoothing=o.label_smoothing)
        if o.loss == "orpo":
            return orpo_loss(*policy.mean.chunk(2), beta=o.beta)
        if o.loss == "ipo":  # IPO compares per-token log-ratios (as TRL does): normalise by the reply lengths
            length = policy.length.clamp(min=1)
            return dpo_loss(*policy.mean.chunk(2), *(ref_sums / length).chunk(2), beta=o.beta, loss_type="ipo")
        return dpo_loss(*policy.sum.chunk(2), *ref_sums.chunk(2), beta=o.beta, loss_type=o.loss,
                        label_smoothing=o.label_smoothing)


def run(cfg, log=print) -> TrainResult:
    runtime = setup_run(cfg, log)
    rows = read_data(cfg)
    model, tokenizer, method = setup_model(cfg, runtime, log=log)
    train, evals, collate = setup_data(cfg, tokenizer, "dpo", runtime, log, read=rows)

    reference = None
    if cfg.dpo.loss not in REFERENCE_FREE:  # made now, before any step (and before a resume loads weights)
        reference = make_reference(model, cfg, runtime, keep_copy=not cfg.dpo.precompute_reference)
    stage = DPOStage(cfg.dpo, reference)
    trainer = Trainer(cfg, runtime, model, method, train, evals, collate, stage, log)
    stage.reference_forwards = int(reference is not None and not cfg.dpo.precompute_reference)  # for the MFU
    if cfg.dpo.precompute_reference:
        table = precompute(reference, train + evals, collate, cfg.training.batch_size, runtime.device,
                           runtime.autocast, stage.logits_at_labels)
        trainer.collate = with_reference(collate, table)
        if runtime.is_main:
            log(f"reference: log-probs of {len(table)} pairs computed once before training")
    result = trainer.train()
    if result.finished:
        save_final(cfg, model, method, tokenizer, runtime)
        if runtime.is_main:
            log(done_line(result, cfg.output_dir))
    return result
