"""Every eval config under examples/eval runs, shortened: tiny models (and a tiny LoRA adapter for an entry that
names one) instead of the real ones, MMLU from a zip in the published layout, a few items per task."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from tests.eval.test_multiple_choice import _write_bench
from tuneforge.errors import ConfigError
from tuneforge.eval.run import ModelEntry, load_eval_config
from tuneforge.eval.suite import MC_TASKS, run_suite, slug

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "eval").glob("*.yaml"))
HELDOUT = ROOT / "tuneforge" / "assets" / "example_task" / "heldout.jsonl"


def _published_zip(tmp_path: Path) -> Path:
    """A zip in MMLU's published layout (data/{dev,test}/<subject>_<split>.csv), its mapping beside it."""
    _write_bench(tmp_path / "bench", n=3)
    zips = tmp_path / "zips"
    zips.mkdir()
    with zipfile.ZipFile(zips / "mmlu.zip", "w") as z:
        for path in sorted((tmp_path / "bench").rglob("*.csv")):
            z.write(path, "data/" + str(path.relative_to(tmp_path / "bench")))
    (tmp_path / "bench" / "mapping.json").rename(zips / "mmlu_mapping.json")
    return zips / "mmlu.zip"


def _shortened(task: str, zipped: Path) -> str:
    """MMLU from the test's zip; a data file made by an earlier step (the quickstart's held-out split) replaced by
    the bundled task's rows."""
    if task.partition("@")[0].partition(":")[0] in MC_TASKS:
        return f"{task.partition(':')[0]}:{zipped}"
    if task.startswith("data:") and not Path(task[5:]).is_file():
        return f"data:{HELDOUT}"
    return task


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_eval_example_runs_shortened(example, tiny_llama_dir, tmp_path, monkeypatch):
    from tests.inference.test_serve import make_lora

    assert example.read_text().startswith(f"# tuneforge eval examples/eval/{example.name}")
    monkeypatch.chdir(ROOT)  # examples name their data relative to the repository root
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))  # where the zip is unpacked
    cfg = load_eval_config(str(example), [])
    adapter = make_lora(tiny_llama_dir, tmp_path / "adapter", seed=0)
    cfg.models = [ModelEntry(model=str(tiny_llama_dir), adapter=str(adapter) if m.adapter else None, name=m.label())
                  for m in cfg.models]
    zipped = _published_zip(tmp_path)
    renamed = {t: _shortened(t, zipped) for t in cfg.tasks}
    cfg.tasks = list(renamed.values())
    cfg.task_limits = {renamed[t]: 1 for t in cfg.task_limits}
    cfg.out, cfg.limit, cfg.max_new_tokens, cfg.progress = str(tmp_path / "out"), 2, 4, False
    results = run_suite(cfg)
    assert list(results) == [m.label() for m in cfg.models]
    for name, tasks in results.items():
        assert list(tasks) == cfg.tasks
        for task, metrics in tasks.items():
            kind, _, shots = task.partition(":")[0].partition("@")
            if kind in MC_TASKS:
                per_subject = cfg.task_limits.get(task, cfg.limit)
                assert metrics["questions"] == 2 * per_subject and "category/STEM" in metrics  # mapping read
                prompts = [json.loads(line)["prompt"] for line in
                           (tmp_path / "out" / slug(name) / slug(task) / "predictions.jsonl").read_text().splitlines()]
                assert all(p.count("Answer:") == 1 + min(int(shots or cfg.shots), 3) for p in prompts)
            elif kind == "data":
                assert metrics["examples"] == 2 and 0 <= metrics["rougeL"] <= 1
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "report.html").is_file()


def test_shots_suffix_only_on_multiple_choice_and_task_limits_name_tasks():
    base = {"models": [{"model": "m"}]}
    with pytest.raises(ConfigError, match="task_limits names mmlu@5"):
        load_eval_config(None, [], base | {"tasks": ["mmlu@0"], "task_limits": {"mmlu@5": 1}})
    assert load_eval_config(None, [], base | {"tasks": ["mmlu@0", "cmmlu@5:x.zip"]}).tasks == ["mmlu@0", "cmmlu@5:x.zip"]
    for bad in ("mmlu@x", "gsm8k@5"):
        with pytest.raises(ConfigError, match="@K"):
            load_eval_config(None, [], base | {"tasks": [bad]})
