"""The output folder: an earlier run is never silently mixed with a new one, a failed setup leaves nothing behind,
temp folders of killed saves are swept, and a checkpoint of a different run is refused by name."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_training import TASK, config, losses, train
from tuneforge.errors import UserError
from tuneforge.train import run_config

FAST = ["training.max_steps=2", "training.batch_size=2", "data.max_length=64"]


def test_new_run_into_an_earlier_runs_folder_is_refused_and_overwrite_starts_over(tiny_llama_dir, tmp_path):
    """The reported failure: rank-8 checkpoints survive a rank-4 run into the same folder, rotation deletes the new
    run's own, and resume=auto then dies on a tensor size mismatch. Now the second run is refused up front, and
    `overwrite_output_dir` clears the folder so only the new run's checkpoints remain and resume works."""
    out = tmp_path / "run"
    train(tiny_llama_dir, out, *FAST, "training.max_steps=4", "training.save_steps=1", "training.save_total_limit=3")
    with pytest.raises(UserError, match=r"not empty .*checkpoint-4/.*training\.resume=auto.*overwrite_output_dir"):
        train(tiny_llama_dir, out, *FAST, "lora.rank=4", "training.save_steps=1")
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-3", "checkpoint-4"}

    (out / "notes.txt").write_text("mine")  # deleted too: the folder is a TuneForge run folder, cleared whole
    logs = []
    run_config(config(tiny_llama_dir, out, *FAST, "lora.rank=4", "training.save_steps=1", "overwrite_output_dir=true"),
               log=logs.append)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "notes.txt").exists() and len(losses(out)) == 2
    assert any(line.startswith("overwrite_output_dir: deleting") and "checkpoint-4/" in line for line in logs)
    result = train(tiny_llama_dir, out, *FAST, "lora.rank=4", "training.resume=auto")
    assert result.finished and result.steps == 2


def test_resume_auto_on_a_finished_run_without_checkpoints_is_refused(tiny_llama_dir, tmp_path):
    """The "not empty" error offered `training.resume=auto` for a finished run with no checkpoint; following it
    trained from step 0 and replaced the finished model."""
    out = tmp_path / "run"
    train(tiny_llama_dir, out, *FAST)  # save_steps 0: the final model only
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(UserError) as info:
        train(tiny_llama_dir, out, *FAST)
    assert "resume=auto" not in str(info.value) and "overwrite_output_dir=true" in str(info.value)
    with pytest.raises(UserError, match=r"found no checkpoint in .*run, which holds a finished run's model: this run "
                                        r"would start from step 0 and replace it"):
        train(tiny_llama_dir, out, *FAST, "training.resume=auto")
    assert (out / "adapter_model.safetensors").read_bytes() == before


def test_overwrite_never_deletes_a_folder_tuneforge_did_not_write(tiny_llama_dir, tmp_path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match=r"does not look like a TuneForge output folder.*thesis\.tex"):
        train(tiny_llama_dir, out, *FAST, "overwrite_output_dir=true")
    assert (out / "thesis.tex").read_text() == "years of work"


def test_overwrite_refuses_to_delete_the_model_it_starts_from(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_llama_dir, out, *FAST)
    with pytest.raises(UserError, match=r"would delete the model this run starts from"):
        train(out, out, *FAST, "overwrite_output_dir=true")
    assert (out / "adapter_model.safetensors").is_file()


def test_inputs_inside_output_dir_do_not_count_and_survive_overwrite(tiny_llama_dir, tmp_path):
    """Data the run reads from inside its output_dir (the quickstart keeps its generated task there) is not an
    earlier run, and overwrite_output_dir keeps it."""
    out = tmp_path / "run"
    (out / "data").mkdir(parents=True)
    data = out / "data" / "train.jsonl"
    data.write_text(TASK.read_text())
    train(tiny_llama_dir, out, *FAST, f"data.train=[{data}]")
    train(tiny_llama_dir, out, *FAST, f"data.train=[{data}]", "overwrite_output_dir=true")
    assert data.read_text() == TASK.read_text() and len(losses(out)) == 2


def test_output_dir_that_is_a_file_is_a_clear_error(tiny_llama_dir, tmp_path):
    target = tmp_path / "taken"
    target.write_text("x")
    for out in (target, target / "sub"):
        with pytest.raises(UserError, match=r"is a file, not a folder"):
            train(tiny_llama_dir, out, *FAST)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, a folder that takes no new folders")
def test_an_output_dir_that_cannot_be_created_is_refused_before_the_model_loads(tiny_llama_dir, tmp_path):
    # it ended in a FileNotFoundError traceback from the first mkdir, after loading the model
    with pytest.raises(UserError, match=r"Cannot write output_dir /proc/tfrun/run: no such file or directory"):
        train(tiny_llama_dir, Path("/proc/tfrun/run"), *FAST)
    train(tiny_llama_dir, tmp_path / "new" / "run", *FAST)  # where it can: created, and the probe removed
    assert (tmp_path / "new" / "run").is_dir() and not list(tmp_path.glob(".tuneforge-probe-*"))


def test_resume_and_overwrite_together_are_refused(tiny_llama_dir, tmp_path):
    with pytest.raises(UserError, match=r"set only one"):
        config(tiny_llama_dir, tmp_path / "x", "training.resume=auto", "overwrite_output_dir=true")


@pytest.mark.parametrize("case", ["bad model path", "bad data", "fewer rows than a batch"])
def test_a_run_that_fails_before_training_leaves_no_folder(tiny_llama_dir, tmp_path, case):
    out = tmp_path / "a" / "run"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi"}\n')
    overrides = {"bad model path": ["model.name_or_path=" + str(tmp_path / "nope")],
                 "bad data": [f"data.train=[{bad}]"],
                 "fewer rows than a batch": ["training.batch_size=100000"]}[case]
    with pytest.raises(UserError):
        train(tiny_llama_dir, out, *FAST, *overrides)
    assert not (tmp_path / "a").exists()


