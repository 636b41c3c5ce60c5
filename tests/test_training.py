"""The one training loop, end to end through `tuneforge train` on tiny models (CPU, fp32 unless stated)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.cli import main as cli_main
from tuneforge.configs.schema import load_train_config
from tuneforge.train import run_config
from tuneforge.training.metrics import read_metrics
from tuneforge.training.runtime import free_port

ROOT = Path(__file__).resolve().parent.parent
TASK = ROOT / "tuneforge" / "assets" / "example_task" / "train.jsonl"
CORPUS = ROOT / "tuneforge" / "assets" / "corpus"


def config(model_dir, out, *overrides, example="sft_lora_tiny.yaml"):
    base = [f"model.name_or_path={model_dir}", f"output_dir={out}", f"data.train=[{TASK}]",
            "training.progress_bar=false", "training.plot_loss=false", "training.save_steps=0",
            "training.eval_steps=0", "data.eval_ratio=0.0", "data.max_length=96"]
    return load_train_config(str(ROOT / "examples" / example), base + list(overrides))


def train(model_dir, out, *overrides, example="sft_lora_tiny.yaml"):
    return run_config(config(model_dir, out, *overrides, example=example), log=lambda _: None)


def losses(out) -> list[float]:
    return [r["loss"] for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r]


def test_sft_lora_learns_and_saves_peft_adapter(tiny_qwen2_dir, tmp_path):
    out = tmp_path / "run"
    # 24 rows seen many times. LoRA cannot move the random embeddings/lm_head of a tiny model, so its loss falls
    # slowly (measured: 7.02 -> 6.53 over the first/last 5 steps; lr 2e-2 is too high and stalls at 6.95)
    subset = tmp_path / "subset.jsonl"
    subset.write_text("".join(TASK.read_text().splitlines(keepends=True)[:24]))
    result = train(tiny_qwen2_dir, out, f"data.train=[{subset}]", "training.max_steps=25", "training.lr=5e-3",
                   "data.eval_ratio=0.2", "lora.target_modules=[all-linear]", "lora.rank=16",
                   "training.scheduler=constant", "training.eval_steps=10", "training.plot_loss=true")
    curve = losses(out)
    assert len(curve) == 25 and sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.3, curve
    rows = read_metrics(out / "metrics.jsonl")
    assert any("eval_loss" in r for r in rows) and result.eval_loss is not None
    assert all(r["tokens_per_s"] > 0 and "lr" in r and "grad_norm" in r for r in rows if "loss" in r)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / "tuneforge_config.yaml").is_file() and (out / "loss.png").stat().st_size > 1000
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir)
    tuned = PeftModel.from_pretrained(base, str(out))
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero; training moved it


def test_full_and_freeze_change_exactly_what_they_should(tiny_llama_dir, tmp_path):
    before = load_file(str(Path(tiny_llama_dir) / "model.safetensors"))
    train(tiny_llama_dir, tmp_path / "freeze", "training.max_steps=3", example="sft_freeze_tiny.yaml")
    after = load_file(str(tmp_path / "freeze" / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    n_layers = json.loads((Path(tiny_llama_dir) / "config.json").read_text())["num_hidden_layers"]
    assert changed and all(k.startswith(f"model.layers.{n_layers - 1}.") or k == "model.norm.weight"
                           for k in changed)
    assert "model.norm.weight" in changed
    train(tiny_llama_dir, tmp_path / "full", "training.max_steps=3", example="sft_full_tiny.yaml")
    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    assert all(not torch.equal(before[k], full[k]) for k in before if "layers.0." in k)


def test_grad_accum_equals_big_batch(tiny_llama_dir, tmp_path):
    common = ["training.max_steps=4", "method=full", "training.lr=1e-3", "training.max_grad_norm=0"]
    train(tiny_llama_dir, tmp_path / "a", "training.batch_size=4", "training.grad_accum=1", *common)
    train(tiny_llama_dir, tmp_path / "b", "training.batch_size=1", "training.grad_accum=4", *common)
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), abs=1e-5)


def test_gradient_checkpointing_same_losses(tiny_llama_dir, tmp_path):
    common = ["training.max_steps=3", "method=full", "training.lr=1e-3"]
    train(tiny_llama_dir, tmp_path / "a", *common)
    train(tiny_llama_dir, tmp_path / "b", "training.gradient_checkpointing=true", *common)
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), abs=1e-5)


@pytest.mark.parametrize("grouped", [False, True], ids=["random", "group_by_length"])
def test_resume_is_bit_identical(tiny_qwen2_dir, tmp_path, grouped):
    """20 steps straight == 10 steps, stop, resume to 20 (weights, optimizer and data order all restored)."""
    common = ["training.max_steps=20", "lora.dropout=0.1", "training.batch_size=2", "training.grad_accum=2",
              "training.warmup_steps=3", "training.save_total_limit=3", f"data.group_by_length={grouped}"]
    train(tiny_qwen2_dir, tmp_path / "straight", *common)
    out = tmp_path / "resumed"
    stopped = train(tiny_qwen2_dir, out, "training.stop_after_steps=10", *common)
    assert not stopped.finished and (out / "checkpoint-10" / "trainable.safetensors").is_file()
    assert not (out / "adapter_model.safetensors").exists()
    train(tiny_qwen2_dir, out, "training.resume=auto", *common)
    a = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "straight") == losses(out)  # the log has each step exactly once, same values


def test_checkpoints_rotate_and_are_complete(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_llama_dir, out, "training.max_steps=8", "training.save_steps=2", "training.save_total_limit=2")
    names = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint"))
    assert names == ["checkpoint-6", "checkpoint-8"]
    for name in names:
        files = {p.name for p in (out / name).iterdir()}
        assert {"trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json"} <= files
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    state = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["position"] == 8


def test_resume_from_explicit_path_and_bad_path(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_llama_dir, out, "training.max_steps=4", "training.save_steps=2")
    result = train(tiny_llama_dir, tmp_path / "other", "training.max_steps=4", f"training.resume={out}/checkpoint-2")
    # steps 1-2 come from the checkpoint's own record (this output_dir had no log), 3-4 were run: the same curve as
    # the run that wrote it, so loss.png and the model card cover the whole run
    assert result.steps == 4 and losses(tmp_path / "other") == losses(out)
    assert [r["step"] for r in read_metrics(tmp_path / "other" / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    code = cli_main(["train", str(ROOT / "examples" / "sft_lora_tiny.yaml"), f"model.name_or_path={tiny_llama_dir}",
                     f"training.resume={tmp_path}"])
    assert code == 2 and "not a TuneForge checkpoint" in capsys.readouterr().err


def test_bf16_on_cpu_learns(tiny_llama_dir, tmp_path):
    result = train(tiny_llama_dir, tmp_path / "bf16", "training.max_steps=15", "training.precision=bf16",
                   "training.lr=3e-3")
    curve = losses(tmp_path / "bf16")
    assert result.finished and curve[-1] < curve[0]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf16" / "adapter_model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())  # trainable weights kept in fp32


def test_pretraining_with_packing(tiny_llama_dir, tmp_path):
    out = tmp_path / "pt"
    cfg = load_train_config(str(ROOT / "examples" / "pt_tiny.yaml"),
                            [f"model.name_or_path={tiny_llama_dir}", f"output_dir={out}", "training.max_steps=12",
                             f"data.train=[{{path: {CORPUS}, format: text}}]", "training.progress_bar=false",
                             "training.plot_loss=false", "training.lr=3e-3"])
    run_config(cfg, log=lambda _: None)
    curve = losses(out)
    assert curve[-1] < curve[0] and (out / "model.safetensors").is_file()


DDP_SCRIPT = """
import sys
from tuneforge.configs.schema import load_train_config
from tuneforge.train import run_config
cfg = load_train_config(sys.argv[1], sys.argv[2:])
run_config(cfg, log=lambda _: None)
"""


def run_in_own_group(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a training command (torchrun and its workers, or one process) in a session of its own, stdout and stderr
    together; past `timeout` kill the whole group and fail. subprocess.run's timeout kills only torchrun, leaving its
    workers spinning for the rest of the suite, and a hang is what the distributed tests are there to catch."""
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"still running after {timeout} s (killed with its workers): {' '.join(args[:4])} ...\n"
                    f"{out[-3000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out)


