"""Run an eval config: every model through every task, then the judge, then the reports.

    results = run_suite(load_eval_config("examples/eval_quick.yaml", []))

Models are loaded one at a time (a 7B model and its adapter twin need not fit together). results.json is
rewritten after every task, so an interrupted run leaves what it finished readable, and the per-item predictions
let a re-run skip it.
"""

from __future__ import annotations

from pathlib import Path

from tuneforge.errors import UserError
from tuneforge.eval.report import write_reports, write_results
from tuneforge.eval.run import EvalConfig, ModelEntry, api_key

MC_TASKS = ("mmlu", "ceval", "cmmlu")


def slug(task: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in task)[:80]


def _safety_path(cfg: EvalConfig, task: str) -> Path:
    kind, _, path = task.partition(":")
    if path:
        return Path(path)
    name = "xstest_prompts.csv" if kind == "xstest" else "cvalues_responsibility_prompts.jsonl"
    sub = "safety" if kind == "xstest" else "cvalues"
    data = Path(cfg.data_dir)
    for candidate in (data / name, data / sub / name, data.parent / "datasets" / sub / name):
        if candidate.is_file():
            return candidate
    raise UserError(f"Task {task}: {name} is not in {data}, {data / sub} or {data.parent / 'datasets' / sub}. "
                    f"Name the file: `{kind}:PATH`.")


def run_task(cfg: EvalConfig, model, tokenizer, task: str, out_dir: Path) -> dict:
    from tuneforge.eval import generation_tasks as gen
    from tuneforge.eval import safety
    from tuneforge.eval.multiple_choice import MCSettings, run_multiple_choice

    kind, _, path = task.partition(":")
    if kind in MC_TASKS:
        settings = MCSettings(kind, path or str(Path(cfg.data_dir) / kind), shots=cfg.shots, limit=cfg.limit,
                              chat_template=cfg.mc_chat_template, option_text=cfg.option_text,
                              batch_size=cfg.batch_size)
        return run_multiple_choice(model, tokenizer, settings, out_dir, cfg.progress)
    if kind == "gsm8k":
        return gen.run_gsm8k(model, tokenizer, path or Path(cfg.data_dir) / "gsm8k", out_dir, cfg.gsm8k_shots,
                             cfg.limit, cfg.cot, cfg.max_new_tokens, cfg.progress)
    if kind in ("data", "judge", "grade") and path:
        return gen.run_dataset(model, tokenizer, path, out_dir, cfg.limit, max_new_tokens=cfg.max_new_tokens,
                               progress=cfg.progress)
    if kind == "ppl" and path:
        return gen.run_perplexity(model, tokenizer, path, out_dir, cfg.limit)
    if kind in ("xstest", "cvalues"):
        reader = safety.read_xstest if kind == "xstest" else safety.read_cvalues
        return safety.run_safety(model, tokenizer, reader(_safety_path(cfg, task)), out_dir, kind, cfg.limit,
                                 min(cfg.max_new_tokens, 64), cfg.progress)
    raise UserError(f"Unknown task `{task}`. Tasks: mmlu, ceval, cmmlu, gsm8k, xstest, cvalues, data:PATH, "
                    f"ppl:PATH, judge:PATH, grade:PATH.")


def load_model(entry: ModelEntry):
    from tuneforge.inference.chat import ChatArgs, load_for_chat

    return load_for_chat(ChatArgs(model=entry.model, adapter=entry.adapter, chat_template=entry.chat_template))


def _notes(cfg: EvalConfig) -> list[str]:
    notes = [f"{m.label()}: model={m.model or '(adapter base)'} adapter={m.adapter or '-'}" for m in cfg.models]
    notes.append(f"multiple choice: {cfg.shots}-shot from dev, scored by log-likelihood of the answer "
                 f"{'option text' if cfg.option_text else 'letter'}, chat template "
                 f"{'applied' if cfg.mc_chat_template else 'not applied (lm-evaluation-harness convention)'}")
    notes.append(f"limit: {cfg.limit or 'none'} items per task (per subject for multiple choice); greedy generation, "
                 f"max {cfg.max_new_tokens} new tokens; BLEU 0-100, other scores fractions")
    return notes


def run_suite(cfg: EvalConfig) -> dict:
    out = Path(cfg.out)
    results: dict[str, dict] = {}
    baseline = cfg.baseline or cfg.models[0].label()
    for entry in cfg.models:
        name = entry.label()
        model, tokenizer = load_model(entry)
        results[name] = {}
        for task in cfg.tasks:
            results[name][task] = run_task(cfg, model, tokenizer, task, out / slug(name) / slug(task))
            write_results(out, results)  # cheap; the reports (charts) are drawn once at the end
        del model
    if any(t.partition(":")[0] in ("judge", "grade") for t in cfg.tasks):
        _judge(cfg, results, baseline)
    write_reports(out, results, baseline, _notes(cfg))
    return results


def _answers(out: Path, model: str, task: str) -> list[dict]:
    from tuneforge.eval.store import ItemStore

    path = out / slug(model) / slug(task) / "predictions.jsonl"
    return ItemStore.read_all(path)


def _judge(cfg: EvalConfig, results: dict, baseline: str) -> None:
    from tuneforge.eval import judge as J

    if not cfg.judge.url:
        raise UserError("judge:/grade: tasks need a judge endpoint: set judge.url (e.g. http://127.0.0.1:8000/v1, "
                        "`tuneforge serve` or any OpenAI-compatible server).")
    out = Path(cfg.out)
    client = J.JudgeClient(cfg.judge.url, cfg.judge.model, api_key(cfg), out / "judge_cache.jsonl",
                           cfg.judge.concurrency)
    for task in cfg.tasks:
        kind = task.partition(":")[0]
        if kind == "grade":
            for name in results:
                rows = _answers(out, name, task)
                grades = J.grade_many(client, [(r["prompt"], r["prediction"]) for r in rows],
                                      cfg.judge.rubric or J.GRADE_RUBRIC)
                valid = [g for g in grades if g is not None]
                results[name][task] |= {"judge_score": sum(valid) / len(valid) if valid else None,
                                        "judge_invalid": len(grades) - len(valid)}
        elif kind == "judge":
            base = {r["id"]: r for r in _answers(out, baseline, task)}
            for name in results:
                if name == baseline:
                    continue
                rows = [r for r in _answers(out, name, task) if r["id"] in base]
                items = [(r["prompt"], r["prediction"], base[r["id"]]["prediction"]) for r in rows]
                verdicts = J.pairwise_many(client, items, cfg.judge.rubric or J.PAIRWISE_RUBRIC)
                results[name][task] |= J.pairwise_rates([v["outcome"] for v in verdicts])
