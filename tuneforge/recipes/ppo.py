"""PPO for RLHF (Ziegler et al., 2019; Ouyang et al., 2022): the policy samples a completion per prompt, a reward
model (an `rm` output folder) or Python function scores it, every token pays a KL penalty to the frozen reference,
GAE turns the rewards into advantages with a value head (critic) on the policy's last hidden state, and several
epochs of clipped policy + value updates follow.

    tuneforge train examples/ppo_tiny.yaml

The value head is one linear layer on the policy's backbone (shared: with LoRA only the adapters and the head
train); it is part of every checkpoint and is saved beside the final model as value_head.safetensors.
"""

from __future__ import annotations

import torch

from tuneforge.losses import gae, kl_shaped_rewards, ppo_policy_loss, ppo_value_loss, token_entropy, whiten
from tuneforge.methods.base import unwrap
from tuneforge.training.loop import TrainResult
from tuneforge.training.rl import (
    Reference,
    Rewards,
    RLStage,
    make_engine,
    policy_forward,
    run_rl,
    sample,
    sampling_seed,
)


class PPOStage(RLStage):
    def __init__(self, cfg, model, tokenizer, runtime, log=print):
        self.s, self.seed, self.rt, self.log = cfg.ppo, cfg.seed, runtime, log
        self.reference = Reference(model)  # before the value head is attached and before training
        self.rewards = Rewards(self.s, runtime, log)
        self.engine = make_engine(model, tokenizer)
        hidden = unwrap(model).config.get_text_config().hidden_size
        head = torch.nn.Linear(hidden, 1).to(runtime.device)
        torch.nn.init.normal_(head.weight, std=1 / (hidden + 1))
        torch.nn.init.zeros_(head.bias)
        unwrap(model).v_head = head  # a submodule: the optimizer and checkpoints pick it up with the policy

    def values(self, model, hidden: torch.Tensor) -> torch.Tensor:
        return unwrap(model).v_head(hidden[:, :-1].float()).squeeze(-1)  # aligned with the token log-probs

    def rl_step(self, trainer, prompts) -> dict:
        s, model = self.s, trainer.model
        seeds = [sampling_seed(self.seed, trainer.step, r) for r in range(len(prompts))]
        roll = sample(self.engine, prompts, s, seeds, self.rt.device)
        scores, means = self.rewards.score(roll.texts, roll.completion_ids, roll.prompts)
        batch = roll.rows(torch.arange(len(prompts)))
        with torch.no_grad(), self.rt.autocast():
            old, mask, _, hidden = policy_forward(model, batch, hidden=True)
            old_values = self.values(model, hidden)
        ref = self.reference.token_logps(batch, self.logits_at_labels)
        rewards, kl = kl_shaped_rewards(scores.to(self.rt.device), old, ref, mask, s.kl_coef, s.kl_estimator)
        advantages, returns = gae(rewards, old_values, mask, s.gamma, s.lam)
        if s.whiten_advantages:
            advantages = whiten(advantages, mask)
        stats = []
        for epoch in range(s.epochs):
            for idx in trainer.minibatches(len(prompts), s.mini_batch_size, epoch):
                with self.rt.autocast():
                    logps, m, logits, hidden = policy_forward(model, roll.rows(idx), hidden=True)
                    values = self.values(model, hidden)
                with torch.no_grad():
                    entropy = token_entropy(logits[:, :-1])
                pl, pc, pm = ppo_policy_loss(logps, old[idx], advantages[idx], m, s.clip_eps, entropy=entropy)
                vl, vc, vm = ppo_value_loss(values, old_values[idx], returns[idx], m, s.cliprange_value)
                policy_loss, value_loss = pl / max(int(pc), 1), vl / max(int(vc), 1)
                loss = policy_loss + s.vf_coef * value_loss
                grad_norm = trainer.update(loss)
                stats.append({"loss": float(loss.detach()), "policy_loss": float(policy_loss.detach()),
                              "value_loss": float(value_loss.detach()), "grad_norm": grad_norm,
                              **{k: float(v) for k, v in {**pm, **vm}.items()}})
        return {"reward": float(scores.mean()), **means, "kl": float((kl * mask).sum(-1).mean()),
                **{k: sum(d[k] for d in stats) / len(stats) for k in stats[0]},
                "completion_length": float(mask.sum(-1).float().mean()), "tokens": int(roll.attention_mask.sum())}

    def before_save(self, model) -> None:
        self._head = unwrap(model).v_head
        del unwrap(model).v_head  # the saved policy is a plain model / adapter, loadable as any other

    def after_save(self, out_dir) -> None:
        from safetensors.torch import save_file

        tmp = out_dir / "value_head.safetensors.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in self._head.state_dict().items()}, str(tmp))
        tmp.replace(out_dir / "value_head.safetensors")


def run(cfg, log=print) -> TrainResult:
    return run_rl(cfg, PPOStage, log)
