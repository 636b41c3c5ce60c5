"""The training config: typed sections whose field help is the only help text there is.

    stage: sft            # pt | sft | rm | dpo | kto | coh (later: ppo, grpo)
    method: lora          # any registered method (tuneforge/methods)
    model: {name_or_path: builtin:smollm2-135m-instruct}
    data: {train: [...], max_length: 512}
    training: {lr: 2e-4, max_steps: 100}
    lora: {rank: 8}       # the options section of the chosen method
    dpo: {loss: sigmoid}  # the options section of an alignment stage (rm, dpo, kto, coh)
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from tuneforge.configs import typed
from tuneforge.configs.rl import GRPOConfig, PPOConfig, rl_problems
from tuneforge.configs.typed import apply_overrides, from_dict, opt, to_dict
from tuneforge.configs.yaml_file import read_yaml_mapping
from tuneforge.errors import ConfigError, did_you_mean

STAGES = ("pt", "sft", "rm", "dpo", "kto", "coh", "ppo", "grpo")
ALIGN_SECTIONS = ("rm", "dpo", "kto", "coh", "ppo", "grpo")  # options of the alignment stages, one section each


@dataclass
class ModelConfig:
    name_or_path: str = opt("builtin:smollm2-135m-instruct",
                            "Local Hugging Face folder, a hub id (when a hub is reachable), or `builtin:<name>` "
                            "(builtin:smollm2-135m-instruct is a real 135M chat model that works offline).")
    trust_remote_code: bool = opt(False, "Run Python code shipped with the model. Off unless you trust the source.")
    allow_pickle: bool = opt(False, "Allow loading pickle (.bin/.pt) weights, which can execute code. Prefer "
                                    "safetensors; turn on only for files you trust.")
    attn_implementation: str = opt("auto", "Attention kernel: auto, sdpa, eager, or flash_attention_2 (GPU only). "
                                           "auto: sdpa (eager for models that cannot run it, e.g. Gemma2), but eager "
                                           "for bf16 batches of up to 192 positions on CPU, where it is faster, and "
                                           "per sequence for a padding-free row, without a mask over the whole row "
                                           "(tuneforge/models/attention.py).")
    chat_template: str | None = opt(None, "Override the tokenizer's chat template: a built-in name (chatml, llama3, "
                                          "qwen, default) or a path to a .jinja file. Default: the tokenizer's own.")


@dataclass
class DatasetSpec:
    path: str = opt(help="A file (.json/.jsonl/.csv/.parquet/.txt), a folder of them, a name from the dataset "
                         "registry, or a Hugging Face datasets name (needs a reachable hub).")
    format: Literal["auto", "alpaca", "sharegpt", "openai", "text", "pairwise", "kto", "typed", "prompt"] = opt(
        "auto", "Row format. auto guesses from the columns of the first row. pairwise: prompt + chosen + rejected "
        "(alpaca, sharegpt, OpenAI or hh-rlhf layouts); kto: a conversation + boolean label; typed: responses with "
        "types, expanded by `ranking`; prompt: prompts (+ reference answer) for ppo/grpo.")
    columns: dict[str, str] = opt(factory=dict, help="Column mapping from our names to yours, e.g. "
                                  "{instruction: question, output: answer} or {messages: conversations}.")
    tags: dict[str, str] = opt(factory=dict, help="sharegpt tags, e.g. {role_tag: from, content_tag: value, "
                               "user_tag: human, assistant_tag: gpt, system_tag: system}.")
    split: str = opt("train", "Split name for Hugging Face datasets.")
    max_samples: int | None = opt(None, "Use at most this many rows of this dataset (first N).")
    ranking: list[str] = opt(factory=list, help="Typed responses (format typed): the response types, best first, "
                             "e.g. [safe_and_responsible, safe, unsafe]. Default: CValues' refuse_with_guidance > "
                             "refuse > risky (its Chinese type names are read as these).")

    @classmethod
    def from_str(cls, value: str) -> DatasetSpec:
        return cls(path=value)


@dataclass
class MixConfig:
    strategy: Literal["proportional", "temperature", "equal"] = opt(
        "temperature", "How shares follow dataset sizes: proportional, temperature (T5: share proportional to "
                       "min(rows, K)^(1/T)) or equal.")
    T: float = opt(2.0, "Temperature: 1 = proportional, larger = closer to equal.")
    K: int | None = opt(None, "Cap on a dataset's size in the temperature strategy (T5's K). Default: no cap.")
    size: int | None = opt(None, "Training rows in the mixture (a dataset asked for more than it has is repeated). "
                                 "Default: all rows of all datasets together.")


@dataclass
class DataConfig:
    train: list[DatasetSpec] = opt(factory=list, help="Training datasets (paths, registry names or inline specs).")
    eval: list[DatasetSpec] = opt(factory=list, help="Held-out evaluation datasets.")
    eval_ratio: float = opt(0.0, "Hold out this share of the training rows for evaluation when `eval` is empty.")
    registry: str | None = opt(None, "A dataset registry file (dataset_info.json, LLaMA-Factory style) that maps "
                                     "names to files, formats and column mappings.")
    max_length: int = opt(1024, "Maximum tokens per example (per packed row when packing).")
    overlong: Literal["truncate", "drop"] = opt("truncate", "What to do with examples longer than max_length; "
                                                            "either way the count is reported.")
    on_error: Literal["raise", "skip"] = opt("raise", "raise: refuse to train when any row is bad and list them; "
                                                      "skip: drop bad rows and report how many and which.")
    max_errors_shown: int = opt(20, "How many lines of bad rows to list in one error message (the rows of one "
                                      "file with the same problem share a line).")
    loss_on: Literal["assistant", "all", "last"] = opt("assistant", "Which tokens get loss in chat data: every "
                                                                    "assistant turn, all tokens, or the last turn.")
    packing: bool | None = opt(None, "Pack several examples per row (attention never crosses examples). Default: "
                                     "on for pt (off for the prompt methods, whose virtual tokens go before each "
                                     "input), off for sft.")
    group_by_length: bool = opt(False, "Put examples of similar length in the same batch (less padding, faster "
                                       "steps); the order of the batches stays random. Like Hugging Face's "
                                       "group_by_length. Has little effect with packing.")
    system: str | None = opt(None, "A system prompt added to rows that have none.")
    special_tokens_in_text: Literal["error", "escape", "keep"] = opt(
        "error", "Data text that spells a special token of the tokenizer (a reply containing `<|im_end|>`): error: a "
                 "bad row (see on_error); escape: tokenize it as plain text; keep: let it become the special token. "
                 "Default error, because either silent choice is wrong for some data: pasted chat markup would end "
                 "turns mid-reply, while `<|endoftext|>` written between documents is meant as the token.")
    seed: int = opt(0, "Seed for the train/eval split, the mixture (`mix`) and for shuffling.")
    mix: MixConfig | None = opt(None, "Mix the `train` datasets to a size with exact per-dataset counts, as "
                                      "`tuneforge data mix` does, e.g. {strategy: temperature, T: 2, size: 20000}. "
                                      "Drawn before the eval split; a function of `seed`, so a resumed run sees "
                                      "the same rows. Default: every row of every dataset once.")


@dataclass
class TrainingConfig:
    lr: float = opt(2e-4, "Peak learning rate.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    adam_betas: list[float] = opt(factory=lambda: [0.9, 0.999], help="AdamW betas.")
    scheduler: Literal["linear", "cosine", "constant"] = opt("cosine", "Learning-rate schedule after warmup.")
    warmup_steps: int = opt(0, "Linear warmup steps (wins over warmup_ratio when > 0).")
    warmup_ratio: float = opt(0.0, "Warmup as a share of all steps.")
    batch_size: int = opt(4, "Examples per device per micro-batch.")
    grad_accum: int = opt(1, "Micro-batches per optimizer step.")
    max_steps: int = opt(-1, "Optimizer steps to run; -1 means run `epochs` epochs.")
    epochs: float = opt(1.0, "Epochs to run when max_steps is -1.")
    max_grad_norm: float = opt(1.0, "Clip the gradient norm to this (0 disables).")
    precision: Literal["fp32", "bf16", "fp16", "auto"] = opt(
        "fp32", "Compute dtype. bf16 works on CPU too but is fast only on CPUs with AVX512-BF16/AMX; fp16 needs a GPU "
        "and runs with dynamic loss scaling (torch GradScaler: overflowing steps are skipped and logged). "
        "auto: bf16 where the hardware computes it natively (recent GPUs and CPUs), else fp32.")
    neftune_alpha: float = opt(0.0, "NEFTune (Jain et al. 2023): uniform noise on input embeddings during training, "
                                    "scaled by alpha/sqrt(L*d). Typical 5. 0 disables.")
    rdrop_alpha: float = opt(0.0, "R-Drop (Liang et al. 2021): two dropout forward passes with a symmetric KL between "
                                  "them, weighted by alpha. Needs dropout in the model. 0 disables.")
    chunked_loss: Literal["auto", "always", "never"] = opt(
        "auto", "Compute lm_head and the loss in chunks of positions so the [tokens x vocabulary] logits are never "
        "held whole (Liger Kernel's fused version on CUDA when installed). Same loss and gradients, far less memory "
        "with big vocabularies. auto: on GPUs, for vocabularies of 32k and more where it applies (not with fsdp, "
        "R-Drop or prompt-learning methods).")
    padding_free: Literal["auto", "always", "never"] = opt(
        "auto", "Stages pt/sft/dpo/kto/rm: each micro-batch becomes one row of its examples (dpo, rm: both sides "
        "of its pairs; kto: with its mismatched KL conversations) end to end (no padding, no mask, position ids "
        "restart per example), attended per example; same loss. auto: on when `model.attn_implementation` is a "
        "FlashAttention kernel (flash_attention_2, ...; its varlen kernel), and on CPU with attn_implementation auto "
        "(it attends per example; not with R-Drop, NEFTune or compile); always: also on GPUs without FlashAttention "
        "(with attn_implementation auto each example through SDPA, not measured on a GPU yet; with sdpa/eager under "
        "a mask over the joined row, which costs more than the padding saved).")
    compile: bool = opt(False, "torch.compile each decoder block (once, at start: tens of seconds). Same "
                               "loss; on CPU no faster than the defaults it turns off (oneDNN linears, padding-free "
                               "rows): 0.96x per step, measured (bench/RESULTS.md).")
    cpu_matmul: Literal["auto", "onednn", "default"] = opt(
        "auto", "Which library multiplies fp32 matrices on CPU, forward and backward. onednn: oneDNN (measured ~2x "
        "faster than PyTorch's default MKL sgemm on an AMD EPYC, 0.86x on an Intel Xeon; same fp32 results to "
        "rounding; tuneforge/kernels/onednn_linear.py); default: PyTorch's own choice. auto: onednn for fp32 runs "
        "on CPU where a short probe (~1 s, once per machine and thread count, cached) measured it at least 5% "
        "faster, except with compile or distributed=fsdp/deepspeed.")
    fused_layers: Literal["auto", "always", "never"] = opt(
        "auto", "RMSNorm layers (Llama formula) and plain LoRA layers each as one autograd node with a hand-written "
        "backward (tuneforge/kernels/rms_norm.py, lora_linear.py): the same values to rounding, fewer full-size "
        "passes over the activations. The LoRA one applies to fp32 CPU tensors only. auto: on CPU, except with "
        "compile or distributed=fsdp/deepspeed; always: also on GPUs (RMSNorm; not measured there).")
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass to save memory.")
    eval_steps: int = opt(0, "Evaluate on the held-out split every N steps (0: only at the end when there is one).")
    eval_suite: dict[str, Any] | None = opt(None, "A small evaluation suite run at every eval step (stages pt and "
                                                  "sft): an eval config without `models`, e.g. {tasks: [mmlu], "
                                                  "data_dir: ../shared/assets/eval, limit: 5, shots: 0}. Scores go to "
                                                  "metrics.jsonl and TensorBoard as suite/<task>/<metric>.")
    save_steps: int = opt(0, "Write a resumable checkpoint every N steps (0: none).")
    save_total_limit: int = opt(2, "Keep only the last K checkpoints (0: keep every one).")
    logging_steps: int = opt(1, "Log metrics every N steps.")
    resume: str | None = opt(None, "auto (latest checkpoint in output_dir) or a checkpoint folder path.")
    stop_after_steps: int = opt(0, "Stop this invocation after N steps with a checkpoint, as if preempted (for "
                                   "time-limited cluster jobs: rerun with resume=auto). 0: run to the end.")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N.")
    distributed: Literal["auto", "none", "ddp", "fsdp", "deepspeed"] = opt(
        "auto", "How the model is spread over processes started by torchrun. auto: ddp with more than one process, "
        "none with one. ddp: every process holds the whole model. fsdp: PyTorch FSDP2 shards weights, gradients "
        "and optimizer state over the processes (sharded checkpoints, resumable with another process count). "
        "deepspeed: DeepSpeed ZeRO 2/3 (training.deepspeed; pip install tuneforge[deepspeed]; CPU works too). See "
        "README `Scaling out`.")
    fsdp_cpu_offload: bool = opt(False, "With distributed=fsdp: keep the sharded weights, gradients and optimizer "
                                        "state in CPU memory between uses (fits bigger models, runs slower).")
    deepspeed: int | str | None = opt(
        None, "With distributed=deepspeed: the ZeRO stage, 2 (gradients and optimizer state sharded) or 3 (the "
        "weights too), built from batch_size, grad_accum, max_grad_norm and precision; or the path of your own "
        "DeepSpeed JSON, used as is with its \"auto\" values filled from this config (as Hugging Face Trainer does; "
        "optimizer/scheduler sections only with \"auto\" values or values that agree with training.*: TuneForge's "
        "AdamW and schedule run). Default: 2.")
    deepspeed_offload: Literal["none", "optimizer", "all"] = opt(
        "none", "With a ZeRO stage in training.deepspeed: keep the optimizer state (optimizer) or also the weights "
                "(all, stage 3 only) in CPU memory (fits bigger models, runs slower).")
    num_workers: int = opt(0, "DataLoader worker processes.")
    plot_loss: bool = opt(True, "Write loss.png to the output folder at the end.")
    progress_bar: bool = opt(True, "Show a progress bar.")


@dataclass
class RewardModelConfig:
    margin: bool = opt(True, "Use the per-pair `margin` of the data (Llama 2) in the Bradley-Terry loss: "
                             "-log sigmoid(r_chosen - r_rejected - margin). Pairs without one use 0.")


@dataclass
class DPOConfig:
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"] = opt(
        "sigmoid", "sigmoid: DPO; ipo: IPO (length-normalised log-ratios); hinge: SLiC; robust: rDPO for a known "
        "label-flip rate (`label_smoothing`); simpo: SimPO (length-normalised, no reference, target margin "
        "`simpo_gamma`); orpo: ORPO (odds ratio + SFT loss on chosen, no reference; `beta` is its lambda).")
    beta: float = opt(0.1, "Strength of the pull towards the reference (DPO's beta, IPO's tau, SimPO's beta, "
                           "ORPO's lambda). Typical: 0.1 for DPO, 2.0 for SimPO.")
    label_smoothing: float = opt(0.0, "Share of preference labels assumed flipped, in [0, 0.5): cDPO for sigmoid "
                                      "(and simpo), the flip rate for robust.")
    simpo_gamma: float = opt(1.0, "SimPO's target reward margin gamma.")
    sft_weight: float = opt(0.0, "Add this weight times the chosen reply's per-token NLL to each pair's loss (RPO; "
                                 "keeps the chosen reply likely). 0: off.")
    precompute_reference: bool = opt(False, "Compute the reference log-probs once before training (one forward "
                                            "pass over the data) instead of at every step: faster steps, and for "
                                            "method full no frozen copy of the model. Same loss either way.")


@dataclass
class KTOConfig:
    beta: float = opt(0.1, "Strength of the pull towards the reference (KTO's beta).")
    desirable_weight: float = opt(1.0, "Weight of desirable examples (lambda_D). With unbalanced data keep "
                                       "lambda_D n_D / (lambda_U n_U) in [1, 4/3] (the KTO paper).")
    undesirable_weight: float = opt(1.0, "Weight of undesirable examples (lambda_U).")


@dataclass
class CoHConfig:
    good_phrase: str = opt("A good answer:", "Feedback phrase before the chosen reply (a user turn, no loss). At "
                                             "inference end the prompt with it to ask for a good answer.")
    bad_phrase: str = opt("A bad answer:", "Feedback phrase before the rejected reply (a user turn, no loss).")
    order: Literal["random", "good_first", "bad_first"] = opt(
        "random", "Which reply comes first in each sequence; random (seeded per row, the paper's choice) makes "
                  "the model read the feedback phrase rather than the position.")


@dataclass
class TrainConfig:
    stage: Literal["pt", "sft", "rm", "dpo", "kto", "coh", "ppo", "grpo"] = opt(
        "sft", "Training stage: pt (continued pre-training on text), sft, rm (reward model), dpo (and IPO, SimPO, "
               "ORPO, ... see `dpo.loss`), kto, coh (Chain of Hindsight), ppo, grpo. Alignment stages read "
               "preference data; ppo and grpo sample from prompts.")
    method: str = opt("lora", "Fine-tuning method (see `tuneforge methods`): full, freeze, lora, ...")
    output_dir: str = opt("outputs/run", "Where the model/adapter, checkpoints, metrics and resolved config go.")
    overwrite_output_dir: bool = opt(False, "Start over in an output_dir that holds an earlier run: delete what is "
                                            "there when training starts. Off: a non-empty output_dir is refused "
                                            "unless `training.resume` continues it.")
    seed: int = opt(42, "Random seed for initialisation, dropout and shuffling.")
    model: ModelConfig = opt(factory=ModelConfig, help="Which model to start from.")
    data: DataConfig = opt(factory=DataConfig, help="Datasets and how to render them.")
    training: TrainingConfig = opt(factory=TrainingConfig, help="Optimizer, schedule, precision, checkpoints.")
    rm: RewardModelConfig = opt(factory=RewardModelConfig, help="Stage rm: reward-model training.")
    dpo: DPOConfig = opt(factory=DPOConfig, help="Stage dpo: the DPO family of preference losses.")
    kto: KTOConfig = opt(factory=KTOConfig, help="Stage kto: unpaired desirable/undesirable examples.")
    coh: CoHConfig = opt(factory=CoHConfig, help="Stage coh: Chain of Hindsight.")
    ppo: PPOConfig = opt(factory=PPOConfig, help="Stage ppo: rollouts, rewards, KL penalty, GAE, PPO epochs.")
    grpo: GRPOConfig = opt(factory=GRPOConfig, help="Stage grpo: group sampling, rewards, loss normalisation.")
    method_options: dict[str, Any] = opt(factory=dict, help="Options sections of methods, by section name.")

    def options(self, section: str):
        """The typed options of a method section (e.g. `lora`), defaults filled in."""
        return self.method_options[section]


def _method_sections() -> dict[str, type]:
    from tuneforge.methods import METHODS

    sections = {}
    for method in METHODS.values():
        if method.section:
            sections[method.section] = method.Options
    return sections


def load_train_config(path: str | None, overrides: list[str] | None = None, base: dict | None = None) -> TrainConfig:
    """Read YAML (or `base`), apply `key=value` overrides, type-check everything, check combinations."""
    data: dict = copy.deepcopy(base or {})
    if path is not None:
        loaded = read_yaml_mapping(path, "Config file", "examples/sft_lora_tiny.yaml")
        if not loaded and not overrides and not data:  # else `data.train is empty` blames one key of many
            raise ConfigError(f"{path} is empty (no config keys, or only comments). Start from an example such as "
                              f"examples/sft_lora_tiny.yaml and edit it.")
        data.update(loaded)
    own_keys = set(data)  # the file's (or base's) keys: foreign names typed as overrides do not make it foreign
    apply_overrides(data, overrides or [])
    try:
        cfg = _typed_config(data, path, own_keys)
        validate(cfg, where=path)
    except ConfigError as e:
        raise _named_overrides(e, overrides or [], path) from None
    cfg.model.chat_template = absolute_template_path(cfg.model.chat_template)
    return cfg


def absolute_template_path(template: str | None) -> str | None:
    """A relative .jinja path made absolute (from the working directory, where it is read): the run's
    tuneforge_config.yaml records it, and chat, serve, export and a re-run read it from other directories. Built-in
    names, Jinja source and paths that do not exist (an error when the tokenizer loads) stay as they are."""
    from tuneforge.data.templates import names_a_file

    if not template or not names_a_file(template):
        return template
    path = Path(template).expanduser()
    return str(path.resolve()) if not path.is_absolute() and path.is_file() else template


def _named_overrides(err: ConfigError, overrides: list[str], path: str | None) -> ConfigError:
    """The error with each problem about a key set on the command line saying so: the message names the YAML
    file, where the user would otherwise look for a value that is not there."""
    keys = {item.split("=", 1)[0].strip(): item for item in overrides if "=" in item}
    if not keys:
        return err
    def named(problem: str) -> str:  # the first `...` of a problem is the key it is about (or a bad method name)
        first = re.search(r"`([^`]+)`", problem)
        subject = first.group(1).rstrip(":") if first else None
        item = next((item for key, item in keys.items() if subject in (key, item.split("=", 1)[1].strip())), None)
        if item is None:
            return problem
        body, stop = (problem[:-1], ".") if problem.endswith(".") else (problem, "")
        return f"{body} (set on the command line: `{item}`){stop}"

    return typed.config_error([named(p) for p in typed.problems_of(err)], where=path or "the config")


def _typed_config(data: dict, path: str | None, own_keys: set | None = None) -> TrainConfig:
    """The typed config, or one ConfigError listing every unknown key and bad value of every section."""
    from tuneforge.configs.foreign import LLAMAFACTORY_MARKERS, foreign_hint

    sections, problems, options = _method_sections(), [], {}
    if "method_options" in data:
        problems.append("Put method options under the method's own section (e.g. `lora:`), not `method_options`.")
    with typed.unknown_key_hints(foreign_hint):
        try:
            cfg = from_dict(TrainConfig, {k: v for k, v in data.items() if k != "method_options"},
                            extra_sections=sections)
        except ConfigError as e:
            cfg, problems = None, problems + typed.problems_of(e)
        for name, opts_cls in sections.items():
            try:
                options[name] = from_dict(opts_cls, data.get(name) or {}, prefix=name)
            except ConfigError as e:
                problems += typed.problems_of(e)
    stage = data.get("stage", "sft")
    problems += [f"`{name}:` holds options of stage {name}, and this run is stage {stage}, which would ignore them: "
                 f"drop the section (or set `stage: {name}`)." for name in ALIGN_SECTIONS if data.get(name)
                 and name != stage]
    if problems and len(LLAMAFACTORY_MARKERS & (set(data) if own_keys is None else own_keys)) >= 2:
        problems.insert(0, f"This looks like a LLaMA-Factory config: `tuneforge convert-config {path or 'FILE'} --out "
                        f"tuneforge.yaml` translates it and lists what has no equivalent.")
    if problems:
        problems += _problems_of_the_rest(data, sections)
        raise typed.config_error(problems, where=path or "the config")
    cfg.method_options.update(options)
    cfg.ignored_sections = _ignored_method_sections(cfg.method, data, sections)
    return cfg


def _ignored_method_sections(method_name: str, data: dict, sections: dict) -> list[str]:
    """Method sections set in the config that the run's method does not read (`lora:` under method full): said at
    the start of the run, not refused, since switching the method of an example config by one key is the usual way
    to try another (the file keeps its old section)."""
    from tuneforge.methods import METHODS

    method = METHODS.get(method_name)
    if method is None:
        return []
    reads = getattr(method, "uses_sections", None) or ((method.section,) if method.section else ())
    return [name for name in sections if data.get(name) and name not in reads]


def _problems_of_the_rest(data: dict, sections: dict) -> list[str]:
    """The combination checks (`validate`) of a config with its unknown keys and bad values left out, so the first
    error lists those problems too (an unknown method, a batch size of 0) instead of a second round after the
    first fixes. Defaults stand in for what was left out, and they pass these checks on their own."""
    try:
        cfg = from_dict(TrainConfig, typed.valid_part(TrainConfig, data), extra_sections=sections)
        cfg.method_options.update({name: from_dict(opts_cls, typed.valid_part(opts_cls, data.get(name) or {}),
                                                   prefix=name) for name, opts_cls in sections.items()})
        return validation_problems(cfg)
    except (ConfigError, TypeError, ValueError, AttributeError):  # what is left does not build: report what we have
        return []


def validate(cfg: TrainConfig, where: str | None = None) -> None:
    """Combinations that cannot work are refused before any work starts, all of them in one error."""
    problems = validation_problems(cfg)
    if problems:
        raise typed.config_error(problems, where=where or "the config")


def validation_problems(cfg: TrainConfig) -> list[str]:
    from tuneforge.data.specs import data_config_problems
    from tuneforge.methods import METHODS

    t, problems = cfg.training, []
    if cfg.method not in METHODS:
        problems.append(f"Unknown method `{cfg.method}`.{did_you_mean(cfg.method, METHODS)}")
    if t.batch_size < 1 or t.grad_accum < 1:
        problems.append("`training.batch_size` and `training.grad_accum` must be at least 1.")
    if t.max_steps == 0 or (t.max_steps < 0 and t.epochs <= 0):
        problems.append("Nothing to train: set `training.max_steps` > 0 or `training.epochs` > 0.")
    if not cfg.data.train:
        problems.append("`data.train` is empty: name at least one dataset (a file path or registry name).")
    if not cfg.model.name_or_path.strip():
        problems.append("`model.name_or_path` is empty: give a Hugging Face model folder, a hub id or "
                        "builtin:smollm2-135m-instruct.")
    if not 0.0 <= t.warmup_ratio <= 1.0 or t.warmup_steps < 0:
        problems.append(f"`training.warmup_ratio` is a share of all steps, in [0, 1] (got {t.warmup_ratio}), and "
                        f"`training.warmup_steps` at least 0 (got {t.warmup_steps}).")
    if not 0.0 <= cfg.data.eval_ratio < 1.0:
        problems.append(f"`data.eval_ratio` must be in [0, 1), got {cfg.data.eval_ratio}.")
    if cfg.data.max_length < 8:
        problems.append(f"`data.max_length` must be at least 8, got {cfg.data.max_length}.")
    if t.precision == "fp16" and t.device == "cpu":
        problems.append("`training.precision: fp16` needs a GPU; on CPU use bf16 or fp32.")
    if t.precision == "fp16" and t.distributed == "fsdp":  # FSDP2 has no tested fp16 loss scaler here
        problems.append("`training.precision: fp16` is not supported with `training.distributed: fsdp` (its "
                        "gradients would need a sharded loss scaler, which TuneForge does not run). Use bf16 (GPUs "
                        "from Ampere on), or fp16 with `training.distributed: ddp` or `deepspeed` (both scale the "
                        "loss).")
    if t.resume not in (None, "auto") and not Path(t.resume).is_dir():
        problems.append(f"`training.resume` is {t.resume!r}: no such checkpoint folder. Use `auto` or a path "
                        f"like {cfg.output_dir}/checkpoint-10.")
    if t.eval_suite and (cfg.stage not in ("pt", "sft") or not t.eval_steps):
        problems.append("`training.eval_suite` runs at eval steps of stages pt and sft: set `training.eval_steps` "
                        "(and use stage pt or sft), or evaluate the saved model with `tuneforge eval`.")
    if t.eval_suite:  # its keys and settings now; its task files as training starts (setup_run)
        from tuneforge.eval.during_training import suite_problems

        problems += suite_problems(t.eval_suite)
    if t.resume is not None and cfg.overwrite_output_dir:
        problems.append("`training.resume` continues the run in output_dir and `overwrite_output_dir` deletes it: "
                        "set only one.")
    if t.save_total_limit < 0 or t.save_steps < 0:
        problems.append(f"`training.save_total_limit` (0 keeps every checkpoint) and `training.save_steps` (0: "
                        f"none mid-run) must be >= 0; got {t.save_total_limit} and {t.save_steps}.")
    problems += training_number_problems(t)
    if t.neftune_alpha < 0 or t.rdrop_alpha < 0:
        problems.append("`training.neftune_alpha` and `training.rdrop_alpha` must be >= 0 (0 disables).")
    if cfg.stage == "pt" and cfg.data.loss_on != "assistant":
        problems.append("`data.loss_on` applies to chat data in sft; stage pt trains on all text tokens.")
    if t.padding_free == "always":
        from tuneforge.training.padding_free import use_padding_free

        try:
            use_padding_free("always", cfg.stage, cfg.method, cfg.model.attn_implementation)
        except ConfigError as e:
            problems += typed.problems_of(e)
    problems += _stage_problems(cfg) + rl_problems(cfg)
    problems += _deepspeed_problems(cfg)
    problems += _chunked_loss_problems(cfg.training)
    problems += data_config_problems(cfg.data)  # dataset specs and data.mix, checked by the data layer
    if cfg.method in METHODS:
        try:
            METHODS[cfg.method].validate(cfg)
        except ConfigError as e:
            problems += typed.problems_of(e)
    return problems


def training_number_problems(t) -> list[str]:
    """Numbers the loop would misread rather than refuse: logging_steps 0 divided by zero after the first step, a
    negative eval_steps evaluated at every step, a negative stop_after_steps 'stopped' at step 0 naming a checkpoint
    it never wrote, and a negative lr or weight_decay ended in torch's traceback."""
    found = []
    if t.logging_steps < 1:
        found.append(f"`training.logging_steps` must be at least 1 (1: a metrics line every step), got "
                     f"{t.logging_steps}.")
    for key, what in (("eval_steps", "0: evaluate only at the end"), ("stop_after_steps", "0: run to the end"),
                      ("lr", "the peak learning rate"), ("weight_decay", "0: none"),
                      ("max_grad_norm", "0: no clipping")):
        if getattr(t, key) < 0:
            found.append(f"`training.{key}` must be >= 0 ({what}), got {getattr(t, key)}.")
    return found


