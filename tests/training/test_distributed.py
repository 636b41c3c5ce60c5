"""training.distributed: FSDP2 over 2 gloo processes on CPU (fp32) trains exactly like 1 process, its sharded
checkpoints resume with the same or another process count, and its export is the usual HF/PEFT folder. Multi-node:
two torchrun launchers on one machine. DeepSpeed: tests/training/test_deepspeed.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_training import DDP_SCRIPT, ROOT, TASK, losses, run_in_own_group, train
from tuneforge.errors import UserError
from tuneforge.training.runtime import free_port

COMMON = [f"data.train=[{TASK}]", "training.max_steps=4", "training.progress_bar=false", "training.plot_loss=false",
          "data.eval_ratio=0.0", "training.eval_steps=0", "training.save_steps=0", "data.max_length=96",
          "training.device=cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def launch(tmp_path: Path, model_dir, out: Path, *overrides, nproc: int = 1, port: int | None = None,
           torchrun: tuple = ()) -> subprocess.CompletedProcess:
    """`tuneforge train`'s code path in a fresh process: plain python for 1 process, torchrun otherwise."""
    script = tmp_path / "run.py"
    script.write_text(DDP_SCRIPT)
    args = [str(ROOT / "examples" / "sft_lora_tiny.yaml"), f"model.name_or_path={model_dir}", *COMMON,
            f"output_dir={out}", *overrides]
    if nproc == 1 and not torchrun:
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", *(torchrun or (f"--nproc_per_node={nproc}",
                                                                            f"--master_port={port or free_port()}")),
               str(script), *args]
    done = run_in_own_group(cmd, ENV)
    assert done.returncode == 0, done.stdout[-3000:]
    return done


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_fsdp_two_processes_match_one_and_resume_on_one(tiny_llama_dir, tmp_path):
    """Full fine-tune: 1 plain process x batch 4 == FSDP 2 processes x batch 2 stopped after step 2 (sharded
    checkpoint) and resumed by 1 FSDP process x batch 4 (DCP reshards 2 -> 1). The export loads in transformers."""
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    train(tiny_llama_dir, one, *COMMON, "method=full", "training.batch_size=4")
    launch(tmp_path, tiny_llama_dir, sharded, "method=full", "training.batch_size=2", "training.distributed=fsdp",
           "training.stop_after_steps=2", nproc=2)
    checkpoint = sharded / "checkpoint-2"
    assert sorted(p.name for p in (checkpoint / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (checkpoint / "trainable.safetensors").exists()
    launch(tmp_path, tiny_llama_dir, sharded, "method=full", "training.batch_size=4", "training.distributed=fsdp",
           "training.resume=auto")
    assert losses(one) == pytest.approx(losses(sharded), abs=1e-5) and len(losses(one)) == 4
    a, b = load_file(str(one / "model.safetensors")), load_file(str(sharded / "model.safetensors"))
    # 1e-4 as in the DDP test: AdamW turns rounding noise of near-zero gradients into steps of up to lr
    assert max_diff(a, b) < 1e-4
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sharded)
    assert torch.equal(model.state_dict()["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.slow
def test_fsdp_lora_resumes_exactly_and_exports_a_peft_adapter(tiny_qwen2_dir, tmp_path):
    """LoRA with the frozen base sharded: 2 FSDP processes x batch 1 x 2 micro-batches, stopped at step 2 and
    resumed with 2, end where an uninterrupted 1-process run with batch 4 does; the adapter loads with PeftModel."""
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    lora = ["training.batch_size=1", "training.grad_accum=2", "training.lr=5e-3"]  # gradient sync skipped once
    train(tiny_qwen2_dir, one, *COMMON, "training.batch_size=4", "training.lr=5e-3")
    for extra in (["training.stop_after_steps=2"], ["training.resume=auto"]):
        launch(tmp_path, tiny_qwen2_dir, sharded, *lora, "training.distributed=fsdp", *extra, nproc=2)
    assert losses(one) == pytest.approx(losses(sharded), abs=1e-5)
    a = load_file(str(one / "adapter_model.safetensors"))
    b = load_file(str(sharded / "adapter_model.safetensors"))
    assert max_diff(a, b) < 1e-5 and any("lora_A" in k for k in a)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir), sharded)
    name = next(k for k in model.state_dict() if "lora_B" in k)
    assert model.state_dict()[name].abs().sum() > 0  # trained, not the zero initialisation


@pytest.mark.slow
def test_two_nodes_on_one_machine_match_two_processes(tiny_llama_dir, tmp_path):
    """Multi-node as on a cluster: two torchrun launchers (1 process each) meet at a c10d rendezvous endpoint, which
    numbers the nodes; the run equals 1 process x batch 4."""
    one, nodes = tmp_path / "one", tmp_path / "nodes"
    train(tiny_llama_dir, one, *COMMON, "method=full", "training.batch_size=4")
    script = tmp_path / "run.py"
    script.write_text(DDP_SCRIPT)
    args = [str(ROOT / "examples" / "sft_lora_tiny.yaml"), f"model.name_or_path={tiny_llama_dir}", *COMMON,
            f"output_dir={nodes}", "method=full", "training.batch_size=2", "training.distributed=fsdp"]
    endpoint_port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2",  # as README: no --node-rank
                               "--nproc-per-node=1", "--rdzv-backend=c10d",
                               f"--rdzv-endpoint=127.0.0.1:{endpoint_port}",
                               "--rdzv-id=tuneforge-test", str(script), *args], env=ENV, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert losses(one) == pytest.approx(losses(nodes), abs=1e-5)


