"""DPO family, SimPO, ORPO and KTO against values worked out here with the math module, one pair at a time."""

from __future__ import annotations

import math

import pytest
import torch

from tuneforge.losses import dpo_loss, kto_loss, kto_reference_point, mismatched_completions, orpo_loss, simpo_loss

# four pairs: (policy chosen, policy rejected, ref chosen, ref rejected) summed log-probs
PC = [-10.0, -4.0, -7.5, -30.0]
PR = [-12.0, -3.0, -7.5, -29.0]
RC = [-11.0, -4.5, -7.0, -30.0]
RR = [-11.5, -2.0, -7.5, -31.0]


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def h(i: int) -> float:
    return (PC[i] - RC[i]) - (PR[i] - RR[i])


def expected_dpo(loss_type: str, beta: float, eps: float) -> list[float]:
    out = []
    for i in range(4):
        z = beta * h(i)
        if loss_type == "sigmoid":
            out.append(-(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z))
        elif loss_type == "ipo":
            out.append((h(i) - 1 / (2 * beta)) ** 2)
        elif loss_type == "hinge":
            out.append(max(0.0, 1 - z))
        else:
            out.append(((1 - eps) * -log_sigmoid(z) - eps * -log_sigmoid(-z)) / (1 - 2 * eps))
    return out


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_losses_match_hand_values(loss_type, eps):
    losses, m = dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=0.3, loss_type=loss_type, label_smoothing=eps)
    assert losses.tolist() == pytest.approx(expected_dpo(loss_type, 0.3, eps), rel=1e-12)
    chosen = [0.3 * (PC[i] - RC[i]) for i in range(4)]
    rejected = [0.3 * (PR[i] - RR[i]) for i in range(4)]
    assert m["rewards/chosen"].tolist() == pytest.approx(chosen)
    assert m["rewards/rejected"].tolist() == pytest.approx(rejected)
    assert m["rewards/margins"].tolist() == pytest.approx([c - r for c, r in zip(chosen, rejected)])
    assert m["rewards/accuracies"].tolist() == [float(c > r) for c, r in zip(chosen, rejected)]


def test_label_smoothing_changes_sigmoid_and_robust_only_when_positive():
    base = dpo_loss(t(PC), t(PR), t(RC), t(RR), loss_type="sigmoid")[0]
    smoothed = dpo_loss(t(PC), t(PR), t(RC), t(RR), loss_type="sigmoid", label_smoothing=0.1)[0]
    robust0 = dpo_loss(t(PC), t(PR), t(RC), t(RR), loss_type="robust")[0]
    assert torch.equal(base, robust0) and not torch.allclose(base, smoothed)