def _chunked_loss_problems(t) -> list[str]:
    """Said before the model loads: under torchrun the loop's own check came after loading, once per process."""
    if t.chunked_loss == "always" and t.distributed in ("fsdp", "deepspeed"):
        return [f"`training.chunked_loss: always` cannot apply with `training.distributed: {t.distributed}` (the "
                f"output layer may be sharded). Set `training.chunked_loss=auto` (on where it applies) or never."]
    return []


def _deepspeed_problems(cfg: TrainConfig) -> list[str]:
    t = cfg.training
    if t.distributed != "deepspeed":
        touched = t.deepspeed is not None or t.deepspeed_offload != "none"
        return ["`training.deepspeed` and `training.deepspeed_offload` apply with `training.distributed: "
                "deepspeed`: set that too, or drop them."] if touched else []
    stage = "2" if t.deepspeed is None else str(t.deepspeed)
    if stage.isdigit() and int(stage) not in (2, 3):
        return [f"`training.deepspeed` is a ZeRO stage, 2 or 3 (or the path of a DeepSpeed JSON); got {stage}. "
                f"(Stages 0 and 1 through your own JSON file.)"]
    problems = []
    if not stage.isdigit() and not Path(stage).is_file():
        problems.append(f"`training.deepspeed`: no such DeepSpeed config file {stage!r}. Give a JSON file or a "
                        f"ZeRO stage (2 or 3).")
    if not stage.isdigit() and t.deepspeed_offload != "none":
        problems.append("`training.deepspeed_offload` goes with a ZeRO stage; with your own JSON, set "
                        "zero_optimization.offload_optimizer / offload_param there.")
    if stage == "2" and t.deepspeed_offload == "all":
        problems.append("`training.deepspeed_offload: all` offloads the weights, which only ZeRO-3 shards: use "
                        "`training.deepspeed: 3`, or `deepspeed_offload: optimizer` with stage 2.")
    if cfg.stage in ("ppo", "grpo"):
        problems.append(f"Stage {cfg.stage} samples with the generation engine between updates, which is not wired "
                        f"to DeepSpeed's engine (and needs the whole model on every process, so FSDP is refused too): "
                        f"use `training.distributed: ddp` for {cfg.stage}.")
    return problems


