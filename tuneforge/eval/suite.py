"""Run an eval config: every model through every task, then the judge, then the reports.

    results = run_suite(load_eval_config("examples/eval/base_vs_quickstart.yaml", []))

Models are loaded one at a time (a 7B model and its adapter twin need not fit together). results.json is
rewritten after every task, so an interrupted run leaves what it finished readable, and the per-item predictions
let a re-run skip it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tuneforge.errors import UserError
from tuneforge.eval.report import atomic_write, write_reports, write_results
from tuneforge.eval.run import EvalConfig, ModelEntry, judge_client

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


def answers_folder(task_dir: Path, task: str) -> Path:
    """Where a judge:PATH or grade:PATH task's replies live: one folder per file, so judging and grading the same
    prompts generate once (each task's judgements.jsonl stays in its own folder)."""
    return Path(task_dir).parent / slug("answers:" + task.partition(":")[2])


def mc_settings(cfg: EvalConfig, task: str):
    """The MCSettings of a multiple-choice task as written in `tasks` (mmlu, mmlu@0, cmmlu@5:PATH), else None."""
    from tuneforge.eval.multiple_choice import MCSettings

    kind, _, path = task.partition(":")
    kind, _, shots = kind.partition("@")  # mmlu@0: this task 0-shot whatever `shots` says
    if kind not in MC_TASKS:
        return None
    return MCSettings(kind, path or str(Path(cfg.data_dir) / kind), limit=cfg.task_limits.get(task, cfg.limit),
                      shots=int(shots) if shots else cfg.shots, chat_template=cfg.mc_chat_template,
                      option_text=cfg.option_text, batch_size=cfg.batch_size)


def check_task_data(cfg: EvalConfig) -> None:
    """Every task's files, checked before the first model loads (see task_data_problems), all in one error."""
    from tuneforge.configs.typed import config_error

    problems = task_data_problems(cfg)
    if problems:
        raise config_error(problems, where="the eval tasks")


def task_data_problems(cfg: EvalConfig) -> list[str]:
    """Each task's files exist and read in their format, and each shot count fits its examples: run_task finds a
    problem only after the model's load and every earlier task (minutes for a big model; hours into training for
    `training.eval_suite`). Each problem names its task."""
    problems = []
    for task in cfg.tasks:
        try:
            _check_task(cfg, task)
        except UserError as e:  # a message that names its task already (`mmlu: shots=5, ...`) is kept as it is
            named = str(e).startswith(("Task ", task.partition(":")[0].partition("@")[0] + ": "))
            problems.append(str(e) if named else f"Task `{task}`: {e}")
    return problems


def _check_task(cfg: EvalConfig, task: str) -> None:
    from tuneforge.eval import generation_tasks as gen
    from tuneforge.eval import safety
    from tuneforge.eval.multiple_choice import check_benchmark

    kind, _, path = task.partition(":")
    kind = kind.partition("@")[0]
    settings = mc_settings(cfg, task)
    if settings is not None:
        check_benchmark(settings)
    elif kind == "gsm8k":
        gen.check_gsm8k(path or Path(cfg.data_dir) / "gsm8k", cfg.gsm8k_shots)
    elif kind in ("data", "judge", "grade", "ppl") and path:
        gen.check_dataset(path, cfg.task_limits.get(task, cfg.limit), need_reference=kind == "data",
                          text=kind == "ppl")
    elif kind in ("xstest", "cvalues"):
        (safety.read_xstest if kind == "xstest" else safety.read_cvalues)(_safety_path(cfg, task))
    else:
        raise unknown_task(task)


def unknown_task(task: str) -> UserError:
    return UserError(f"Task `{task}` is unknown. Tasks: mmlu, ceval, cmmlu, gsm8k, xstest, cvalues, data:PATH, "
                     f"ppl:PATH, judge:PATH, grade:PATH.")


def run_task(cfg: EvalConfig, model, tokenizer, task: str, out_dir: Path, judge=None) -> dict:
    """One task's metrics for one loaded model; `judge` is the run's JudgeClient (made here when needed)."""
    from tuneforge.eval import generation_tasks as gen
    from tuneforge.eval import safety
    from tuneforge.eval.multiple_choice import run_multiple_choice

    kind, _, path = task.partition(":")
    kind = kind.partition("@")[0]
    limit = cfg.task_limits.get(task, cfg.limit)
    settings = mc_settings(cfg, task)
    if settings is not None:
        return run_multiple_choice(model, tokenizer, settings, out_dir, cfg.progress)
    if kind == "gsm8k":
        return gen.run_gsm8k(model, tokenizer, path or Path(cfg.data_dir) / "gsm8k", out_dir, cfg.gsm8k_shots,
                             limit, cfg.cot, cfg.max_new_tokens, cfg.progress)
    if kind in ("data", "judge", "grade") and path:
        judged = kind != "data"  # judge:/grade: of one file share the replies (answers_folder); no reference needed
        return gen.run_dataset(model, tokenizer, path, answers_folder(out_dir, task) if judged else out_dir, limit,
                               max_new_tokens=cfg.max_new_tokens, progress=cfg.progress, scored=not judged)
    if kind == "ppl" and path:
        return gen.run_perplexity(model, tokenizer, path, out_dir, limit)
    if kind in ("xstest", "cvalues"):
        reader = safety.read_xstest if kind == "xstest" else safety.read_cvalues
        detector = (judge or judge_client(cfg, Path(out_dir))) if cfg.safety.detector == "judge" else None
        return safety.run_safety(model, tokenizer, reader(_safety_path(cfg, task)), out_dir, kind, limit,
                                 min(cfg.max_new_tokens, cfg.safety.max_new_tokens), cfg.progress, detector)
    raise unknown_task(task)


def load_model(entry: ModelEntry):
    from tuneforge.inference.chat import ChatArgs, load_for_chat

    return load_for_chat(ChatArgs(model=entry.model, adapter=entry.adapter, chat_template=entry.chat_template))


def _adapter_base(adapter: str) -> str:
    """The base an adapter column without `model` loads (its recorded base), for the report's notes."""
    from tuneforge.models.adapter_loading import base_for

    try:
        return base_for(adapter, None, None)[0]
    except UserError:  # the run itself says why it cannot load; the notes only describe
        return "(adapter base)"


def _notes(cfg: EvalConfig) -> list[str]:
    notes = [f"{m.label()}: model={m.model or _adapter_base(m.adapter)} adapter={m.adapter or '-'}"
             for m in cfg.models]
    mc = [t.partition(":")[0].partition("@") for t in cfg.tasks if t.partition(":")[0].partition("@")[0] in MC_TASKS]
    shots = "/".join(sorted({k or str(cfg.shots) for _, _, k in mc}, key=int)) or str(cfg.shots)
    if mc:
        notes.append(f"multiple choice: {shots}-shot from dev (a task named mmlu@K: K-shot), scored by "
                     f"log-likelihood of the answer {'option text' if cfg.option_text else 'letter'}, chat template "
                     f"{'applied' if cfg.mc_chat_template else 'not applied (lm-evaluation-harness convention)'}; "
                     f"over_context: questions longer than the model's context, scored past its trained positions "
                     f"(lower the shots when this is not 0)")
    limits = "".join(f", {n} for {t}" for t, n in cfg.task_limits.items())
    per_subject = " (per subject for multiple choice)" if mc else ""
    limit = f"at most {cfg.limit} items per task" if cfg.limit else "every item of each task"
    grades = ", judge_score 1-10" if any(t.partition(":")[0] == "grade" for t in cfg.tasks) else ""
    generates = any(t.partition(":")[0].partition("@")[0] not in (*MC_TASKS, "ppl") for t in cfg.tasks)
    greedy = f"greedy generation, max {cfg.max_new_tokens} new tokens; " if generates else ""
    notes.append(f"limit: {limit}{limits}{per_subject}; {greedy}BLEU 0-100{grades}, accuracies, rates and ROUGE as "
                 f"fractions")
    if any(t.partition(":")[0] == "gsm8k" for t in cfg.tasks):  # `shots` above is multiple choice only
        notes.append(f"gsm8k: {cfg.gsm8k_shots}-shot from train.jsonl (gsm8k_shots), "
                     f"{'asked to reason step by step and end with a line #### <number>' if cfg.cot else 'no reasoning instruction'}"
                     f"; scored on the number after the first ####, else the last number in the reply")
    if any(t.partition(":")[0] in ("gsm8k", "data", "judge", "grade") for t in cfg.tasks):
        notes.append(f"truncated_replies: replies cut at max_new_tokens ({cfg.max_new_tokens}); a cut reply usually "
                     f"lacks its answer and scores 0, so raise max_new_tokens when this is not 0")
    if any(t.partition(":")[0] in ("xstest", "cvalues") for t in cfg.tasks):
        how = (f"judge `{cfg.judge.model}` at {cfg.judge.url} with XSTest's classifier prompt (judge_fallbacks: "
               f"replies naming no class, decided by the rules)" if cfg.safety.detector == "judge"
               else "string rules, English and Chinese")
        notes.append(f"safety: replies of at most {min(cfg.max_new_tokens, cfg.safety.max_new_tokens)} tokens; "
                     f"refusal detector: {how}; an empty reply counts as a refusal (empty_replies counts them; "
                     f"XSTest's string-match script counts them as compliance)")
    if cfg.judge.url:
        notes.append(f"judge: `{cfg.judge.model}` at {cfg.judge.url}, both orders per pair; unparsed_replies and "
                     f"invalid pairs are counted apart, never as ties")
    return notes


def model_identity(entry: ModelEntry) -> dict:
    """What a model column's predictions came from: the model and adapter as resolved, each local weight file's
    size and modification time (a retrained adapter in the same folder is another model) and the chat template."""
    identity: dict = {"chat_template": entry.chat_template}
    template = Path(entry.chat_template) if entry.chat_template and entry.chat_template.endswith(".jinja") else None
    if template is not None and template.is_file():  # a template edited in place is another prompt
        identity["chat_template_file"] = [template.stat().st_size, template.stat().st_mtime_ns]
    for role, source in (("model", entry.model), ("adapter", entry.adapter)):
        folder = Path(source) if source and not source.startswith("builtin:") else None
        if folder is None or not folder.exists():
            identity[role] = source
            continue
        files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt",
                                                                                   ".pth", ".gguf", ".json", ".jinja"))
        identity[role] = str(folder.resolve())
        identity[role + "_files"] = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}
    return identity


