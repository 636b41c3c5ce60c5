"""KTO: alignment from unpaired feedback (each reply labelled desirable or not), Ethayarajh et al. 2024.

    tuneforge train examples/kto_tiny.yaml

Data: kto rows (a conversation and a boolean `label`), or preference pairs (chosen: desirable, rejected: not).
Each micro-batch of B rows also carries B mismatched rows (row i's prompt with row i+1's reply, built by
`collate_kto`): their policy/reference log-ratio estimates KL(pi || ref), KTO's reference point z0, averaged over
all processes under DDP. Under torchrun every process collates the whole global micro-batch and keeps its own
rows (`KTOTrainer`), so row i is mismatched with row i + 1 of the global micro-batch, as in one process with
batch_size x processes: 1 and N processes compute the same z0 and loss curve. The mismatched rows carry no
gradient (z0 is detached, as in the paper and TRL), so the policy runs them in a forward pass of their own without
autograd (as TRL does): a joint pass would also run the backward through them, a third more work per step. The
reference runs all 2B rows in one pass.

The reference is live: an adapter method runs the same model with its adapters off; other methods keep a frozen
copy. The loss (tuneforge/losses/preference.py, `kto_loss`) weighs desirable and undesirable rows by
`kto.desirable_weight` and `kto.undesirable_weight`.
"""

from __future__ import annotations

import torch

from tuneforge.data.encode_align import kto_balance
from tuneforge.data.types import IGNORE_INDEX
from tuneforge.losses import kto_loss
from tuneforge.training.flops import fed_counts
from tuneforge.training.loop import Stage, Trainer, TrainResult
from tuneforge.training.reference import Reference, make_reference, response_logps
from tuneforge.training.setup import done_line, read_data, save_final, setup_data, setup_model, setup_run


def _stack(a: torch.Tensor, b: torch.Tensor, fill: int) -> torch.Tensor:
    """Rows of `a` then rows of `b`, right-padded with `fill` to one width."""
    width = max(a.shape[1], b.shape[1])
    pad = [torch.nn.functional.pad(x, (0, width - x.shape[1]), value=fill) for x in (a, b)]
    return torch.cat(pad)


class KTOStage(Stage):
    reference_forwards = 1  # the reference model runs on every batch (counted for the MFU)

    def __init__(self, opts, reference: Reference, runtime):
        self.opts, self.reference, self.runtime = opts, reference, runtime

    def targets(self, batch: dict) -> int:
        return int(batch["kto_label"].shape[0])

    def head_positions(self, batch: dict) -> int:
        """The label positions of the B conversations (the MFU counts their tokens, not the mismatched ones')."""
        return super().head_positions(split_mismatched(batch, self.targets(batch))[0])

    def forward_only_tokens(self, batch: dict, tokens: int) -> int:
        """MFU count: the reference over the conversations, and the policy and the reference over the mismatched
        rows (forward only: they estimate the detached KL point)."""
        mismatched = split_mismatched(batch, self.targets(batch))[1]
        fed = mismatched["attention_mask"].sum() if "attention_mask" in mismatched else mismatched["input_ids"].numel()
        return tokens + 2 * int(fed)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        n = batch["kto_label"].shape[0]
        rows, mismatched = split_mismatched(batch, n)
        policy = response_logps(model, rows, self.logits_at_labels).sum
        with torch.no_grad():
            kl_policy = response_logps(model, mismatched, self.logits_at_labels).sum
        both = batch if "sequence_ids" in batch else {  # padding-free: one row holds both already
            "input_ids": _stack(batch["input_ids"], batch["kl_input_ids"], 0),  # padding: masked, never labelled
            "attention_mask": _stack(batch["attention_mask"], batch["kl_attention_mask"], 0),
            "labels": _stack(batch["labels"], batch["kl_labels"], IGNORE_INDEX)}
        ref = self.reference.logps(both, self.logits_at_labels).sum
        z0 = self.reference_point(kl_policy, ref[n:], average=model.training)
        losses, metrics = kto_loss(policy, ref[:n], batch["kto_label"], z0, beta=self.opts.beta,
                                   desirable_weight=self.opts.desirable_weight,
                                   undesirable_weight=self.opts.undesirable_weight)
        return losses.sum(), metrics  # per row (rewards/chosen: desirable rows only); averaged over the step

    def reference_point(self, kl_policy: torch.Tensor, kl_ref: torch.Tensor, average: bool) -> torch.Tensor:
        """z0 = max(0, mean log-ratio of the mismatched rows), the mean taken over every process's rows while
        training (evaluation batches differ in number between processes, so there each keeps its own)."""
        diff = (kl_policy - kl_ref).detach().float()
        total = torch.stack([diff.sum(), torch.tensor(float(diff.numel()), device=diff.device)])
        if average:
            total = self.runtime.all_reduce_sum(total)
        return (total[0] / total[1]).clamp(min=0)


