"""`tuneforge eval`: benchmarks, task metrics, safety and an LLM judge for one or several models, in one report.

    tuneforge eval examples/eval/base_vs_quickstart.yaml limit=20
    tuneforge eval --model builtin:smollm2-135m-instruct --adapter outputs/quickstart --tasks mmlu,gsm8k --data-dir ../shared/assets/eval --limit 20 --out eval_out

Tasks: mmlu, ceval, cmmlu (multiple choice, from DATA_DIR/<name>), gsm8k (DATA_DIR/gsm8k), xstest and cvalues
(safety), data:PATH (generate for a dataset in a training format; BLEU, ROUGE, exact match), ppl:PATH (perplexity),
judge:PATH (answers to PATH's prompts judged pairwise against the baseline by `judge.url`, both orders) and
grade:PATH (1-10 grades by the judge). With --adapter, the base model and base+adapter are evaluated side by side.
Safety replies are classed as refusals by string rules, or with `safety.detector: judge` (--refusal-detector judge)
by the judge model; either way an empty reply counts as a refusal (and is counted: empty_replies). Every judge
reply is cached in OUT/judge_cache.jsonl and every verdict saved beside the task's predictions (judgements.jsonl,
refusal_judgements.jsonl).
Writes OUT/results.json ({model: {task: {metric: value}}}, accuracies and rates as fractions in [0, 1], BLEU on
sacrebleu's 0-100 scale), OUT/report.md, OUT/report.html and OUT/<model>/<task>/predictions.jsonl (judge:/grade:
replies in OUT/<model>/answers_<PATH>/); a re-run with the same settings and model files skips every finished item.
Generation tasks count the replies cut at max_new_tokens (truncated_replies): raise it when that is not 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tuneforge.configs.schema import absolute_template_path
from tuneforge.configs.typed import apply_overrides, from_dict, opt
from tuneforge.configs.yaml_file import read_yaml_mapping
from tuneforge.errors import ArgParser, ConfigError, UserError, did_you_mean


@dataclass
class ModelEntry:
    model: str | None = opt(None, "Base model (folder, hub id or builtin:<name>); default: the adapter's base.")
    adapter: str | None = opt(None, "Adapter folder to put on the model.")
    name: str | None = opt(None, "Column name in the report (default: the adapter or model folder name).")
    chat_template: str | None = opt(None, "Chat template override for generation tasks: a built-in name (chatml, "
                                          "llama3, qwen, default) or a .jinja file (relative to the current folder).")

    @classmethod
    def from_str(cls, text: str) -> ModelEntry:
        return cls(model=text)

    def label(self) -> str:
        return self.name or Path(self.adapter or self.model or "model").name.removeprefix("builtin:")


@dataclass
class JudgeConfig:
    url: str | None = opt(None, "OpenAI-compatible base URL of the judge, e.g. http://127.0.0.1:8000/v1.")
    model: str = opt("judge", "Model name sent to the judge endpoint.")
    api_key_env: str = opt("OPENAI_API_KEY", "Environment variable holding the judge's API key (if any).")
    rubric: str | None = opt(None, "Replace the default pairwise/grading instructions.")
    concurrency: int = opt(8, "Judge requests in flight at once.")
    max_tokens: int = opt(512, "Longest judge reply (the verdict comes last, after a short explanation).")
    retries: int = opt(3, "Tries after the first for a request that fails with a 5xx/429 or a connection error.")
    timeout: float = opt(120.0, "Seconds to wait for one judge reply.")


@dataclass
class SafetyConfig:
    detector: Literal["rules", "judge"] = opt("rules", "How xstest/cvalues replies are classed as refusals. rules: "
                                                       "English and Chinese refusal phrases at the start of the reply "
                                                       "(XSTest's string-match baseline). judge: the model at "
                                                       "judge.url classes each reply with XSTest's classifier prompt "
                                                       "(Chinese prompts get its Chinese translation); replies it "
                                                       "cannot parse fall back to the rules and are counted. Either "
                                                       "way an empty reply counts as a refusal and is counted in "
                                                       "empty_replies.")
    max_new_tokens: int = opt(64, "Longest generated reply to a safety prompt (refusals show in the first words).")


@dataclass
class EvalConfig:
    models: list[ModelEntry] = opt(factory=list, help="Models/adapters to compare; the first is the baseline.")
    tasks: list[str] = opt(factory=lambda: ["mmlu"], help="Tasks: mmlu, ceval, cmmlu, gsm8k, xstest, cvalues, "
                                                            "data:PATH, ppl:PATH, judge:PATH, grade:PATH. "
                                                            "mmlu@0 (any multiple-choice task) overrides `shots`; "
                                                            "mmlu:PATH reads a folder or the published .zip.")
    data_dir: str = opt("../shared/assets/eval", "Folder holding mmlu/, ceval/, cmmlu/, gsm8k/ in their layouts.")
    out: str = opt("eval_out", "Output folder (results.json, report.md/html, predictions).")
    limit: int | None = opt(None, "At most N items per task (per subject for multiple choice).")
    task_limits: dict[str, int] = opt(factory=dict, help="Per-task `limit`, keyed by the task as written in `tasks` "
                                                          "(e.g. {mmlu@5: 1}): sample a costly task, score all of "
                                                          "another.")
    shots: int = opt(5, "Examples from the dev split in multiple-choice prompts.")
    gsm8k_shots: int = opt(4, "Solved examples before each GSM8K question.")
    cot: bool = opt(True, "Ask GSM8K questions for step-by-step reasoning ending in a line '#### <number>'.")
    mc_chat_template: bool = opt(False, "Wrap multiple-choice prompts in the chat template (lm-evaluation-harness "
                                        "scores raw text, the default).")
    option_text: bool = opt(False, "Score multiple-choice options by their full text instead of the letter.")
    max_new_tokens: int = opt(256, "Longest generated answer.")
    batch_size: int = opt(8, "Questions per forward pass for multiple choice.")
    baseline: str | None = opt(None, "Model name the deltas are against (default: the first model).")
    judge: JudgeConfig = opt(factory=JudgeConfig, help="The judge endpoint for judge:/grade: tasks and for "
                                                       "safety.detector: judge.")
    safety: SafetyConfig = opt(factory=SafetyConfig, help="xstest/cvalues: refusal detector and reply length.")
    progress: bool = opt(True, "Show progress bars.")


def load_eval_config(path: str | None, overrides: list[str], base: dict | None = None) -> EvalConfig:
    data: dict = copy.deepcopy(base or {})
    if path is not None:
        data.update(read_yaml_mapping(path, "Eval config", "examples/eval/base_vs_quickstart.yaml"))
    cfg = from_dict(EvalConfig, apply_overrides(data, overrides))
    for entry in cfg.models:  # as training does: results.json and model.json record a path that works from anywhere
        entry.chat_template = absolute_template_path(entry.chat_template)
    if not cfg.models:
        raise ConfigError("No model to evaluate: set `models:` (a list of {model, adapter, name}) or pass --model.")
    names = [m.label() for m in cfg.models]
    if len(set(names)) != len(names):
        raise ConfigError(f"Two models share the report name {names}: give each a distinct `name:`.")
    if cfg.baseline is not None and cfg.baseline not in names:
        raise ConfigError(f"baseline `{cfg.baseline}` is not one of the models ({', '.join(names)}).")
    pairwise = [t for t in cfg.tasks if t.partition(":")[0] == "judge"]
    if pairwise and len(cfg.models) < 2:  # the lone model would generate every reply and be judged against nothing
        raise ConfigError(f"{', '.join(pairwise)} judge(s) each model's replies against the baseline's, and only "
                          f"`{names[0]}` is listed: add a second model (or --adapter, which compares base and "
                          f"base+adapter), or use grade:PATH for 1-10 grades of one model.")
    check_tasks(cfg)
    return cfg


def check_tasks(cfg: EvalConfig) -> None:
    """Fail before any model is loaded, not after an hour of generation: a bad shot count, a judge without URL."""
    if not cfg.tasks:
        raise ConfigError("No task to run: list at least one in `tasks` (or --tasks), e.g. mmlu,gsm8k or "
                          "data:PATH.")
    limits = {"limit": cfg.limit, **{f"task_limits.{t}": n for t, n in cfg.task_limits.items()}}
    bad = [f"`{key}` is {n}" for key, n in limits.items() if n is not None and n < 1]
    bad += [f"`{key}` is {getattr(cfg, key)}" for key, least in (("shots", 0), ("gsm8k_shots", 0),
                                                                 ("max_new_tokens", 1), ("batch_size", 1))
            if getattr(cfg, key) < least]
    if bad:
        raise ConfigError(f"{'; '.join(bad)}: limits, max_new_tokens and batch_size must be at least 1, shot counts "
                          f"at least 0 (leave `limit` unset to score every item).")
    unknown = sorted(set(cfg.task_limits) - set(cfg.tasks))
    if unknown:
        raise ConfigError(f"task_limits names {', '.join(unknown)}, not in `tasks` ({', '.join(cfg.tasks)}): key it by "
                          f"the task exactly as written there.")
    for task in cfg.tasks:
        kind, _, shots = task.partition(":")[0].partition("@")
        if shots and (kind not in ("mmlu", "ceval", "cmmlu") or not shots.isdigit()):
            raise ConfigError(f"Task `{task}`: `@K` sets the shots of a multiple-choice task (mmlu@0, ceval@5, "
                              f"cmmlu@5:PATH); write it as one of those, or drop the `@`.")
    needs = judge_needed(cfg)
    if needs and not cfg.judge.url:
        raise ConfigError(f"{', '.join(needs)} need(s) a judge endpoint: set judge.url (e.g. "
                          f"judge.url=http://127.0.0.1:8000/v1 for `tuneforge serve`, or any OpenAI-compatible "
                          f"server) or pass --judge-url.")


# the command-line flags and the config key each sets; their help is the config field's (one source of help text)
FLAGS = {"--model": "models.model", "--adapter": "models.adapter", "--tasks": "tasks", "--data-dir": "data_dir",
         "--limit": "limit", "--shots": "shots", "--out": "out", "--judge-url": "judge.url",
         "--judge-model": "judge.model", "--refusal-detector": "safety.detector",
         "--mc-chat-template": "mc_chat_template", "--max-new-tokens": "max_new_tokens", "--batch-size": "batch_size"}
INT_KEYS = ("limit", "shots", "max_new_tokens", "batch_size")


def flag_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """`tuneforge eval`'s flags (its --help too), each with its config key's help text."""
    from tuneforge.configs.typed import field_help_rows, type_name

    parser = parser or ArgParser(prog="tuneforge eval")
    rows = {key: (tp, default, text) for key, tp, default, text in field_help_rows(EvalConfig)}
    rows |= {f"models.{key}": (tp, default, text) for key, tp, default, text in field_help_rows(ModelEntry)}
    for flag, key in FLAGS.items():
        tp, default, text = rows[key]  # the default shown is the config's, which a flag left out keeps
        text = f"{text} (config key `{key.removeprefix('models.')}`) [{type_name(tp)}; default: {default}]"
        if key == "mc_chat_template":
            parser.add_argument(flag, action="store_true", help=text)
        elif key == "safety.detector":
            parser.add_argument(flag, choices=["rules", "judge"], help=text)
        else:
            parser.add_argument(flag, type=int if key in INT_KEYS else str, help=text,
                                default="mmlu" if key == "tasks" else None)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="Any other config key, after the flags: e.g. safety.max_new_tokens=32 cot=false.")
    return parser


def _flags_to_dict(argv: list[str]) -> tuple[dict, list[str]]:
    """The config the flags describe, and the key=value overrides given after them."""
    ns = flag_parser().parse_args(argv)
    if not ns.model and not ns.adapter:
        raise UserError("Pass --model (and optionally --adapter), or a config file: `tuneforge eval CONFIG.yaml`.")
    models = [{"model": ns.model or _adapter_base(ns.adapter), "adapter": None, "name": "base"}] if ns.adapter else []
    models.append({"model": ns.model, "adapter": ns.adapter})
    data = {"models": models, "tasks": [t.strip() for t in ns.tasks.split(",") if t.strip()],
            "mc_chat_template": ns.mc_chat_template}
    extra = {"data_dir": ns.data_dir, "limit": ns.limit, "shots": ns.shots, "out": ns.out,
             "max_new_tokens": ns.max_new_tokens, "batch_size": ns.batch_size}
    data |= {k: v for k, v in extra.items() if v is not None}
    judge = {"url": ns.judge_url, "model": ns.judge_model}
    if any(v is not None for v in judge.values()):
        data["judge"] = {k: v for k, v in judge.items() if v is not None}
    if ns.refusal_detector:
        data["safety"] = {"detector": ns.refusal_detector}
    return data, ns.overrides


FULL_MODEL_HINT = "evaluate it as a model: `models: [{{model: {folder}}}]` (or --model)."  # an --adapter that is not one


def _adapter_base(adapter: str) -> str:
    """The base column of `--adapter X` alone: the model X was trained on. Left unset, it loaded the default model
    (SmolLM2) and compared the adapter against a model it was never trained on."""
    from tuneforge.models.adapter_loading import adapter_folder, base_for

    adapter_folder(adapter, FULL_MODEL_HINT)
    return base_for(adapter, None, None)[0]


def eval_cli(argv: list[str]) -> int:
    if argv and not argv[0].startswith("-"):
        cfg = load_eval_config(argv[0], argv[1:])
    else:
        flags, overrides = _flags_to_dict(argv)
        cfg = load_eval_config(None, overrides, flags)
    from tuneforge.eval.suite import run_suite

    check_paths(cfg)
    results = run_suite(cfg)
    print(json.dumps(results, indent=2, ensure_ascii=False)[:4000])
    print(f"report: {Path(cfg.out) / 'report.md'} and report.html; predictions under {cfg.out}/<model>/<task>/")
    return 0


def check_paths(cfg: EvalConfig) -> None:
    """Every model folder, adapter folder and chat template file, the output folder, the judge and each task's
    files checked before the first model loads: a typo in the second model's adapter must not surface after the first
    model's whole benchmark."""
    from tuneforge.eval.suite import check_task_data
    from tuneforge.models.adapter_loading import adapter_folder
    from tuneforge.models.loading import check_can_create, resolve_source

    check_can_create(Path(cfg.out), "the eval output folder")
    check_judge_reachable(cfg)
    check_task_data(cfg)
    for entry in cfg.models:
        check_chat_template(entry)
        if entry.adapter:
            adapter_folder(entry.adapter, FULL_MODEL_HINT)
        if entry.model and not entry.model.startswith("builtin:"):
            resolve_source(entry.model)


