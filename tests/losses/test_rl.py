"""PPO and GRPO pieces against loops written out here over Python floats, padding and masking included."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from tuneforge.losses import (
    aggregate_token_loss,
    constant_reward_groups,
    gae,
    group_advantages,
    grpo_loss,
    kl_penalty,
    kl_shaped_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)


def hand_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list, list]:
    """GAE over one unpadded episode, straight from the paper's recursion."""
    adv, last = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, [a + v for a, v in zip(adv, values)]


def test_gae_matches_hand_loop_for_right_left_and_gapped_padding():
    torch.manual_seed(0)
    rewards, values = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0],      # right padding
                         [0, 0, 1, 1, 1, 1, 1],      # left padding
                         [1, 1, 0, 1, 1, 1, 0],      # a masked token inside (e.g. a tool result)
                         [0, 0, 0, 0, 0, 0, 1]]).bool()  # a single-token completion
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for b in range(4):
        idx = mask[b].nonzero().squeeze(-1).tolist()
        want_adv, want_ret = hand_gae(rewards[b, idx].tolist(), values[b, idx].tolist(), 0.9, 0.8)
        assert adv[b, idx].tolist() == pytest.approx(want_adv, rel=1e-6, abs=1e-6)
        assert ret[b, idx].tolist() == pytest.approx(want_ret, rel=1e-6, abs=1e-6)
        assert torch.all(adv[b, ~mask[b]] == 0) and torch.all(ret[b, ~mask[b]] == 0)


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.1]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert ret[0].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert adv[0].tolist() == pytest.approx([0.5, 0.8, 0.9])


def test_whiten_uses_only_masked_positions():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    kept = [1.0, 2.0, 3.0, 4.0]
    mean, std = statistics.mean(kept), statistics.stdev(kept)  # unbiased, like TRL's masked_whiten
    out = whiten(x, mask)
    assert out[mask.bool()].tolist() == pytest.approx([(v - mean) / std for v in kept], rel=1e-5)
    assert out[~mask.bool()].tolist() == [0.0, 0.0]
    assert whiten(x, mask, shift_mean=False)[mask.bool()].tolist() == pytest.approx(
        [(v - mean) / std + mean for v in kept], rel=1e-5)


def test_kl_estimators():
    logps, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    assert kl_penalty(logps, ref, "k1").tolist() == pytest.approx([0.5, -1.0, 0.0])
    want_k3 = [math.exp(r - p) - (r - p) - 1 for p, r in zip(logps.tolist(), ref.tolist())]
    assert kl_penalty(logps, ref, "k3").tolist() == pytest.approx(want_k3)
    assert (kl_penalty(torch.randn(100), torch.randn(100), "k3") >= 0).all()
    with pytest.raises(ValueError, match="k1, k3"):
        kl_penalty(logps, ref, "k2")