def split_mismatched(batch: dict, n: int) -> tuple[dict, dict]:
    """(the B conversations, the B mismatched ones) as two model batches: padded rows from their own keys, or a
    padding-free row cut where the mismatched sequences begin (ids n.. renumbered from 0)."""
    if "sequence_ids" not in batch:
        keys = ("input_ids", "attention_mask", "labels")
        return {k: batch[k] for k in keys}, {k: batch[f"kl_{k}"] for k in keys}
    cut = int((batch["sequence_ids"][0] < n).sum())  # the conversations come first
    keys = ("input_ids", "position_ids", "labels", "sequence_ids")
    rows, mismatched = {k: batch[k][:, :cut] for k in keys}, {k: batch[k][:, cut:] for k in keys}
    mismatched["sequence_ids"] = mismatched["sequence_ids"] - n
    return rows, mismatched


class KTOTrainer(Trainer):
    """Under torchrun, each rank collates the whole global micro-batch and keeps its own rows: the mismatched rows
    then pair across process boundaries exactly as one process with batch_size x processes pairs them (collated per
    rank, row i met row i + 1 of its own share only, and 2 x 2 drifted from 1 x 4 once z0 was above 0)."""

    def _micro_batches(self) -> list[tuple[dict, int]]:
        if not self.rt.distributed:
            return super()._micro_batches()
        out, size, rank = [], self.t.batch_size, self.rt.rank
        for _ in range(self.t.grad_accum):
            whole = [self.train_items[i] for i in self._global_indices(self.position)]
            self.position += 1
            batch = own_rows(self.collate(whole), rank * size, size, len(whole))
            out.append(({k: v.to(self.rt.device) for k, v in batch.items()}, fed_counts(whole[rank * size:][:size])))
        return out

    def _global_indices(self, position: int) -> list[int]:
        """Every rank's indices of micro-batch `position`, in rank order (the global micro-batch)."""
        order, mine, found = self.order, self.order.rank, []
        try:
            for rank in range(self.rt.world_size):
                order.rank = rank  # the same DataOrder: its cached epoch order serves every rank
                found += order.indices(position)
        finally:
            order.rank = mine
        return found


def own_rows(batch: dict, first: int, size: int, total: int) -> dict:
    """Rows first..first+size of a KTO batch collated from all `total` rows: padded batches by row; a padding-free row
    by its sequences (the conversations, then the mismatched ones), renumbered from 0 as `collate_kto_padding_free`
    numbers them."""
    if "sequence_ids" not in batch:
        return {k: v[first:first + size] if v.shape[0] == total else v for k, v in batch.items()}
    ids = batch["sequence_ids"][0]
    conversation = (ids >= first) & (ids < first + size)
    mismatched = (ids >= total + first) & (ids < total + first + size)
    keep = conversation | mismatched
    out = {k: v[:, keep] for k, v in batch.items() if k not in ("sequence_ids", "kto_label")}
    renumbered = torch.where(conversation, ids - first, ids - total - first + size)
    out["sequence_ids"] = renumbered[keep].unsqueeze(0)
    out["kto_label"] = batch["kto_label"][first:first + size]
    return out


def run(cfg, log=print) -> TrainResult:
    runtime = setup_run(cfg, log)
    rows = read_data(cfg)
    model, tokenizer, method = setup_model(cfg, runtime, log=log)
    train, evals, collate = setup_data(cfg, tokenizer, "kto", runtime, log, read=rows)
    if runtime.is_main:
        for line in kto_balance(train, cfg.kto.desirable_weight, cfg.kto.undesirable_weight):
            log(f"data: {line}")
    reference = make_reference(model, cfg, runtime)  # made now, before any step (and before a resume loads weights)
    stage = KTOStage(cfg.kto, reference, runtime)
    result = KTOTrainer(cfg, runtime, model, method, train, evals, collate, stage, log).train()
    if result.finished:
        save_final(cfg, model, method, tokenizer, runtime)
        if runtime.is_main:
            log(done_line(result, cfg.output_dir))
    return result
