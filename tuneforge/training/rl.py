"""What the sampling stages (ppo, grpo) share: rewards, rollouts through the engine, the reference model and an
outer step of "sample, score, then several optimizer updates" on top of the one training loop.

`RLTrainer` is the loop's `Trainer` with a different step: one trainer step is one rollout batch (prompts taken
from the data order like any batch) followed by `epochs` x minibatch optimizer updates, so optimizer/scheduler
building, checkpoints (trainable tensors, optimizer, scheduler, RNG, data position), resume, metrics, the
stop-on-signal handling and the final save are the loop's own. The learning-rate schedule advances once per
rollout batch. Sampling seeds are derived from (seed, step, row), so a resumed run samples exactly the same
completions. The log-probs trained on (policy, old policy, reference) are those of logits / temperature, the
distribution the rollouts are sampled from (`policy_forward`). Dropout stays off for the whole run (rollout,
reference and updates run in eval mode), as RL implementations do, so the policy ratio is exactly 1 at the first
update.

Under torchrun (DDP) each process takes its share of the step's prompts (the data order's slice, as for any batch),
samples and scores them itself, with seeds from the row's index in the global batch: rank r's rows get the seeds
1 process would give those rows, so N processes sample what 1 process does. Each rank keeps its own reference model
(or disabled adapters), reward functions or reward model and value head replica; DDP all-reduces the gradients, the
loss of an update is normalised by the token/sequence count over all ranks, and the logged rewards, KL and the
other statistics are over all ranks' rollouts. `mini_batch_size` counts completions per process. Rank 0 writes
checkpoints, logs and the final model (the loop's own rules).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import numbers
import os
import re
import sys
import sysconfig
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tuneforge.configs.rl import BUILTIN_REWARDS, reward_form_hint, unknown_reward
from tuneforge.data.example_task import exact_match
from tuneforge.data.types import IGNORE_INDEX, BadRow, DataReport, EncodedPrompt
from tuneforge.errors import ConfigError, DataError, UserError
from tuneforge.losses import label_positions, token_logps, whiten
from tuneforge.methods.base import unwrap
from tuneforge.models.reward import check_reward_folder
from tuneforge.training import reference
from tuneforge.training.loop import Stage, Trainer

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
    """The function a `module:function` reward names; ConfigError saying why it cannot be had."""
    module_name, _, attr = spec.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:  # console scripts leave the working directory out
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any failure at import is the module's, reported in one paragraph
        where = _where_it_failed(e, module_name)
        if isinstance(e, ImportError) and not where:  # the module itself is not there
            raise ConfigError(f"Reward `{spec}` cannot be loaded ({e}). Name a function as `module:function` "
                              f"importable from the working directory, a built-in ({', '.join(BUILTIN_REWARDS)}) or "
                              f"an rm output folder.{reward_form_hint(spec)}") from e
        problem = e.msg if isinstance(e, SyntaxError) else str(e)
        raise ConfigError(f"Reward `{spec}` cannot be loaded: importing `{module_name}` raised "
                          f"{type(e).__name__}: {problem}{where}. Fix the module (run `python -c \"import "
                          f"{module_name}\"` to see it fail alone).") from e
    fn = getattr(module, attr, None)
    if fn is None:
        close = difflib.get_close_matches(attr, [n for n in dir(module) if not n.startswith("_")], n=1)
        hint = f" Did you mean `{module_name}:{close[0]}`?" if close else ""
        raise ConfigError(f"Reward `{spec}` cannot be loaded: {module.__file__} has no `{attr}`.{hint}")
    if not callable(fn):
        raise ConfigError(f"Reward `{spec}` is not a function.")
    return fn


def _where_it_failed(error: BaseException, module_name: str) -> str:
    """The words " at FILE:LINE" naming the user's code where importing a reward module failed ('' when it was not the
    module's own code, e.g. the module does not exist): a SyntaxError's own place, else the innermost traceback frame outside
    the Python installation and this file (a library the module calls fails inside itself)."""
    if isinstance(error, SyntaxError) and error.filename:
        return f" at {error.filename}:{error.lineno}"
    missing = getattr(error, "name", None)
    if isinstance(error, ImportError) and missing and (module_name == missing or module_name.startswith(missing + ".")):
        return ""  # the module (or its package) itself was not found
    installed = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not f.filename.startswith("<") and f.filename != __file__]
    own = [f for f in frames if not any(f.filename.startswith(root) for root in installed)]
    frame = (own or frames or [None])[-1]
    return f" at {frame.filename}:{frame.lineno}" if frame is not None else ""


def _reads_reference(fn) -> bool:
    params = inspect.signature(fn).parameters
    return "reference" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


PASSED = ("prompt", "reference", "completion_ids")  # the keywords a reward function may take (`_with_keywords`)


def _check_signature(spec: str, fn) -> None:
    """ConfigError when `fn` requires an argument a reward call never passes (TRL's `answer`, dataset columns): every
    call would fail, and with on_reward_error: skip every completion would silently score 0."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature to read (a builtin): its calls say what is wrong
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_text = bool(positional) or any(p.kind == p.VAR_POSITIONAL for p in params)
    text = positional[0] if positional else None  # it receives the completion
    unmet = [p.name for p in params if p is not text and p.default is p.empty and p.name not in PASSED
             and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if takes_text and not unmet:
        return
    what = (f"requires {', '.join(f'`{n}`' for n in unmet)}, which a reward call does not pass" if unmet
            else "takes no argument for the completion")
    raise ConfigError(f"Reward `{spec}` {what}: TuneForge calls a reward function once per completion as "
                      f"`function(completion, prompt=messages, reference=answer_or_None, completion_ids=ids)`, with "
                      f"the keywords it accepts of these. Take the row's answer (its `answer` or `reference` column) "
                      f"as `reference`, or give the other arguments defaults.")


def _with_keywords(fn):
    """`fn` called with the keywords it accepts of prompt, reference and completion_ids."""
    params = inspect.signature(fn).parameters
    takes_all = any(p.kind == p.VAR_KEYWORD for p in params.values())
    wanted = {k for k in ("prompt", "reference", "completion_ids") if takes_all or k in params}
    return lambda completion, **kw: fn(completion, **{k: v for k, v in kw.items() if k in wanted})


def check_rewards(section, key: str) -> tuple[list[str], list[str]]:
    """Resolve every configured reward without loading a model (functions imported, rm folders' configs read), so
    a typo fails in a second, before the model and data load. Returns (the built-ins that need each row's
    reference answer, the functions that read it)."""
    if not section.reward:
        raise ConfigError(f"No reward configured: set e.g. `{key}.reward: {{exact_match: 1.0}}`.")
    needs, reads = [], []
    for name in section.reward:
        if name in BUILTIN_REWARDS:
            needs += [name] if BUILTIN_REWARDS[name] else []
        elif Path(name).is_dir():
            check_reward_folder(name)
        elif ":" in name:
            fn = _import_function(name)
            _check_signature(name, fn)
            reads += [name] if _reads_reference(fn) else []
        else:
            raise ConfigError(unknown_reward(key, name))
    return needs, reads


class Rewards:
    """The weighted sum of the configured rewards for each completion; a reward that raises or gives NaN/inf is
    an error naming it and the prompt (or, with on_reward_error: skip, a completion scored 0, counted: one log line
    per step and reward, a `reward_errors/<name>` metric, and `summary()` at the end). `key`: the config section
    (grpo, ppo), for the messages."""

    def __init__(self, section, runtime, log=print, key: str = "grpo"):
        check_rewards(section, key)
        self.section, self.log, self.key = section, log, key
        self.skipped: dict[str, int] = {}  # completions scored 0 per reward over the run (on_reward_error: skip)
        self.calls: dict[str, int] = {}
        self.fns = {}
        for name in section.reward:
            if name in BUILTIN_REWARDS:
                self.fns[name] = _builtin(name, section)
            elif Path(name).is_dir():
                self.fns[name] = _RewardModel(name, runtime)
            else:
                self.fns[name] = _with_keywords(_import_function(name))

    flops = 0.0  # model FLOPs of the reward models' passes in the last `score` (the MFU counts them)

    def score(self, texts: list[str], ids: list[list[int]], prompts: list[EncodedPrompt],
              step: int | None = None) -> tuple[torch.Tensor, dict]:
        """Total reward per completion [N], and for the log the mean of each named reward (with skip: the share of
        completions each function failed on, `reward_errors/<name>`). `step`: the trainer step, for the log."""
        total = torch.zeros(len(texts))
        means = {}
        self.flops = 0.0
        for name, fn in self.fns.items():
            if isinstance(fn, _RewardModel):
                values, flops = fn.batch(texts, prompts)
                self.flops += flops
            else:
                values = self._calls(name, fn, texts, ids, prompts, step, means)
            means[f"reward/{name}"] = sum(values) / max(len(values), 1)
            total += self.section.reward[name] * torch.tensor(values)
        return total, means

    def _calls(self, name, fn, texts, ids, prompts, step, metrics: dict) -> list[float]:
        """`fn` on each completion; with skip, the failures scored 0, counted and said in one line."""
        results = [self._one(name, fn, t, i, p) for t, i, p in zip(texts, ids, prompts)]
        failed = [problem for _, problem in results if problem is not None]
        if self.section.on_reward_error == "skip":
            metrics[f"reward_errors/{name}"] = len(failed) / max(len(results), 1)
            self.skipped[name] = self.skipped.get(name, 0) + len(failed)
            self.calls[name] = self.calls.get(name, 0) + len(results)
            if failed:
                self._say_skipped(name, failed, len(results), step)
        return [value for value, _ in results]

    def _say_skipped(self, name: str, failed: list[str], n: int, step: int | None) -> None:
        when = f"step {step}" if step is not None else "this step"
        if len(failed) == n:
            said = (f"every one of the {n} calls of `{name}` failed at {when}, so it scored 0 for all of them and "
                    f"gave no signal")
        else:
            said = f"`{name}` failed on {len(failed)} of {n} completions at {when}; they scored 0"
        self.log(f"reward: {said} ({self.key}.on_reward_error: skip; first: {failed[0]})")

    def _one(self, name, fn, text, ids, prompt: EncodedPrompt) -> tuple[float, str | None]:
        """(reward, None), or with skip (0.0, what went wrong and where); raises UserError otherwise."""
        try:
            returned = fn(text, prompt=prompt.messages, reference=prompt.reference, completion_ids=ids)
        except Exception as e:  # noqa: BLE001 - any failure of user code is reported with its context
            value, problem = None, f"raised {type(e).__name__}: {e}"
        else:
            value, problem = _reward_value(returned)
        if problem is None:
            return value, None
        question = prompt.messages[-1]["content"] if prompt.messages else ""
        where = f"for the prompt of {prompt.source or 'a row'} ({question[:80]!r}) and completion {text[:80]!r}"
        if self.section.on_reward_error == "skip":
            return 0.0, f"{problem} {where}"
        raise UserError(f"Reward `{name}` {problem} {where}. Fix the function, or set "
                        f"`{self.key}.on_reward_error: skip` to count such completions and score them 0.")

    def summary(self, runtime) -> list[str]:
        """A line per function that failed during the run (over all processes), for the end of the run."""
        names = sorted(self.calls)
        if not names:
            return []
        counts = torch.tensor([[self.skipped[n], self.calls[n]] for n in names], dtype=torch.float64)
        if runtime is not None and runtime.distributed:
            counts = runtime.all_reduce_sum(counts.to(runtime.device)).cpu()
        return [f"reward errors: `{n}` failed on {int(skipped)} of {int(calls)} completions of the run, which scored "
                f"0 for it ({self.key}.on_reward_error: skip)"
                for n, (skipped, calls) in zip(names, counts.tolist()) if skipped]


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

    def batch(self, texts: list[str], prompts: list[EncodedPrompt]) -> tuple[list[float], float]:
        """(rewards, model FLOPs of scoring them: the backbone over every token, the score head at each last)."""
        from tuneforge.data.encode import render
        from tuneforge.training.flops import model_forward_flops

        rendered = [render(self.scorer.tokenizer, self.template,
                           [*p.messages, {"role": "assistant", "content": t}], None, add_generation_prompt=False)
                    for t, p in zip(texts, prompts)]
        ids = [self.scorer.tokenizer(r, add_special_tokens=False)["input_ids"] for r in rendered]  # as `score` does
        flops = model_forward_flops(self.scorer.model, [len(x) for x in ids], self.scorer.model.score, len(ids))
        return self.scorer.score_ids(ids).float().tolist(), flops


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
    seqs, ids = [], []
    for prompt, c in zip(prompts, completions):
        # the stop token is not in token_ids; train on the one sampled (a model may stop on several, e.g.
        # <|im_end|> and <|endoftext|>), so the policy learns when to stop
        done = list(c.token_ids) + ([c.stop_token_id] if c.stop_token_id is not None else [])
        ids.append(done)
        seqs.append((prompt.input_ids, done))
    width = max(len(p) + len(c) for p, c in seqs)
    pad = engine.tokenizer.pad_token_id
    pad = pad if pad is not None else min(engine.stop_ids, default=0)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)  # masked out: any id does
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for row, (p, c) in enumerate(seqs):
        input_ids[row, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attention[row, :len(p) + len(c)] = 1
        labels[row, len(p):len(p) + len(c)] = torch.tensor(c, dtype=torch.long)
    return Rollout(input_ids.to(device), attention.to(device), labels.to(device),
                   [c.text for c in completions], ids, prompts)


def sampling_seed(seed: int, step: int, row: int) -> int:
    """A seed per completion from (run seed, step, row): resuming at a step samples the same completions."""
    return (seed * 1_000_003 + step * 65_537 + row) % (2 ** 31 - 1)


def policy_forward(model, batch: dict, hidden: bool = False, at_labels: bool = False, temperature: float = 1.0):
    """(per-token log-probs [B, T-1], mask [B, T-1], logits, last hidden state or None).

    `temperature`: the rollouts' sampling temperature; the logits are divided by it, so the log-probs (and the
    logits returned, e.g. for the entropy) are those of the distribution the completions were sampled from, as
    TRL's GRPOTrainer, OpenRLHF and verl compute them. Without it the policy ratio, the KL and the gradient would
    be those of the untempered policy on samples of another one.

    `at_labels` (the stage's `logits_at_labels`: the model takes `logits_to_keep`; ignored with `hidden`): the output
    layer runs only at positions that predict a completion token (`label_positions`) and `logits` holds only those;
    log-probs and mask keep the [B, T-1] layout (0 / False elsewhere), so callers see no difference. Why: the prompt
    is most of a rollout, and lm_head is a fifth of a small model's forward (SmolLM2-135M: vocabulary 49152); the
    GRPO comparison with TRL (bench/bench_vs_trl.py) measured the saving."""
    labels = batch["labels"]
    positions = label_positions(labels) if at_labels and not hidden else None
    if positions is not None:
        logits = tempered(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                logits_to_keep=positions).logits, temperature)
        picked, _ = token_logps(logits, labels, positions)
        logps = picked.new_zeros(labels.shape[0], labels.shape[1] - 1).index_copy(1, positions, picked)
        return logps, labels[:, 1:] != IGNORE_INDEX, logits, None
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=hidden)
    logits = tempered(out.logits[:, -labels.shape[1]:], temperature)
    logps, mask = token_logps(logits, labels)
    return logps, mask, logits, (out.hidden_states[-1][:, -labels.shape[1]:] if hidden else None)


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature (the same tensor at 1: no copy of the batch's logits)."""
    return logits if temperature == 1 else logits / temperature


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


SUMMED = ("tokens", "token_squares", "head_positions", "other_flops")  # counts, added up over ranks


def mean_over_ranks(runtime, metrics: dict) -> dict:
    """Per-rank means (of equal shares of rows) averaged over ranks; the counts in SUMMED added up. Identity in one
    process."""
    if not runtime.distributed:
        return metrics
    keys = sorted(metrics)
    values = runtime.all_reduce_sum(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64,
                                                 device=runtime.device))
    return {k: (int(v) if k in SUMMED else float(v) / runtime.world_size) for k, v in zip(keys, values.tolist())}


