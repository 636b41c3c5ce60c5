"""`model.attn_implementation: auto`: SDPA, except where something else is measurably faster on CPU, and per
sequence for a padding-free row (on any device).

PyTorch's SDPA on CPU runs a flash-attention kernel, and in bf16 that kernel's fixed cost dominates short
rows: forward + backward of one attention call (9 heads of 64 dims, 1024 positions per batch) took 10.4 ms at 64
positions per row against 3.4 ms for eager's matmul-softmax-matmul, 13.1 against 6.3 at 128, about the same at
192-256, and eager lost at 1024 (bench/bench_attention.py; bench/RESULTS.md, "Attention kernel on CPU"). In fp32, and
on GPUs, SDPA is as fast or faster at every length.
Transformers picks one kernel per model, but a batch's length is known only when it arrives; so `auto` registers an
attention function (transformers' AttentionInterface) that decides per call: CPU + bf16 + at most
EAGER_MAX_KEYS keys goes to the model's own `eager_attention_forward` (each model file has one, with its own
softcapping or sinks), everything else to transformers' SDPA function, unchanged. Masks are made as for SDPA
(a boolean mask, or none where plain causal attention is meant) and turned into eager's additive mask here.

A padding-free row (`training.padding_free`: several sequences end to end, position ids restarting at 0) would get
from transformers a dense block-diagonal mask over the whole row, whose attention costs (S x L)^2 instead of
S x L^2 (there is no varlen kernel on CPU, nor in SDPA on GPUs: FlashAttention's comes in its own package).
`segment_attention` attends within each sequence instead: one causal call per sequence (fp32 on CPU, few
sequences), or the sequences gathered into a padded batch for attention alone and scattered back. The row's linear
layers skip the padding, attention costs no more than the padded batch's did, and the numbers are the padded batch's
(tests/models/test_attention.py). The row x row mask is not even built: for a one-row batch
whose mask transformers could not skip, `auto_mask` hands the layers a `DeferredMask` (the arguments to build it),
which only a layer that cannot attend per sequence turns into the dense mask. So a row's length is not limited by a
(row x row) mask's memory (64 MiB at 8192 positions, 1 GiB at 32768).

A model class that cannot run SDPA (`_supports_sdpa` false, e.g. Gemma2's softcapping) gets its own eager attention
instead (`settle_attention`, at load), as transformers' own default would pick.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch

AUTO_ATTENTION = "tuneforge_auto"
EAGER_MAX_KEYS = 192  # eager 2-3x faster at 64-128 keys, even at 192-256, slower beyond (bench_attention.py)


def resolve_attention(setting: str) -> str:
    """The attn_implementation to hand transformers for `model.attn_implementation`: auto becomes the per-call
    choice above, on every device (on GPUs each call but a padding-free row's is transformers' SDPA, unchanged); any
    other setting is returned as it is."""
    if setting != "auto":
        return setting
    register()
    return AUTO_ATTENTION


def settle_attention(model):
    """`auto` on a model class that cannot run SDPA (`_supports_sdpa` false: attention softcapping or sinks, as in
    Gemma2 and GPT-OSS, whose extra arguments SDPA would refuse or ignore, or a remote-code class that does not say):
    its own eager attention, as transformers' own default would pick. Returns the model."""
    if model.config._attn_implementation == AUTO_ATTENTION and not getattr(type(model), "_supports_sdpa", False):
        model.set_attn_implementation("eager")
    return model


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(AUTO_ATTENTION, auto_attention)
    AttentionMaskInterface.register(AUTO_ATTENTION, auto_mask)


class DeferredMask:
    """The mask of a one-row batch, not built yet: transformers' `sdpa_mask` arguments. `window` is the layer's
    sliding window (transformers' `local_size`), which per-sequence attention applies itself. Every layer of one
    forward (and a checkpointed block's recomputation) gets the same object, so the row's sequences are worked out
    once, here (one host sync per forward)."""

    _UNSET = object()

    def __init__(self, mask_args: dict):
        self.mask_args, self.window, self._dense, self._segments = mask_args, mask_args.get("local_size"), None, \
            self._UNSET

    def segments(self, query, key, position_ids) -> RowSegments | None:
        """The row's sequences (`flat_segments`), from the first layer that asks."""
        if self._segments is self._UNSET:
            self._segments = flat_segments(query, key, position_ids)
        return self._segments

    def dense(self) -> torch.Tensor | None:
        """The mask SDPA would have got (built once, then shared by every layer that asks)."""
        if self._dense is None:
            from transformers.masking_utils import sdpa_mask

            self._dense = sdpa_mask(**self.mask_args)
        return self._dense


