"""What the sampling stages (ppo, grpo) share: rewards, rollouts through the engine, the reference model and an
outer step of "sample, score, then several optimizer updates" on top of the one training loop.

`RLTrainer` is the loop's `Trainer` with a different step: one trainer step is one rollout batch (prompts taken
from the data order like any batch) followed by `epochs` x minibatch optimizer updates, so optimizer/scheduler
building, checkpoints (trainable tensors, optimizer, scheduler, RNG, data position), resume, metrics, the
stop-on-signal handling and the final save are the loop's own. The learning-rate schedule advances once per
rollout batch. Sampling seeds are derived from (seed, step, row), so a resumed run samples exactly the same
completions. Dropout stays off for the whole run (rollout, reference and updates run in eval mode), as RL
implementations do, so the policy ratio is exactly 1 at the first update.

Under torchrun (DDP) each process takes its share of the step's prompts (the data order's slice, as for any batch),
samples and scores them itself, with seeds from the row's index in the global batch: rank r's rows get the seeds
1 process would give those rows, so N processes sample what 1 process does. Each rank keeps its own reference model
(or disabled adapters), reward functions or reward model and value head replica; DDP all-reduces the gradients, the
loss of an update is normalised by the token/sequence count over all ranks, and the logged rewards, KL and the
other statistics are over all ranks' rollouts. `mini_batch_size` counts completions per process. Rank 0 writes
checkpoints, logs and the final model (the loop's own rules).
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneforge.data.example_task import exact_match
from tuneforge.data.types import IGNORE_INDEX, EncodedPrompt
from tuneforge.errors import ConfigError, UserError
from tuneforge.losses import label_positions, token_logps, whiten
from tuneforge.methods.base import unwrap
from tuneforge.training import reference
from tuneforge.training.loop import Stage, Trainer

BUILTIN_REWARDS = ("exact_match", "format", "length")


# ---- rewards ---------------------------------------------------------------------------------------------------

def _exact_match(completion, reference=None, **_):
    if reference is None:
        raise ValueError("the row has no reference answer (add an `answer` or `reference` column)")
    return float(exact_match(completion, reference))


def _builtin(name: str, section):
    if name == "exact_match":
        return _exact_match
    if name == "format":
        pattern = re.compile(section.format_pattern)
        return lambda completion, **_: float(pattern.fullmatch(completion) is not None)
    target = max(section.length_target, 1)
    return lambda completion, **_: max(0.0, 1.0 - abs(len(completion) - target) / target)


def _import_function(spec: str):
    module_name, _, attr = spec.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:  # console scripts leave the working directory out
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"Reward `{spec}` cannot be loaded ({e}). Name a function as `module:function` importable "
                          f"from the working directory, a built-in ({', '.join(BUILTIN_REWARDS)}) or an rm output "
                          f"folder.") from e
    if not callable(fn):
        raise ConfigError(f"Reward `{spec}` is not a function.")
    params = inspect.signature(fn).parameters
    takes_all = any(p.kind == p.VAR_KEYWORD for p in params.values())
    wanted = {k for k in ("prompt", "reference", "completion_ids") if takes_all or k in params}
    return lambda completion, **kw: fn(completion, **{k: v for k, v in kw.items() if k in wanted})


class Rewards:
    """The weighted sum of the configured rewards for each completion; a reward that raises or gives NaN/inf is
    an error naming it and the prompt (or, with on_reward_error: skip, a counted skip that scores 0)."""

    def __init__(self, section, runtime, log=print):
        if not section.reward:
            raise ConfigError("No reward configured: set e.g. `reward: {exact_match: 1.0}` in the stage's section.")
        self.section, self.log, self.skipped = section, log, 0
        self.fns = {}
        for name in section.reward:
            if name in BUILTIN_REWARDS:
                self.fns[name] = _builtin(name, section)
            elif Path(name).is_dir():
                self.fns[name] = _RewardModel(name, runtime)
            elif ":" in name:
                self.fns[name] = _import_function(name)
            else:
                raise ConfigError(f"Reward `{name}` is neither a built-in ({', '.join(BUILTIN_REWARDS)}), a "
                                  f"`module:function` nor an existing rm output folder.")

    def score(self, texts: list[str], ids: list[list[int]], prompts: list[EncodedPrompt]) -> tuple[torch.Tensor, dict]:
        """Total reward per completion [N] and the mean of each named reward (for the log)."""
        total = torch.zeros(len(texts))
        means = {}
        for name, fn in self.fns.items():
            if isinstance(fn, _RewardModel):
                values = fn.batch(texts, prompts)
            else:
                values = [self._one(name, fn, t, i, p) for t, i, p in zip(texts, ids, prompts)]
            means[f"reward/{name}"] = sum(values) / max(len(values), 1)
            total += self.section.reward[name] * torch.tensor(values)
        return total, means

    def _one(self, name, fn, text, ids, prompt: EncodedPrompt) -> float:
        try:
            returned = fn(text, prompt=prompt.messages, reference=prompt.reference, completion_ids=ids)
        except Exception as e:  # noqa: BLE001 - any failure of user code is reported with its context
            value, problem = None, f"raised {type(e).__name__}: {e}"
        else:
            value, problem = _reward_value(returned)
        if problem is None:
            return value
        question = prompt.messages[-1]["content"] if prompt.messages else ""
        where = f"for the prompt of {prompt.source or 'a row'} ({question[:80]!r}) and completion {text[:80]!r}"
        if self.section.on_reward_error == "skip":
            self.skipped += 1
            self.log(f"reward: `{name}` {problem} {where}; scored 0 (skipped so far: {self.skipped})")
            return 0.0
        raise UserError(f"Reward `{name}` {problem} {where}. Fix the function, or set `on_reward_error: skip` in "
                        f"the stage's section to count such completions and score them 0.")


def _reward_value(returned) -> tuple[float | None, str | None]:
    """(the reward, None), or (None, what is wrong with what the function returned): one finite number per
    completion. A list is the likeliest mistake: TRL calls reward functions once per batch, TuneForge once per
    completion."""
    if isinstance(returned, torch.Tensor) and returned.numel() == 1:
        returned = returned.item()
    if not isinstance(returned, numbers.Real):  # int, float, bool, numpy scalars; not "0.5", None or a list
        kind = type(returned).__name__
        hint = (" (TuneForge calls a reward function once per completion, with the completion's text, not with a "
                "batch as TRL does)") if isinstance(returned, (list, tuple, torch.Tensor)) else ""
        return None, f"returned {kind} {repr(returned)[:60]}, not one number{hint}"
    value = float(returned)
    return (value, None) if math.isfinite(value) else (None, f"returned {value}")


class _RewardModel:
    """An `rm` output folder as a reward: prompt + completion rendered with the reward model's own chat template
    (as its training rendered pairs), scored in padded batches."""

    def __init__(self, folder: str, runtime):
        from tuneforge.data.templates import resolve_chat_template
        from tuneforge.models.reward import load_reward_model

        self.scorer = load_reward_model(folder, device=str(runtime.device) if runtime else "cpu")
        self.template = resolve_chat_template(self.scorer.tokenizer, None)

    def batch(self, texts: list[str], prompts: list[EncodedPrompt]) -> list[float]:
        from tuneforge.data.encode import render

        rendered = [render(self.scorer.tokenizer, self.template,
                           [*p.messages, {"role": "assistant", "content": t}], None, add_generation_prompt=False)
                    for t, p in zip(texts, prompts)]
        return self.scorer.score(rendered).float().tolist()


# ---- rollouts ----------------------------------------------------------------------------------------------------

@dataclass
class Rollout:
    """Prompt + completion sequences, right-padded: labels are the completion tokens (IGNORE elsewhere)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    texts: list[str]
    completion_ids: list[list[int]]
    prompts: list[EncodedPrompt]

    def rows(self, index: torch.Tensor) -> dict:
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
                "labels": self.labels[index]}