def claim_model_folder(folder: Path, identity: dict) -> None:
    """Predictions in `folder` are reused only if the same model made them: a column name kept across a retrain
    (or pointed at another model) would otherwise report the old model's answers under the new one's name. Another
    model's folder is moved aside, not deleted."""
    from tuneforge.eval.store import settings_key

    record = folder / "model.json"
    if folder.is_dir() and any(folder.rglob("predictions.jsonl")):
        try:
            before = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            before = None  # answers from before model.json existed: whose they are is unknown
        if before != identity:
            aside = folder.with_name(f"{folder.name}.previous-{settings_key(before or {})}")
            if aside.exists():
                shutil.rmtree(aside)  # the same earlier model's answers, set aside once already
            folder.rename(aside)
            print(f"note: {folder} held the answers of another model (or of this one before its files changed); "
                  f"moved to {aside.name} so they are not reused", flush=True)
    atomic_write(record, json.dumps(identity, indent=1, ensure_ascii=False) + "\n")


def run_suite(cfg: EvalConfig) -> dict:
    out = Path(cfg.out)
    results: dict[str, dict] = {}
    baseline = cfg.baseline or cfg.models[0].label()
    judge = judge_client(cfg) if cfg.judge.url else None
    for entry in cfg.models:
        name = entry.label()
        claim_model_folder(out / slug(name), model_identity(entry))
        model, tokenizer = load_model(entry)
        results[name] = {}
        for task in cfg.tasks:
            results[name][task] = run_task(cfg, model, tokenizer, task, out / slug(name) / slug(task), judge)
            write_results(out, results)  # cheap; the reports (charts) are drawn once at the end
        del model
    for task in cfg.tasks:
        kind = task.partition(":")[0]
        if kind == "grade":
            _grade(judge, cfg, results, task)
        elif kind == "judge":
            _pairwise(judge, cfg, results, task, baseline)
    write_reports(out, results, baseline, _notes(cfg))
    return results


