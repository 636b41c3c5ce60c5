"""The one training loop: every stage uses it and supplies only a `Stage` (how a batch becomes a loss).

Per optimizer step it takes `grad_accum` micro-batches, counts the loss targets of the whole global batch first
(all ranks, all micro-batches) and divides each micro-batch's summed loss by that count. So 1 process with batch 8,
8 micro-batches of 1, and 2 processes with batch 4 all optimise the same objective.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from tuneforge.configs.schema import ALIGN_SECTIONS, dump_config
from tuneforge.configs.typed import to_dict
from tuneforge.data.types import IGNORE_INDEX
from tuneforge.errors import UserError, counted
from tuneforge.kernels import onednn_linear
from tuneforge.losses import causal_lm_loss, label_positions, selected_positions_loss
from tuneforge.methods.base import Method, unwrap
from tuneforge.training import checkpoint as ckpt
from tuneforge.training.chunked_loss import chunked_causal_loss
from tuneforge.training.distributed import build_strategy, load_sharded, save_sharded, shared_temp_name
from tuneforge.training.flops import EfficiencyMeter, WorkTally, fed_counts
from tuneforge.training.interrupt import StopRequest, resume_command
from tuneforge.training.metrics import MetricsLogger, MetricWindow, format_metrics
from tuneforge.training.optim import build_optimizer, build_scheduler, total_steps_for
from tuneforge.training.output_dir import prepare_output_dir, write_atomic
from tuneforge.training.padding_free import install_varlen_hook, uses_flash_attention
from tuneforge.training.runtime import Runtime


class Stage:
    """What a recipe supplies: the loss of a micro-batch. Default: next-token cross-entropy on `labels`, or the
    R-Drop objective when `rdrop_alpha` > 0 (set by the trainer from `training.rdrop_alpha`)."""

    rdrop_alpha: float = 0.0
    logits_at_labels: bool = False  # set by the trainer when the model takes `logits_to_keep` (see below)
    chunked_loss: bool = False  # set by the trainer from `training.chunked_loss` (training/chunked_loss.py)
    reference_forwards: int = 0  # forward-only passes of a frozen model over the same tokens per step (MFU count)

    def targets(self, batch: dict) -> int:
        """How many loss terms the batch contributes (the normaliser across micro-batches and ranks)."""
        return label_count(batch)

    # ---- what the MFU counts (training/flops.py) ----
    def head_positions(self, batch: dict) -> int:
        """Positions whose output-layer logits the loss reads: the label positions (lm_head is charged there only)."""
        return label_count(batch)

    def forward_only_tokens(self, batch: dict, tokens: int) -> int:
        """Token passes of forward-only work per micro-batch of `tokens` trained tokens: a live reference model's
        forward over the same tokens, `reference_forwards` times."""
        return self.reference_forwards * tokens

    @property
    def train_copies(self) -> int:
        """Training passes over each token per step: R-Drop runs every row twice (two dropout masks)."""
        return 2 if self.rdrop_alpha > 0 else 1

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """(sum of loss terms, extra metrics). A metric is a tensor of per-item values (one per pair, row, ...;
        possibly empty) or a number (one item): the trainer logs the mean over every item of the whole step, all
        micro-batches and all ranks (`StepMetrics`). Return the same keys on every call."""
        if self.rdrop_alpha > 0 and model.training:
            from tuneforge.tricks import rdrop_stage_loss

            return rdrop_stage_loss(model, batch, self.rdrop_alpha)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        positions = label_positions(batch["labels"]) if self.logits_at_labels else None
        if self.chunked_loss:  # lm_head + loss in chunks of positions: the full logits never exist
            return chunked_causal_loss(model, inputs, batch["labels"], positions), {}
        if positions is not None:  # logits only where a label is predicted: same loss, much less lm_head work
            logits = model(**inputs, logits_to_keep=positions).logits
            return selected_positions_loss(logits, batch["labels"], positions)[0], {}
        logits = model(**inputs).logits
        logits = logits[:, -batch["labels"].shape[1]:]  # prompt-learning methods prepend virtual-token positions
        loss_sum, _ = causal_lm_loss(logits, batch["labels"])
        return loss_sum, {}


def label_count(batch: dict) -> int:
    """Positions whose next token has a label (the loss terms of next-token cross-entropy)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def accepts_logits_to_keep(model) -> bool:
    """Whether `model(..., logits_to_keep=index_tensor)` selects positions of the caller's sequence. Not for
    prompt-learning PEFT models: their virtual tokens shift every position (and PEFT builds the call itself)."""
    import inspect

    model = unwrap(model)
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None:
        if peft_config.is_prompt_learning:
            return False
        model = model.get_base_model()
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def use_chunked_loss(setting: str, model, stage: Stage, runtime: Runtime) -> bool:
    """`training.chunked_loss`: auto turns it on on GPUs (where memory binds) when the logits are big (vocabulary
    >= 32k) and it applies; on CPU its speed is not yet measured well enough to make it the default."""
    from tuneforge.training.chunked_loss import supports_chunked_loss

    if setting == "never":
        return False
    ok, why = supports_chunked_loss(model)
    if not stage.logits_at_labels:
        ok, why = False, "the model does not take `logits_to_keep` (prompt-learning methods shift positions)"
    elif runtime.sharded:
        ok, why = False, f"with distributed={runtime.engine} the output layer may be sharded"
    elif stage.rdrop_alpha > 0:
        ok, why = False, "R-Drop compares full logits of two passes"
    if setting == "always" and not ok:
        raise UserError(f"training.chunked_loss: always cannot apply to this run: {why}. Set "
                        f"`training.chunked_loss=auto` (on where it applies) or never.")
    vocab = getattr(getattr(unwrap(model), "config", None), "vocab_size", 0) or 0
    return ok and (setting == "always" or (vocab >= 32_000 and runtime.device.type == "cuda"))


