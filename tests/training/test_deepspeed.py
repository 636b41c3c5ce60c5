"""training.distributed: deepspeed. DeepSpeed's CPU accelerator runs ZeRO over the gloo group TuneForge starts, so
the engine itself is tested here on CPU (fp32; the 2-process runs are marked slow): ZeRO-2/3 train exactly like 1
plain process, resume exactly from the engine's own checkpoints and export the usual HF/PEFT folder; a user's
DeepSpeed JSON is used with "auto" filled; bad JSON, mismatches and a missing package are clear errors."""

from __future__ import annotations

import json
import sys
from importlib.util import find_spec

import pytest
import torch
from safetensors.torch import load_file

from tests.test_training import config, losses, train
from tests.training.test_distributed import COMMON, launch, max_diff
from tuneforge.errors import ConfigError, UserError
from tuneforge.training import deepspeed_zero as dz

needs_deepspeed = pytest.mark.skipif(find_spec("deepspeed") is None, reason="pip install tuneforge[deepspeed]")
DS = ["training.distributed=deepspeed"]


@pytest.mark.slow  # ~1 min: 2 launches of 2 processes (the 1-process ZeRO-3 test below runs by default)
@needs_deepspeed
def test_zero2_two_processes_match_one_resume_and_export(tiny_llama_dir, tmp_path):
    """Full fine-tune: 1 plain process x batch 4 == ZeRO-2 (built from training.*) over 2 processes x batch 2,
    stopped after step 2 (the engine's checkpoint) and resumed. The gathered export loads in plain transformers."""
    one, zero = tmp_path / "one", tmp_path / "zero2"
    train(tiny_llama_dir, one, *COMMON, "method=full", "training.batch_size=4")
    for extra in ("training.stop_after_steps=2", "training.resume=auto"):
        launch(tmp_path, tiny_llama_dir, zero, "method=full", "training.batch_size=2", *DS, "training.deepspeed=2",
               extra, nproc=2)
        if extra.startswith("training.stop"):
            shards = sorted(p.name for p in (zero / "checkpoint-2" / "deepspeed" / "state").glob("*optim_states.pt"))
            assert len(shards) == 2 and not (zero / "checkpoint-2" / "trainable.safetensors").exists()
    assert losses(one) == pytest.approx(losses(zero), abs=1e-5) and len(losses(one)) == 4
    a, b = load_file(str(one / "model.safetensors")), load_file(str(zero / "model.safetensors"))
    assert max_diff(a, b) < 1e-4  # as the DDP/FSDP tests: AdamW turns rounding noise into steps of up to lr
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(zero)
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(model.state_dict()[name], b[name]) and not torch.equal(b[name], load_file(
        str(tiny_llama_dir / "model.safetensors"))[name])  # trained, and what the folder loads


@needs_deepspeed
def zero3_json(tmp_path) -> str:
    """ZeRO-3 that partitions every tensor: DeepSpeed keeps tensors under 1e5 elements whole by default, which is
    all of a tiny model's (threshold 0 makes the test exercise the gather/release path)."""
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
                                "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                                                      "stage3_param_persistence_threshold": 0}}))
    return str(user)


@needs_deepspeed
def test_user_json_zero3_in_one_process_matches_plain(tiny_llama_dir, tmp_path):
    """A user's DeepSpeed JSON ("auto" values filled from training.*) in one process without torchrun, 2
    micro-batches per step through the engine's accumulation boundary: the losses and weights of the plain loop."""
    user = zero3_json(tmp_path)
    one, zero = tmp_path / "one", tmp_path / "zero3"
    common = ["method=full", "training.batch_size=2", "training.grad_accum=2"]
    train(tiny_llama_dir, one, *COMMON, *common)
    launch(tmp_path, tiny_llama_dir, zero, *common, *DS, f"training.deepspeed={user}")
    assert losses(one) == pytest.approx(losses(zero), abs=1e-5)
    assert max_diff(load_file(str(one / "model.safetensors")), load_file(str(zero / "model.safetensors"))) < 1e-4


