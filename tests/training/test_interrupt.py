"""SIGINT/SIGTERM during training: the step finishes, a checkpoint is written, the exact resume command is printed,
and the resumed run ends where an uninterrupted one does (bit for bit on CPU). A second signal aborts."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_training import ROOT, TASK, losses, train
from tuneforge.training.interrupt import StopRequest
from tuneforge.training.runtime import free_port

# batch 1, short rows: a step takes milliseconds. The child is frozen (SIGSTOP) as soon as its first step is logged,
# so the signal lands a step or two in, far before step 40, however loaded the machine is
COMMON = ["training.max_steps=40", "training.batch_size=1", "training.grad_accum=2", "data.max_length=64",
          "training.save_steps=0", "training.eval_steps=0", "data.eval_ratio=0.0", "lora.dropout=0.1",
          "training.warmup_steps=3", "training.progress_bar=false", "training.plot_loss=false"]


def cli_args(model_dir, out: Path, *extra) -> list[str]:
    return [str(ROOT / "examples" / "sft_lora_tiny.yaml"), f"model.name_or_path={model_dir}", f"output_dir={out}",
            f"data.train=[{TASK}]", *COMMON, *extra]


def finish(proc: subprocess.Popen, timeout: float = 180) -> str:
    """Its output once it exits (the `spawn` fixture kills it if the test fails first)."""
    return proc.communicate(timeout=timeout)[0]


@pytest.fixture
def spawn():
    """Popen in a new session; every process group started is killed at the test's end, whatever happened (a
    hung torchrun included), so a failing test never leaves training processes behind."""
    started = []

    def start(cmd: list[str]) -> subprocess.Popen:
        # the same thread count as this process, which runs the straight and resumed runs: float sums differ by
        # thread count, and the comparison is bit for bit
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def signal_after_first_step(proc: subprocess.Popen, out: Path, sig: int, timeout: float = 120) -> None:
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + timeout
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no training step logged"
        time.sleep(0.005)
    proc.send_signal(signal.SIGSTOP)  # freeze it: the signal arrives while it is mid-run, not after its end
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_and_the_resumed_run_is_bit_identical(tiny_qwen2_dir, tmp_path, sig, spawn):
    out = tmp_path / "interrupted"
    args = cli_args(tiny_qwen2_dir, out)
    proc = spawn([sys.executable, "-m", "tuneforge", "train", *args])
    signal_after_first_step(proc, out, sig)
    printed = finish(proc)
    assert proc.returncode == 128 + sig, printed
    steps_done = len(losses(out))
    assert 1 <= steps_done < 40, printed
    assert (out / f"checkpoint-{steps_done}" / "trainable.safetensors").is_file()  # the step it was in finished
    assert f"{signal.Signals(sig).name} received" in printed
    command = shlex.join(["tuneforge", "train", *args, "training.resume=auto"])
    assert command in printed, printed  # the user's own arguments, ready to paste

    train(tiny_qwen2_dir, out, *COMMON, "training.resume=auto")
    train(tiny_qwen2_dir, tmp_path / "straight", *COMMON)
    a = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "straight") == losses(out)


def test_second_signal_aborts_at_once():
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when pytest runs as a background job
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT  # the first only asks: the loop stops after its step
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored after the loop


def test_under_torchrun_the_forwarded_copy_of_a_ctrl_c_is_not_a_second_one(monkeypatch):
    """Ctrl-C reaches a torchrun worker from the terminal and again from torchrun, milliseconds apart: that must
    still save. A later second Ctrl-C aborts as usual."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # torchrun's copy
        assert stop.signum == signal.SIGINT
        stop.echo_window_s = 0.0
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)



@pytest.mark.parametrize("local_rank, says", [("0", True), ("1", False)])
def test_one_stop_notice_per_node(local_rank, says, monkeypatch, capfd):
    """Every torchrun process gets the signal; only each node's first one says so (it printed once per process)."""
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM  # each process still stops
    assert ("SIGTERM received: finishing the current step" in capfd.readouterr().err) == says