class StepMetrics:
    """A stage's extra metrics over a whole optimizer step: per key, the sum and the count of the items it reported
    (pairs, rows) over every micro-batch, summed over ranks. Without this a logged accuracy would be the last
    micro-batch's of rank 0 only."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}  # on the device: no host sync per micro-batch
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict) -> None:
        for key, value in metrics.items():
            value = torch.as_tensor(value).detach().double()
            self.sums[key] = self.sums.get(key, 0) + value.sum()
            self.counts[key] = self.counts.get(key, 0) + value.numel()

    def means(self, runtime: Runtime) -> dict[str, float]:
        """The step's mean per key; a key no rank had an item for (KTO's rewards/chosen in a step of undesirable
        rows only) is left out rather than logged as 0. Collective: every rank calls it with the same keys."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        sums = torch.stack([self.sums[k].to(runtime.device) for k in keys])
        counts = torch.tensor([float(self.counts[k]) for k in keys], dtype=torch.float64, device=runtime.device)
        totals = torch.stack([sums, counts])
        totals = runtime.all_reduce_sum(totals)
        return {k: float(totals[0, i] / totals[1, i]) for i, k in enumerate(keys) if totals[1, i] > 0}


def use_onednn_matmul(setting: str, runtime: Runtime, compile_blocks: bool) -> bool:
    """`training.cpu_matmul`: whether fp32 CPU linears (forward and backward) run through oneDNN
    (kernels/onednn_linear.py). auto: where oneDNN measured faster on this CPU (`faster_here`), leaving out what it
    is not tested with: compiled blocks (Dynamo would trace the mode) and sharded engines (FSDP2 and DeepSpeed swap
    parameters around the forward)."""
    if setting == "default":
        return False
    applies = runtime.device.type == "cpu" and runtime.dtype == torch.float32
    if setting == "onednn":
        if not (applies and onednn_linear.available()):
            why = ("this run is not fp32 on CPU" if not applies else "this torch build has no oneDNN linear "
                   "(or TUNEFORGE_ONEDNN_LINEAR=0 is set)")
            raise UserError(f"training.cpu_matmul: onednn cannot apply: {why}. Set `training.cpu_matmul=auto` "
                            f"(oneDNN where it applies) or default.")
        return True
    return (applies and onednn_linear.available() and not compile_blocks
            and not runtime.sharded and onednn_linear.faster_here())


@dataclass
class DataOrder:
    """A deterministic, resumable order of micro-batches: epoch e is a permutation seeded by (seed, e); rank r takes
    its slice of each global micro-batch. The position is one integer (micro-batches consumed).

    With `lengths` (data.group_by_length), each run of `group_size` global micro-batches of the permutation is sorted
    by length and cut into batches whose order is then shuffled: similar lengths share a batch (little padding)
    while the batch sequence stays random. Grouping is per global micro-batch, so 1 or N processes and any
    grad_accum see the same batches."""

    n_items: int
    batch_size: int  # per rank
    world_size: int
    rank: int
    seed: int
    lengths: list[int] | None = None
    group_size: int = 64
    _cache: tuple[int, list[int]] | None = field(default=None, repr=False, compare=False)

    @property
    def per_epoch(self) -> int:
        return self.n_items // (self.batch_size * self.world_size)

    def indices(self, position: int) -> list[int]:
        epoch, k = divmod(position, self.per_epoch)
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self.epoch_order(epoch))
        start = (k * self.world_size + self.rank) * self.batch_size
        return self._cache[1][start:start + self.batch_size]

    def epoch_order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.n_items, generator=gen).tolist()
        if self.lengths is None:
            return perm
        width = self.batch_size * self.world_size
        usable = self.per_epoch * width  # the incomplete last global batch is never used: keep it out of groups
        grouped = []
        for start in range(0, usable, width * self.group_size):
            chunk = sorted(perm[start:min(start + width * self.group_size, usable)], key=lambda i: -self.lengths[i])
            batches = [chunk[b:b + width] for b in range(0, len(chunk), width)]
            grouped += [i for b in torch.randperm(len(batches), generator=gen).tolist() for i in batches[b]]
        return grouped + perm[usable:]


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    eval_loss: float | None
    history: list[dict] = field(default_factory=list)
    finished: bool = True
    interrupted: int | None = None  # the signal (SIGINT/SIGTERM) that stopped the run early, if one did


