"""A small eval suite at eval steps during training, as flat scalars for the metrics log and TensorBoard.

    metrics |= suite_metrics(model, tokenizer, {"tasks": ["mmlu"], "limit": 5}, output_dir, step)
    # -> {"suite/mmlu/accuracy_micro": 0.24, "suite/mmlu/accuracy_macro": 0.25}

The suite is an eval config without `models` (the model being trained is the one evaluated). Each step writes its
predictions under OUTPUT/eval_suite/step-N/, so the per-item cache never hands a later step an earlier answer.
The caller (the training loop) adds the returned values to the metrics it logs at that step.
"""

from __future__ import annotations

from pathlib import Path

from tuneforge.configs.typed import from_dict
from tuneforge.errors import ConfigError

HEADLINE_SKIP = {"questions", "examples", "prompts", "tokens", "shots", "chat_template", "pairs", "invalid",
                 "over_context"}
JUDGED = ("judge:", "grade:")  # tasks scored by tuneforge eval's judge step, which the suite does not run
UNUSED_KEYS = ("models", "baseline", "out")  # the suite scores the model being trained, under OUTPUT/eval_suite/


def suite_config(suite: dict):
    from tuneforge.eval.run import EvalConfig

    return from_dict(EvalConfig, {**suite, "progress": False}, prefix="training.eval_suite")


def suite_problems(suite: dict) -> list[str]:
    """`training.eval_suite`'s keys and settings, checked as `tuneforge eval` checks its config, when the training
    config loads: a bad key or `shots` would otherwise fail at the first eval step, maybe hours in. Its task files
    are read later, before the model loads (`suite_file_problems`): tools that only read the config's data
    (`tuneforge data inspect --config`) need no benchmark folder."""
    from tuneforge.configs.typed import problems_of
    from tuneforge.eval.run import check_tasks

    problems = [f"`training.eval_suite.{key}` is not used: the suite evaluates the model being trained and writes "
                f"under OUTPUT/eval_suite/step-N/. Drop it." for key in UNUSED_KEYS if key in suite]
    tasks = suite.get("tasks") or []
    tasks = tasks.split(",") if isinstance(tasks, str) else tasks
    problems += [f"`training.eval_suite`: task `{task}` is scored by a judge model, which the suite does not call "
                 f"(it would generate replies and score nothing). Evaluate the saved checkpoints with `tuneforge eval "
                 f"--tasks {task} ...` instead, or use `data:{task.partition(':')[2]}` here for BLEU/ROUGE."
                 for task in tasks if isinstance(task, str) and task.strip().startswith(JUDGED)]
    try:
        check_tasks(suite_config({k: v for k, v in suite.items() if k not in UNUSED_KEYS}))
    except ConfigError as e:
        return problems + [p if "`training.eval_suite" in p else f"`training.eval_suite`: {p}"
                           for p in problems_of(e)]
    return problems


def check_suite_files(suite: dict | None) -> None:
    """Each suite task's files exist and read in their format, and each shot count fits: checked as training starts,
    before the model loads, since run_task would find a problem only at the first eval step."""
    from tuneforge.configs.typed import config_error
    from tuneforge.eval.suite import task_data_problems

    if not suite:
        return
    problems = [f"`training.eval_suite`: {p}"
                for p in task_data_problems(suite_config({k: v for k, v in suite.items() if k not in UNUSED_KEYS}))]
    if problems:
        raise config_error(problems, where="the config's training.eval_suite")


def suite_metrics(model, tokenizer, suite: dict, output_dir, step: int) -> dict[str, float]:
    from tuneforge.eval.suite import run_task, slug

    cfg = suite_config(suite)
    out = Path(output_dir) / "eval_suite" / f"step-{step}"
    was_training = model.training
    model.eval()
    try:
        found = {}
        for task in cfg.tasks:
            for name, value in run_task(cfg, model, tokenizer, task, out / slug(task)).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and "/" not in name \
                        and name not in HEADLINE_SKIP:
                    found[f"suite/{task}/{name}"] = float(value)
        return found
    finally:
        model.train(was_training)