def _answers(cfg: EvalConfig, model: str, task: str) -> list[dict]:
    """This run's replies to a judge:/grade: file: the answers folder also holds rows an earlier run with a larger
    limit (or an older version of the file) generated, which must not be judged."""
    from tuneforge.eval.generation_tasks import task_items
    from tuneforge.eval.store import ItemStore

    wanted = {it["id"]: it for it in task_items(task.partition(":")[2], cfg.task_limits.get(task, cfg.limit),
                                                need_reference=False)}
    saved = ItemStore.read_all(answers_folder(Path(cfg.out) / slug(model) / slug(task), task) / "predictions.jsonl")
    return [r | {"question": judge_question(wanted[r["id"]]["messages"])} for r in saved if r["id"] in wanted]


def judge_question(messages: list[dict]) -> str:
    """What the judge reads as the question: the user's message, or for a row with a system prompt or earlier turns
    the whole conversation up to the reply (the last user message alone would hide what it refers to)."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"[{m['role'].capitalize()}]\n{m.get('content') or ''}" for m in messages)


def _save_judgements(out: Path, model: str, task: str, rows: list[dict]) -> None:
    """Every verdict with the reply it was read from, beside the task's predictions, so each rate can be audited."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write(out / slug(model) / slug(task) / "judgements.jsonl", text)


