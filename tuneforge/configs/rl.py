"""Config sections of the sampling stages: `grpo:` and `ppo:` (rollouts through the engine, rewards, updates).

Rewards (`reward:` in either section) map a reward to its weight; the total is the weighted sum. A reward is
- a built-in: `exact_match` (1 when the completion equals the row's reference answer after normalising whitespace
  and trailing punctuation, else 0), `format` (1 when the completion matches `format_pattern`), `length` (1 at
  `length_target` characters, falling linearly to 0 at twice or zero that length);
- a Python function `module:function` (importable from the working directory), called once per completion as
  `function(completion, prompt=messages, reference=answer_or_None, completion_ids=ids)` with the keywords it accepts,
  returning a number;
- a reward-model folder (the output of a `stage: rm` run).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tuneforge.configs.typed import opt

# The built-in rewards, each with whether it compares the completion with the row's reference answer (rows without
# one are then bad rows, reported before the model loads).
BUILTIN_REWARDS = {"exact_match": True, "format": False, "length": False}

REWARD_HELP = ("Rewards and their weights, e.g. {exact_match: 1.0, 'my_rewards:short': 0.2}: built-ins exact_match, "
               "format, length; `module:function` (called per completion, returns a number); or an rm output folder.")


@dataclass
class SamplingSection:
    """What rollouts share: the engine's sampling settings and the reward."""

    reward: dict[str, float] = opt(factory=lambda: {"exact_match": 1.0}, help=REWARD_HELP)
    max_new_tokens: int = opt(32, "Longest completion sampled per prompt (tokens).")
    temperature: float = opt(1.0, "Sampling temperature of rollouts (> 0: RL needs varied completions).")
    top_p: float = opt(1.0, "Nucleus sampling of rollouts (1 = off).")
    top_k: int = opt(0, "Top-k sampling of rollouts (0 = off).")
    epochs: int = opt(1, "Optimisation passes over each rollout batch (PPO epochs / GRPO iterations).")
    mini_batch_size: int = opt(0, "Completions per optimizer update within a rollout batch, per process (0: all of them).")
    clip_eps: float = opt(0.2, "Clip range of the policy ratio.")
    format_pattern: str = opt(r"(?s)^\s*\S.*$", "Regular expression the `format` reward checks (re.fullmatch).")
    length_target: int = opt(20, "Target completion length in characters for the `length` reward.")
    on_reward_error: Literal["raise", "skip"] = opt(
        "raise", "A reward function that raises or returns NaN/inf: stop with an error naming the function and "
                 "prompt (raise), or count and log it and give that completion reward 0 (skip).")


@dataclass
class GRPOConfig(SamplingSection):
    num_generations: int = opt(4, "G: completions sampled per prompt (a group; at least 2).")
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = opt(
        "dapo", "Token normalisation: grpo (per-sequence mean, then mean), dr_grpo (sum / max_new_tokens per "
                "sequence), dapo (mean over all tokens of the batch).")
    advantage: Literal["group", "rloo"] = opt("group", "group: reward - group mean; rloo: leave-one-out baseline.")
    scale_rewards: bool = opt(True, "Divide advantages by the group's reward std (Dr. GRPO turns this off).")
    beta: float = opt(0.04, "Weight of the k3 KL to the reference model (0: no reference is kept).")
    clip_eps_high: float | None = opt(None, "Upper clip range (DAPO clip-higher); default clip_eps.")


@dataclass
class PPOConfig(SamplingSection):
    kl_coef: float = opt(0.05, "Per-token KL penalty to the reference, subtracted from the reward.")
    kl_estimator: Literal["k1", "k3"] = opt("k1", "KL estimate of the penalty: k1 (log ratio) or k3.")
    gamma: float = opt(1.0, "GAE discount.")
    lam: float = opt(0.95, "GAE lambda.")
    vf_coef: float = opt(0.1, "Weight of the value loss.")
    cliprange_value: float = opt(0.2, "Clip range of the value loss.")
    whiten_advantages: bool = opt(True, "Normalise advantages over the rollout batch.")
    epochs: int = opt(4, "PPO epochs over each rollout batch.")


def rl_problems(cfg) -> list[str]:
    """Settings of the sampling stages that cannot work (checked with the rest of the config)."""
    problems = []
    section = {"grpo": cfg.grpo, "ppo": cfg.ppo}.get(cfg.stage)
    if section is None:
        return problems
    if cfg.stage == "grpo" and cfg.grpo.num_generations < 2:
        problems.append(f"`grpo.num_generations` must be at least 2 (advantages compare completions within a group), "
                        f"got {cfg.grpo.num_generations}.")
    problems += sampling_problems(cfg.stage, section) + reward_problems(cfg.stage, section.reward)
    if section.epochs < 1:
        problems.append(f"`{cfg.stage}.epochs` must be at least 1, got {section.epochs}.")
    return problems + range_problems(cfg, section)