def test_a_signal_after_the_last_step_still_saves_the_trained_model(tiny_qwen2_dir, tmp_path, monkeypatch, capfd):
    """Ctrl-C / SIGTERM during the final evaluation or the final save lost the whole run (KeyboardInterrupt, no
    checkpoint at the last step with save_steps=0): a first signal now lets both finish; a second one, in the save or
    after a first in the evaluation, aborts the save and leaves no temp folder behind."""
    from tuneforge.training import loop, setup

    real_evaluate, real_finish = loop.Trainer.evaluate, setup.finish_output_folder

    def signals_in_final_eval(signals):
        def evaluate(self):  # the final evaluation is the one after the last step
            for sig in signals * (self.step == self.total_steps):
                os.kill(os.getpid(), sig)
            return real_evaluate(self)
        return evaluate

    def signals_in_save(signals):
        def finish(*args):
            for sig in signals:
                os.kill(os.getpid(), sig)
            return real_finish(*args)
        return finish

    def run(name, in_eval, in_save):
        monkeypatch.setattr(loop.Trainer, "evaluate", signals_in_final_eval(in_eval))
        monkeypatch.setattr(setup, "finish_output_folder", signals_in_save(in_save))
        return train(tiny_qwen2_dir, tmp_path / name, *COMMON[:2], "training.max_steps=3", "data.eval_ratio=0.01")

    for name, in_eval, in_save in [("eval", [signal.SIGINT], []), ("save", [], [signal.SIGTERM])]:
        result = run(name, in_eval, in_save)
        assert result.finished and result.eval_loss is not None
        assert (tmp_path / name / "adapter_model.safetensors").is_file() and not list((tmp_path / name).glob("*.tmp-*"))
        said = "received: finishing the final evaluation and saving the final model (press Ctrl-C again to abort"
        assert said in capfd.readouterr().err
    for name, in_eval, in_save in [("twice", [], [signal.SIGINT, signal.SIGINT]),
                                   ("eval_then_save", [signal.SIGINT], [signal.SIGTERM])]:
        with pytest.raises(KeyboardInterrupt):
            run(name, in_eval, in_save)
        aborted = tmp_path / name
        assert not list(aborted.glob("*.tmp-*")) and not (aborted / "adapter_model.safetensors").exists()


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (Linux /proc)."""
    found = {}
    for task in Path(f"/proc/{launcher_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
            if "RANK" in env:
                found[int(env["RANK"])] = int(pid)
    return found


@pytest.mark.slow  # ~15 s of CPU for three processes each
@pytest.mark.parametrize("how", ["SIGTERM to rank 1 only", "Ctrl-C in the terminal"])
def test_under_torchrun_a_signal_stops_every_rank_at_the_same_step(tiny_llama_dir, tmp_path, spawn, how):
    """Preemption often reaches one process first: only rank 1 gets SIGTERM. Without agreeing on the step, rank 0
    would run on into an all-reduce that rank 1 never joins and hang (checked: it does). Ctrl-C in a terminal
    reaches every process of the group, and torchrun forwards it once more; here the copies coalesce (the workers
    are stopped when they arrive), so the echo case itself is covered by the unit test above."""
    out = tmp_path / "ddp"
    proc = spawn([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                  "-m", "tuneforge", "train", *cli_args(tiny_llama_dir, out, "training.device=cpu")])
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 180
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
        time.sleep(0.005)
    workers = worker_pids(proc.pid)
    for pid in workers.values():
        os.kill(pid, signal.SIGSTOP)
    if how == "SIGTERM to rank 1 only":
        os.kill(workers[1], signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)  # the launcher and both workers, as a terminal's Ctrl-C does
    for pid in workers.values():
        os.kill(pid, signal.SIGCONT)
    printed = finish(proc)
    steps_done = len(losses(out))
    assert 1 <= steps_done < 40, printed
    assert (out / f"checkpoint-{steps_done}" / "trainable.safetensors").is_file(), printed
    name = "SIGTERM" if how.startswith("SIGTERM") else "SIGINT"
    assert f"{name} received" in printed and "torchrun --nproc_per_node=2 -m tuneforge train" in printed, printed
    result = train(tiny_llama_dir, out, *COMMON, "training.batch_size=2", "training.resume=auto",
                   "training.device=cpu")  # 2 processes x 1 continue as 1 process x 2: the same global batches
    assert result.finished and len(losses(out)) == 40


def test_resume_command_repeats_the_arguments_and_never_conflicts(tiny_llama_dir, tmp_path):
    from tests.test_training import config
    from tuneforge.training.interrupt import resume_command, set_command

    cfg = config(tiny_llama_dir, tmp_path / "run", "overwrite_output_dir=true")
    assert resume_command(cfg) == (f"tuneforge train {tmp_path / 'run' / 'tuneforge_config.yaml'} "
                                   f"training.resume=auto overwrite_output_dir=false")  # without CLI arguments
    set_command(["my config.yaml", "overwrite_output_dir=true", "training.resume=old", "lora.rank=4"])
    try:
        assert resume_command(cfg, world_size=2) == ("torchrun --nproc_per_node=2 -m tuneforge train 'my config.yaml' "
                                                     "lora.rank=4 training.resume=auto overwrite_output_dir=false")
    finally:
        set_command(None)