@pytest.mark.slow
@needs_deepspeed
def test_zero3_lora_resumes_exactly_and_exports_a_peft_adapter(tiny_qwen2_dir, tmp_path):
    """LoRA on a ZeRO-3-partitioned frozen base (every tensor, see zero3_json), 2 processes x batch 1 x 2
    micro-batches (the engine's accumulation boundary), stopped at step 2 and resumed: the curve and adapter of 1
    plain process with batch 4. ~1-3 min: every tensor is gathered over gloo in each forward and backward."""
    one, zero = tmp_path / "one", tmp_path / "zero3"
    lora = ["training.batch_size=1", "training.grad_accum=2", "training.lr=5e-3"]
    train(tiny_qwen2_dir, one, *COMMON, "training.batch_size=4", "training.lr=5e-3")
    for extra in ("training.stop_after_steps=2", "training.resume=auto"):
        launch(tmp_path, tiny_qwen2_dir, zero, *lora, *DS, f"training.deepspeed={zero3_json(tmp_path)}", extra,
               nproc=2)
    assert losses(one) == pytest.approx(losses(zero), abs=1e-5)
    a, b = load_file(str(one / "adapter_model.safetensors")), load_file(str(zero / "adapter_model.safetensors"))
    assert max_diff(a, b) < 1e-5 and any("lora_A" in k for k in a)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir), zero)
    name = next(k for k in model.state_dict() if "lora_B" in k)
    assert model.state_dict()[name].abs().sum() > 0  # trained, not the zero initialisation


# ---- the config, without running DeepSpeed ---------------------------------------------------------------------------
def training(tmp_path, tiny_llama_dir, *overrides):
    return config(tiny_llama_dir, tmp_path / "out", *DS, *overrides).training


def test_stage_config_comes_from_training_settings(tmp_path, tiny_llama_dir):
    t = training(tmp_path, tiny_llama_dir, "training.deepspeed=3", "training.deepspeed_offload=all",
                 "training.batch_size=2", "training.grad_accum=3", "training.max_grad_norm=0.5",
                 "training.precision=bf16")
    c = dz.build_config(t, world_size=4)
    assert c["train_micro_batch_size_per_gpu"] == 2 and c["gradient_accumulation_steps"] == 3
    assert c["train_batch_size"] == 24 and c["gradient_clipping"] == 0.5
    assert c["bf16"] == {"enabled": True} and c["fp16"] == {"enabled": False}
    assert c["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                      "offload_param": {"device": "cpu"}}
    default = dz.build_config(training(tmp_path, tiny_llama_dir, "training.max_grad_norm=0"), world_size=1)
    assert default["zero_optimization"] == {"stage": 2} and default["gradient_clipping"] == 0.0


def test_user_json_auto_values_are_filled_and_others_kept(tmp_path, tiny_llama_dir):
    t = training(tmp_path, tiny_llama_dir, "training.batch_size=2", "training.grad_accum=4")
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_batch_size": "auto", "gradient_clipping": 1.0, "fp16": {"enabled": "auto"},
                                "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": "auto",
                                                      "offload_optimizer": {"device": "cpu", "pin_memory": True}},
                                "wall_clock_breakdown": True}))
    c = dz.load_user_config(str(user), t, world_size=2, hidden_size=64)
    assert c["train_batch_size"] == 16 and c["train_micro_batch_size_per_gpu"] == 2
    assert c["fp16"] == {"enabled": False} and c["wall_clock_breakdown"] is True
    zero = c["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}


def hf_style_json(tmp_path, schedule: str = "WarmupLR"):
    """A ds_config as Hugging Face's DeepSpeed docs give it: optimizer and scheduler sections of "auto" values."""
    user = tmp_path / "ds_hf.json"
    user.write_text(json.dumps({
        "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16}, "bf16": {"enabled": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                  "weight_decay": "auto"}},
        "scheduler": {"type": schedule, "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                   "warmup_num_steps": "auto", "total_num_steps": "auto"}},
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                              "overlap_comm": True, "reduce_bucket_size": "auto",
                              "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto"},
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 2000,
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False}))
    return str(user)


def test_hf_style_json_with_auto_optimizer_and_scheduler_sections_works(tmp_path, tiny_llama_dir):
    """HF Trainer fills such sections from its arguments, as TuneForge's own AdamW and schedule take training.*:
    they are accepted (and left out of what DeepSpeed gets) when the schedule is the one training.scheduler runs."""
    user = hf_style_json(tmp_path)
    t = training(tmp_path, tiny_llama_dir, "training.scheduler=constant", "training.batch_size=2")
    c = dz.load_user_config(user, t, world_size=2, hidden_size=64)
    assert "optimizer" not in c and "scheduler" not in c
    assert c["train_batch_size"] == 4 and c["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    linear = training(tmp_path, tiny_llama_dir, "training.scheduler=linear", "training.lr=2e-5")
    assert "scheduler" not in dz.load_user_config(hf_style_json(tmp_path, "WarmupDecayLR"), linear, 1, 64)


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON \\(line 1"),
    (json.dumps({"train_micro_batch_size_per_gpu": 7, "zero_optimization": {"stage": 2}}),
     "train_micro_batch_size_per_gpu to 7, but this run has \\d+ \\(training.batch_size\\)"),
    (json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}), "training.precision"),
    (json.dumps({"optimizer": {"type": "Lamb"}, "zero_optimization": {"stage": 2}}),
     "has an `optimizer` section that TuneForge cannot run \\(type 'Lamb'"),
    (json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 5e-5}}, "zero_optimization": {"stage": 2}}),
     "optimizer.params.lr to 5e-05, but this run has 0.001 \\(training.lr\\)"),
    (json.dumps({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}}),
     "scheduler of type WarmupLR \\(constant after warmup\\), but training.scheduler is cosine. Set "
     "`training.scheduler=constant`"),
    (json.dumps({"zero_optimization": {"stage": 2, "sub_group_size": "auto"}}),
     "zero_optimization.sub_group_size to \"auto\""),
    (json.dumps({"zero_optimization": {"stage": 5}}), "stage 5"),
])
def test_bad_user_json_is_a_clear_error(tmp_path, tiny_llama_dir, content, match):
    user = tmp_path / "ds.json"
    user.write_text(content)
    t = training(tmp_path, tiny_llama_dir, f"training.deepspeed={user}")
    with pytest.raises(UserError, match=match) as e:
        dz.load_user_config(str(user), t, world_size=1, hidden_size=64)
    assert str(user) in str(e.value)