def test_fsdp_refuses_qlora_and_dcp_checkpoints_need_fsdp(tmp_path):
    from tuneforge.training.distributed import check_method_supported

    with pytest.raises(UserError, match="qlora"):
        check_method_supported("fsdp", "qlora")
    check_method_supported("ddp", "qlora")


def test_decoder_blocks_are_the_no_split_modules(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from tuneforge.training.distributed import decoder_blocks, resolve_engine

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    blocks = decoder_blocks(model)
    assert [type(b).__name__ for b in blocks] == ["LlamaDecoderLayer"] * model.config.num_hidden_layers
    assert resolve_engine("auto", 1) == "none" and resolve_engine("auto", 2) == "ddp"
    assert resolve_engine("ddp", 1) == "none" and resolve_engine("fsdp", 1) == "fsdp"
    with pytest.raises(UserError, match="each would train its own copy"):
        resolve_engine("none", 2)


@pytest.mark.parametrize("engine, nproc, batch, says", [
    ("fsdp", 1, 2, "To resume with 1 process\\(es\\) instead of 2, set `training.batch_size=4`"),
    ("fsdp", 3, 2, "3 process\\(es\\) cannot keep its global micro-batch of 4 examples"),
    ("deepspeed", 1, 2, "start torchrun with --nproc-per-node 2 and training.batch_size=2"),
])
def test_resume_with_another_process_count_names_the_batch_size_to_set(tiny_llama_dir, tmp_path, engine, nproc,
                                                                        batch, says):
    """A checkpoint of 2 processes x batch 2 resumed by another process count: the error says which
    training.batch_size keeps the global micro-batch (or that none does, or that DeepSpeed needs the same count)."""
    import json

    from tests.test_training import config
    from tuneforge.training.checkpoint import check_same_run, run_fingerprint

    cfg = config(tiny_llama_dir, tmp_path / "out", f"training.distributed={engine}", "training.batch_size=2")
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"world_size": 2, "run": run_fingerprint(cfg, 2, None)}))
    cfg.training.batch_size = batch
    with pytest.raises(UserError, match=says):
        check_same_run(checkpoint, run_fingerprint(cfg, nproc, None), nproc)
    cfg.training.batch_size = 4
    if engine == "fsdp":  # 1 x 4 is the same global micro-batch
        assert check_same_run(checkpoint, run_fingerprint(cfg, 1, None), 1)


def test_fsdp_cpu_offload_on_cpu_trains_and_says_there_is_nothing_to_offload(tiny_llama_dir, tmp_path):
    """On CPU the shards are in CPU memory already; FSDP2's offload policy pins memory, which needs an accelerator
    (it crashed in fully_shard: "Cannot access accelerator device when none is available")."""
    script = tmp_path / "run.py"
    script.write_text(DDP_SCRIPT.replace("log=lambda _: None", "log=print"))
    args = [str(ROOT / "examples" / "sft_full_tiny.yaml"), f"model.name_or_path={tiny_llama_dir}", *COMMON,
            "training.max_steps=1", f"output_dir={tmp_path / 'out'}", "training.distributed=fsdp",
            "training.fsdp_cpu_offload=true"]
    done = subprocess.run([sys.executable, str(script), *args], env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "fsdp_cpu_offload: this run trains on the CPU" in done.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()