def one_process_and_two(tmp_path: Path, common: list[str], two: str = "two", *two_extra: str) -> None:
    """`tuneforge train` of the arguments `common` (config path first) in 1 process x batch 4 (output_dir
    tmp_path/one) and under torchrun in 2 processes x batch 2 (tmp_path/`two`, plus `two_extra`), each with one
    thread and in a process group of its own; both must succeed."""
    script = tmp_path / "run.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = ([sys.executable, str(script), *common, f"output_dir={tmp_path / 'one'}", "training.batch_size=4"],
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
             str(script), *common, f"output_dir={tmp_path / two}", "training.batch_size=2", *two_extra])
    for args in runs:
        done = run_in_own_group(args, env)
        assert done.returncode == 0, done.stdout[-3000:]


def test_two_cpu_processes_match_one(tiny_llama_dir, tmp_path):
    """torchrun with 2 gloo processes x batch 2 gives the loss curve of 1 process x batch 4."""
    common = [str(ROOT / "examples" / "sft_lora_tiny.yaml"), f"model.name_or_path={tiny_llama_dir}",
              f"data.train=[{TASK}]", "training.max_steps=4", "training.progress_bar=false", "training.plot_loss=false",
              "data.eval_ratio=0.0", "training.eval_steps=0", "training.save_steps=0", "data.max_length=96",
              "method=full", "training.device=cpu"]
    one_process_and_two(tmp_path, common)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert one == pytest.approx(two, abs=1e-5)
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    # weights: 1e-4, not 1e-5. Summing gradients over ranks rounds differently, and AdamW turns rounding noise on
    # near-zero gradients (rarely seen rows of the tied embedding) into steps of up to lr (seen: 2e-5 after 4 steps)
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a}
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a), sorted(diffs.items(), key=lambda kv: -kv[1])[:5]


