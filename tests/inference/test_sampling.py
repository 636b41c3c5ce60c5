"""Sampling on tensors: each filter against a hand-worked case, the repetition penalty against transformers', draws
that follow the distribution, and per-row generators that make a row's draws independent of its batch."""

from __future__ import annotations

import pytest
import torch

from tuneforge.inference.sampling import (
    BatchParams,
    apply_openai_penalties,
    apply_repetition_penalty,
    choose_tokens,
    filtered_probs,
)
from tuneforge.inference.types import SamplingParams

PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
LOGITS = PROBS.log()


def _kept(**kw) -> list[int]:
    args = dict(temperature=torch.ones(1), top_k=torch.zeros(1, dtype=torch.long), top_p=torch.ones(1),
                min_p=torch.zeros(1))
    args.update({k: torch.tensor([v]) for k, v in kw.items()})
    probs, order = filtered_probs(LOGITS, **args)
    return sorted(order[0][probs[0] > 0].tolist())


def test_filters():
    assert _kept() == [0, 1, 2, 3]
    assert _kept(top_k=2) == [0, 1]
    assert _kept(top_p=0.5) == [0]  # token 0 alone reaches 0.5
    assert _kept(top_p=0.6) == [0, 1]
    assert _kept(top_p=0.96) == [0, 1, 2, 3]
    assert _kept(min_p=0.5) == [0, 1]  # 0.15 < 0.5 * 0.5
    assert _kept(min_p=0.99) == [0]
    assert _kept(top_k=3, top_p=0.7, min_p=0.2) == [0, 1]


def test_repetition_penalty_equals_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(2, 10)
    history = torch.tensor([[1, 4, 4, 7], [0, 2, 9, 9]])
    seen = torch.zeros(2, 10, dtype=torch.bool).scatter_(1, history, True)
    expected = RepetitionPenaltyLogitsProcessor(1.7)(history, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, torch.tensor([1.7, 1.7])), expected)


def test_openai_penalties_and_logit_bias_by_hand():
    """OpenAI's formula: logit - frequency x count - presence x [count > 0], over the reply's tokens; logit_bias
    added. Greedy rows pick what the adjusted logits say."""
    logits = torch.tensor([[3.0, 2.9, 1.0, 0.0], [3.0, 2.9, 1.0, 0.0]])
    counts = torch.tensor([[2.0, 0, 0, 0], [1.0, 0, 0, 0]])
    got = apply_openai_penalties(logits, counts, torch.tensor([0.5, 0.0]), torch.tensor([0.25, -1.0]))
    torch.testing.assert_close(got, torch.tensor([[2.0, 2.9, 1.0, 0.0], [4.0, 2.9, 1.0, 0.0]]))
    rows = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
            SamplingParams(logit_bias={3: 10.0}), SamplingParams()]
    params = BatchParams.of(rows, "cpu", vocab_size=4)
    chosen = choose_tokens(torch.tensor([[3.0, 2.9, 1.0, 0.0]] * 3), params, _generators(1, 2, 3),
                           counts=torch.tensor([[2.0, 0, 0, 0], [2.0, 0, 0, 0], [2.0, 0, 0, 0]]))
    assert chosen.tolist() == [1, 3, 0]  # penalised away from 0; biased to 3; a row without either keeps 0
    assert BatchParams.of([SamplingParams()], "cpu", vocab_size=4).bias is None  # no [B, V] table unless asked