def sample(engine, prompts: list[EncodedPrompt], section, seeds: list[int], device) -> Rollout:
    """One completion per prompt (repeat a prompt for a group), each with its own seed, through the engine."""
    from tuneforge.inference import SamplingParams

    params = [SamplingParams(max_new_tokens=section.max_new_tokens, temperature=section.temperature,
                             top_p=section.top_p, top_k=section.top_k, seed=seed) for seed in seeds]
    completions = engine.generate([p.input_ids for p in prompts], params)
    eos = engine_stop_id(engine)
    seqs, ids = [], []
    for prompt, c in zip(prompts, completions):
        # the stop token is not in token_ids; train on it, so the policy learns when to stop
        done = list(c.token_ids) + ([eos] if c.finish_reason == "stop" and eos is not None else [])
        ids.append(done)
        seqs.append((prompt.input_ids, done))
    width = max(len(p) + len(c) for p, c in seqs)
    pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else (eos or 0)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)  # masked out: any id does
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for row, (p, c) in enumerate(seqs):
        input_ids[row, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attention[row, :len(p) + len(c)] = 1
        labels[row, len(p):len(p) + len(c)] = torch.tensor(c, dtype=torch.long)
    return Rollout(input_ids.to(device), attention.to(device), labels.to(device),
                   [c.text for c in completions], ids, prompts)


def engine_stop_id(engine) -> int | None:
    eos = engine.tokenizer.eos_token_id
    return eos if eos in engine.stop_ids else min(engine.stop_ids, default=None)


def sampling_seed(seed: int, step: int, row: int) -> int:
    """A seed per completion from (run seed, step, row): resuming at a step samples the same completions."""
    return (seed * 1_000_003 + step * 65_537 + row) % (2 ** 31 - 1)


def policy_forward(model, batch: dict, hidden: bool = False, at_labels: bool = False):
    """(per-token log-probs [B, T-1], mask [B, T-1], logits, last hidden state or None).

    `at_labels` (the stage's `logits_at_labels`: the model takes `logits_to_keep`; ignored with `hidden`): the output
    layer runs only at positions that predict a completion token (`label_positions`) and `logits` holds only those;
    log-probs and mask keep the [B, T-1] layout (0 / False elsewhere), so callers see no difference. Why: the prompt
    is most of a rollout, and lm_head is a fifth of a small model's forward (SmolLM2-135M: vocabulary 49152); the
    GRPO comparison with TRL (bench/bench_vs_trl.py) measured the saving."""
    labels = batch["labels"]
    positions = label_positions(labels) if at_labels and not hidden else None
    if positions is not None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=positions).logits
        picked, _ = token_logps(logits, labels, positions)
        logps = picked.new_zeros(labels.shape[0], labels.shape[1] - 1).index_copy(1, positions, picked)
        return logps, labels[:, 1:] != IGNORE_INDEX, logits, None
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=hidden)
    logits = out.logits[:, -labels.shape[1]:]
    logps, mask = token_logps(logits, labels)
    return logps, mask, logits, (out.hidden_states[-1][:, -labels.shape[1]:] if hidden else None)