def auto_mask(**mask_args):
    """Masks as SDPA gets them (boolean, or None where plain causal attention is meant), except a one-row batch's
    that transformers could not skip (a padding-free row: position ids restarting), which is deferred."""
    from transformers.masking_utils import sdpa_mask

    if (mask_args.get("batch_size") == 1 and mask_args.get("attention_mask") is None
            and not mask_args.get("allow_is_causal_skip", True) and mask_args.get("q_length", 1) > 1):
        return DeferredMask(mask_args)
    return sdpa_mask(**mask_args)


def auto_attention(module, query, key, value, attention_mask, **kwargs):
    if isinstance(attention_mask, DeferredMask):
        segments = attention_mask.segments(query, key, kwargs.get("position_ids"))
        if segments is not None:
            return segment_attention(module, query, key, value, segments, attention_mask.window, **kwargs)
        attention_mask = attention_mask.dense()
    return short_or_sdpa(module, query, key, value, attention_mask, **kwargs)


def short_or_sdpa(module, query, key, value, attention_mask, **kwargs):
    """The per-call choice of the module docstring: the model's eager attention or transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.device.type != "cpu" or compute_dtype(query) != torch.bfloat16 or key.shape[-2] > EAGER_MAX_KEYS:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    is_causal = kwargs.pop("is_causal", None)
    mask = additive_mask(attention_mask, query, key, getattr(module, "is_causal", True) if is_causal is None
                         else is_causal)
    return eager(module, query, key, value, mask, **kwargs)


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype the attention products run in: autocast's where it is on (under autocast the queries come out of
    RoPE in fp32, and both SDPA and eager's matmuls are cast down), else the tensor's own."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


def additive_mask(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor,
                  is_causal: bool) -> torch.Tensor | None:
    """SDPA's mask (True = attend; None = causal, or no mask at all) as eager's: 0 where attended, the dtype's
    minimum elsewhere, in fp32 as transformers' own eager mask is under autocast (the embeddings' dtype)."""
    q_len, k_len = query.shape[-2], key.shape[-2]
    if mask is None:
        if not is_causal or q_len == 1:  # SDPA's own rule: one query (decoding) attends to every key
            return None
        # bottom-right aligned: query i is position k_len - q_len + i
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    elif mask.dtype != torch.bool:  # already additive (a caller-made float mask): SDPA adds it as it is
        return mask
    return torch.zeros(mask.shape, dtype=torch.float32, device=query.device).masked_fill_(
        ~mask, torch.finfo(torch.float32).min)


class RowSegments(NamedTuple):
    """The sequences of a padding-free row: `bounds` (start, end) of each in the row; `index` [S, Lmax] of each
    sequence's positions and `valid` [S, Lmax] (for the gathered batch); `one_by_one`: attend them in a loop."""

    bounds: list[tuple[int, int]]
    index: torch.Tensor
    valid: torch.Tensor
    one_by_one: bool


LOOP_ALWAYS, LOOP_MAX = 8, 16  # sequences per row: see `attend_one_by_one`


def attend_one_by_one(lengths: list[int]) -> bool:
    """Whether a loop of one causal attention call per sequence (no padding, no mask) beats one call over the
    gathered, padded batch: measured on CPU in fp32 (bench/RESULTS.md), forward + backward of the attention call,
    1.3-3x faster up to 8 sequences (the padded batch computes S x Lmax^2 scores, the loop the sum of L^2), about
    even at 16 of similar lengths, slower at 32 short ones (a call's fixed cost). So: up to 8 always, up to 16 where
    padding would add half again to the scores."""
    longest, squares = max(lengths), sum(n * n for n in lengths)
    return len(lengths) <= LOOP_ALWAYS or (len(lengths) <= LOOP_MAX and len(lengths) * longest ** 2 >= 1.5 * squares)