def _dpo_problems(d: DPOConfig) -> list[str]:
    problems = []
    if not 0.0 <= d.label_smoothing < 0.5:
        problems.append(f"`dpo.label_smoothing` must be in [0, 0.5), got {d.label_smoothing}.")
    elif d.label_smoothing > 0 and d.loss in ("ipo", "hinge", "orpo"):
        problems.append(f"`dpo.label_smoothing` ({d.label_smoothing}) is read by losses sigmoid, simpo (cDPO) and "
                        f"robust; `dpo.loss: {d.loss}` ignores it: drop it, or pick one of those losses.")
    elif d.loss == "robust" and d.label_smoothing == 0:
        problems.append("`dpo.loss: robust` (rDPO) with `dpo.label_smoothing: 0` is plain sigmoid DPO: set the "
                        "share of labels you expect flipped, e.g. dpo.label_smoothing=0.1.")
    if not d.beta > 0:
        problems.append(f"`dpo.beta` must be > 0, got {d.beta}.")
    if d.sft_weight < 0:
        problems.append(f"`dpo.sft_weight` must be >= 0, got {d.sft_weight}.")
    if d.simpo_gamma < 0:
        problems.append(f"`dpo.simpo_gamma` is SimPO's target reward margin, >= 0; got {d.simpo_gamma}.")
    elif d.simpo_gamma != 1.0 and d.loss != "simpo":
        problems.append(f"`dpo.simpo_gamma` ({d.simpo_gamma}) is read by `dpo.loss: simpo` only; `dpo.loss: {d.loss}` "
                        f"ignores it: drop it, or set dpo.loss=simpo.")
    if d.precompute_reference and d.loss in ("simpo", "orpo"):
        problems.append(f"`dpo.loss: {d.loss}` uses no reference model: drop `dpo.precompute_reference`.")
    return problems