def rows_offset(runtime, n_rows: int) -> int:
    """Index in the global rollout batch of this rank's first row (ranks hold equal shares, in rank order)."""
    return runtime.rank * n_rows


def gather(runtime, values: torch.Tensor) -> torch.Tensor:
    """Every rank's `values` (same shape on each), concatenated in rank order; the tensor itself in one process."""
    if not runtime.distributed:
        return values
    import torch.distributed as dist

    local = values.to(runtime.device)
    parts = [torch.empty_like(local) for _ in range(runtime.world_size)]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(values.device)


SUMMED = ("tokens", "token_squares", "head_positions", "forward_only_tokens")  # counts, added up over ranks


def mean_over_ranks(runtime, metrics: dict) -> dict:
    """Per-rank means (of equal shares of rows) averaged over ranks; the counts in SUMMED added up. Identity in one
    process."""
    if not runtime.distributed:
        return metrics
    keys = sorted(metrics)
    values = runtime.all_reduce_sum(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64,
                                                 device=runtime.device))
    return {k: (int(v) if k in SUMMED else float(v) / runtime.world_size) for k, v in zip(keys, values.tolist())}


def rollout_work(roll: Rollout, epochs: int, forward_passes: int, head_at_labels: bool) -> dict:
    """An RL step's MFU counts (training/flops.py): `epochs` training passes over the rollout's tokens, and
    `forward_passes` forward-only ones (sampling it, and the old-policy and reference log-probs where the stage takes
    them); lm_head read at the completion tokens only where logits are taken only there. The reward model's and a
    value model's own passes are not counted."""
    lengths = roll.attention_mask.sum(-1)
    tokens = int(lengths.sum())
    completion = int((roll.labels[:, 1:] != IGNORE_INDEX).sum())
    return {"tokens": tokens, "token_squares": int((lengths ** 2).sum()), "train_copies": epochs,
            "forward_only_tokens": forward_passes * tokens, "head_positions": completion if head_at_labels else tokens}


