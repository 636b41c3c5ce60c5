"""PPO for RLHF (Ziegler et al., 2019; Ouyang et al., 2022): the policy samples a completion per prompt, a reward
model (an `rm` output folder) or Python function scores it, every token pays a KL penalty to the frozen reference,
GAE turns the rewards into advantages with a value head (critic) on the policy's last hidden state, and several
epochs of clipped policy + value updates follow.

    tuneforge train examples/ppo_tiny.yaml

The value head is one linear layer on the policy's backbone (shared: with LoRA only the adapters and the head
train); it is part of every checkpoint and is saved beside the final model as value_head.safetensors. Under
torchrun every process holds a replica (DDP keeps them equal) and whitens advantages with the mean and variance of
all processes' rollouts (see tuneforge/training/rl.py for the rest).
"""

from __future__ import annotations

import torch

from tuneforge.losses import gae, kl_shaped_rewards, ppo_policy_loss, ppo_value_loss, token_entropy
from tuneforge.methods.base import unwrap
from tuneforge.training.loop import TrainResult
from tuneforge.training.rl import (
    Reference,
    Rewards,
    RLStage,
    make_engine,
    mean_over_ranks,
    policy_forward,
    rollout_work,
    rows_offset,
    run_rl,
    sample,
    sampling_seed,
    whiten_over_ranks,
)

LOSSES = ("loss", "policy_loss", "value_loss", "grad_norm")  # already over all ranks (RLTrainer.update)


def add_value_head(model):
    """The critic: one linear layer on the policy's last hidden state, attached before DDP wraps the model (so its
    gradients are all-reduced with the policy's) and after the method (so it trains with LoRA too)."""
    hidden = model.config.get_text_config().hidden_size
    head = torch.nn.Linear(hidden, 1)
    torch.nn.init.normal_(head.weight, std=1 / (hidden + 1))
    torch.nn.init.zeros_(head.bias)
    model.v_head = head  # a submodule: the optimizer and checkpoints pick it up with the policy
    return model


class PPOStage(RLStage):
    def __init__(self, cfg, model, tokenizer, runtime, log=print):
        self.s, self.seed, self.rt, self.log = cfg.ppo, cfg.seed, runtime, log
        self.reference = Reference(model)  # before training (a frozen copy also copies the unused value head)
        self.rewards = Rewards(self.s, runtime, log, key=cfg.stage)
        self.engine = make_engine(model, tokenizer)

    def values(self, model, hidden: torch.Tensor) -> torch.Tensor:
        return unwrap(model).v_head(hidden[:, :-1].float()).squeeze(-1)  # aligned with the token log-probs

    def rl_step(self, trainer, prompts) -> dict:
        s, model = self.s, trainer.model
        first = rows_offset(self.rt, len(prompts))  # seeds by global row: N processes sample what 1 process does
        seeds = [sampling_seed(self.seed, trainer.step, first + r) for r in range(len(prompts))]
        roll = sample(self.engine, prompts, s, seeds, self.rt.device)
        scores, means = self.rewards.score(roll.texts, roll.completion_ids, roll.prompts,
                                           step=trainer.step + 1)
        batch = roll.rows(torch.arange(len(prompts)))
        with torch.no_grad(), self.rt.autocast():
            old, mask, _, hidden = policy_forward(model, batch, hidden=True, temperature=s.temperature)
            old_values = self.values(model, hidden)
        ref = self.reference.token_logps(batch, self.logits_at_labels, s.temperature)
        rewards, kl = kl_shaped_rewards(scores.to(self.rt.device), old, ref, mask, s.kl_coef, s.kl_estimator)
        advantages, returns = gae(rewards, old_values, mask, s.gamma, s.lam)
        if s.whiten_advantages:
            advantages = whiten_over_ranks(self.rt, advantages, mask)
        stats = []
        for epoch in range(s.epochs):
            for idx in trainer.minibatches(len(prompts), s.mini_batch_size, epoch):
                stats.append(self.update(trainer, roll.rows(idx), old[idx], old_values[idx], advantages[idx],
                                         returns[idx]))
        local = {"reward": float(scores.mean()), **means, "kl": float((kl * mask).sum(-1).mean()),
                 "completion_length": float(mask.sum(-1).float().mean()),
                 # sampling (lm_head at each new token), old policy and values (everywhere), reference; the value
                 # head is part of the policy's weights, so its forward and backward count with the policy's
                 **rollout_work(roll, s.epochs, False, trainer.meter, [True, False, self.logits_at_labels],
                                self.rewards.flops),
                 **{k: sum(d[k] for d in stats) / len(stats) for k in stats[0] if k not in LOSSES}}
        return {**mean_over_ranks(self.rt, local), **{k: sum(d[k] for d in stats) / len(stats) for k in LOSSES}}

    def update(self, trainer, rows: dict, old, old_values, advantages, returns) -> dict:
        """One clipped policy + value update on a minibatch; the losses normalised by the tokens of all ranks."""
        s = self.s
        with self.rt.autocast():
            logps, m, logits, hidden = policy_forward(trainer.model, rows, hidden=True, temperature=s.temperature)
            values = self.values(trainer.model, hidden)
        with torch.no_grad():
            entropy = token_entropy(logits[:, :-1])
        pl, pc, pm = ppo_policy_loss(logps, old, advantages, m, s.clip_eps, entropy=entropy)
        vl, vc, vm = ppo_value_loss(values, old_values, returns, m, s.cliprange_value)
        policy_loss, value_loss = pl / trainer.global_count(pc), vl / trainer.global_count(vc)
        loss, grad_norm = trainer.update(policy_loss + s.vf_coef * value_loss)
        parts = self.rt.all_reduce_sum(torch.stack([policy_loss, value_loss]).detach().float())
        return {"loss": loss, "policy_loss": float(parts[0]), "value_loss": float(parts[1]), "grad_norm": grad_norm,
                **{k: float(v) for k, v in {**pm, **vm}.items()}}

    def before_save(self, model) -> None:
        self._head = unwrap(model).v_head
        del unwrap(model).v_head  # the saved policy is a plain model / adapter, loadable as any other

    def after_save(self, out_dir) -> None:
        from safetensors.torch import save_file

        tmp = out_dir / "value_head.safetensors.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in self._head.state_dict().items()}, str(tmp))
        tmp.replace(out_dir / "value_head.safetensors")


def run(cfg, log=print) -> TrainResult:
    return run_rl(cfg, PPOStage, log, extend=add_value_head)
