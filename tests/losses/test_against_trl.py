"""Cross-check of the DPO family, SimPO, ORPO, KTO and GRPO against TRL's own code (trl is a test-only dependency).

TRL 1.x has no free-standing loss functions: the DPO, KTO and GRPO losses live inside the trainers'
`_compute_loss`, which take the trainer as `self` and call the model. Building a real trainer needs a model,
tokenizer, dataset and accelerator state; instead these tests call TRL's unbound methods with a minimal stand-in
trainer (just the attributes the loss code reads) and a stand-in model that returns per-token log-probs we chose, so
TRL's arithmetic runs unmodified on the same numbers as ours. CPO (SimPO, cDPO) and ORPO expose their loss as a method
of tensors, called the same way. If TRL changes those internals the stand-ins stop fitting: the tests then fail with
an AttributeError/KeyError naming the missing piece (update the stand-in; our formulas are pinned by
test_preference.py independently).
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tuneforge.losses import dpo_loss, grpo_loss, kto_loss, kto_reference_point, orpo_loss, simpo_loss

trl = pytest.importorskip("trl")

BETA = 0.3
PC = torch.tensor([-10.0, -4.0, -7.5, -30.0], dtype=torch.float64)
PR = torch.tensor([-12.0, -3.0, -7.5, -29.0], dtype=torch.float64)
RC = torch.tensor([-11.0, -4.5, -7.0, -30.0], dtype=torch.float64)
RR = torch.tensor([-11.5, -2.0, -7.5, -31.0], dtype=torch.float64)


def stand_in_accelerator():
    same = lambda x: x  # noqa: E731 - one process: gathering is the identity
    return SimpleNamespace(device=torch.device("cpu"), gather=same, gather_for_metrics=same, num_processes=1)


class StandInModel:
    """Returns, for row i of input_ids (whose first id is a row key), the per-token log-probs table[key]; TRL's
    fused-head outputs also carry entropy, mean logits and top-1 flags, which only feed TRL's own logging."""

    training = True

    def __init__(self, table: dict[int, torch.Tensor]):
        self.table = table

    def __call__(self, input_ids, **_):
        log_probs = torch.stack([self.table[int(k)] for k in input_ids[:, 0]])
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
                               aux_loss=None)