def whiten_over_ranks(runtime, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`whiten` (losses/rl.py) with the mean and unbiased variance of every rank's masked values, so N processes
    normalise PPO's advantages as 1 process does over the whole rollout batch."""
    if not runtime.distributed:
        return whiten(x, mask)
    m = mask.to(torch.float64)
    x64 = x.to(torch.float64)
    total = runtime.all_reduce_sum(torch.stack([(x64 * m).sum(), m.sum()]))
    mean = total[0] / total[1]
    var = runtime.all_reduce_sum(((x64 - mean) ** 2 * m).sum()) / (total[1] - 1).clamp(min=1)
    return ((x64 - mean) * torch.rsqrt(var + 1e-8) * m).to(x.dtype)


class Reference(reference.Reference):
    """The frozen reference policy (adapters disabled, or a frozen copy made before the first step: the same
    component as dpo/kto), giving per-token log-probs of a rollout."""

    @torch.no_grad()
    def token_logps(self, batch: dict, at_labels: bool = False) -> torch.Tensor:
        with self._context():
            return policy_forward(self.module, batch, at_labels=at_labels)[0]


# ---- the outer step ----------------------------------------------------------------------------------------------

class RLStage(Stage):
    """What a sampling recipe supplies: `rl_step(trainer, prompts)` -> metrics (rollout, then updates), with the
    work counts of `rollout_work` among them (the loop's MFU)."""

    def rl_step(self, trainer: RLTrainer, prompts: list[EncodedPrompt]) -> dict:
        raise NotImplementedError

    def before_save(self, model) -> None:
        """Take off what the saved model must not hold (PPO's value head)."""

    def after_save(self, out_dir: Path) -> None:
        """Write what the stage saves beside the model."""


class RLTrainer(Trainer):
    """The loop's Trainer whose step is a rollout batch plus several updates (see the module docstring)."""

    def __init__(self, cfg, runtime, model, method, prompts, stage: RLStage, log=print):
        super().__init__(cfg, runtime, model, method, prompts, [], lambda items: {}, stage, log)

    def train_step(self) -> dict:
        self.model.eval()  # no dropout anywhere in RL (see the module docstring)
        items = []
        for _ in range(self.t.grad_accum):
            items += [self.train_items[i] for i in self.order.indices(self.position)]
            self.position += 1
        with self.matmuls():  # rollouts, log-probs and updates alike (training.cpu_matmul)
            metrics = self.stage.rl_step(self, items)
        self.scheduler.step()
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        return metrics

    def global_count(self, count) -> int:
        """A loss normaliser (tokens or sequences) summed over every rank's minibatch: dividing this rank's loss sum
        by it makes the ranks' losses add up to the loss 1 process computes over all their rows."""
        return max(int(self.rt.all_reduce_sum(torch.as_tensor(count, device=self.rt.device).float()).item()), 1)

    def update(self, loss: torch.Tensor) -> tuple[float, float]:
        """One optimizer update from this rank's share of the minibatch loss (normalised by `global_count`);
        returns (the whole minibatch's loss over all ranks, grad norm)."""
        (loss * self.rt.world_size).backward()  # DDP averages gradients over ranks; the shares add up: undo that
        grad_norm = self._step()
        return float(self.rt.all_reduce_sum(loss.detach().float())), grad_norm

    def evaluate(self):
        return None  # sampling stages have no held-out loss; rewards are logged per step

    def minibatches(self, n: int, mini: int, epoch: int) -> list[torch.Tensor]:
        """Shuffled minibatch indices for one epoch over n rollout rows, seeded by (seed, step, epoch)."""
        gen = torch.Generator().manual_seed(sampling_seed(self.cfg.seed, self.step, 10_000 + epoch))
        order = torch.randperm(n, generator=gen)
        size = mini if 0 < mini < n else n
        return [order[i:i + size] for i in range(0, n, size)]


def make_engine(model, tokenizer):
    """The rollout engine over the policy as it trains (its active adapter, if any)."""
    from tuneforge.inference import Engine
    from tuneforge.inference.adapters import active_adapter

    return Engine(unwrap(model), tokenizer, max_batch_size=64, default_adapter=active_adapter(model))


def run_rl(cfg, make_stage, log=print, extend=None):
    """The whole run of a sampling stage: runtime, prompts (read first: a bad row fails before the model loads),
    model + method (`extend`: what the stage adds to the model before DDP wraps it, PPO's value head), the stage
    (reference, rewards), the RL trainer, the final save."""
    from tuneforge.data.build import read_datasets
    from tuneforge.training.loop import describe_model
    from tuneforge.training.setup import done_line, save_final, setup_data, setup_model, setup_run

    runtime = setup_run(cfg, log)
    if runtime.engine not in ("none", "ddp"):
        raise UserError(f"Stage {cfg.stage} samples with the whole model on every process, so it runs in one "
                        f"process or under DDP, not with training.distributed={runtime.engine}. Set "
                        f"`training.distributed=ddp` (or auto).")
    rows = read_datasets(cfg.data, stage=cfg.stage)
    model, tokenizer, method = setup_model(cfg, runtime, extend=extend)
    main_log = log if runtime.is_main else (lambda _: None)
    main_log(describe_model(model, method))
    prompts, evals, _ = setup_data(cfg, tokenizer, cfg.stage, runtime, log, read=rows)
    if evals:
        main_log(f"note: stage {cfg.stage} does not score the {len(evals)} held-out prompts during training; the "
                 f"rewards logged per step are those of the training rollouts")
    stage = make_stage(cfg, model, tokenizer, runtime, log)
    result = RLTrainer(cfg, runtime, model, method, prompts, stage, log).train()
    if result.finished:
        stage.before_save(model)
        save_final(cfg, model, method, tokenizer, runtime)
        if runtime.is_main:
            stage.after_save(Path(cfg.output_dir))
        main_log(done_line(result, cfg.output_dir))
    return result