def test_temp_folders_of_killed_saves_are_removed_unless_their_process_lives(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_llama_dir, out, *FAST, "training.save_steps=1")
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        (out / f"checkpoint-3.tmp-{dead.pid}").mkdir()
        (out / f"tuneforge_config.yaml.tmp-{dead.pid}").write_text("half")
        (out / f"checkpoint-5.tmp-{live.pid}").mkdir()  # another process is saving right now: not ours to delete
        (out / "checkpoint-2.old").mkdir()  # killed between the renames while replacing checkpoint-2
        logs = []
        run_config(config(tiny_llama_dir, out, *FAST, "training.max_steps=3", "training.resume=auto"),
                   log=logs.append)
        names = {p.name for p in out.iterdir()}
        assert f"checkpoint-3.tmp-{dead.pid}" not in names and f"tuneforge_config.yaml.tmp-{dead.pid}" not in names
        assert f"checkpoint-5.tmp-{live.pid}" in names and "checkpoint-2.old" not in names
        assert any(f"unfinished save of process {dead.pid}" in line for line in logs)
    finally:
        live.kill()
        live.wait()


def test_resume_from_a_different_run_names_the_difference(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    common = [*FAST, "training.max_steps=4", "training.save_steps=2"]
    train(tiny_llama_dir, out, *common, "training.stop_after_steps=2")
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["run"]["method"] == "lora" and state["run"]["training examples"] > 0
    subset = tmp_path / "subset.jsonl"
    subset.write_text("".join(TASK.read_text().splitlines(keepends=True)[:300]))
    for change, named in [("lora.rank=4", "lora.rank: 8 in the checkpoint, 4 now"),
                          ("training.batch_size=1", "global micro-batch (training.batch_size x processes): 2 in "
                                                    "the checkpoint, 1 now"),
                          ("method=dora", "method: 'lora' in the checkpoint, 'dora' now"),
                          ("method=full", "method: 'lora' in the checkpoint, 'full' now)"),
                          (f"data.train=[{subset}]", "training examples: "),
                          (f"model.name_or_path={tmp_path / 'other'}", "model.name_or_path: ")]:
        if change.startswith("model."):
            shutil.copytree(tiny_llama_dir, tmp_path / "other", dirs_exist_ok=True)
        logs = []
        with pytest.raises(UserError, match=r"Cannot resume from .*checkpoint-2: it was written by a different run"
                           ) as err:
            run_config(config(tiny_llama_dir, out, *common, "training.resume=auto", change), log=logs.append)
        assert named in str(err.value), str(err.value)
        if change == "method=full":  # the method alone: lora's options are not listed as 'None now'
            assert "different run (method: 'lora' in the checkpoint, 'full' now). Resume" in str(err.value)
        settings_only = not change.startswith("data.")  # found before the model loads; data only once encoded
        assert settings_only == (not any(line.startswith("method ") for line in logs)), (change, logs)
    old_style = tmp_path / "old-style-checkpoint"  # written before checkpoints recorded their run: shapes still
    shutil.copytree(out / "checkpoint-2", old_style)  # checked, a clear error and no size-mismatch traceback
    (old_style / "trainer_state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "run"}))
    with pytest.raises(UserError, match=r"has shape \(8, 64\) there and \(4, 64\) here"):
        train(tiny_llama_dir, tmp_path / "other", *common, f"training.resume={old_style}", "lora.rank=4")
    logs = []
    run_config(config(tiny_llama_dir, out, *common, "training.resume=auto", "training.max_steps=5"), log=logs.append)
    assert any("4 steps in all, this one has 5" in line for line in logs), logs
    assert len(losses(out)) == 5


def test_quickstart_runs_twice_into_its_folder(tiny_llama_dir, tmp_path, capsys):
    """`bash scripts/quickstart.sh` twice: the second run starts over in its own folder instead of being refused,
    and keeps the task data it generated there."""
    from tuneforge.cli import main as cli_main

    args = ["quickstart", "--model", str(tiny_llama_dir), "--output-dir", str(tmp_path / "qs"), "--steps", "1",
            "--heldout", "2", "--show", "0"]
    assert cli_main(args) == 0
    (tmp_path / "qs" / "checkpoint-9").mkdir()  # something only an earlier run could have left
    assert cli_main(args) == 0, capsys.readouterr().err
    assert not (tmp_path / "qs" / "checkpoint-9").exists() and (tmp_path / "qs" / "data" / "train.jsonl").is_file()


def test_resuming_past_the_runs_last_step_is_refused_and_rewrites_nothing(tiny_llama_dir, tmp_path):
    """max_steps lowered below the checkpoint's step: nothing to train. It used to say the schedule "now ends at step
    3", report done at step 8, and rewrite the final model and config with the lower max_steps."""
    out = tmp_path / "run"
    train(tiny_llama_dir, out, *FAST, "training.max_steps=4", "training.save_steps=2")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    with pytest.raises(UserError, match=r"checkpoint-4 is at step 4, past this run's 3 steps .*max_steps above 4"):
        train(tiny_llama_dir, out, *FAST, "training.max_steps=3", "training.save_steps=2", "training.resume=auto")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == before
    logs = []  # at exactly the last step: said, and the final model saved from it
    run_config(config(tiny_llama_dir, out, *FAST, "training.max_steps=4", "training.save_steps=2",
                      "training.resume=auto"), log=logs.append)
    assert any("is this run's last step: nothing is left to train" in line for line in logs), logs
