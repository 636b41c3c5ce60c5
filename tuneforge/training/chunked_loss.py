"""lm_head + cross-entropy in chunks of label positions, so the [positions, vocab] logits are never held whole.

With a 150k vocabulary (Qwen) the logits are the largest tensor of a step: 4 sequences x 2048 positions x 151,936 x
4 bytes (fp32 for the softmax) = 5 GB, plus as much again for their gradient. Here the model returns hidden states
(`logits_to_keep` selects no position, so its own lm_head does no work), and `LinearCrossEntropy` multiplies
`chunk_size` positions at a time by the output matrix, takes their loss, and drops the logits; its backward pass
recomputes each chunk's logits from the saved hidden states (the same trick as losses/logprobs.py, here with the
matmul inside), so the largest temporary is chunk_size x vocab (128 MiB of fp32). Same loss and gradients as the full logits
(tests/training/test_chunked_loss.py). On CUDA, Liger Kernel's fused linear cross-entropy (Triton) is used when
installed.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from tuneforge.data.types import IGNORE_INDEX

CHUNK_BYTES = 128 * 2**20  # fp32 logits per chunk: 220 positions at Qwen's 151,936 vocabulary, 1048 at 32k


def chunk_rows(vocab: int) -> int:
    return max(16, CHUNK_BYTES // (4 * vocab))


class LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T + bias, targets), chunked over rows in both passes."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # softmax precision
        total = torch.zeros((), dtype=acc, device=hidden.device)
        lse = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            logits = F.linear(hidden[sl], weight, bias).to(acc)
            lse[sl] = torch.logsumexp(logits, dim=-1)
            total += (lse[sl] - logits.gather(1, targets[sl, None]).squeeze(1)).sum()
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size = chunk_size
        # the backward pass recomputes the logits as the forward pass made them (in bf16 under autocast)
        ctx.autocast = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(
            hidden.device.type) else None
        return total

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=lse.dtype) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=lse.dtype) if need_b else None
        recompute = (torch.autocast(hidden.device.type, dtype=ctx.autocast) if ctx.autocast is not None
                     else contextlib.nullcontext())
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            h = hidden[sl]
            # d loss / d logits = softmax - one_hot(target), times the incoming gradient
            with recompute:
                logits = F.linear(h, weight, bias)
            g = (logits.to(lse.dtype) - lse[sl, None]).exp_()
            g[torch.arange(g.shape[0], device=g.device), targets[sl]] -= 1
            g *= grad_out
            if need_h:
                grad_h[sl] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w += g.T @ h.to(lse.dtype)
            if need_b:
                grad_b += g.sum(0)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None, grad_b.to(bias.dtype) if need_b else None,
                None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T (+ bias)` against `targets` (rows with IGNORE_INDEX dropped)."""
    keep = targets != IGNORE_INDEX
    hidden, targets = hidden[keep], targets[keep]
    if hidden.is_cuda and _liger() is not None:
        return _liger()(weight, hidden, targets, bias)
    return LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size or chunk_rows(weight.shape[0]))


_LIGER = []


def _liger():
    """Liger Kernel's fused linear cross-entropy (sum reduction), or None when the package is not installed."""
    if not _LIGER:
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

            _LIGER.append(LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum"))
        except ImportError:
            _LIGER.append(None)
    return _LIGER[0]


def supports_chunked_loss(model) -> tuple[bool, str]:
    """Whether the model's logits are exactly `lm_head(last hidden state)`: (ok, why not)."""
    from tuneforge.methods.base import unwrap

    plain = unwrap(model)
    base = plain.get_base_model() if hasattr(plain, "get_base_model") else plain
    config = getattr(base, "config", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return False, "its output layer is not a plain linear layer"
    for key in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
        if getattr(config, key, None) not in (None, 1, 1.0):
            return False, f"its logits are rescaled after lm_head (config.{key})"
    return True, ""


def chunked_causal_loss(model, inputs: dict, labels: torch.Tensor, positions: torch.Tensor | None,
                        chunk_size: int | None = None) -> torch.Tensor:
    """The summed next-token loss at `positions` (all positions when None) without materialising the logits."""
    from tuneforge.methods.base import unwrap

    no_logits = torch.zeros(0, dtype=torch.long, device=labels.device)
    out = model(**inputs, logits_to_keep=no_logits, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    if positions is None:
        positions = torch.arange(hidden.shape[1] - 1, device=labels.device)
    plain = unwrap(model)
    head = (plain.get_base_model() if hasattr(plain, "get_base_model") else plain).get_output_embeddings()
    targets = labels[:, positions + 1]
    rows = hidden[:, positions]
    return linear_cross_entropy(rows.reshape(-1, rows.shape[-1]), head.weight, targets.reshape(-1), head.bias,
                                chunk_size)
