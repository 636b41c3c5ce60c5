"""Padding-free batches: examples laid end to end in one row, no padding, no mask; attended per example by
FlashAttention's varlen kernel on GPUs and by the `auto` attention on CPUs (models/attention.py).

    training: {padding_free: auto}        # the default: on with FlashAttention (and on CPU): pt, sft, dpo, kto, rm
    model: {attn_implementation: flash_attention_2}

dpo's flat row holds the chosen sides of its pairs, then the rejected ones (`collate_pairs_padding_free`); kto's
its conversations, then their mismatched ones (`collate_kto_padding_free`); both with `sequence_ids` so that the
log-prob sums come out per sequence (`losses.sequence_logps`). rm reads each sequence's last hidden state where its
sequence id ends (`models/reward.py`).

Two pieces, both needed because of how transformers (5.x) dispatches packed batches (read in its
`masking_utils.py` and `modeling_flash_attention_utils.py`):

1. **The flat batch** (`data.collate.collate_padding_free`): a micro-batch of B examples becomes ONE row of their
   summed length, `position_ids` restarting at 0 per example, no `attention_mask`, the first label of each
   example ignored (it would be predicted from the previous example). No position is padding, so no FLOP is spent
   on it; `batch_size` still counts examples, so the loss and the optimisation are those of the padded batch.
2. **The varlen kwargs** (`install_varlen_hook`): with a FlashAttention kernel and no 2D mask, transformers infers
   sequence boundaries from `position_ids` only for batch size 1, and recomputes them in every layer (a device
   sync each time); a batch of several packed rows (`data.packing` with batch_size > 1) silently runs plain causal
   attention across the examples of a row. The hook computes `cu_seq_lens_q/k` and `max_length_q/k` once per
   forward from `position_ids` (every example, and every padding block, starts at position 0) and passes them down
   (the model's `**kwargs` reach each attention call), which selects `flash_attn_varlen_func` for any batch shape.

With sdpa or eager nothing here is needed for correctness: a packed or flat batch without a mask gets a
block-diagonal causal mask from `find_packed_sequence_indices`. But that mask is dense over the row, so a flat
row of B examples costs (B x length)^2 attention instead of B x length^2: `auto` leaves sdpa batches on GPUs
padded. On CPU, `model.attn_implementation: auto` (the default) gathers each sequence of a flat row into a padded
batch of its own for attention alone (models/attention.py), so `auto` turns padding-free on there: the linear
layers skip the padding and attention costs what it did padded.
"""

from __future__ import annotations

from typing import Literal

import torch

from tuneforge.errors import ConfigError
from tuneforge.methods import METHODS


def flash_attention(attn_implementation: str | None) -> bool:
    """Whether `model.attn_implementation` names a FlashAttention kernel (flash_attention_2/3, or a hub kernel
    like kernels-community/flash-attn2), by transformers' own test when it has one."""
    if not attn_implementation:
        return False
    try:
        from transformers.utils.generic import is_flash_attention_requested
    except ImportError:  # older transformers: the names it knew
        return "flash" in attn_implementation
    return bool(is_flash_attention_requested(requested_attention_implementation=attn_implementation))


def uses_flash_attention(model: torch.nn.Module) -> bool:
    """Whether the model (under any wrapper) runs a FlashAttention kernel: then packed and flat batches need the
    varlen kwargs (`install_varlen_hook`)."""
    config = getattr(decoder_of(model), "config", None)
    return flash_attention(getattr(config, "_attn_implementation", None))


def use_padding_free(setting: Literal["auto", "always", "never"], stage: str, method: str,
                     attn_implementation: str | None, cpu_auto_attention: bool = False) -> bool:
    """`training.padding_free` resolved for a run: stages pt and sft (causal-LM batches), dpo and kto (log-prob sums
    per sequence) and rm (each sequence's last token); the sampling stages (ppo, grpo) generate.
    auto turns it on where attention runs per sequence without a dense mask over the row: a FlashAttention kernel
    (varlen), or `cpu_auto_attention`, the `auto` attention on CPU (models/attention.py `segment_attention`)."""
    if setting == "never":
        return False
    why = None
    if stage not in ("pt", "sft", "dpo", "kto", "rm"):
        why = f"stage {stage} scores whole pairs, replies or prompts, each in its own row"
    elif not METHODS[method].packs:  # (prefix keys also arrive as a KV cache: packed-sequence detection is off)
        why = f"method {method} puts virtual tokens before the input, which one flat row would give to one example"
    if setting == "always" and why:
        raise ConfigError(f"`training.padding_free: always` cannot apply: {why}. Set `training.padding_free=auto` "
                          f"(on where it applies) or never.")
    return why is None and (setting == "always" or flash_attention(attn_implementation) or cpu_auto_attention)


def varlen_kwargs(position_ids: torch.Tensor) -> dict:
    """FlashAttention varlen arguments for the flattened batch: every sequence starts where a position is 0."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().view(-1)
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError("padding-free batches need position_ids that start at 0 for every sequence")
    end = torch.tensor([flat.numel()], device=flat.device)
    cu_seq_lens = torch.cat([starts, end]).to(torch.int32)
    max_length = int(cu_seq_lens.diff().max())  # the one host sync of the forward pass
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": max_length, "max_length_k": max_length}


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer stack that takes position_ids (LlamaModel in LlamaForCausalLM), under DDP/FSDP and PEFT.
    Hooked there, not on the outer model: PEFT calls the outer model's `.forward` directly, bypassing its hooks."""
    from tuneforge.methods.base import unwrap

    model = unwrap(model)
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    inner = getattr(model, "base_model", model)  # transformers: the decoder under the task head
    return inner if isinstance(inner, torch.nn.Module) else model


def install_varlen_hook(model: torch.nn.Module):
    """Add the varlen kwargs to every forward call of the model's decoder that has position ids and no mask (a
    packed or flat batch); returns the hook handle. Calls with a 2D mask or a KV cache are left as they are."""

    def add_varlen(module, args, kwargs):
        position_ids = kwargs.get("position_ids")
        if (position_ids is None or kwargs.get("attention_mask") is not None
                or kwargs.get("past_key_values") is not None or "cu_seq_lens_q" in kwargs):
            return None
        return args, {**kwargs, **varlen_kwargs(position_ids)}

    return decoder_of(model).register_forward_pre_hook(add_varlen, with_kwargs=True)