class Trainer:
    def __init__(self, cfg, runtime: Runtime, model, method: Method, train_items: list, eval_items: list,
                 collate: Callable[[list], dict], stage: Stage | None = None, log: Callable[[str], None] = print):
        self.cfg, self.t, self.rt = cfg, cfg.training, runtime
        self.model, self.method = model, method
        self.train_items, self.eval_items = train_items, eval_items
        self.collate, self.stage = collate, stage or Stage()
        self.output_dir = Path(cfg.output_dir)
        lengths = [len(item) for item in train_items] if cfg.data.group_by_length else None
        self.order = DataOrder(len(train_items), self.t.batch_size, runtime.world_size, runtime.rank,
                               cfg.data.seed, lengths)
        if self.order.per_epoch == 0:
            raise UserError(f"Only {len(train_items)} {_item_noun(train_items)}, fewer than one global batch "
                            f"(batch_size {self.t.batch_size} x {runtime.world_size} processes). Lower "
                            f"`training.batch_size` or add data.")
        self.total_steps = total_steps_for(self.t, self.order.per_epoch)
        self.strategy = build_strategy(cfg, runtime)
        self.optimizer = build_optimizer(model, method, cfg)
        self.scheduler = build_scheduler(self.optimizer, self.t, self.total_steps)
        # DeepSpeed wraps model and optimizer in its engine here (the others wrapped the model in setup_model)
        self.model, self.optimizer = self.strategy.prepare(model, self.optimizer, runtime)
        self.say = log if runtime.is_main else (lambda _: None)
        self._say_partial_batch(train_items)
        self._say_past_the_context()
        self._say_settings_without_effect()
        self._say_epochs_rounded_up()
        self.step, self.position = 0, 0
        self.window = MetricWindow()
        self.fingerprint = ckpt.run_fingerprint(cfg, runtime.world_size, train_items)
        self.meter = EfficiencyMeter(unwrap(model), runtime.device, runtime.dtype, runtime.world_size)
        self._resumed = False
        self._install_tricks()

    def _install_tricks(self) -> None:
        """NEFTune, R-Drop and label-position logits work with any method and stage, so they live in the loop."""
        from tuneforge.tricks import check_rdrop_applicable, neftune_hook

        self._neftune = neftune_hook(unwrap(self.model), self.t.neftune_alpha) if self.t.neftune_alpha > 0 else None
        if self.t.rdrop_alpha > 0:
            check_rdrop_applicable(unwrap(self.model))
            self.stage.rdrop_alpha = self.t.rdrop_alpha
        on = []  # neither shows otherwise but in the loss: a user checking their config could not tell
        if self._neftune is not None:
            on.append(f"NEFTune (noise alpha {self.t.neftune_alpha:g} on the input embeddings while training)")
        if self.t.rdrop_alpha > 0:
            on.append(f"R-Drop (alpha {self.t.rdrop_alpha:g}: two dropout passes per batch, their KL as `rdrop_kl`)")
        if on:
            self.say(f"training tricks: {'; '.join(on)}")
        self.stage.logits_at_labels = accepts_logits_to_keep(self.model)
        self._varlen = install_varlen_hook(self.model) if uses_flash_attention(self.model) else None
        self.stage.chunked_loss = use_chunked_loss(self.t.chunked_loss, self.model, self.stage, self.rt)
        self._onednn = use_onednn_matmul(self.t.cpu_matmul, self.rt, self.t.compile)

    def matmuls(self):
        """The context of every forward and backward (training.cpu_matmul): thread-local, changes no module."""
        return onednn_linear.onednn_linears(self.rt.device, self._onednn)

    # ---- one optimizer step -------------------------------------------------------------------------------
    def _micro_batches(self) -> list[tuple[dict, int]]:
        out = []
        for _ in range(self.t.grad_accum):
            items = [self.train_items[i] for i in self.order.indices(self.position)]
            self.position += 1
            batch = {k: v.to(self.rt.device) for k, v in self.collate(items).items()}
            out.append((batch, fed_counts(items)))
        return out

    def _no_sync(self, last: bool):
        if self.rt.distributed or self.strategy.sharded_checkpoints:  # an engine also in one process (ZeRO, FSDP)
            return self.strategy.no_sync(self.model, last)
        return contextlib.nullcontext()

    def train_step(self) -> dict:
        self.model.train()
        micro = self._micro_batches()
        counts = [[self.stage.targets(b), *fed, self.stage.head_positions(b),
                   self.stage.forward_only_tokens(b, fed[0])] for b, fed in micro]
        counts = self.rt.all_reduce_sum(torch.tensor(counts, device=self.rt.device, dtype=torch.float64).sum(0))
        n_targets, n_tokens, squares, n_head, n_forward = (int(c) for c in counts.tolist())  # one collective
        scale = self.rt.world_size / max(n_targets, 1)  # DDP averages gradients over ranks; undo that
        loss_total, extra = torch.zeros((), device=self.rt.device), StepMetrics()
        for i, (batch, _) in enumerate(micro):
            with self.matmuls():
                with self._no_sync(last=i == len(micro) - 1), self.rt.autocast():
                    loss_sum, metrics = self.stage.loss(self.model, batch)
                # recomputed (checkpointed) blocks run under the same context: see checkpointing_kwargs()
                self.strategy.backward(self.model, loss_sum * scale)
            loss_total += loss_sum.detach().float()
            extra.add(metrics)
        loss = self.rt.all_reduce_sum(loss_total).item() / max(n_targets, 1)
        if not math.isfinite(loss):  # before the optimizer step: the weights stay as the last good step left them
            raise self._diverged("loss", loss)
        grad_norm = self._step()
        self._check_grad_norm(grad_norm)
        self.scheduler.step()
        return {"loss": loss, "lr": self.scheduler.get_last_lr()[0], "tokens": n_tokens,
                "token_squares": squares, "head_positions": n_head, "forward_only_tokens": n_forward,
                **self._grad_metrics(grad_norm), **extra.means(self.rt)}

    def _grad_metrics(self, grad_norm: float) -> dict:
        """grad_norm, left out of a step fp16 loss scaling skipped (the window averages the steps that have it);
        under fp16, `fp16_skipped`: the share of the window's steps skipped."""
        if self.strategy.scaler is None:
            return {"grad_norm": grad_norm}
        skipped = not math.isfinite(grad_norm)
        return {"fp16_skipped": float(skipped)} | ({} if skipped else {"grad_norm": grad_norm})

    fp16_skips = 0  # optimizer steps in a row that fp16 loss scaling skipped

    def _check_grad_norm(self, grad_norm: float) -> None:
        """A non-finite gradient norm stops the run, unless fp16 loss scaling skipped the step (and halved the scale:
        routine while the scale settles); 20 skips in a row, a scale cut by 2^20, is divergence all the same."""
        scaler = self.strategy.scaler
        if math.isfinite(grad_norm):
            self.fp16_skips = 0
            return
        if scaler is not None and self.fp16_skips < 19:
            self.fp16_skips += 1
            self.say(f"note: step {self.step + 1}: fp16 gradients overflowed (norm {grad_norm}); the update was "
                     f"skipped and the loss scale lowered to {scaler.get_scale():g}")
            return
        raise self._diverged("gradient norm", grad_norm)

    def _diverged(self, what: str, value: float) -> UserError:
        """A nan/inf loss would train on to an all-nan model that is saved as 'done': stop and say why instead."""
        saved = ckpt.list_checkpoints(self.output_dir)
        last = f"the last checkpoint is {saved[-1]}" if saved else "no checkpoint was saved"
        return UserError(f"Step {self.step + 1}: the {what} is {value}, so training stopped before saving a broken "
                         f"model ({last}). A setting or a data value that is not a number (nan/inf in the config, "
                         f"e.g. a beta, or in the data, e.g. a margin) or a diverging run (training.lr "
                         f"{self.t.lr:g} too high, fp16 overflow: use bf16) causes this; fix it and run again.")

    def _step(self) -> float:
        """Clip, optimizer step, zero the gradients (the engine's way); the gradient norm before clipping."""
        max_norm = self.t.max_grad_norm if self.t.max_grad_norm > 0 else float("inf")
        return self.strategy.step(self.model, self.optimizer, max_norm)

    # ---- evaluation -----------------------------------------------------------------------------------------
    tokenizer = None  # set by run_stage: the eval suite (training.eval_suite) renders prompts with it

    def run_eval_suite(self) -> dict[str, float]:
        """training.eval_suite on the model being trained (main rank; the others wait), as suite/<task>/<metric>."""
        if not self.t.eval_suite or self.tokenizer is None:
            return {}
        found = {}
        if self.rt.is_main:
            from tuneforge.eval.during_training import suite_metrics

            found = suite_metrics(unwrap(self.model), self.tokenizer, self.t.eval_suite, self.output_dir, self.step)
        self.rt.barrier()
        return found

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.eval_items:
            return None
        self.model.eval()
        mine = self.eval_items[self.rt.rank::self.rt.world_size]
        batches = [mine[start:start + self.t.batch_size] for start in range(0, len(mine), self.t.batch_size)]
        total, extra = torch.zeros(2, device=self.rt.device, dtype=torch.float64), StepMetrics()
        for i, items in enumerate(batches + self._eval_fillers(batches)):
            batch = {k: v.to(self.rt.device) for k, v in self.collate(items).items()}
            with self.rt.autocast(), self.matmuls():
                loss_sum, metrics = self.stage.loss(self.model, batch)
            if i >= len(batches):  # a filler: run for the other ranks' sake, counted nowhere
                continue
            total += torch.tensor([loss_sum.item(), self.stage.targets(batch)], device=self.rt.device,
                                  dtype=torch.float64)
            extra.add(metrics)
        total = self.rt.all_reduce_sum(total)
        # the stage's own metrics over the held-out set too (DPO's reward accuracy and margins, as TRL logs them);
        # a collective, so only when every rank had a batch (the same condition on every rank)
        self.eval_metrics = {f"eval_{k}": v for k, v in extra.means(self.rt).items()} \
            if len(self.eval_items) >= self.rt.world_size else {}
        self.model.train()
        return float(total[0] / max(total[1], 1))

    def _eval_fillers(self, batches: list[list]) -> list[list]:
        """Batches a rank runs and discards so that every rank runs as many eval forwards as rank 0 (which holds the
        most: items are dealt rank by rank). Only sharded engines need them: each forward of an FSDP (or ZeRO-3)
        model gathers weight shards from every rank, and a held-out set that did not split evenly hung the run."""
        if self.rt.world_size == 1 or not self.rt.sharded:
            return []
        most = math.ceil(math.ceil(len(self.eval_items) / self.rt.world_size) / self.t.batch_size)
        filler = batches[-1] if batches else self.eval_items[:1]
        return [filler] * (most - len(batches))

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def _state(self, history: list[dict]) -> dict:
        return {"step": self.step, "position": self.position, "total_steps": self.total_steps,
                "world_size": self.rt.world_size, "history": history, "window": self.window.state(),
                "run": self.fingerprint, "objective": self._objective(),
                **({"grad_scaler": self.strategy.scaler.state_dict()} if self.strategy.scaler is not None else {})}

    def _objective(self) -> dict:
        """What a resumed run may change but should hear about: the stage's loss options and the learning rate."""
        section = getattr(self.cfg, self.cfg.stage, None) if self.cfg.stage in ALIGN_SECTIONS else None
        found = {f"{self.cfg.stage}.{k}": v for k, v in (to_dict(section) if section is not None else {}).items()}
        return json.loads(json.dumps(found | {"training.lr": self.t.lr}))  # as trainer_state.json reads back

    def save_checkpoint(self, history: list[dict]) -> Path | None:
        if self.strategy.sharded_checkpoints:
            return self._save_sharded(history)
        trainable = self.method.trainable_state_dict(unwrap(self.model))
        path = None
        if self.rt.is_main:
            path = ckpt.save_checkpoint(self.output_dir, self.step, trainable, self.optimizer, self.scheduler,
                                        self._state(history), keep=self.t.save_total_limit)
            self.say(f"saved {path}")
        self.rt.barrier()
        return path

    def _save_sharded(self, history: list[dict]) -> Path:
        """FSDP, DeepSpeed: every rank writes its shards into one temp folder; rank 0 renames it once all are done."""
        final = self.output_dir / f"checkpoint-{self.step}"
        tmp = shared_temp_name(final, self.rt)
        if self.rt.is_main:
            ckpt.atomic_dir(final, tmp)
        self.rt.barrier()
        save_sharded(tmp, self.strategy, self.model, self.optimizer, self.scheduler, self._state(history), self.rt)
        self.rt.barrier()
        if self.rt.is_main:
            ckpt.commit(tmp, final)
            ckpt.prune(self.output_dir, self.t.save_total_limit)
            self.say(f"saved {final}")
        self.rt.barrier()
        return final

    def maybe_resume(self) -> list[dict]:
        """Load the checkpoint to continue from, after checking it was written by this same run. Writes nothing."""
        path = ckpt.find_resume(self.t.resume, self.output_dir)
        if path is None:
            if self.t.resume == "auto":
                self.say(f"resume: auto found no checkpoint in {self.output_dir}; starting from step 0")
            return []
        if not ckpt.check_same_run(path, self.fingerprint, self.rt.world_size):
            self.say(f"note: {path} does not record its run's settings; cannot check they match this run")
        if self.strategy.sharded_checkpoints:
            state = load_sharded(path, self.strategy, self.model, self.optimizer, self.scheduler)
        elif (path / "dcp").is_dir() or (path / "deepspeed").is_dir():
            engine = "fsdp` (any number of processes)" if (path / "dcp").is_dir() else "deepspeed`"
            raise UserError(f"{path} holds sharded tensors written by a sharding engine; resume it with "
                            f"`training.distributed={engine}.")
        else:
            state = ckpt.load_checkpoint(path, unwrap(self.model), self.optimizer, self.scheduler)
        if state["world_size"] != self.rt.world_size:
            self.say(f"note: checkpoint was written with {state['world_size']} processes, resuming with "
                     f"{self.rt.world_size}; the global batches are the same")
        if state["step"] > self.total_steps:
            raise UserError(f"{path} is at step {state['step']}, past this run's {self.total_steps} steps "
                            f"(training.max_steps or epochs): there is nothing left to train, and going on would "
                            f"only rewrite {self.output_dir}'s final model. Raise training.max_steps above "
                            f"{state['step']} to train further, or use {path} as it is.")
        if state["step"] == self.total_steps:
            self.say(f"note: {path} is this run's last step: nothing is left to train; the final model is saved "
                     f"from it")
        if state.get("total_steps", self.total_steps) != self.total_steps:
            self.say(f"note: the checkpoint's run had {state['total_steps']} steps in all, this one has "
                     f"{self.total_steps} (training.max_steps or epochs changed): the learning-rate schedule now "
                     f"ends at step {self.total_steps}")
        changed = [f"{k} {v} -> {self._objective()[k]}" for k, v in (state.get("objective") or {}).items()
                   if k in self._objective() and self._objective()[k] != v]
        if changed:
            self.say(f"note: resuming with another objective than {path} was trained with ({', '.join(changed)}): "
                     f"steps 1-{state['step']} in metrics.jsonl are the old one's, and this run's "
                     f"tuneforge_config.yaml and model card record only the new settings")
        self.step, self.position = state["step"], state["position"]
        self.window.load(state.get("window"))
        if self.strategy.scaler is not None and state.get("grad_scaler"):  # the fp16 loss scale it had reached
            self.strategy.scaler.load_state_dict(state["grad_scaler"])
        self.say(f"resumed from {path} at step {self.step}")
        self._resumed = True
        return state.get("history", [])

    def _open_output_dir(self, history: list[dict]) -> None:
        """Create (or clear) output_dir and write the resolved config: only now, once everything before training
        worked, so a run that fails during setup leaves no half-made folder."""
        if self.rt.is_main:
            prepare_output_dir(self.cfg, self.say)
            resolved = (f"# resolved at the start of this run: device {self.rt.device.type}, precision "
                        f"{self.rt.precision}, {self.rt.world_size} process(es)\n")
            write_atomic(self.output_dir / "tuneforge_config.yaml", resolved + dump_config(self.cfg))
            if not self._resumed and (self.output_dir / "metrics.jsonl").exists():
                (self.output_dir / "metrics.jsonl").unlink()  # a fresh run does not append to an old run's log
            if self._resumed:
                truncate_metrics(self.output_dir / "metrics.jsonl", self.step, history,
                                 ends_here=self.step == self.total_steps)
        self.rt.barrier()

    def _say_partial_batch(self, items: list) -> None:
        """Every global batch is full (the same batches on 1 or N processes, exact resume), so the items past the
        last full one sit out each epoch: say how many, as a run should never drop rows silently."""
        width = self.t.batch_size * self.rt.world_size
        left = len(items) - self.order.per_epoch * width
        if left:
            noun = _item_noun(items)
            fill, sit = ("does", "sits") if left == 1 else ("do", "sit")
            self.say(f"note: {left} of the {len(items)} {noun} {fill} not fill a global batch ({width} {noun}) and "
                     f"{sit} out each epoch; each epoch's shuffle picks other ones")

    def _say_settings_without_effect(self) -> None:
        """Settings this run's sizes make do nothing (or less than asked): said, as a silently ignored key reads as a
        bug hours later (no eval curve, no checkpoint to resume, a learning rate that never reached training.lr)."""
        t, steps = self.t, self.total_steps
        if t.eval_steps and not self.eval_items:
            self.say(f"note: training.eval_steps {t.eval_steps} has no held-out set to evaluate (data.eval is empty "
                     f"and data.eval_ratio is 0): no eval loss is logged. Set data.eval or data.eval_ratio (e.g. "
                     f"0.05) to get one")
        if t.save_steps > steps:
            self.say(f"note: training.save_steps {t.save_steps} is more than this run's {steps} steps: no "
                     f"checkpoint is written before the end (Ctrl-C, SIGTERM and stop_after_steps still write "
                     f"one); the final model is saved as usual")
        warmup = t.warmup_steps if t.warmup_steps > 0 else int(t.warmup_ratio * steps)
        if warmup > steps:
            self.say(f"note: training.warmup_steps {warmup} is more than this run's {steps} steps: the learning "
                     f"rate rises for the whole run and ends at {steps / warmup:.0%} of training.lr {t.lr:g}, never "
                     f"decaying. Lower training.warmup_steps (or use training.warmup_ratio) below {steps}")

    def _say_epochs_rounded_up(self) -> None:
        """Every optimizer step takes grad_accum whole micro-batches (the same batches on resume and on N processes),
        so `epochs` rounds up to whole steps: with an epoch of fewer micro-batches than grad_accum, `epochs: 1` ran
        each example twice or more without a word. Said when the run is 5% or more past what was asked."""
        t, per_epoch = self.t, self.order.per_epoch
        if t.max_steps > 0:
            return
        run = self.total_steps * t.grad_accum / per_epoch
        if run >= 1.05 * t.epochs:
            self.say(f"note: training.epochs {t.epochs:g} is {t.epochs * per_epoch:g} micro-batches, not a whole "
                     f"number of optimizer steps of training.grad_accum {t.grad_accum}: the run takes "
                     f"{counted(self.total_steps, 'step')} ({self.total_steps * t.grad_accum} micro-batches of "
                     f"{t.batch_size * self.rt.world_size}), {run:.3g} epochs. Lower training.grad_accum or set "
                     f"training.max_steps to train less")

    def _say_past_the_context(self) -> None:
        """Rows longer than the positions the model was built for train it where it never was (RoPE
        extrapolation): allowed, as long-context fine-tuning does it on purpose, but never unsaid."""
        config = getattr(unwrap(self.model), "config", None)
        window = getattr(config, "max_position_embeddings", None)
        if isinstance(window, int) and self.cfg.data.max_length > window:
            self.say(f"note: data.max_length {self.cfg.data.max_length} is past the model's "
                     f"{window} positions (max_position_embeddings): rows that long train it at positions it was "
                     f"not built for; lower data.max_length unless you extend the context on purpose")

    def _say_fused_layers(self) -> None:
        from tuneforge.kernels import fused_layer_counts

        counts = fused_layer_counts(self.model)
        if any(counts.values()):
            self.say("fused layers (training.fused_layers): "
                     + ", ".join(f"{n} {kind}" for kind, n in counts.items() if n))

    # ---- the loop -------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        with StopRequest() as stop:  # from here on SIGINT/SIGTERM stop after a whole step, with a checkpoint
            history = self.maybe_resume()
            self._open_output_dir(history)
            logger = MetricsLogger(self.output_dir, self.rt.is_main, self.total_steps, self.step, self.t.progress_bar)
            last_eval, self.work, self._t0 = None, WorkTally(), time.perf_counter()
            if self.meter.peak:
                self.say(f"efficiency: model FLOPs against {self.meter.peak / 1e12:.3g} TFLOP/s peak "
                         f"({self.meter.peak_source}, x{self.rt.world_size} process(es))")
            self._say_fused_layers()
            stop_at = self.step + self.t.stop_after_steps if self.t.stop_after_steps else self.total_steps
            while self.step < min(stop_at, self.total_steps):
                if self.step + 1 == self.total_steps:  # a signal in the last step: no checkpoint, the final save
                    stop.notice = StopRequest.FINAL_NOTICE
                metrics = self._step_and_log(logger, history)
                last_eval = metrics.get("eval_loss", last_eval)
                interrupted = stop.agreed(self.rt) and self.step < self.total_steps
                if (self.t.save_steps and self.step % self.t.save_steps == 0) or interrupted \
                        or self.step == stop_at < self.total_steps:
                    self.save_checkpoint(history)
                if interrupted:
                    return self._stopped(logger, history, last_eval, stop.signum or signal.SIGTERM)
            if self.step < self.total_steps:
                return self._stopped(logger, history, last_eval, None)
            # Every step is done: a signal now would lose the whole run (no checkpoint is due at the last step), so
            # the first one only says that the final evaluation finishes and the model is saved (save_final).
            stop.notice = StopRequest.FINAL_NOTICE
            return self._finish(logger, history, last_eval)

    def _step_and_log(self, logger: MetricsLogger, history: list[dict]) -> dict:
        """One optimizer step, then eval / log lines as due. The logged loss is the window mean (MetricWindow)."""
        metrics = self.train_step()
        self.step += 1
        tokens = metrics.pop("tokens")
        self.work.add(tokens, metrics.pop("token_squares"), metrics.pop("head_positions"),
                      metrics.pop("forward_only_tokens", 0), metrics.pop("other_flops", 0.0))
        elapsed = time.perf_counter() - self._t0
        metrics["tokens_per_s"] = self.work.tokens / elapsed if elapsed > 0 else 0.0
        metrics.update(self.meter.metrics(metrics["tokens_per_s"], seq_len=self.work.seq_len,
                                          extra_forwards=self.work.forward_share, head_share=self.work.head_share,
                                          copies=metrics.pop("train_copies", self.stage.train_copies),
                                          other_flops_per_token=self.work.other_flops_per_token))
        self.window.add(metrics)
        if self.t.eval_steps and self.eval_items and self.step % self.t.eval_steps == 0 \
                and self.step < self.total_steps:
            metrics["eval_loss"] = self.evaluate()
            metrics.update(self.eval_metrics)
            metrics.update(self.run_eval_suite())
        if self.step % self.t.logging_steps == 0 or self.step == self.total_steps or "eval_loss" in metrics:
            logged = self.window.flush(metrics)
            logger.log(self.step, logged)
            history.append({"step": self.step, **logged})
            if not self.t.progress_bar:  # the bar shows the same numbers
                self.say(format_metrics(self.step, self.total_steps, logged))
        shown = {"loss": metrics["loss"], "lr": metrics["lr"], "tok/s": metrics["tokens_per_s"]}
        logger.progress(1, shown | ({"mfu": metrics["mfu"]} if "mfu" in metrics else {}))
        return metrics

    def _stopped(self, logger, history, last_eval, signum) -> TrainResult:
        logger.close(plot=False)
        why = signal.Signals(signum).name if signum else "training.stop_after_steps"
        self.say(f"stopped after step {self.step} of {self.total_steps} ({why}); checkpoint in "
                 f"{self.output_dir / f'checkpoint-{self.step}'}. Continue with:\n  "
                 f"{resume_command(self.cfg, self.rt.world_size)}")
        self.rt.barrier()  # under torchrun a rank that exits first makes the launcher kill the others mid-message
        return TrainResult(self.step, history[-1]["loss"] if history else None, last_eval, history, False, signum)

    def _finish(self, logger, history, last_eval) -> TrainResult:
        final_eval = self.evaluate()
        for hook in (self._neftune, self._varlen):
            if hook is not None:
                hook.remove()
        if final_eval is not None:
            logger.log(self.step, {"eval_loss": final_eval, **self.eval_metrics})
            last_eval = final_eval
        logger.close(plot=self.t.plot_loss)
        final_loss = next((h["loss"] for h in reversed(history) if "loss" in h), None)
        return TrainResult(self.step, final_loss, last_eval, history)


