"""GRPO (Shao et al., 2024, "DeepSeekMath"): G sampled completions per prompt, rewards from functions or a reward
model, advantages normalised within each group, a clipped objective with a k3 KL to the reference.

    tuneforge train examples/grpo_tiny.yaml

One trainer step: take `training.batch_size` prompts, sample `grpo.num_generations` completions of each through the
engine (seeded per step and row), score them, then run `grpo.epochs` passes of minibatch updates. Groups whose
completions all got the same reward have advantage 0 and teach nothing: the log says so.

Under torchrun each process samples the groups of its own prompts (a group never spans processes, so advantages
are what 1 process computes); see tuneforge/training/rl.py for seeds, normalisation and metrics over ranks.
"""

from __future__ import annotations

import torch

from tuneforge.losses import constant_reward_groups, group_advantages, grpo_loss
from tuneforge.training.loop import TrainResult
from tuneforge.training.rl import (
    Reference,
    Rewards,
    RLStage,
    gather,
    make_engine,
    mean_over_ranks,
    policy_forward,
    rollout_work,
    rows_offset,
    run_rl,
    sample,
    sampling_seed,
)


class GRPOStage(RLStage):
    def __init__(self, cfg, model, tokenizer, runtime, log=print):
        self.s, self.seed, self.rt = cfg.grpo, cfg.seed, runtime
        self.log = log if runtime.is_main else (lambda _: None)  # rank 0 reports for all ranks
        self.reference = Reference(model) if self.s.beta else None  # before training changes the weights
        self.rewards = Rewards(self.s, runtime, log, key=cfg.stage)
        self.engine = make_engine(model, tokenizer)
        self._told_constant = False
        n, G = cfg.training.batch_size * cfg.training.grad_accum, self.s.num_generations
        self.log(f"grpo: each step samples {n} prompts x {G} completions = {n * G} completions per process "
                 f"(training.batch_size counts prompts; TRL's per_device_train_batch_size counts completions)")

    def rl_step(self, trainer, prompts) -> dict:
        s, G = self.s, self.s.num_generations
        rows = [p for p in prompts for _ in range(G)]
        first = rows_offset(self.rt, len(rows))  # seeds by global row: N processes sample what 1 process does
        seeds = [sampling_seed(self.seed, trainer.step, first + r) for r in range(len(rows))]
        roll = sample(self.engine, rows, s, seeds, self.rt.device)
        rewards, means = self.rewards.score(roll.texts, roll.completion_ids, roll.prompts,
                                            step=trainer.step + 1)
        constant = constant_reward_groups(rewards, G)
        everyone = gather(self.rt, torch.stack([rewards, constant.repeat_interleave(G).float()], dim=1))
        self._report_constant(trainer.step + 1, int(everyone[:, 1].sum()) // G, len(everyone) // G)
        advantages = group_advantages(rewards, G, s.advantage, s.scale_rewards).to(self.rt.device)
        everything = torch.arange(len(rows))
        batch = roll.rows(everything)
        at = self.logits_at_labels  # lm_head only where completion tokens are predicted
        T = s.temperature  # log-probs of the distribution sampled from (policy_forward)
        several_updates = s.epochs > 1 or 0 < s.mini_batch_size < len(rows)
        with torch.no_grad(), self.rt.autocast():
            old = policy_forward(trainer.model, batch, at_labels=at, temperature=T)[0] if several_updates else None
        ref = self.reference.token_logps(batch, at, T) if self.reference is not None else None
        losses, stats = [], []
        for epoch in range(s.epochs):
            for idx in trainer.minibatches(len(rows), s.mini_batch_size, epoch):
                with self.rt.autocast():
                    logps, mask, _, _ = policy_forward(trainer.model, roll.rows(idx), at_labels=at, temperature=T)
                total, count, m = grpo_loss(logps, None if old is None else old[idx],
                                            None if ref is None else ref[idx], advantages[idx], mask, s.beta,
                                            s.clip_eps, s.clip_eps_high, s.loss_type, s.max_new_tokens)
                loss, m["grad_norm"] = trainer.update(total / trainer.global_count(count))
                losses.append(loss)
                stats.append({k: float(v) for k, v in m.items()})
        lengths = [len(ids) for ids in roll.completion_ids]
        forwards = [True] + [at] * (several_updates + (self.reference is not None))  # sampling, old, reference
        work = rollout_work(roll, s.epochs, at, trainer.meter, forwards, self.rewards.flops)
        local = {**means, "completion_length": sum(lengths) / len(lengths), **work,
                 **{k: sum(d[k] for d in stats) / len(stats) for k in stats[0]}}
        all_rewards = everyone[:, 0]
        return {"loss": sum(losses) / len(losses), "reward": float(all_rewards.mean()),
                "reward_std": float(all_rewards.std()) if len(all_rewards) > 1 else 0.0,
                "constant_groups": float(everyone[:, 1].mean()), **mean_over_ranks(self.rt, local)}

    def _report_constant(self, step: int, n_constant: int, n_groups: int) -> None:
        """The "reward and loss stay 0" trap, said out loud: the first time, and whenever every group is constant."""
        if n_constant == 0 or (self._told_constant and n_constant < n_groups):
            return
        self._told_constant = True
        self.log(f"grpo: step {step}: {n_constant} of {n_groups} prompt groups got the same reward for every "
                 f"completion, so their advantage (and loss) is 0 and they teach nothing. If this persists: the "
                 f"prompts are too hard or too easy for the model, the reward never varies, or the groups are too "
                 f"small (raise grpo.num_generations or grpo.temperature).")


def run(cfg, log=print) -> TrainResult:
    return run_rl(cfg, GRPOStage, log)