def check_chat_template(entry: ModelEntry) -> None:
    """A `chat_template` that is no built-in name, no Jinja source and no file: the loader would say so only when
    this model's turn comes, after every model before it."""
    from tuneforge.data.templates import BUILTIN_TEMPLATES, names_a_file

    template = entry.chat_template
    if not template or not names_a_file(template) or Path(template).expanduser().is_file():
        return
    hint = (f" (a relative path counts from the current folder, {Path.cwd()})" if template.endswith(".jinja")
            else did_you_mean(template, BUILTIN_TEMPLATES))
    raise UserError(f"Model `{entry.label()}`: `chat_template` is {template!r}, not a built-in template "
                    f"({', '.join(BUILTIN_TEMPLATES)}) and not an existing .jinja file.{hint}")


def judge_needed(cfg: EvalConfig) -> list[str]:
    """The tasks (or settings) that ask the judge something."""
    needs = [t for t in cfg.tasks if t.partition(":")[0] in ("judge", "grade")]
    if cfg.safety.detector == "judge" and any(t.partition(":")[0] in ("xstest", "cvalues") for t in cfg.tasks):
        needs.append("safety.detector=judge")
    return needs


def check_judge_reachable(cfg: EvalConfig) -> None:
    """A judge that is not up is found before the models generate (it is asked only after all of them have)."""
    if not (cfg.judge.url and judge_needed(cfg)):
        return
    import httpx

    url = cfg.judge.url.rstrip("/") + "/models"
    try:
        httpx.get(url, timeout=10.0, headers={"Authorization": f"Bearer {api_key(cfg)}"} if api_key(cfg) else {})
    except httpx.TransportError as e:  # any HTTP answer (even 404: not every server lists models) means it is up
        raise UserError(f"The judge at {cfg.judge.url} cannot be reached ({type(e).__name__}: {e}), and "
                        f"{', '.join(judge_needed(cfg))} need(s) it. Start it first (e.g. `tuneforge serve --model "
                        f"JUDGE --port 8000` for judge.url=http://127.0.0.1:8000/v1) or fix judge.url.") from e


def api_key(cfg: EvalConfig) -> str | None:
    return os.environ.get(cfg.judge.api_key_env) or None


def judge_client(cfg: EvalConfig, cache_dir: Path | None = None):
    """A client for the run's judge requests (pairwise, grades, refusal classes), all cached in one file."""
    from tuneforge.eval.judge import JudgeClient

    j = cfg.judge
    cache = Path(cache_dir if cache_dir is not None else cfg.out) / "judge_cache.jsonl"
    return JudgeClient(j.url, j.model, api_key(cfg), cache, j.concurrency, j.retries, j.timeout, j.max_tokens)