def describe_model(model: torch.nn.Module, method: Method, tokenizer, cfg) -> str:
    from tuneforge.methods.base import count_parameters

    trainable, total = count_parameters(unwrap(model))
    return "\n".join([f"method {method.name}: {trainable:,} trainable of {total:,} parameters "
                      f"({100 * trainable / max(total, 1):.3f}%)", *method.notes(model, tokenizer, cfg)])



def truncate_metrics(path: Path, step: int, history: list[dict] | None = None, ends_here: bool = False) -> None:
    """Drop log rows written after the checkpoint we resume from (they will be written again). Resuming a
    checkpoint of another output_dir (`training.resume: path`) finds no log here: start it from the rows the
    checkpoint carries, so metrics.jsonl, loss.png and the model card cover steps 1.. and not only the new ones.
    `ends_here`: the checkpoint is this run's last step, whose end-of-run rows (final eval: no `loss`) this run
    writes again; kept, they would be in the log twice."""
    if not path.exists():
        if history:
            from tuneforge.training.metrics import as_record

            write_atomic(path, "".join(json.dumps(as_record(row["step"], row)) + "\n" for row in history))
        return
    rows = [(line, json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    keep = [line for line, row in rows
            if row["step"] < step or (row["step"] == step and ("loss" in row or not ends_here))]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    tmp.replace(path)


def _item_noun(items: list) -> str:
    """What a batch holds, as the log counts it: packed rows (several examples each) or examples."""
    from tuneforge.data.packing import PackedRow

    return "packed rows" if items and isinstance(items[0], PackedRow) else "training examples"