def test_bad_rows_fail_before_the_model_loads(tmp_path):
    """Rows are validated first: a bad file is reported even though the model folder does not exist (so a user
    does not wait for a big model to load only to learn that row 3 is broken)."""
    from tuneforge.errors import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "yo"}\n{"instruction": "hi"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:line 2: field `output`"):
        train(tmp_path / "no-such-model", tmp_path / "out", f"data.train=[{bad}]", "training.max_steps=1")


def test_group_by_length_batches_similar_lengths_and_keeps_every_item():
    from tuneforge.training.loop import DataOrder

    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(5, 200, (203,), generator=gen).tolist()
    plain = DataOrder(203, 4, 1, 0, seed=3)
    grouped = DataOrder(203, 4, 1, 0, seed=3, lengths=lengths, group_size=8)
    for epoch in (0, 1):
        assert sorted(grouped.epoch_order(epoch)) == list(range(203))  # a permutation: nothing lost or repeated
        assert grouped.epoch_order(epoch)[200:] == plain.epoch_order(epoch)[200:]  # the unused tail stays out

    def mean_spread(order):
        batches = [order.indices(k) for k in range(order.per_epoch)]
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)

    assert mean_spread(grouped) < 0.3 * mean_spread(plain)  # far less padding per batch
    assert grouped.epoch_order(0) != grouped.epoch_order(1)  # still shuffled per epoch
    # 2 ranks x 2 items see exactly the global batches of 1 rank x 4 items
    ranks = [DataOrder(203, 2, 2, r, seed=3, lengths=lengths, group_size=8) for r in (0, 1)]
    for k in range(grouped.per_epoch):
        assert ranks[0].indices(k) + ranks[1].indices(k) == grouped.indices(k)


def test_label_position_logits_give_the_full_loss_and_are_chosen_per_method(tiny_llama_dir):
    """Stage.loss with logits only at label positions equals the full-logits loss on a real model (LoRA-wrapped);
    prompt-learning models (virtual tokens shift positions) keep the full path."""
    from transformers import AutoModelForCausalLM

    from tuneforge.methods import METHODS
    from tuneforge.training.loop import Stage, accepts_logits_to_keep

    cfg = config(tiny_llama_dir, "unused", "lora.target_modules=[all-linear]")
    model = METHODS["lora"].apply(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), cfg.options("lora"), cfg)
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (3, 24))
    labels = ids.clone()
    labels[:, :15] = -100
    labels[2, 15:18] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    full, fast = Stage(), Stage()
    fast.logits_at_labels = accepts_logits_to_keep(model)
    assert fast.logits_at_labels
    torch.testing.assert_close(fast.loss(model, batch)[0], full.loss(model, batch)[0], atol=1e-5, rtol=1e-6)
    prompt_cfg = config(tiny_llama_dir, "unused", "method=prompt_tuning")
    prompted = METHODS["prompt_tuning"].apply(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                              prompt_cfg.options("prompt_tuning"), prompt_cfg)
    assert not accepts_logits_to_keep(prompted)