def test_kl_shaped_rewards_put_the_score_on_the_last_real_token():
    logps = torch.tensor([[-1.0, -1.0, -1.0, 0.0], [0.0, -2.0, -1.0, -1.0]])
    ref = torch.tensor([[-2.0, -1.0, -0.5, 0.0], [0.0, -1.0, -1.0, -3.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    rewards, kl = kl_shaped_rewards(torch.tensor([3.0, -1.0]), logps, ref, mask, kl_coef=0.1)
    assert kl.flatten().tolist() == pytest.approx([1.0, 0.0, -0.5, 0.0, 0.0, -1.0, 0.0, 2.0])
    assert rewards.flatten().tolist() == pytest.approx([-0.1, 0.0, 0.05 + 3.0, 0.0, 0.0, 0.1, 0.0, -0.2 - 1.0])


PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [5.0, 6.0, 9.0, 9.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])  # 9.0 sits only on masked positions


def test_token_normalisations_match_their_definitions():
    total, count = aggregate_token_loss(PER_TOKEN, MASK, "grpo")
    assert (total / count).item() == pytest.approx((6 / 3 + 4 / 1 + 11 / 2) / 3)
    total, count = aggregate_token_loss(PER_TOKEN, MASK, "dr_grpo", max_completion_length=8)
    assert (total / count).item() == pytest.approx(21 / (3 * 8))
    total, count = aggregate_token_loss(PER_TOKEN, MASK, "dapo")
    assert (total / count).item() == pytest.approx(21 / 6)
    with pytest.raises(ValueError, match="max_completion_length"):
        aggregate_token_loss(PER_TOKEN, MASK, "dr_grpo")
    with pytest.raises(ValueError, match="grpo, dr_grpo, dapo"):
        aggregate_token_loss(PER_TOKEN, MASK, "bnpo")


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batches_add_up_to_the_whole_batch(loss_type):
    whole = aggregate_token_loss(PER_TOKEN, MASK, loss_type, 8)
    parts = [aggregate_token_loss(PER_TOKEN[s], MASK[s], loss_type, 8) for s in (slice(0, 1), slice(1, 3))]
    assert (whole[0] / whole[1]).item() == pytest.approx((sum(p[0] for p in parts) / sum(p[1] for p in parts)).item())


def hand_clipped(logp, old, adv, lo, hi):
    ratio = math.exp(logp - old)
    return -min(ratio * adv, min(max(ratio, 1 - lo), 1 + hi) * adv), ratio * adv > min(max(ratio, 1 - lo), 1 + hi) * adv


def test_ppo_policy_loss_matches_hand_values_and_ignores_masked_tokens():
    logps = torch.tensor([[-1.0, -0.5, -2.0], [-0.2, -3.0, 5.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -1.0, -1.0], [-0.5, -2.0, 0.0]])
    adv = torch.tensor([[1.0, 2.0, -1.0], [-1.0, 0.5, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    total, count, m = ppo_policy_loss(logps, old, adv, mask, clip_eps=0.2, clip_eps_high=0.3,
                                      entropy=torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]]))
    cells = [(b, t) for b in range(2) for t in range(3) if mask[b, t]]
    terms = [hand_clipped(logps[b, t].item(), old[b, t].item(), adv[b, t].item(), 0.2, 0.3) for b, t in cells]
    assert count.item() == 5 and total.item() == pytest.approx(sum(v for v, _ in terms), rel=1e-6)
    assert m["clip_fraction"].item() == pytest.approx(sum(c for _, c in terms) / 5)
    assert m["entropy"].item() == pytest.approx(3.0)
    d = (old - logps).detach()
    want_kl = [math.exp(d[b, t]) - d[b, t].item() - 1 for b, t in cells]
    assert m["approx_kl"].item() == pytest.approx(sum(want_kl) / 5, rel=1e-5)
    total.backward()
    assert logps.grad[1, 2] == 0 and torch.isfinite(logps.grad).all()


def test_ppo_value_loss_matches_hand_values():
    values = torch.tensor([[1.0, 0.0, 2.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.0, 0.0]])
    returns = torch.tensor([[0.0, 1.0, 7.0]])
    total, count, m = ppo_value_loss(values, old, returns, torch.tensor([[1, 1, 0]]), clip_range=0.2)
    # token 0: unclipped (1 - 0)^2 = 1, clipped (0.7 - 0)^2 = 0.49 -> 0.5; token 1: both 1 -> 0.5
    assert count.item() == 2 and total.item() == pytest.approx(0.5 * 1 + 0.5 * 1)
    assert m["value_clip_fraction"].item() == 0.0
    total.backward()
    assert values.grad[0].tolist() == pytest.approx([1.0, -1.0, 0.0])


def test_group_advantages_group_and_rloo():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    g = rewards[:4].tolist()
    mean, std = statistics.mean(g), statistics.stdev(g)
    adv = group_advantages(rewards, 4, "group")
    assert adv[:4].tolist() == pytest.approx([(r - mean) / (std + 1e-4) for r in g])
    assert adv[4:].tolist() == [0.0] * 4  # a constant group teaches nothing
    rloo = group_advantages(rewards, 4, "rloo", scale_std=False)
    loo = [r - (sum(g) - r) / 3 for r in g]
    assert rloo[:4].tolist() == pytest.approx(loo)
    assert group_advantages(rewards, 4, "group", scale_std=False)[:4].tolist() == pytest.approx([r - mean for r in g])
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)
    with pytest.raises(ValueError, match="group, rloo"):
        group_advantages(rewards, 4, "ppo")


def test_constant_reward_groups_are_reported():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5])
    assert constant_reward_groups(rewards, 3).tolist() == [True, False, True]


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_grpo_loss_matches_hand_values(loss_type):
    logps = torch.tensor([[-1.0, -0.5, -2.0], [-0.2, -3.0, 7.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -1.0, -1.0], [-0.5, -2.9, 0.0]])
    ref = torch.tensor([[-1.0, -1.0, -3.0], [-0.3, -3.0, 0.0]])
    adv = torch.tensor([0.7, -1.3])  # one advantage per completion
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    total, count, m = grpo_loss(logps, old, ref, adv, mask, beta=0.04, clip_eps=0.2, loss_type=loss_type,
                                max_completion_length=5)
    rows = []
    for b in range(2):
        row = []
        for t in range(3):
            if mask[b, t]:
                p, r = logps[b, t].item(), ref[b, t].item()
                row.append(hand_clipped(p, old[b, t].item(), adv[b].item(), 0.2, 0.2)[0]
                           + 0.04 * (math.exp(r - p) - (r - p) - 1))
        rows.append(row)
    want = {"grpo": sum(sum(r) / len(r) for r in rows) / 2, "dr_grpo": sum(map(sum, rows)) / (2 * 5),
            "dapo": sum(map(sum, rows)) / 5}[loss_type]
    assert (total / count).item() == pytest.approx(want, rel=1e-6)
    assert m["kl"].item() > 0
    total.backward()
    assert logps.grad[1, 2] == 0 and torch.isfinite(logps.grad).all()


def test_grpo_on_policy_gradient_is_advantage_times_score_function():
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    total, count, m = grpo_loss(logps, None, None, adv, torch.ones(2, 2), loss_type="dapo")
    assert m["ratio"].item() == 1.0 and m["clip_fraction"].item() == 0.0 and "kl" not in m
    total.backward()
    assert logps.grad.tolist() == [[-2.0, -2.0], [1.0, 1.0]]  # d(-ratio * A)/d logp = -A at ratio 1
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, None, None, adv, torch.ones(2, 2), beta=0.1)


def test_ppo_value_loss_takes_the_clipped_error_when_it_is_larger():
    values = torch.tensor([[1.0]], requires_grad=True)
    total, _, m = ppo_value_loss(values, torch.tensor([[0.5]]), torch.tensor([[2.0]]), torch.ones(1, 1), 0.2)
    assert total.item() == pytest.approx(0.5 * (0.7 - 2.0) ** 2) and m["value_clip_fraction"].item() == 1.0
    total.backward()
    assert values.grad.item() == 0.0  # outside the trust region the value gets no gradient