def rollout_work(roll: Rollout, epochs: int, head_at_labels: bool, meter, forwards: list[bool],
                 reward_flops: float = 0.0) -> dict:
    """An RL step's MFU counts (training/flops.py): `epochs` training passes over the rollout's tokens (lm_head at
    the completion tokens only where `head_at_labels`), and as model FLOPs (`other_flops`) its forward-only work:
    one policy pass over the rollout per flag in `forwards` (sampling it, the old-policy and the reference
    log-probs where the stage takes them), True where that pass runs lm_head at the completion tokens only, plus
    `reward_flops`, the reward models' own passes (`Rewards.flops`). `meter`: the loop's EfficiencyMeter."""
    lengths = roll.attention_mask.sum(-1)
    tokens, squares = int(lengths.sum()), int((lengths ** 2).sum())
    completion = int((roll.labels[:, 1:] != IGNORE_INDEX).sum())
    passes = sum(meter.forward_flops(tokens, squares, completion if at else tokens) for at in forwards)
    return {"tokens": tokens, "token_squares": squares, "train_copies": epochs,
            "head_positions": completion if head_at_labels else tokens, "other_flops": passes + reward_flops}


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
    def token_logps(self, batch: dict, at_labels: bool = False, temperature: float = 1.0) -> torch.Tensor:
        with self._context():
            return policy_forward(self._forward(), batch, at_labels=at_labels, temperature=temperature)[0]


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
        # DDP averages gradients over ranks; the shares add up: undo that (the strategy scales an fp16 loss)
        self.strategy.backward(self.model, loss * self.rt.world_size)
        total = float(self.rt.all_reduce_sum(loss.detach().float()))
        if not math.isfinite(total):  # before the step, as the loop does: see Trainer._diverged
            raise self._diverged("loss", total)
        grad_norm = self._step()
        self._check_grad_norm(grad_norm)
        return total, grad_norm

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
    """The whole run of a sampling stage: the rewards resolved (a typo fails in a second), runtime, prompts (read
    first: a bad row, or a missing reference answer a reward needs, fails before the model loads), model + method
    (`extend`: what the stage adds to the model before DDP wraps it, PPO's value head), the stage (reference,
    rewards), the RL trainer, the final save, and the reward errors skipped over the run."""
    from tuneforge.training.setup import done_line, save_final, setup_data, setup_model, setup_run

    needs, reads = check_rewards(getattr(cfg, cfg.stage), cfg.stage)
    runtime = setup_run(cfg, log)
    if runtime.engine not in ("none", "ddp"):
        raise UserError(f"Stage {cfg.stage} samples with the whole model on every process, so it runs in one "
                        f"process or under DDP, not with training.distributed={runtime.engine}. Set "
                        f"`training.distributed=ddp` (or auto).")
    main_log = log if runtime.is_main else (lambda _: None)
    rows = read_prompts(cfg, needs, reads, main_log)
    model, tokenizer, method = setup_model(cfg, runtime, extend=extend, log=log)
    prompts, evals, _ = setup_data(cfg, tokenizer, cfg.stage, runtime, log, read=rows)
    if evals:
        main_log(f"note: stage {cfg.stage} does not score the {len(evals)} held-out prompts during training; the "
                 f"rewards logged per step are those of the training rollouts")
    stage = make_stage(cfg, model, tokenizer, runtime, log)
    check_prompt_room(stage.engine, prompts)
    result = RLTrainer(cfg, runtime, model, method, prompts, stage, log).train()
    if result.finished:
        stage.before_save(model)
        save_final(cfg, model, method, tokenizer, runtime)
        if runtime.is_main:
            stage.after_save(Path(cfg.output_dir))
        main_log(done_line(result, cfg.output_dir))
    for line in stage.rewards.summary(runtime):
        main_log(line)
    return result