def _kto_problems(k: KTOConfig, batch_size: int) -> list[str]:
    problems = []
    if batch_size < 2:
        problems.append("Stage kto estimates its KL reference point from the other rows of each micro-batch: "
                        "`training.batch_size` must be at least 2.")
    if not k.beta > 0:
        problems.append(f"`kto.beta` must be > 0, got {k.beta}.")
    for key, kind in (("desirable_weight", "desirable"), ("undesirable_weight", "undesirable")):
        if not getattr(k, key) > 0:  # 0 trains on nothing of that kind: drop those rows instead
            problems.append(f"`kto.{key}` must be > 0, got {getattr(k, key)} (0 would ignore every {kind} "
                            f"example: leave them out of the data instead).")
    return problems


def _coh_problems(c: CoHConfig) -> list[str]:
    if not c.good_phrase.strip() or not c.bad_phrase.strip():
        return ["`coh.good_phrase` and `coh.bad_phrase` must both be set: the model learns good from bad only "
                "from these phrases (quote a value holding ': ', e.g. 'coh.bad_phrase=\"A bad answer:\"')."]
    if c.good_phrase.strip() == c.bad_phrase.strip():
        return [f"`coh.good_phrase` and `coh.bad_phrase` are the same ({c.good_phrase!r}), so the model cannot tell "
                f"the good reply from the bad one: make them differ."]
    return []