@pytest.mark.parametrize("overrides, match", [
    (["training.deepspeed=4"], "a ZeRO stage, 2 or 3"),
    (["training.deepspeed=0"], "a ZeRO stage, 2 or 3"),
    (["training.deepspeed=missing.json"], "no such DeepSpeed config file"),
    (["training.deepspeed=2", "training.deepspeed_offload=all"], "only ZeRO-3 shards"),
    (["stage=grpo"], "Stage grpo samples"),
])
def test_impossible_deepspeed_settings_are_refused_up_front(tmp_path, tiny_llama_dir, overrides, match):
    with pytest.raises(ConfigError, match=match):
        config(tiny_llama_dir, tmp_path / "out", *DS, *overrides)


def test_deepspeed_keys_without_the_engine_are_refused(tmp_path, tiny_llama_dir):
    with pytest.raises(ConfigError, match="apply with `training.distributed: deepspeed`"):
        config(tiny_llama_dir, tmp_path / "out", "training.deepspeed=3")


def test_resume_refuses_another_zero_setting(tmp_path, tiny_llama_dir):
    """ZeRO-2 optimizer shards cannot load into a ZeRO-3 engine: the run fingerprint names the setting."""
    from tuneforge.training.checkpoint import fingerprint_differences, run_fingerprint

    cfg = config(tiny_llama_dir, tmp_path / "out", *DS, "training.deepspeed=3")
    written = run_fingerprint(cfg, 2, None)
    cfg.training.deepspeed = 2
    assert fingerprint_differences(written, run_fingerprint(cfg, 2, None)) == [
        "training.deepspeed: 3 in the checkpoint, 2 now"]
    assert "training.deepspeed" not in run_fingerprint(config(tiny_llama_dir, tmp_path / "out"), 2, None)

def test_resume_with_another_process_count_is_refused(tmp_path, tiny_llama_dir, monkeypatch):
    """ZeRO's optimizer shards are cut per process: a checkpoint of 2 processes names the count to resume with."""
    checkpoint = tmp_path / "checkpoint-2"
    (checkpoint / "deepspeed").mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"world_size": 2}))
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 1)
    strategy = dz.DeepSpeedStrategy(config(tiny_llama_dir, tmp_path / "out", *DS))
    with pytest.raises(UserError, match="written by 2 DeepSpeed processes.*--nproc-per-node 2"):
        strategy.load_shards(checkpoint, model=None, optimizer=None)

def test_user_json_is_checked_before_the_model_loads(tmp_path, tiny_llama_dir, monkeypatch):
    from tuneforge.training.distributed import check_deepspeed
    from tuneforge.training.runtime import Runtime

    monkeypatch.setattr(dz, "import_deepspeed", lambda device: None)  # installed or not, the file is read first
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"gradient_accumulation_steps": 5, "zero_optimization": {"stage": 3}}))
    cfg = config(tiny_llama_dir, tmp_path / "out", *DS, f"training.deepspeed={user}", "training.grad_accum=2")
    with pytest.raises(UserError, match="gradient_accumulation_steps to 5, but this run has 2"):
        check_deepspeed(cfg, Runtime(device=torch.device("cpu"), dtype=torch.float32))

