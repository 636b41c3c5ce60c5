"""Training tricks that work with any method: NEFTune noise and R-Drop.

Both are small pure helpers the training loop calls; neither changes what is saved.

    handle = neftune_hook(model, alpha=5.0)       # once, after the method is applied; handle.remove() at the end
    check_rdrop_applicable(model)                 # once, before training, when rdrop_alpha > 0
    out = rdrop_forward(model, batch, alpha=1.0)  # per micro-batch instead of the plain forward
    (out.loss_sum / global_tokens).backward()     # log out.ce_sum / tokens as the usual loss

transformers' Trainer has NEFTune built in, but we use our own loop, and R-Drop exists in no library we depend on,
so both are written here (a dozen lines each).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tuneforge.errors import ConfigError
from tuneforge.losses import causal_lm_loss, rdrop_loss
from tuneforge.methods.base import unwrap


def neftune_noise_bound(alpha: float, seq_len: int, hidden: int) -> float:
    """The largest absolute noise NEFTune adds to one embedding coordinate: alpha / sqrt(L * d)."""
    return alpha / math.sqrt(seq_len * hidden)


def neftune_hook(model: torch.nn.Module, alpha: float) -> torch.utils.hooks.RemovableHandle:
    """NEFTune (Jain et al., 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning",
    https://arxiv.org/abs/2310.05914): during training add uniform noise U(-1, 1) * alpha / sqrt(L * d) to the input
    embeddings (L = sequence length of the batch, d = hidden size). In eval mode (evaluation, generation) the
    embeddings are untouched. Returns the hook handle; `handle.remove()` turns the noise off.

    L is the padded batch length, as in transformers' Trainer implementation (the paper's reference code uses the
    same tensor shape). Works on PEFT-wrapped models too (their input embeddings are the base model's).
    """
    if alpha <= 0:
        raise ConfigError(f"`neftune_alpha` must be positive, got {alpha} (the paper uses 5, 10 or 15).")
    embeddings = unwrap(model).get_input_embeddings()

    def add_noise(module, inputs, output):
        if not module.training:
            return output
        bound = neftune_noise_bound(alpha, output.size(1), output.size(2))
        return output + torch.empty_like(output).uniform_(-bound, bound)

    return embeddings.register_forward_hook(add_noise)


def has_active_dropout(model: torch.nn.Module) -> bool:
    """Whether a training-mode forward is random: a Dropout module with p > 0, or a config dropout (e.g. Llama's
    `attention_dropout`, applied functionally inside attention) above 0."""
    model = unwrap(model)
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    keys = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop")
    return any(float(getattr(config, k, 0.0) or 0.0) > 0 for k in keys)


def check_rdrop_applicable(model: torch.nn.Module) -> None:
    """R-Drop compares two dropout passes; with no dropout anywhere they are identical and R-Drop does nothing."""
    if not has_active_dropout(model):
        raise ConfigError("`rdrop_alpha` is set but this model has no active dropout (no Dropout layer with p > 0 "
                          "and attention_dropout = 0), so both forward passes would be identical and R-Drop would "
                          "add nothing. Use a method with dropout (e.g. `lora.dropout: 0.1`) or set rdrop_alpha to 0.")


@dataclass
class RDropOutput:
    loss_sum: torch.Tensor  # what to backpropagate (divided by the global label-token count)
    ce_sum: torch.Tensor  # mean of the two passes' summed cross-entropies: the usual loss, for logging
    kl_sum: torch.Tensor  # alpha/2 * symmetric KL, summed over label tokens
    n_tokens: torch.Tensor


def rdrop_forward(model: torch.nn.Module, batch: dict, alpha: float) -> RDropOutput:
    """One R-Drop step (Liang et al., 2021, https://arxiv.org/abs/2106.14448) for a causal LM batch with
    `input_ids`, `labels` and optional `attention_mask` (other tensor entries are passed to the model as well).

    As in the paper's reference code, the batch is duplicated along the batch dimension and run in ONE forward
    pass: every row draws its own dropout masks, so the two copies see different dropout. The paper's objective is
    NLL_a + NLL_b + alpha/2 * (KL(a||b) + KL(b||a)); we return half of it, (NLL_a + NLL_b)/2 + 0.5 * rdrop_loss,
    so the cross-entropy part keeps the usual per-token scale and `alpha` means what it means in the paper.
    """
    labels = batch["labels"]
    n = labels.shape[0]
    inputs = {k: torch.cat([v, v]) for k, v in batch.items() if k != "labels" and isinstance(v, torch.Tensor)}
    logits = model(**inputs).logits
    logits = logits[:, -labels.shape[1]:, :]  # prompt-learning models may prepend virtual-token positions
    logits_a, logits_b = logits[:n], logits[n:]
    ce_a, n_tokens = causal_lm_loss(logits_a, labels)
    ce_b, _ = causal_lm_loss(logits_b, labels)
    kl, _ = rdrop_loss(logits_a, logits_b, labels, alpha)
    ce = 0.5 * (ce_a + ce_b)
    return RDropOutput(loss_sum=ce + 0.5 * kl, ce_sum=ce.detach(), kl_sum=kl.detach(), n_tokens=n_tokens)


def rdrop_stage_loss(model: torch.nn.Module, batch: dict, alpha: float) -> tuple[torch.Tensor, dict]:
    """`rdrop_forward` in the shape of `Stage.loss` (loss sum, extra metrics); the metrics are per label token."""
    out = rdrop_forward(model, batch, alpha)
    n = max(int(out.n_tokens), 1)
    return out.loss_sum, {"ce": float(out.ce_sum) / n, "rdrop_kl": float(out.kl_sum) / n}