def check_prompt_room(engine, prompts: list[EncodedPrompt]) -> None:
    """Refuse, before the first step, prompts the model's context leaves no room to continue (data.max_length past
    the context lets them through): the engine would stop the run at the step that samples one, naming no row."""
    full = [p for p in prompts if engine.room_after(p.input_ids) <= 0]
    if full:
        first = full[0]
        raise DataError(f"{len(full)} training prompt(s) leave no room for a reply in the model's context of "
                        f"{engine.context_length} tokens (first: {first.source or 'a row'}, a prompt of {len(first)} "
                        f"tokens). Set `data.max_length` to at most {engine.context_length - 1} (longer prompts are "
                        f"then skipped and counted), or shorten those prompts.")


def read_prompts(cfg, needs: list[str], reads: list[str], log=print) -> tuple[list, list, DataReport]:
    """`read_datasets` for a sampling stage. When a built-in reward (`needs`) compares completions with the row's
    reference answer, each training prompt without one is a bad row (file:line) here, listed with the other bad
    rows, so `data.on_error` decides about it before the model loads instead of the run failing mid-training.
    Otherwise, when some prompts have none and it matters (a function that reads references, or KTO rows labelled
    false, whose reply is no answer to aim at), the count is said once."""
    from tuneforge.data.build import check_bad_rows, read_datasets

    data = replace(cfg.data, on_error="skip") if needs else cfg.data  # every bad row first, then one decision
    train, evals, report = read_datasets(data, stage=cfg.stage)
    missing = [e for e in train if _lacks_reference(e)]
    if needs and missing:
        report.bad_rows += [BadRow(e.source, "answer", f"no reference answer, which the `{needs[0]}` reward "
                                                      f"compares completions with; add an `answer` (or `reference`) "
                                                      f"column, or drop `{needs[0]}` from {cfg.stage}.reward")
                            for e in missing]
        train = [e for e in train if not _lacks_reference(e)]
    if needs and cfg.data.on_error == "raise":
        check_bad_rows(report, cfg.data)
    if needs and not train:
        check_bad_rows(report, cfg.data)  # lists what was skipped
        raise DataError(f"No training prompts left: none of the {report.rows_read} rows read has a reference "
                        f"answer, which `{needs[0]}` needs. Add an `answer` column, or choose rewards that need none "
                        f"(format, length, a function, a reward model).")
    undesirable = sum(1 for e in missing if getattr(e, "label", None) is False)
    if missing and not needs and (reads or undesirable):
        log(f"note: {len(missing)} of {len(train)} training prompts have no reference answer, so reward functions "
            f"get reference=None for them" + (f"; {undesirable} of them are KTO rows labelled false, whose "
                                              f"undesirable reply is not used as one" if undesirable else ""))
    return train, evals, report


def _lacks_reference(example) -> bool:
    """Whether the prompt `example` gives (if any: a typed row gives one, with its first pair) has no reference."""
    from tuneforge.data.encode_align import for_stage

    return any(p.reference is None for p in for_stage(example, "prompt"))