def reward_problems(stage: str, rewards: dict) -> list[str]:
    """Rewards that name nothing usable, and weights that leave no signal (every completion would score 0: GRPO's
    groups all constant, PPO's reward the KL penalty alone, while the run says it trains)."""
    problems = [unknown_reward(stage, name) for name in rewards
                if name not in BUILTIN_REWARDS and ":" not in name and not Path(name).is_dir()]
    weights = [w for w in rewards.values() if isinstance(w, (int, float))]  # a non-number is said by the typing
    if rewards and weights and not any(weights):
        problems.append(f"`{stage}.reward` weighs every reward 0 ({', '.join(rewards)}), so every completion scores 0 "
                        f"and the run learns nothing from them: give at least one reward a non-zero weight (a weight "
                        f"of 0 beside others keeps that reward in the log without training on it).")
    return problems


def unknown_reward(stage: str, name: str) -> str:
    """Why `stage.reward` cannot use `name`, and the fix: a missing rm folder (the usual case: ppo_rm_tiny.yaml run
    before rm_tiny.yaml) said as such, naming the folder it looked in, rather than as an unknown reward."""
    if Path(name).is_file():
        return (f"`{stage}.reward` names the file `{name}`; a reward model is a folder (the output_dir of a "
                f"`stage: rm` run, holding config.json): name that folder.")
    if "/" in name or "\\" in name or name.startswith(("~", ".")):
        return (f"`{stage}.reward` names the folder `{name}`, which does not exist (looked in {Path.cwd()}): train the "
                f"reward model first (a `stage: rm` run with this output_dir, e.g. `tuneforge train "
                f"examples/rm_tiny.yaml` for outputs/rm_tiny), or fix the path.")
    close = difflib.get_close_matches(name, BUILTIN_REWARDS, n=1)
    hint = f" Did you mean `{close[0]}`?" if close else reward_form_hint(name)
    return (f"`{stage}.reward` names `{name}`: neither a built-in ({', '.join(BUILTIN_REWARDS)}), a `module:function` "
            f"nor an existing rm output folder.{hint}")


def sampling_problems(stage: str, section) -> list[str]:
    """The rollouts' sampling settings through the engine's own check (the ranges chat and serve enforce), spelled
    as config keys. RL adds one rule: temperature > 0, said in its words alone (0 is greedy decoding, valid
    elsewhere, and the engine's ">= 0" would mislead)."""
    from tuneforge.inference.types import SamplingParams

    greedy = [] if section.temperature > 0 else [
        f"`{stage}.temperature` must be > 0: greedy rollouts are all alike and teach nothing, got {section.temperature}."]
    params = SamplingParams(max_new_tokens=section.max_new_tokens, top_p=section.top_p, top_k=section.top_k,
                            temperature=1.0 if greedy else section.temperature)
    return greedy + params.problems(spell=lambda name: f"{stage}.{name}")


def range_problems(cfg, section) -> list[str]:
    """Numbers outside the range their method is defined on (they trained on to losses of 1e13 and said 'done')."""
    k = cfg.stage
    ranges = [("clip_eps", section.clip_eps > 0, "> 0"), ("mini_batch_size", section.mini_batch_size >= 0, ">= 0 "
              "(0: all completions in one update)"), ("length_target", section.length_target >= 1, ">= 1")]
    if k == "grpo":
        high = section.clip_eps_high
        ranges += [("beta", section.beta >= 0, ">= 0 (0: no reference)"),
                   ("clip_eps_high", high is None or high >= section.clip_eps, f">= grpo.clip_eps ({section.clip_eps})")]
    else:
        ranges += [("kl_coef", section.kl_coef >= 0, ">= 0 (a negative one rewards drifting from the reference)"),
                   ("gamma", 0 <= section.gamma <= 1, "in [0, 1]"), ("lam", 0 <= section.lam <= 1, "in [0, 1]"),
                   ("vf_coef", section.vf_coef >= 0, ">= 0"), ("cliprange_value", section.cliprange_value > 0, "> 0")]
    return [f"`{k}.{key}` must be {rule}, got {getattr(section, key)}." for key, ok, rule in ranges if not ok]


def reward_form_hint(name: str) -> str:
    """A "did you mean `module:function`" sentence for a reward named as a file path or a dotted name ('' for any
    other name): the two likeliest slips when naming a function."""
    module, colon, function = name.rpartition(":") if ":" in name else ("", "", "")
    if not colon:
        module, dot, function = name.rpartition(".")
        if not dot or not module or "/" in name or "\\" in name:
            return ""
    dotted = module.removesuffix(".py").replace("\\", "/").strip("/").replace("/", ".")
    if dotted == module and colon:
        return ""
    return f" Did you mean `{dotted}:{function}` (a module path with dots, then a colon and the function)?"
