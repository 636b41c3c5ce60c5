"""Training settings a user can get wrong or combine oddly (found in a QA pass of `tuneforge train`): refused before
the model loads, said when a run's sizes make them do nothing, never a traceback mid-run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneforge.configs.schema import load_train_config
from tuneforge.errors import ConfigError
from tuneforge.train import run_config
from tuneforge.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
TASK = ROOT / "tuneforge" / "assets" / "example_task" / "train.jsonl"


def config(model_dir, out, *overrides):
    base = [f"model.name_or_path={model_dir}", f"output_dir={out}", f"data.train=[{TASK}]", "method=full",
            "training.progress_bar=false", "training.plot_loss=false", "training.save_steps=0",
            "training.eval_steps=0", "data.eval_ratio=0.0", "data.max_length=64", "training.batch_size=2"]
    return load_train_config(str(ROOT / "examples" / "sft_lora_tiny.yaml"), base + list(overrides))


def train(model_dir, out, *overrides):
    lines = []
    result = run_config(config(model_dir, out, *overrides), log=lines.append)
    return result, "\n".join(lines)


def test_eval_steps_without_held_out_set_trains_and_says_so(tiny_llama_dir, tmp_path):
    """eval_steps with no data.eval and eval_ratio 0 crashed at the first eval step (AttributeError: no
    eval_metrics); warmup longer than the run and save_steps past it were silent."""
    result, said = train(tiny_llama_dir, tmp_path / "run", "training.max_steps=3", "training.eval_steps=1",
                         "training.warmup_steps=6", "training.save_steps=50")
    assert result.finished and result.steps == 3 and result.eval_loss is None
    assert "training.eval_steps 1 has no held-out set" in said and "data.eval_ratio" in said
    assert "training.warmup_steps 6 is more than this run's 3 steps" in said and "50% of training.lr" in said
    assert "training.save_steps 50 is more than this run's 3 steps" in said
    assert not any("eval_loss" in r for r in read_metrics(tmp_path / "run" / "metrics.jsonl"))


@pytest.mark.parametrize("setting, named", [
    ("training.logging_steps=0", "`training.logging_steps` must be at least 1"),  # was ZeroDivisionError after step 1
    ("training.eval_steps=-1", "`training.eval_steps` must be >= 0"),  # was an eval at every step
    ("training.stop_after_steps=-2", "`training.stop_after_steps` must be >= 0"),  # was 'stopped after step 0'
    ("training.lr=-1", "`training.lr` must be >= 0"),  # was torch's ValueError traceback
    ("training.weight_decay=-0.1", "`training.weight_decay` must be >= 0"),
    ("training.max_grad_norm=-1", "`training.max_grad_norm` must be >= 0"),  # was clipping silently off
])
def test_bad_training_numbers_are_refused_before_anything_runs(tiny_llama_dir, tmp_path, setting, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        train(tiny_llama_dir, tmp_path / "run", "training.max_steps=2", setting)
    assert not (tmp_path / "run").exists()


def test_resume_from_a_path_into_a_new_output_dir_keeps_the_whole_curve(tiny_llama_dir, tmp_path):
    """metrics.jsonl of a run resumed from another folder's checkpoint held only the new steps, so its loss.png and
    model card told half the story; the checkpoint carries the rows of the steps before it."""
    common = ["training.max_steps=4", "training.logging_steps=1"]
    train(tiny_llama_dir, tmp_path / "first", "training.save_steps=2", *common)
    train(tiny_llama_dir, tmp_path / "second", f"training.resume={tmp_path / 'first' / 'checkpoint-2'}", *common)
    first, second = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("first", "second"))
    assert [r["step"] for r in second if "loss" in r] == [1, 2, 3, 4]
    assert [r["loss"] for r in second if "loss" in r] == [r["loss"] for r in first if "loss" in r]
    assert "| optimizer steps | 4 |" in (tmp_path / "second" / "README.md").read_text()


def test_resumed_run_replaces_the_later_tensorboard_steps(tiny_llama_dir, tmp_path):
    """Resuming from an earlier checkpoint of the same folder wrote steps 3-4 a second time next to the first run's,
    and TensorBoard drew both (steps 1, 2, 3, 4, 3, 4); metrics.jsonl was already cut back to the checkpoint."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, common = tmp_path / "run", ["training.max_steps=4", "training.save_steps=2", "training.save_total_limit=0"]
    train(tiny_llama_dir, out, *common)
    train(tiny_llama_dir, out, f"training.resume={out / 'checkpoint-2'}", *common)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]


def test_resuming_a_finished_run_logs_its_final_eval_once(tiny_llama_dir, tmp_path):
    """`resume: auto` in a folder whose newest checkpoint is the last step re-saves the final model and evaluates
    again: the first run's end-of-run eval row stayed too, so metrics.jsonl held step 4's eval_loss twice."""
    out, common = tmp_path / "run", ["training.max_steps=4", "training.save_steps=4", "data.eval_ratio=0.1"]
    train(tiny_llama_dir, out, *common)
    _, said = train(tiny_llama_dir, out, "training.resume=auto", *common)
    assert "nothing is left to train" in said
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "eval_loss" in r] == [4]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def test_epochs_rounded_up_to_whole_steps_is_said(tiny_llama_dir, tmp_path):
    """8 examples in batches of 2 are 4 micro-batches an epoch; grad_accum 8 makes `epochs: 1` one step of 8
    micro-batches, every example twice: that ran without a word."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(TASK.read_text(encoding="utf-8").splitlines(keepends=True)[:8]), encoding="utf-8")
    result, said = train(tiny_llama_dir, tmp_path / "run", f"data.train=[{rows}]", "training.max_steps=-1",
                         "training.epochs=1", "training.grad_accum=8")
    assert result.steps == 1
    assert "training.epochs 1 is 4 micro-batches" in said and "1 step (8 micro-batches of 2), 2 epochs" in said
