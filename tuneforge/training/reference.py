"""Response log-probs of the policy and of the reference model, for the preference stages (dpo, kto).

    logps = response_logps(model, batch)          # SequenceLogps: .sum, .mean, .length, one per sequence
    reference = Reference(model, keep_copy=True)  # before training changes the weights
    ref = reference.logps(batch)                  # no gradient

A batch is padded rows (`input_ids`, `attention_mask`, `labels`) or one padding-free row of the sequences end to
end (`input_ids`, `position_ids` restarting at 0 per sequence, `labels`, `sequence_ids`; `data.collate`).

Where the reference comes from:
- an adapter method (the model is a PEFT model: lora, qlora, dora, ia3, ...): the same model with its adapters
  switched off (`disable_adapter()`), so no second copy is held;
- a prompt method (prompt/prefix tuning, p-tuning): the same model with the virtual tokens' starting values
  swapped in (the policy training starts from; switching them off would be another model);
- any other method (full, freeze, ...): a frozen copy made now, before the first step, unless `keep_copy` is False
  (the precomputed reference: `precompute` runs once over the data before training, on the model itself).
"""

from __future__ import annotations

import contextlib
import copy

import torch

from tuneforge.losses import SequenceLogps, label_positions, sequence_logps
from tuneforge.methods.base import unwrap


def response_logps(model, batch: dict, at_labels: bool = True) -> SequenceLogps:
    """Summed and mean log-probs of each sequence's label tokens, through the chunked helper (never a full-vocabulary
    fp32 copy of the batch's logits). `at_labels`: the model takes `logits_to_keep` (see `accepts_logits_to_keep`),
    so the output layer runs only where some row has a label."""
    labels = batch["labels"]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    inputs["use_cache"] = False  # with a cache transformers would not see a padding-free row's sequence boundaries
    positions = label_positions(labels) if at_labels else None
    if positions is not None:
        inputs["logits_to_keep"] = positions
    return sequence_logps(model(**inputs).logits, labels, positions, sequence_ids=batch.get("sequence_ids"))


class Reference:
    """The frozen reference policy pi_ref of DPO and KTO (see the module docstring for where it comes from)."""

    def __init__(self, model, keep_copy: bool = True):
        base = unwrap(model)
        self.uses_adapters = hasattr(base, "disable_adapter") and hasattr(base, "peft_config")
        self.initial = None
        if self.uses_adapters and any(getattr(c, "is_prompt_learning", False) for c in base.peft_config.values()):
            # a prompt method's policy starts with its virtual tokens, so switching the adapter off is not the
            # starting policy (DPO's first loss would not be ln 2): keep the few trained values as they start
            self.uses_adapters = False
            self.initial = {n: p.detach().clone() for n, p in base.named_parameters() if p.requires_grad}
        if self.uses_adapters or self.initial is not None or not keep_copy:
            self.module, self.copy = base, None
        else:
            self.copy = copy.deepcopy(base).eval()  # made before the first step: the weights training starts from
            self.copy.requires_grad_(False)
            self.module = self.copy

    def _context(self):
        return self.module.disable_adapter() if self.uses_adapters else contextlib.nullcontext()

    def _forward(self):
        """What the reference pass calls: the module, or for a prompt method the module with the virtual tokens'
        starting values put in by `functional_call` (not copied into the parameters: the policy's graph of this
        step still holds them)."""
        if self.initial is None:
            return self.module
        return lambda **inputs: torch.func.functional_call(self.module, self.initial, args=(), kwargs=inputs)

    @torch.no_grad()
    def logps(self, batch: dict, at_labels: bool = True) -> SequenceLogps:
        with self._context(), eval_mode(self.module):
            return response_logps(self._forward(), batch, at_labels)


@contextlib.contextmanager
def eval_mode(module):
    """`module` in eval mode for one reference pass, its modes back afterwards. Why: with adapters (or a prompt
    method) the reference is the policy itself, which is in training mode, so the reference pass got the model's
    dropout and NEFTune's embedding noise: a reference that changed from call to call and was not the precomputed
    one (computed in eval mode). The frozen copy is in eval mode already."""
    if not module.training:
        yield
        return
    kept_in_eval = [m for m in module.modules() if not m.training]
    module.eval()
    try:
        yield
    finally:
        module.train()
        for m in kept_in_eval:  # a submodule the run keeps in eval mode stays so
            m.training = False


@torch.inference_mode()
def precompute(reference: Reference, items: list, collate, batch_size: int, device, autocast,
               at_labels: bool = True) -> dict[int, tuple[float, float]]:
    """Reference log-prob sums of every preference pair in `items`, once, before training: {id(pair): (chosen,
    rejected)}. Every process computes all of them (no communication; the same numbers on every rank).

    Why it is cheaper than a training step's reference pass: inference_mode (no autograd bookkeeping at all), pairs
    sorted by length so a batch holds similar lengths (little padding), and twice the training batch per forward
    (nothing is kept for a backward pass). Padding does not change a row's log-probs: the attention mask hides it."""
    was_training = reference.module.training
    reference.module.eval()
    table = {}
    order = sorted(range(len(items)), key=lambda i: len(items[i]))
    for start in range(0, len(order), 2 * batch_size):
        chunk = [items[i] for i in order[start:start + 2 * batch_size]]
        batch = {k: v.to(device) for k, v in collate(chunk).items()}
        with autocast():
            sums = reference.logps(batch, at_labels).sum
        chosen, rejected = sums.float().cpu().chunk(2)
        for i, pair in enumerate(chunk):  # plain floats: no inference-mode tensor reaches the training step
            table[id(pair)] = (float(chosen[i]), float(rejected[i]))
    reference.module.train(was_training)
    return table


def with_reference(collate, table: dict[int, tuple[float, float]]):
    """`collate` for pairs plus `ref_logps` [2B] (chosen sums then rejected sums, in the batch's row order)."""

    def collate_fn(items):
        batch = collate(items)
        refs = torch.tensor([table[id(pair)] for pair in items], dtype=torch.float32)  # [B, 2]
        batch["ref_logps"] = torch.cat([refs[:, 0], refs[:, 1]])
        return batch

    return collate_fn


def make_reference(model, cfg, runtime, keep_copy: bool = True) -> Reference:
    """`Reference(model, keep_copy)`, except where the reference is a frozen copy (full, freeze, ...) of a model
    sharded by FSDP, which cannot be deep-copied: there a second sharded model holds the starting weights."""
    if runtime.engine != "fsdp" or not keep_copy:
        return Reference(model, keep_copy)
    own = Reference(model, keep_copy=False)  # no copy made: says whether this method needs one
    if own.uses_adapters or own.initial is not None:
        return Reference(model, keep_copy)
    from tuneforge.training.distributed import sharded_frozen_copy

    return Reference(sharded_frozen_copy(model, cfg, runtime), keep_copy=False)