def flat_segments(query, key, position_ids) -> RowSegments | None:
    """For a padding-free row (one row of several sequences, `position_ids` restarting at 0; its mask deferred):
    its `RowSegments`; None for any other call."""
    if (query.shape[0] != 1 or position_ids is None or query.shape[-2] != key.shape[-2]
            or position_ids.shape[-1] != query.shape[-2]):
        return None
    return row_segments(position_ids)


def row_segments(position_ids: torch.Tensor) -> RowSegments | None:
    """The sequences of a row whose position ids restart at 0 for each; None for fewer than two."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().view(-1).tolist()
    if len(starts) < 2 or starts[0] != 0:
        return None
    bounds = list(zip(starts, starts[1:] + [flat.numel()]))
    lengths = [end - start for start, end in bounds]
    begin, length = (torch.tensor(x, device=flat.device) for x in (starts, lengths))
    offsets = torch.arange(max(lengths), device=flat.device)
    valid = offsets[None, :] < length[:, None]
    return RowSegments(bounds, torch.where(valid, begin[:, None] + offsets[None, :], 0), valid,
                       attend_one_by_one(lengths))


def causal_window_mask(length: int, window: int | None, device) -> torch.Tensor:
    """[length, length] booleans, query by key: causal, and within the sliding `window` (a key at most window - 1
    positions back, as transformers' sliding masks) where one is given."""
    offsets = torch.arange(length, device=device)
    allowed = offsets[None, :] <= offsets[:, None]
    if window:
        allowed &= offsets[:, None] - offsets[None, :] < window
    return allowed


def segment_attention(module, query, key, value, segments: RowSegments, window: int | None = None, **kwargs):
    """Attention of a padding-free row, within each of its sequences (and the layer's sliding `window`), through
    `short_or_sdpa`; [1, T, heads, dim] in the row's order. Why: the linear layers keep the row's no-padding saving,
    while attention costs no more than the padded batch's did; a dense block-diagonal mask over the whole row costs
    (S x L)^2 instead (no varlen kernel on CPU or in SDPA). Two ways: a loop of one causal call per sequence (slices
    of the row, no padding, no mask) where `attend_one_by_one` says so, for fp32 on CPU; else (bf16: many small
    matmuls lost to one batched one, 0.9x on the quickstart; GPUs: not measured) each sequence gathered into a padded
    [S, heads, Lmax, dim] batch attended under a causal + padding mask and scattered back. Same numbers as the padded
    batch to rounding (tests/models/test_attention.py)."""
    kwargs.pop("position_ids", None)
    kwargs.pop("is_causal", None)
    if segments.one_by_one and query.device.type == "cpu" and compute_dtype(query) == torch.float32:
        # split, not slices: a slice's backward writes its gradient into a zero-filled tensor of the whole row, so S
        # sequences cost S full-size fills and adds per tensor; split's backward is one concatenation (10% of the
        # loop's time, bench/RESULTS.md)
        lengths = [end - start for start, end in segments.bounds]
        outs = []
        for part in zip(*(t.split(lengths, dim=2) for t in (query, key, value))):
            length = part[0].shape[2]
            mask = causal_window_mask(length, window, query.device)[None, None] if window and length > window else None
            outs.append(short_or_sdpa(module, *part, mask, is_causal=mask is None, **kwargs)[0])
        return torch.cat(outs, dim=1), None

    index, valid = segments.index, segments.valid

    def gather(t):  # [1, heads, T, dim] -> [S, heads, Lmax, dim]
        return t[0][:, index].transpose(0, 1)

    mask = (causal_window_mask(index.shape[1], window, query.device)[None] & valid[:, None, :])[:, None]
    out, weights = short_or_sdpa(module, gather(query), gather(key), gather(value), mask, **kwargs)
    return out[valid][None], weights  # [S, Lmax, heads, dim] -> [1, T, heads, dim]; every query saw its first key