def test_equal_logps_give_log2_and_zero_accuracy():
    same = t([-5.0, -1.0])
    losses, m = dpo_loss(same, same, same, same, beta=0.1)
    assert losses.tolist() == pytest.approx([math.log(2)] * 2)
    assert m["rewards/accuracies"].tolist() == [0.0, 0.0]  # a tie is not a correct preference
    simpo, _ = simpo_loss(same, same, beta=2.0, gamma=0.0)
    assert simpo.tolist() == pytest.approx([math.log(2)] * 2)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_huge_margins_stay_finite_with_finite_gradients(loss_type):
    pc = torch.tensor([1e4, -1e4, 0.0], requires_grad=True)  # float32: exp(1e4 * beta) would overflow naively
    zeros = torch.zeros(3)
    losses, _ = dpo_loss(pc, zeros, zeros, zeros, beta=0.5, loss_type=loss_type, label_smoothing=0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all()
    if loss_type == "sigmoid":
        assert losses[0].item() == pytest.approx(0.1 * 0.5 * 1e4, rel=1e-4)  # the smoothed term grows linearly
        assert losses[1].item() == pytest.approx(0.9 * 0.5 * 1e4, rel=1e-4)


def test_dpo_gradient_direction_raises_chosen_and_lowers_rejected():
    pc, pr = torch.tensor([-3.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    losses, _ = dpo_loss(pc, pr, torch.tensor([-3.0]), torch.tensor([-3.0]), beta=0.1)
    losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.05) and pr.grad.item() == pytest.approx(0.05)  # -beta * sigmoid(0)


def test_bad_options_are_refused():
    x = t([0.0])
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)


def test_simpo_matches_hand_values():
    c, r = [-0.5, -2.0, -1.0], [-1.5, -1.0, -1.0]  # mean log-probs per token
    losses, m = simpo_loss(t(c), t(r), beta=2.5, gamma=1.2)
    want = [-log_sigmoid(2.5 * a - 2.5 * b - 1.2) for a, b in zip(c, r)]
    assert losses.tolist() == pytest.approx(want, rel=1e-12)
    assert m["rewards/chosen"].tolist() == pytest.approx([2.5 * a for a in c])
    assert m["rewards/accuracies"].tolist() == [1.0, 0.0, 0.0]
    smoothed, _ = simpo_loss(t(c), t(r), beta=2.5, gamma=1.2, label_smoothing=0.1)
    z = [2.5 * a - 2.5 * b - 1.2 for a, b in zip(c, r)]
    assert smoothed.tolist() == pytest.approx([-0.9 * log_sigmoid(x) - 0.1 * log_sigmoid(-x) for x in z])


def test_orpo_matches_hand_values_with_a_near_certain_response():
    c, r = [-0.3, -2.0, -1e-9], [-1.1, -0.2, -3.0]  # the last chosen is (nearly) probability 1
    losses, m = orpo_loss(t(c), t(r), beta=0.25)
    want = []
    for a, b in zip(c, r):
        a_c = min(a, -1e-6)  # the documented clamp keeps the odds finite
        odds = lambda lp: math.exp(lp) / (1 - math.exp(lp))  # noqa: E731
        log_or = math.log(odds(a_c)) - math.log(odds(b))
        want.append(-a - 0.25 * log_sigmoid(log_or))
    assert losses.tolist() == pytest.approx(want, rel=1e-9)
    assert m["nll"].tolist() == pytest.approx([-a for a in c])
    pc = torch.tensor(c, requires_grad=True)
    orpo_loss(pc, torch.tensor(r), beta=0.25)[0].sum().backward()
    assert torch.isfinite(pc.grad).all()


def test_mismatched_completions_shift_by_one():
    assert mismatched_completions(["y1", "y2", "y3"]) == ["y3", "y1", "y2"]
    with pytest.raises(ValueError, match="at least 2"):
        mismatched_completions(["y1"])


def test_kto_matches_hand_values():
    policy, ref = [-4.0, -6.0, -5.0, -9.0], [-5.0, -5.5, -5.0, -8.0]
    desirable = [True, False, True, False]
    kl_policy, kl_ref = [-7.0, -8.0, -6.0, -9.0], [-7.5, -8.0, -6.0, -9.2]  # mismatched pairs
    z0 = kto_reference_point(t(kl_policy), t(kl_ref))
    assert z0.item() == pytest.approx((0.5 + 0 + 0 + 0.2) / 4, rel=1e-12)
    losses, m = kto_loss(t(policy), t(ref), torch.tensor(desirable), z0, beta=0.2, desirable_weight=1.0,
                         undesirable_weight=1.5)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = [1.0 * (1 - sig(0.2 * ((p - q) - z0.item()))) if d else 1.5 * (1 - sig(0.2 * (z0.item() - (p - q))))
            for p, q, d in zip(policy, ref, desirable)]
    assert losses.tolist() == pytest.approx(want, rel=1e-12)
    assert m["rewards/chosen"].tolist() == pytest.approx([0.2, 0.0])
    assert m["rewards/rejected"].tolist() == pytest.approx([-0.1, -0.2])


def test_kto_reference_point_is_clamped_and_carries_no_gradient():
    kl_policy = torch.tensor([-9.0, -9.0], requires_grad=True)
    z0 = kto_reference_point(kl_policy, torch.tensor([-5.0, -5.0]))
    assert z0.item() == 0.0 and not z0.requires_grad
    policy = torch.tensor([-3.0, -3.0], requires_grad=True)
    losses, _ = kto_loss(policy, torch.tensor([-3.0, -3.0]), torch.tensor([True, False]), z0, beta=0.1)
    assert losses.tolist() == pytest.approx([0.5, 0.5])  # r = z0 = 0: 1 - sigmoid(0)
    losses.sum().backward()
    assert policy.grad.tolist() == pytest.approx([-0.025, 0.025])  # beta * sigmoid'(0) = 0.1 * 0.25


def test_every_preference_loss_has_finite_gradients_at_extreme_inputs():
    big = torch.tensor([-1e4, -1e-3, -50.0, -1e-12])  # float32, as a model would produce
    small = torch.tensor([-1e-3, -1e4, -50.0, -30.0])
    cases = {
        "dpo": lambda c, r: dpo_loss(c, r, small, big, beta=1.0)[0],
        "simpo": lambda c, r: simpo_loss(c, r, beta=2.5, gamma=1.0)[0],
        "orpo": lambda c, r: orpo_loss(c, r, beta=0.5)[0],
        "kto": lambda c, r: kto_loss(torch.cat([c, r]), torch.cat([r, c]), torch.arange(8) < 4,
                                     torch.tensor(1e3), beta=1.0)[0],
    }
    for name, fn in cases.items():
        c, r = big.clone().requires_grad_(), small.clone().requires_grad_()
        losses = fn(c, r)
        losses.sum().backward()
        assert torch.isfinite(losses).all(), name
        assert torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all(), name
