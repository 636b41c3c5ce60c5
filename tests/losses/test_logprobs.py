"""Chunked label log-probs: equal to the naive full log-softmax (values and gradients), and never allocating a
full-vocabulary fp32 tensor for the whole batch (the largest tensor any op creates is measured)."""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tuneforge.data.types import IGNORE_INDEX
from tuneforge.losses import label_positions, sequence_logps, token_entropy, token_logps


def batch(vocab: int = 40, dtype=torch.float32):
    torch.manual_seed(0)
    logits = torch.randn(3, 9, vocab, dtype=dtype)
    labels = torch.randint(0, vocab, (3, 9))
    labels[:, :4] = IGNORE_INDEX  # prompt
    labels[1, 7:] = IGNORE_INDEX  # padding
    labels[2, :8] = IGNORE_INDEX  # a single-token response
    return logits, labels


def naive(logits, labels):
    """The textbook computation: full fp32 log-softmax, gather, mask, sum."""
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = log_probs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * mask
    return picked, mask


def test_token_and_sequence_logps_equal_naive_with_gradients():
    logits, labels = batch()
    for chunk in (1, 4, 1000):
        a = logits.clone().requires_grad_()
        seq = sequence_logps(a, labels, chunk_size=chunk)
        b = logits.clone().requires_grad_()
        picked, mask = naive(b, labels)
        assert torch.allclose(seq.sum, picked.sum(-1), atol=1e-5)
        assert seq.length.tolist() == [5.0, 3.0, 1.0]
        assert torch.allclose(seq.mean, picked.sum(-1) / mask.sum(-1), atol=1e-5)
        weights = torch.tensor([1.0, -2.0, 0.5])  # a non-trivial upstream gradient through sum and mean
        ((seq.sum + seq.mean) * weights).sum().backward()
        ((picked.sum(-1) + picked.sum(-1) / mask.sum(-1)) * weights).sum().backward()
        assert torch.allclose(a.grad, b.grad, atol=1e-6)
    tok, tok_mask = token_logps(logits, labels)
    assert torch.equal(tok_mask, mask) and torch.all(tok[~mask] == 0)


def test_selected_positions_give_the_same_logps():
    logits, labels = batch()
    positions = label_positions(labels, max_share=1.0)
    at_positions = sequence_logps(logits[:, positions], labels, positions, chunk_size=3)
    assert torch.allclose(at_positions.sum, sequence_logps(logits, labels).sum, atol=1e-6)


def test_virtual_token_prefix_is_skipped_and_bf16_logits_work():
    logits, labels = batch(dtype=torch.bfloat16)
    prefixed = torch.cat([torch.randn(3, 2, 40).to(torch.bfloat16), logits], dim=1)  # prompt-tuning prefix
    picked, _ = naive(logits, labels)
    got = sequence_logps(prefixed, labels, chunk_size=2).sum
    assert got.dtype == torch.float32 and torch.allclose(got, picked.sum(-1), atol=1e-4)


def test_sequence_without_labels_gets_zero():
    logits, labels = batch()
    labels[0] = IGNORE_INDEX
    seq = sequence_logps(logits, labels)
    assert seq.sum[0] == 0 and seq.mean[0] == 0 and seq.length[0] == 0


def test_token_entropy_equals_naive():
    logits, _ = batch()
    p = F.softmax(logits, -1)
    want = -(p * p.log()).sum(-1)
    assert torch.allclose(token_entropy(logits, chunk_size=5), want, atol=1e-5)
    assert torch.allclose(token_entropy(torch.zeros(1, 2, 40)), torch.full((1, 2), torch.log(torch.tensor(40.0))))


class Allocations(TorchDispatchMode):
    """Watches every aten op while active (forward and backward): `largest` is the biggest new tensor storage any op
    returned, `peak` the most bytes held at once by storages created inside (alive while any tensor using them is:
    autograd's saved tensors count). Storages that existed before (the logits) are not counted."""

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.live: dict[int, tuple[int, list]] = {}  # storage pointer -> (bytes, weak references to its tensors)
        self.largest = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.existing:
                size, refs = self.live.setdefault(t.untyped_storage().data_ptr(), (t.untyped_storage().nbytes(), []))
                refs.append(weakref.ref(t))
                self.largest = max(self.largest, size)
        self.live = {p: (n, alive) for p, (n, refs) in self.live.items() if (alive := [r for r in refs if r() is not None])}
        self.peak = max(self.peak, sum(n for n, _ in self.live.values()))
        return out


def measure(loss_fn, logits, labels) -> tuple[Allocations, torch.Tensor]:
    leaf = logits.clone().requires_grad_()
    with Allocations([leaf]) as seen:
        loss_fn(leaf, labels).backward()
    return seen, leaf.grad


def test_peak_memory_is_one_gradient_plus_a_chunk_not_the_fp32_batch_at_large_vocab():
    vocab, chunk = 32000, 16
    torch.manual_seed(0)
    logits = torch.randn(2, 64, vocab).to(torch.bfloat16)  # 8 MiB in bf16; the fp32 log-softmax of it: 16 MiB
    labels = torch.randint(0, vocab, (2, 64))
    labels[:, :16] = IGNORE_INDEX
    chunked, grad_chunked = measure(lambda x, y: sequence_logps(x, y, chunk_size=chunk).sum.sum(), logits, labels)
    textbook, grad_naive = measure(lambda x, y: naive(x, y)[0].sum(), logits, labels)
    logits_bytes, fp32_batch, fp32_chunk = logits.numel() * 2, 2 * 63 * vocab * 4, chunk * vocab * 4
    assert textbook.largest >= fp32_batch and textbook.peak >= 2 * fp32_batch  # the measurement sees the copies
    assert chunked.largest <= logits_bytes  # the gradient of the logits, in their own dtype, is the largest
    assert chunked.peak <= logits_bytes + 3 * fp32_chunk  # that gradient plus a few [chunk, V] blocks
    assert chunked.peak < textbook.peak / 3
    assert torch.allclose(grad_chunked.float(), grad_naive.float(), atol=1e-2)


def test_real_model_logits_at_label_positions_give_the_same_sequence_logps(tiny_llama_dir):
    """The path a DPO recipe takes: the model computes logits only where a label is predicted (logits_to_keep with
    an index tensor), then the chunked log-probs; equal to the full logits' log-probs, gradients included."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    torch.manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[:, :8] = IGNORE_INDEX  # prompt
    labels[1, 10:] = IGNORE_INDEX  # a shorter response
    positions = label_positions(labels)
    fast = sequence_logps(model(input_ids=ids, logits_to_keep=positions).logits, labels, positions, chunk_size=3)
    grads_fast = torch.autograd.grad(fast.sum.sum(), model.lm_head.weight)[0]
    picked, _ = naive(model(input_ids=ids).logits, labels)
    grads_full = torch.autograd.grad(picked.sum(), model.lm_head.weight)[0]
    assert torch.allclose(fast.sum, picked.sum(-1), atol=1e-5)
    assert torch.allclose(grads_fast, grads_full, atol=1e-5)
