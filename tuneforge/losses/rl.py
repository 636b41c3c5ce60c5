"""RL losses on sampled completions: PPO (GAE, clipped policy and value losses, KL-shaped rewards, whitening) and
GRPO (group-normalised advantages, clipped objective with KL to the reference, grpo / dr_grpo / dapo normalisation).

All token tensors are [B, T] over the completion tokens, with a `mask` (bool or 0/1) that is true on real completion
tokens; masked positions never contribute. Losses return (sum, count, metrics) like `causal_lm_loss`: the recipe sums
both over micro-batches (and ranks) and divides once, so the result equals one big batch. `count` is what the
objective divides by: tokens for PPO and `dapo`, sequences for `grpo` and `dr_grpo`. Metrics are detached scalars.

    PPO:  rewards = kl_shaped_rewards(scores, logps, ref_logps, mask, kl_coef)
          adv, ret = gae(rewards, values, mask, gamma, lam); adv = whiten(adv, mask)
          ppo_policy_loss(new_logps, logps, adv, mask) and ppo_value_loss(new_values, values, ret, mask)
    GRPO: adv = group_advantages(rewards, group_size)      # constant_reward_groups(rewards, group_size) to log
          grpo_loss(new_logps, logps, ref_logps, adv, mask, loss_type="dapo")
"""

from __future__ import annotations

import torch

from tuneforge.losses.reward import last_token_index

KL_ESTIMATORS = ("k1", "k3")
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
ADVANTAGES = ("group", "rloo")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the positions where mask is true (0 when there are none)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise x to unit variance (and zero mean unless shift_mean=False) over the masked positions, as PPO
    implementations do with advantages (Huang et al., 2022, "The 37 Implementation Details of PPO", detail 7). The
    variance is unbiased (Bessel-corrected), like TRL's masked_whiten. Masked positions come back as 0."""
    m = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    n = m.sum()
    var = ((x - mean) ** 2 * m).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al., 2016, "High-Dimensional Continuous Control Using Generalized
    Advantage Estimation", https://arxiv.org/abs/1506.02438, eq. 16), token-level:

        delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},   returns_t = A_t + V_t

    over each row's real tokens only: masked positions are skipped (the next value of a token is that of the row's
    next real token, and after the last real token the episode ends: V = 0, A = 0), so left padding, right padding or
    gaps give the same result as the unpadded row. rewards, values: [B, T]; returns (advantages, returns), 0 where
    masked. No gradient (values are targets here)."""
    mask = mask.bool()
    rewards, values = rewards.float(), values.float()
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[1])):
        live = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(live, adv, 0.0)
        next_value = torch.where(live, values[:, t], next_value)
        next_adv = torch.where(live, adv, next_adv)
    return advantages, torch.where(mask, advantages + values, 0.0)


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman, 2020, "Approximating KL Divergence",
    http://joschu.net/blog/kl-approx.html): `k1` = log pi - log ref (unbiased, can be negative: the classic RLHF
    penalty of Ziegler et al., 2019), `k3` = exp(log ref - log pi) - (log ref - log pi) - 1 (unbiased, always >= 0,
    lower variance: GRPO's KL term, Shao et al., 2024, eq. 4). logps, ref_logps: [B, T] -> [B, T]."""
    if estimator == "k1":
        return logps - ref_logps
    if estimator == "k3":
        d = ref_logps - logps
        return torch.exp(d) - d - 1
    raise ValueError(f"KL estimator {estimator!r} is not one of {', '.join(KL_ESTIMATORS)}")