def _grade(judge, cfg: EvalConfig, results: dict, task: str) -> None:
    from tuneforge.eval import judge as J

    out = Path(cfg.out)
    for name in results:
        rows = _answers(cfg, name, task)
        grades = J.grade_many(judge, [(r["question"], r["prediction"]) for r in rows],
                              cfg.judge.rubric or J.GRADE_RUBRIC)
        valid = [g for g in grades if g is not None]
        _save_judgements(out, name, task, [{"id": r["id"], "grade": g} for r, g in zip(rows, grades)])
        results[name][task] |= {"judge_score": sum(valid) / len(valid) if valid else None,
                                "judge_invalid": len(grades) - len(valid)}


def _pairwise(judge, cfg: EvalConfig, results: dict, task: str, baseline: str) -> None:
    """Each model's answers against the baseline's, for the prompts both answered; both orders per pair."""
    from tuneforge.eval import judge as J

    out = Path(cfg.out)
    base = {r["id"]: r for r in _answers(cfg, baseline, task)}
    for name in results:
        if name == baseline:
            continue
        rows = [r for r in _answers(cfg, name, task) if r["id"] in base]
        items = [(r["question"], r["prediction"], base[r["id"]]["prediction"]) for r in rows]
        verdicts = J.pairwise_many(judge, items, cfg.judge.rubric or J.PAIRWISE_RUBRIC)
        _save_judgements(out, name, task, [{"id": r["id"], "against": baseline} | v for r, v in zip(rows, verdicts)])
        unparsed = sum((v["verdict_first"] is None) + (v["verdict_swapped"] is None) for v in verdicts)
        results[name][task] |= J.pairwise_rates([v["outcome"] for v in verdicts]) | {"unparsed_replies": unparsed}