def _generators(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("top_k", [0, 3])
def test_draws_follow_the_distribution(top_k):
    params = BatchParams.of([SamplingParams(temperature=0.5, top_k=top_k)], "cpu")
    gen = _generators(0)
    counts = torch.zeros(4)
    for _ in range(3000):
        counts[choose_tokens(LOGITS.clone(), params, gen)] += 1
    expected = torch.softmax(LOGITS[0] / 0.5, dim=-1)
    if top_k:  # the filtered row draws over the kept tokens, renormalised
        expected = torch.where(torch.arange(4) < top_k, expected, 0) / expected[:top_k].sum()
    assert torch.allclose(counts / counts.sum(), expected, atol=0.03)


def test_a_rows_draws_do_not_depend_on_its_batch():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    alone = BatchParams.of([SamplingParams(temperature=1.0, top_p=0.9)], "cpu")
    mixed = BatchParams.of([SamplingParams(temperature=1.3, top_k=5), SamplingParams(),
                            SamplingParams(temperature=1.0, top_p=0.9)], "cpu")
    g_alone, g_mixed = _generators(7), _generators(3, 0, 7)
    for _ in range(20):
        mine = choose_tokens(logits[2:].clone(), alone, g_alone)
        together = choose_tokens(logits.clone(), mixed, g_mixed)
        assert together[2] == mine[0]
        assert together[1] == logits[1].argmax()  # greedy row


@pytest.mark.parametrize("settings", [dict(temperature=0.9), dict(temperature=0.9, top_p=0.9),
                                      dict(temperature=0.7, top_k=50, min_p=0.02)])
def test_a_seeded_row_survives_the_rounding_of_another_batch_shape(settings):
    """In a batch of another shape the model's logits for a row differ by float rounding (~1e-6); its seeded draws
    must not. A draw by cumulative sum over the vocabulary flips whenever its number lands within the rounding of
    any token boundary (here about one step in 150 without filters); the exponential race only when the two best
    perturbed scores tie to rounding."""
    vocab, g = 32000, torch.Generator().manual_seed(0)
    alone = BatchParams.of([SamplingParams(**settings)], "cpu")
    mixed = BatchParams.of([SamplingParams(temperature=1.3, top_k=5), SamplingParams(**settings), SamplingParams()],
                           "cpu")
    g_alone, g_mixed = _generators(7), _generators(3, 7, 0)
    for _ in range(1000):
        logits = torch.randn(vocab, generator=g) * 3
        wobbled = logits * (1 + 1e-6 * torch.randn(vocab, generator=g))
        batch = torch.stack([torch.randn(vocab, generator=g), wobbled, torch.randn(vocab, generator=g)])
        assert choose_tokens(batch, mixed, g_mixed)[1] == choose_tokens(logits[None], alone, g_alone)[0]


@pytest.mark.parametrize("sharpness", [0.5, 3.0, 10.0])
def test_candidate_shortcut_keeps_what_a_full_sort_keeps(sharpness):
    """Sorting only the most likely tokens must keep exactly the tokens (and probabilities) a full sort keeps."""
    logits = torch.randn(6, 5000, generator=torch.Generator().manual_seed(0)) * sharpness
    settings = dict(temperature=torch.tensor([1.0, 0.7, 1.3, 1.0, 0.9, 2.0]),
                    top_k=torch.tensor([0, 40, 0, 0, 300, 3000]),
                    top_p=torch.tensor([0.9, 1.0, 0.5, 0.99, 0.8, 1.0]),
                    min_p=torch.tensor([0.0, 0.0, 0.0, 0.05, 0.01, 0.0]))
    probs, order = filtered_probs(logits, **settings)
    full = (logits / settings["temperature"][:, None]).softmax(dim=-1).sort(dim=-1, descending=True)
    ranks = torch.arange(5000)
    keep = (settings["top_k"][:, None] == 0) | (ranks < settings["top_k"][:, None])
    keep &= (full.values.cumsum(dim=-1) - full.values) < settings["top_p"][:, None]
    keep &= full.values >= settings["min_p"][:, None] * full.values[:, :1]
    keep[:, 0] = True
    for row in range(6):
        got = {int(t): float(p) for t, p in zip(order[row], probs[row]) if p > 0}
        want = {int(t): float(p) for t, p in zip(full.indices[row], full.values[row] * keep[row]) if p > 0}
        assert got.keys() == want.keys() and got == pytest.approx(want)
