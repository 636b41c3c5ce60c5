"""Preference losses: the DPO family (sigmoid, IPO, hinge, robust, cDPO label smoothing), SimPO, ORPO and KTO.

Inputs are per-sequence log-probabilities of the responses (from `sequence_logps`: `.sum` for DPO and KTO, `.mean`
for SimPO and ORPO); outputs are one loss per pair (or per example for KTO) plus detached per-pair metrics, so a
recipe sums the losses and counts pairs like the SFT loop sums tokens (gradient accumulation and data parallelism
then match one big batch). Metric keys follow TRL's log names: rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies (1.0 where the chosen response's implicit reward is strictly higher).

    seq = sequence_logps(logits, labels)                  # batch = [chosen; rejected]
    pc, pr = seq.sum.chunk(2)
    losses, metrics = dpo_loss(pc, pr, ref_chosen, ref_rejected, beta=0.1, loss_type="sigmoid")
    loss_sum, n_pairs = losses.sum(), losses.numel()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")

T = TypeVar("T")


def _reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    chosen, rejected = chosen_rewards.detach(), rejected_rewards.detach()
    return {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
            "rewards/accuracies": (chosen > rejected).float()}


def _smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - e) log sigmoid(z) - e log sigmoid(-z): the logistic loss when a fraction e of the labels is flipped."""
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Direct preference losses on h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)), one per pair [B].

    - `sigmoid`: DPO (Rafailov et al., 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
      Model", https://arxiv.org/abs/2305.18290, eq. 7): -log sigmoid(beta h). With label_smoothing e > 0 it is
      conservative DPO (cDPO, Mitchell 2023, "A note on DPO with noisy preferences"):
      -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h).
    - `ipo`: IPO (Azar et al., 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
      https://arxiv.org/abs/2310.12036, eq. 17): (h - 1 / (2 beta))^2, beta being the paper's tau. TRL divides each
      log-ratio by the response length first: pass `sequence_logps(...).mean` (policy and reference) to get that.
    - `hinge`: SLiC-HF (Zhao et al., 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
      https://arxiv.org/abs/2305.10425): max(0, 1 - beta h).
    - `robust`: rDPO (Chowdhury et al., 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback",
      https://arxiv.org/abs/2403.00409, eq. 10) for a known flip rate e = label_smoothing < 0.5:
      ((1 - e)(-log sigmoid(beta h)) - e(-log sigmoid(-beta h))) / (1 - 2e), unbiased for the clean loss.

    Inputs: summed response log-probs [B] (policy with gradient, reference without). Returns (losses [B], metrics):
    rewards are beta * (log pi - log ref), detached, per pair.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo loss_type {loss_type!r} is not one of {', '.join(DPO_LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid_loss(beta * h, label_smoothing)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # robust
        e = label_smoothing
        losses = ((1 - e) * -F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1 - 2 * e)
    return losses, _reward_metrics(beta * chosen_ratio, beta * rejected_ratio)


def simpo_loss(policy_chosen_mean_logps: torch.Tensor, policy_rejected_mean_logps: torch.Tensor,
               beta: float = 2.0, gamma: float = 1.0, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """SimPO (Meng et al., 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    https://arxiv.org/abs/2405.14734, eq. 6): no reference model; the implicit reward is the length-normalised
    log-likelihood beta / |y| log pi(y | x), and the chosen reward must beat the rejected one by a target margin gamma:

        -log sigmoid(beta * mean_logp(y_w) - beta * mean_logp(y_l) - gamma)

    (label_smoothing e > 0 applies the cDPO form, as TRL's CPO trainer does). Defaults are the paper's typical
    beta = 2.0 with gamma / beta = 0.5. Inputs: per-token mean response log-probs [B] (`sequence_logps(...).mean`).
    Returns (losses [B], metrics) with rewards beta * mean log-prob.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen, rejected = beta * policy_chosen_mean_logps, beta * policy_rejected_mean_logps
    return _smoothed_sigmoid_loss(chosen - rejected - gamma, label_smoothing), _reward_metrics(chosen, rejected)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012, "Accurately computing log(1 - exp(-|a|))")."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(policy_chosen_mean_logps: torch.Tensor, policy_rejected_mean_logps: torch.Tensor,
              beta: float = 0.1) -> tuple[torch.Tensor, dict]:
    """ORPO (Hong et al., 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    https://arxiv.org/abs/2403.07691, eqs. 2-7): no reference model and no separate SFT stage. With P = exp(mean
    log-prob of the response) and odds(y) = P / (1 - P),

        loss = NLL(y_w) + beta * -log sigmoid(log odds(y_w) - log odds(y_l))       (beta is the paper's lambda)

    where NLL(y_w) = -mean_logp(y_w) is the SFT loss on the chosen response (eq. 2). Inputs: per-token mean response
    log-probs [B] (`sequence_logps(...).mean`); a mean of exactly 0 (probability 1) is clamped just below so the odds
    stay finite. Returns (losses [B], metrics): also nll and log_odds_ratio per pair; rewards are beta * mean log-prob
    (TRL's convention).
    """
    wide = torch.promote_types(policy_chosen_mean_logps.dtype, torch.float32)  # bf16 would round 1 - P to 0
    chosen = policy_chosen_mean_logps.to(wide).clamp(max=-1e-6)
    rejected = policy_rejected_mean_logps.to(wide).clamp(max=-1e-6)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    nll = -policy_chosen_mean_logps.to(wide)
    losses = nll - beta * F.logsigmoid(log_odds)
    metrics = _reward_metrics(beta * policy_chosen_mean_logps, beta * policy_rejected_mean_logps)
    return losses, {**metrics, "nll": nll.detach(), "log_odds_ratio": log_odds.detach()}


def mismatched_completions(completions: Sequence[T]) -> list[T]:
    """For KTO's KL estimate: pair prompt i with completion i - 1 of the same batch (the last completion goes to the
    first prompt), as Ethayarajh et al. (2024, section 4.1) and TRL do: (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}).
    The mismatched set uses the same completions as the matched one, only paired with other prompts. Needs at least 2
    rows (with one row the "mismatched" pair would be the matched one)."""
    if len(completions) < 2:
        raise ValueError("KTO's KL estimate needs at least 2 examples per batch (completions are shifted by one "
                         "within the batch); raise the micro-batch size")
    return [completions[-1], *completions[:-1]]


def kto_reference_point(kl_policy_logps: torch.Tensor, kl_ref_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 = max(0, mean(log pi(y'|x) - log ref(y'|x))) over the mismatched pairs (x, y') of
    the batch (Ethayarajh et al., 2024, eq. 8 and section 4.1: a biased but low-variance estimate of KL(pi || ref)),
    detached: no gradient flows through it. Inputs [N] summed log-probs; returns a scalar. Under data parallelism
    average it over ranks before passing it to `kto_loss` (TRL gathers it the same way)."""
    diff = (kl_policy_logps - kl_ref_logps).detach()
    return diff.to(torch.promote_types(diff.dtype, torch.float32)).mean().clamp(min=0)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
             beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """KTO (Ethayarajh et al., 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
    https://arxiv.org/abs/2402.01306, eq. 7): unpaired examples labelled desirable or not. With r = log pi(y|x) -
    log ref(y|x) and the reference point z0 = `kl` (from `kto_reference_point`),

        desirable:    lambda_D * (1 - sigmoid(beta (r - z0)))
        undesirable:  lambda_U * (1 - sigmoid(beta (z0 - r)))

    lambda_D / lambda_U = desirable_weight / undesirable_weight; the paper advises
    lambda_D n_D / (lambda_U n_U) in [1, 4/3] when the classes are unbalanced. Inputs: summed response log-probs [N],
    `desirable` bool [N], `kl` a scalar. Returns (losses [N], metrics) with per-example rewards beta * r split into
    rewards/chosen (desirable) and rewards/rejected (undesirable), and the kl used.
    """
    desirable = desirable.bool()
    ratio = policy_logps - ref_logps
    kl = kl.detach().to(ratio.dtype)
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    rewards = beta * ratio.detach()
    return losses, {"rewards/chosen": rewards[desirable], "rewards/rejected": rewards[~desirable], "kl": kl}