def per_token(total: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Rows of `width` per-token log-probs, spread evenly over the first lengths[i] tokens, summing to total[i]."""
    rows = torch.zeros(len(total), width, dtype=torch.float64)
    for i, (s, n) in enumerate(zip(total.tolist(), lengths.tolist())):
        rows[i, :n] = s / n
    return rows


def trl_dpo(loss_type: str, label_smoothing: float, lengths: torch.Tensor):
    from trl.trainer.dpo_trainer import DPOTrainer

    width = int(lengths.max()) + 1
    logps = per_token(torch.cat([PC, PR]), lengths, width - 1)  # batch is [chosen; rejected]
    model = StandInModel({i: logps[i] for i in range(8)})
    trainer = SimpleNamespace(
        model=model, accelerator=stand_in_accelerator(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=BETA, label_smoothing=label_smoothing, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    completion_mask = (torch.arange(width)[None] < lengths[:, None]).long()
    inputs = {"input_ids": torch.arange(8)[:, None].expand(8, width), "attention_mask": torch.ones(8, width),
              "completion_mask": completion_mask, "ref_chosen_logps": RC, "ref_rejected_logps": RR}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("hinge", 0.0), ("robust", 0.0), ("robust", 0.2),
                                           ("ipo", 0.0)])
def test_dpo_family_equals_trl(loss_type, eps):
    lengths = torch.tensor([3, 5, 1, 8, 2, 4, 6, 7])  # response tokens of the 8 sequences
    trl_loss, trl_metrics = trl_dpo(loss_type, eps, lengths)
    if loss_type == "ipo":  # TRL divides IPO's log-ratios by the response length: the same as feeding mean log-probs
        c, r = lengths[:4].double(), lengths[4:].double()
        ours, metrics = dpo_loss(PC / c, PR / r, RC / c, RR / r, beta=BETA, loss_type="ipo")
    else:
        ours, metrics = dpo_loss(PC, PR, RC, RR, beta=BETA, loss_type=loss_type, label_smoothing=eps)
    assert ours.mean().item() == pytest.approx(trl_loss.item(), rel=1e-9)
    if loss_type != "ipo":
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert metrics[key].mean().item() == pytest.approx(trl_metrics[key][-1], rel=1e-9, abs=1e-12)


def test_sigmoid_label_smoothing_and_simpo_equal_trl_cpo():
    """TRL 1.16's DPO sigmoid ignores label_smoothing (cDPO moved out of it); its CPO loss keeps the cDPO form, and
    CPO is DPO without a reference: our sigmoid loss with a zero reference must match it, and SimPO too."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    for loss_type, eps in [("sigmoid", 0.0), ("sigmoid", 0.15), ("simpo", 0.0), ("simpo", 0.1)]:
        cpo = SimpleNamespace(alpha=0.0, beta=BETA, loss_type=loss_type, label_smoothing=eps, simpo_gamma=0.7,
                              accelerator=stand_in_accelerator())
        trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(cpo, PC, PR)
        if loss_type == "sigmoid":
            zero = torch.zeros_like(PC)
            ours, metrics = dpo_loss(PC, PR, zero, zero, beta=BETA, label_smoothing=eps)
        else:  # CPO's simpo takes the length-normalised log-probs as its inputs, like ours
            ours, metrics = simpo_loss(PC, PR, beta=BETA, gamma=0.7, label_smoothing=eps)
        assert ours.tolist() == pytest.approx(trl_losses.tolist(), rel=1e-9)
        assert metrics["rewards/chosen"].tolist() == pytest.approx(trl_chosen.tolist())
        assert metrics["rewards/rejected"].tolist() == pytest.approx(trl_rejected.tolist())


def test_orpo_odds_ratio_equals_trl():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    chosen_mean, rejected_mean = PC / 10, PR / 7  # mean log-probs per token, all < 0
    orpo = SimpleNamespace(beta=BETA, accelerator=stand_in_accelerator())
    trl_losses, trl_chosen, _, _, trl_log_odds = ORPOTrainer.odds_ratio_loss(orpo, chosen_mean, rejected_mean)
    ours, metrics = orpo_loss(chosen_mean, rejected_mean, beta=BETA)
    # TRL returns beta * log sigmoid(log odds) and subtracts its mean from the NLL: our loss minus our NLL is its
    # negation (TRL computes in float32, hence the tolerance)
    assert (ours - metrics["nll"]).tolist() == pytest.approx((-trl_losses).tolist(), rel=1e-6)
    assert metrics["log_odds_ratio"].mean().item() == pytest.approx(trl_log_odds.item(), rel=1e-6)
    assert metrics["rewards/chosen"].tolist() == pytest.approx(trl_chosen.tolist())


def test_kto_equals_trl():
    from trl.trainer.kto_trainer import KTOTrainer

    policy = torch.tensor([-4.0, -6.0, -5.0, -9.0, -2.0], dtype=torch.float64)
    ref = torch.tensor([-5.0, -5.5, -5.0, -8.0, -2.5], dtype=torch.float64)
    kl_policy = torch.tensor([-7.0, -8.0, -6.0, -9.0, -3.0], dtype=torch.float64)
    kl_ref = torch.tensor([-7.5, -8.0, -6.2, -9.2, -3.1], dtype=torch.float64)
    desirable = torch.tensor([True, False, True, False, False])
    width = 3
    table = {i: torch.tensor([policy[i], 0.0], dtype=torch.float64) for i in range(5)}
    table.update({100 + i: torch.tensor([kl_policy[i], 0.0], dtype=torch.float64) for i in range(5)})
    model = StandInModel(table)
    trainer = SimpleNamespace(
        model=model, accelerator=stand_in_accelerator(), calculate_KL=True, precompute_ref_logps=True,
        aux_loss_enabled=False, loss_type="kto", beta=BETA, desirable_weight=1.3, undesirable_weight=0.8,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    trainer._compute_kl_logps = lambda m, b: KTOTrainer._compute_kl_logps(trainer, m, b)
    ones = torch.ones(5, width, dtype=torch.long)
    inputs = {"input_ids": torch.arange(5)[:, None] * ones, "attention_mask": ones, "completion_mask": ones,
              "KL_input_ids": (100 + torch.arange(5))[:, None] * ones, "KL_attention_mask": ones,
              "KL_completion_mask": ones, "label": desirable.long(), "ref_logps": ref, "ref_KL_logps": kl_ref}
    trl_loss = KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    z0 = kto_reference_point(kl_policy, kl_ref)
    ours, metrics = kto_loss(policy, ref, desirable, z0, beta=BETA, desirable_weight=1.3, undesirable_weight=0.8)
    assert ours.mean().item() == pytest.approx(trl_loss.item(), rel=1e-9)
    assert z0.item() == pytest.approx(trainer._metrics["train"]["kl"][-1], rel=1e-9)
    assert metrics["rewards/chosen"].mean().item() == pytest.approx(trainer._metrics["train"]["rewards/chosen"][-1])


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_grpo_loss_types_equal_trl_with_gradients(loss_type):
    """TRL's GRPOTrainer._compute_loss with the model's per-token log-probs stubbed: same loss, same gradient with
    respect to the log-probs, and the same clip and KL metrics, for each normalisation."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    torch.manual_seed(0)
    n, width, max_len = 4, 6, 8
    logps_value = -torch.rand(n, width, dtype=torch.float64) * 3
    old = logps_value + 0.4 * torch.randn(n, width, dtype=torch.float64)  # some ratios leave [0.8, 1.28]
    ref = logps_value + 0.3 * torch.randn(n, width, dtype=torch.float64)
    mask = (torch.arange(width)[None] < torch.tensor([6, 3, 1, 5])[:, None]).long()
    adv = torch.tensor([1.2, -0.7, 0.3, -1.5], dtype=torch.float64)

    theirs = logps_value.clone().requires_grad_()
    accelerator = stand_in_accelerator()
    accelerator.reduce = lambda x, reduction: x
    accelerator.sync_gradients = True
    trainer = SimpleNamespace(
        model=StandInModel({}), accelerator=accelerator, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=0.04, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28,
        use_vllm=False, current_gradient_accumulation_steps=1, max_completion_length=max_len,
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *a, **k: (theirs, torch.zeros_like(theirs), None))
    inputs = {"prompt_ids": torch.zeros(n, 2, dtype=torch.long), "prompt_mask": torch.ones(n, 2, dtype=torch.long),
              "completion_ids": torch.zeros(n, width, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    trl_loss = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
    trl_loss.backward()

    ours = logps_value.clone().requires_grad_()
    total, count, metrics = grpo_loss(ours, old, ref, adv, mask, beta=0.04, clip_eps=0.2, clip_eps_high=0.28,
                                      loss_type=loss_type, max_completion_length=max_len)
    (total / count).backward()
    assert (total / count).item() == pytest.approx(trl_loss.item(), rel=1e-9)
    assert torch.allclose(ours.grad, theirs.grad, rtol=1e-9, atol=1e-12)
    logged = trainer._metrics["train"]
    assert metrics["clip_fraction"].item() == pytest.approx(logged["clip_ratio/region_mean"][-1])
    assert 0 < metrics["clip_fraction"].item() < 1  # the case exercises clipping
    assert metrics["kl"].item() == pytest.approx(logged["kl"][-1], rel=1e-9)