def test_a_scheduler_without_warmup_type_is_said_to_warm_up_linearly(tmp_path, tiny_llama_dir, monkeypatch):
    """DeepSpeed's WarmupLR defaults to a log-shaped warmup; TuneForge runs its linear one: said when there is one."""
    from tuneforge.training.distributed import check_deepspeed
    from tuneforge.training.runtime import Runtime

    monkeypatch.setattr(dz, "import_deepspeed", lambda device: None)
    runtime = Runtime(device=torch.device("cpu"), dtype=torch.float32)
    user = hf_style_json(tmp_path)  # WarmupLR, every value "auto", no warmup_type (Hugging Face's example files)
    warm = config(tiny_llama_dir, tmp_path / "out", *DS, f"training.deepspeed={user}", "training.scheduler=constant",
                  "training.warmup_steps=3")
    notes = check_deepspeed(warm, runtime)
    assert len(notes) == 1 and "no warmup_type" in notes[0] and "linear warmup" in notes[0]
    cold = config(tiny_llama_dir, tmp_path / "out", *DS, f"training.deepspeed={user}", "training.scheduler=constant",
                  "training.warmup_steps=0", "training.warmup_ratio=0")
    assert check_deepspeed(cold, runtime) == []  # no warmup: nothing differs


def test_missing_deepspeed_package_is_a_clear_error(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # what `import deepspeed` sees when it is not installed
    with pytest.raises(UserError, match=r"needs the DeepSpeed package.*pip install 'tuneforge\[deepspeed\]'"):
        train(tiny_llama_dir, tmp_path / "out", *COMMON, *DS)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_deprecation_warnings_of_deepspeeds_torch_calls_are_not_shown(monkeypatch):
    """Every rank printed torch's FutureWarning about the collectives DeepSpeed's ZeRO calls: noise the user cannot
    act on. Other FutureWarnings still show."""
    import warnings

    monkeypatch.setitem(sys.modules, "deepspeed", object())  # the filter goes on whether DeepSpeed imports or not
    with warnings.catch_warnings(record=True) as seen:
        dz.import_deepspeed(torch.device("cpu"))
        for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
            warnings.warn(f"`torch.distributed.{name}` is deprecated. Please use `torch.distributed.x` instead.",
                          FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]


@pytest.mark.gpu
@needs_deepspeed
def test_zero3_bf16_on_cuda_follows_the_plain_loop(tiny_llama_dir, tmp_path):
    """On a GPU: DeepSpeed's own bf16 mode (bf16 weights, fp32 master copy in the optimizer) over NCCL, one process,
    against the plain loop's bf16 autocast: the same curve up to bf16 rounding; the export holds fp32 masters."""
    gpu = ["training.device=cuda", "training.precision=bf16", "method=full", "training.batch_size=4"]
    one, zero = tmp_path / "one", tmp_path / "zero3"
    launch(tmp_path, tiny_llama_dir, one, *gpu)
    launch(tmp_path, tiny_llama_dir, zero, *gpu, *DS, "training.deepspeed=3")
    assert losses(one) == pytest.approx(losses(zero), abs=0.05) and len(losses(zero)) == 4
    b = load_file(str(zero / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in b.values())
    assert max_diff(load_file(str(one / "model.safetensors")), b) < 0.05


def test_estimate_offload_moves_the_optimizer_side_to_cpu():
    """`tuneforge estimate --offload` mirrors training.deepspeed_offload: full fine-tune of a 7B under ZeRO-3 over
    8 GPUs keeps (4 + 8) bytes x N / 8 of master weights + AdamW states in CPU memory (all: + 2 x N / 8 weights)."""
    from tuneforge.estimate.memory import EstimateArgs, estimate

    def full(**kw):
        return estimate(EstimateArgs(model="llama-7b", methods="full", gpus=8, distributed="zero3", **kw))

    base, opt, every = full(), full(offload="optimizer"), full(offload="all")
    n = base.columns[0].trainable_params
    assert opt.columns[0].master_weights == opt.columns[0].optimizer_states == 0.0
    assert base.columns[0].total - opt.columns[0].total == pytest.approx(12 * n / 8)
    assert opt.columns[0].weights == base.columns[0].weights and every.columns[0].weights == 0.0
    assert any(f"{14 * n / 8 / 1e9:.3g} GB per GPU process in CPU memory" in note for note in every.notes)
    with pytest.raises(UserError, match="needs ZeRO-3"):
        estimate(EstimateArgs(model="llama-7b", methods="full", gpus=8, distributed="zero2", offload="all"))