@torch.no_grad()
def kl_shaped_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                      kl_coef: float = 0.05, estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level PPO rewards for RLHF (Ziegler et al., 2019, "Fine-Tuning Language Models from Human Preferences",
    https://arxiv.org/abs/1909.08593, eq. 2; Ouyang et al., 2022): every completion token is penalised by
    kl_coef * KL_t(pi || ref), and the sequence's score (reward model or reward function) is added at its last real
    token. scores: [B]; logps/ref_logps/mask: [B, T]. Returns (rewards [B, T], per-token kl [B, T]), 0 where masked."""
    mask = mask.bool()
    kl = torch.where(mask, kl_penalty(logps.float(), ref_logps.float(), estimator), 0.0)
    rewards = -kl_coef * kl
    has_token = mask.any(-1)
    rows = torch.arange(mask.shape[0], device=mask.device)[has_token]
    rewards[rows, last_token_index(mask[has_token])] += scores.float()[has_token]
    return rewards, kl


def aggregate_token_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str = "dapo",
                         max_completion_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The token-level normalisations GRPO variants differ by, as (sum, count) so that micro-batches add up:

    - `grpo` (Shao et al., 2024, "DeepSeekMath", https://arxiv.org/abs/2402.03300, eq. 3): mean over each sequence's
      tokens, then over sequences -> (sum of per-sequence means, number of sequences). Long answers weigh less per
      token, which Dr. GRPO shows biases towards long wrong answers.
    - `dr_grpo` (Liu et al., 2025, "Understanding R1-Zero-Like Training: A Critical Perspective",
      https://arxiv.org/abs/2503.20783, section 3.2): sum over tokens divided by a constant, the maximum completion
      length, per sequence -> (token sum / max_completion_length, number of sequences).
    - `dapo` (Yu et al., 2025, "DAPO", https://arxiv.org/abs/2503.14476, eq. 8, token-level policy gradient loss):
      sum over all tokens of the batch divided by their number -> (token sum, number of tokens). Also PPO's usual one.
    """
    m = mask.to(per_token.dtype)
    if loss_type == "grpo":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).sum(), torch.tensor(per_token.shape[0])
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss_type dr_grpo divides by max_completion_length: pass the generation limit")
        return (per_token * m).sum() / max_completion_length, torch.tensor(per_token.shape[0])
    if loss_type == "dapo":
        return (per_token * m).sum(), mask.bool().sum()
    raise ValueError(f"loss_type {loss_type!r} is not one of {', '.join(GRPO_LOSS_TYPES)}")


def _clipped_surrogate(logps, old_logps, advantages, mask, clip_eps, clip_eps_high):
    """Per-token -min(ratio A, clip(ratio, 1 - eps, 1 + eps_high) A) and the metrics every clipped objective logs."""
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    with torch.no_grad():
        was_clipped = (ratio * advantages > clipped * advantages).float()
        metrics = {"clip_fraction": masked_mean(was_clipped, mask),
                   "approx_kl": masked_mean(kl_penalty(logps, old_logps, "k3"), mask),  # KL(old || new)-ish, k3
                   "ratio": masked_mean(ratio, mask)}
    return per_token, metrics


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip_eps: float = 0.2, clip_eps_high: float | None = None,
                    entropy: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """PPO's clipped surrogate (Schulman et al., 2017, "Proximal Policy Optimization Algorithms",
    https://arxiv.org/abs/1707.06347, eq. 7), per token, averaged over all real tokens of the batch:

        -min(ratio A, clip(ratio, 1 - eps, 1 + eps_high) A),   ratio = exp(log pi - log pi_old)

    (eps_high = eps unless given: DAPO's "clip-higher"). logps: [B, T] with gradient; old_logps, advantages: [B, T]
    from the rollout. Returns (sum, token count, metrics): clip_fraction (share of tokens where the clipped term was
    chosen), approx_kl (k3 estimate between old and new policy), ratio, and entropy (masked mean of `entropy` [B, T]
    from `token_entropy`, when given).
    """
    per_token, metrics = _clipped_surrogate(logps, old_logps.detach(), advantages.detach(), mask, clip_eps,
                                            clip_eps_high)
    if entropy is not None:
        metrics["entropy"] = masked_mean(entropy.detach().float(), mask)
    total, count = aggregate_token_loss(per_token, mask, "dapo")
    return total, count, metrics


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_range: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """PPO's clipped value loss (Schulman et al., 2017, as in OpenAI baselines; Huang et al., 2022, detail 9):

        0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)

    per token, averaged over real tokens. values: [B, T] with gradient; old_values, returns: [B, T] from the
    rollout. Returns (sum, token count, metrics): value_clip_fraction, and the masked mean of the values."""
    old_values, returns = old_values.detach(), returns.detach()
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_err, clipped_err = (values - returns) ** 2, (clipped - returns) ** 2
    per_token = 0.5 * torch.max(unclipped_err, clipped_err)
    total, count = aggregate_token_loss(per_token, mask, "dapo")
    metrics = {"value_clip_fraction": masked_mean((clipped_err > unclipped_err).float(), mask),
               "values": masked_mean(values.detach().float(), mask)}
    return total, count, metrics