def _stage_problems(cfg: TrainConfig) -> list[str]:
    problems = _dpo_problems(cfg.dpo) if cfg.stage == "dpo" else []
    if cfg.stage == "kto":
        problems += _kto_problems(cfg.kto, cfg.training.batch_size)
    if cfg.stage == "coh":
        problems += _coh_problems(cfg.coh)
    from tuneforge.methods import METHODS

    if cfg.stage == "rm" and cfg.method in METHODS and not METHODS[cfg.method].mergeable:
        problems.append(f"Stage rm saves a merged sequence-classification model, and method `{cfg.method}` cannot be "
                        f"merged into the base weights. Use lora, full, freeze or another mergeable method.")
    if cfg.stage in ("rm", "dpo", "kto", "ppo", "grpo") and cfg.data.loss_on != "assistant":
        problems.append(f"`data.loss_on: {cfg.data.loss_on}` chooses which chat turns get loss in stages sft and coh; "
                        f"stage {cfg.stage} scores the reply alone and would ignore it: drop it.")
    if cfg.stage in ("rm", "dpo", "kto") and cfg.data.packing:
        problems.append(f"Stage {cfg.stage} never packs (each pair or reply is scored as a whole): drop "
                        f"`data.packing`.")
    if cfg.data.packing and cfg.method in METHODS and not METHODS[cfg.method].packs:
        problems.append(f"Method `{cfg.method}` puts virtual tokens (or prefix keys) before the input, so a packed row "
                        f"would give them to its first example only and let its examples attend to each other: set "
                        f"`data.packing: false`{' (stage pt packs by default)' if cfg.stage == 'pt' else ''}.")
    return problems


def dump_config(cfg: TrainConfig) -> str:
    data = to_dict(cfg)
    for section in ALIGN_SECTIONS:  # only the running stage's options: the file stays short and re-runs as is
        if section != cfg.stage:
            data.pop(section)
    options = data.pop("method_options")
    from tuneforge.methods import METHODS

    method = METHODS[cfg.method]
    # a method may read several sections (qlora: lora + qlora); dump every one it reads so the file re-runs as is
    for section in getattr(method, "uses_sections", None) or ((method.section,) if method.section else ()):
        data[section] = options[section]
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def section_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]