def group_advantages(rewards: torch.Tensor, group_size: int, advantage: str = "group", scale_std: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """One advantage per completion from the rewards of its group (the G completions of one prompt, consecutive in
    `rewards` [N], N a multiple of G):

    - `group` (GRPO, Shao et al., 2024, "DeepSeekMath", https://arxiv.org/abs/2402.03300, section 4.1.2):
      r_i - mean(group);
    - `rloo` (REINFORCE leave-one-out, Ahmadian et al., 2024, "Back to Basics", https://arxiv.org/abs/2402.14740,
      eq. 5): r_i - mean of the other G - 1 rewards = G / (G - 1) * (r_i - mean(group)).

    With scale_std the result is divided by the group's (unbiased) reward std + eps, as GRPO does; Dr. GRPO argues
    against it (it up-weights groups of near-equal rewards): pass scale_std=False. A group whose rewards are all
    equal gets advantage 0 (see `constant_reward_groups`). Returns [N] float32."""
    if advantage not in ADVANTAGES:
        raise ValueError(f"advantage {advantage!r} is not one of {', '.join(ADVANTAGES)}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size} (need >= 2 per group)")
    grouped = rewards.float().reshape(-1, group_size)
    centred = grouped - grouped.mean(-1, keepdim=True)
    if advantage == "rloo":
        centred = centred * group_size / (group_size - 1)
    if scale_std:
        centred = centred / (grouped.std(-1, keepdim=True) + eps)
    return centred.reshape(-1)


def constant_reward_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which groups got the same reward for every completion [N // G] bool. Such a group has advantage 0 for every
    token, so it teaches nothing: when most groups are constant, "reward and loss stay 0" (prompts too hard or too
    easy, a reward function that always returns the same value, or too few completions per prompt)."""
    grouped = rewards.reshape(-1, group_size)
    return (grouped == grouped[:, :1]).all(-1)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, beta: float = 0.0, clip_eps: float = 0.2,
              clip_eps_high: float | None = None, loss_type: str = "dapo",
              max_completion_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """GRPO's objective (Shao et al., 2024, "DeepSeekMath", https://arxiv.org/abs/2402.03300, eq. 3), per token:

        -min(ratio A, clip(ratio, 1 - eps, 1 + eps_high) A) + beta * KL_k3(pi || ref)

    aggregated with `loss_type` grpo | dr_grpo | dapo (see `aggregate_token_loss`). advantages: [N] per completion
    (from `group_advantages`) or [N, T]; old_logps None means one update per generation (ratio 1, the gradient is
    still A * grad log pi); ref_logps may be None when beta = 0 (Dr. GRPO and DAPO drop the KL term). Returns
    (sum, count, metrics): clip_fraction, approx_kl, ratio and, with beta > 0, kl (masked mean of the k3 term).
    """
    old_logps = logps.detach() if old_logps is None else old_logps.detach()
    adv = advantages.detach()
    adv = adv[:, None] if adv.dim() == 1 else adv
    per_token, metrics = _clipped_surrogate(logps, old_logps, adv, mask, clip_eps, clip_eps_high)
    if beta:
        if ref_logps is None:
            raise ValueError("grpo_loss with beta > 0 needs ref_logps (the reference model's per-token log-probs)")
        kl = kl_penalty(logps, ref_logps.detach(), "k3")
        per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl.detach(), mask)
    total, count = aggregate_token_loss(per_token, mask, loss_type, max_completion_length)
    return total, count, metrics
