"""fp16 training runs with dynamic loss scaling (training/distributed.py `Strategy.scaler`, torch's GradScaler).
Without it, gradients under fp16's smallest value (~6e-8) flush to zero in the backward and the run learns less or
nothing without a word. Config refuses fp16 on CPU, but CPU autocast computes fp16 too, so the mechanics are tested
here: the scaler is built for fp16, keeps tiny gradients, skips an overflowing step, and its scale is checkpointed."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.configs.schema import load_train_config
from tuneforge.errors import ConfigError, UserError
from tuneforge.train import run_config
from tuneforge.training.distributed import build_strategy
from tuneforge.training.loop import Trainer
from tuneforge.training.metrics import read_metrics
from tuneforge.training.runtime import Runtime


def strategy(dtype: torch.dtype):
    cfg = load_train_config(None, [], base={"data": {"train": ["unused.jsonl"]}})
    return build_strategy(cfg, Runtime(device=torch.device("cpu"), dtype=dtype))


def fp16_step(strategy, loss_factor: float):
    """One step of a linear layer computed in fp16 (autocast), its loss times `loss_factor`: (weight change,
    gradient norm the step reported, the same gradient computed in fp32)."""
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(8, 8), torch.randn(4, 8)
    before = layer.weight.detach().clone()
    weight = before.clone().requires_grad_()
    reference = torch.autograd.grad((torch.nn.functional.linear(x, weight, layer.bias) * loss_factor).sum(),
                                    weight)[0]
    optimizer = torch.optim.SGD(layer.parameters(), lr=1e6)  # large: the tiny update must clear fp32 rounding
    with torch.autocast("cpu", dtype=torch.float16):
        out = layer(x)
    strategy.backward(layer, out.float().sum() * loss_factor)
    norm = strategy.step(layer, optimizer, max_norm=float("inf"))
    return layer.weight.detach() - before, norm, reference


def test_fp16_gets_a_loss_scaler_and_other_precisions_do_not():
    assert strategy(torch.float16).scaler is not None
    assert strategy(torch.bfloat16).scaler is None and strategy(torch.float32).scaler is None


def test_loss_scaling_keeps_the_gradients_fp16_would_flush_to_zero():
    change, _, reference = fp16_step(strategy(torch.float16), 1e-9)
    assert torch.allclose(change, -1e6 * reference, rtol=1e-2, atol=1e-6)  # the fp32 gradient, scaled back exactly
    unscaled, _, _ = fp16_step(strategy(torch.float32), 1e-9)  # the same fp16 compute without a scaler
    assert torch.count_nonzero(unscaled) == 0  # every gradient underflowed: the step learned nothing


def test_an_overflowing_fp16_step_is_skipped_and_the_scale_lowered():
    scaled = strategy(torch.float16)
    start = scaled.scaler.get_scale()
    change, norm, _ = fp16_step(scaled, 1e30)  # fp16 gradients overflow to inf
    assert not math.isfinite(norm) and torch.count_nonzero(change) == 0
    assert scaled.scaler.get_scale() == start / 2


def test_skipped_steps_are_said_and_twenty_in_a_row_stop_the_run():
    notes = []
    trainer = SimpleNamespace(strategy=strategy(torch.float16), fp16_skips=0, say=notes.append, step=4,
                              _diverged=lambda what, value: UserError(f"{what} is {value}"))
    for _ in range(19):
        Trainer._check_grad_norm(trainer, float("inf"))
    assert len(notes) == 19 and notes[0].startswith("note: step 5: fp16 gradients overflowed")
    Trainer._check_grad_norm(trainer, 1.0)  # a good step resets the count
    for _ in range(19):
        Trainer._check_grad_norm(trainer, float("inf"))
    with pytest.raises(UserError, match="gradient norm is inf"):
        Trainer._check_grad_norm(trainer, float("inf"))
    plain = SimpleNamespace(strategy=strategy(torch.float32), fp16_skips=0, say=notes.append, step=0,
                            _diverged=trainer._diverged)
    with pytest.raises(UserError):  # without loss scaling a non-finite norm is divergence at once
        Trainer._check_grad_norm(plain, float("inf"))


def test_an_fp16_run_logs_its_skips_checkpoints_its_scale_and_resumes_exactly(tiny_llama_dir, tmp_path,
                                                                              monkeypatch):
    """Config refuses fp16 on CPU, so the typed config is switched after the check: the loop itself runs fp16. The
    scale starts high enough to overflow (as 65536 does on real models), so the first steps are skipped and the
    scale a checkpoint holds is not the starting one: a resume that did not restore it would skip again."""
    from functools import partial

    from tests.test_training import TASK

    monkeypatch.setattr(torch.amp, "GradScaler", partial(torch.amp.GradScaler, init_scale=2.0 ** 20))

    def run(out, *overrides):
        cfg = load_train_config(None, [f"model.name_or_path={tiny_llama_dir}", f"output_dir={out}",
                                       f"data.train=[{TASK}]", "training.progress_bar=false",
                                       "training.plot_loss=false", "data.max_length=64", "training.max_steps=8",
                                       "training.save_steps=4", "training.lr=1e-2", *overrides],
                                base={"method": "lora"})
        cfg.training.precision = "fp16"
        return run_config(cfg, log=lambda _: None)

    run(tmp_path / "straight")
    rows = [r for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 8 and rows[0]["fp16_skipped"] == 1.0 and "grad_norm" not in rows[0]
    assert rows[-1]["fp16_skipped"] == 0.0 and math.isfinite(rows[-1]["grad_norm"])
    state = json.loads((tmp_path / "straight" / "checkpoint-4" / "trainer_state.json").read_text())
    assert 0 < state["grad_scaler"]["scale"] < 2.0 ** 20
    run(tmp_path / "resumed", "training.stop_after_steps=4")
    run(tmp_path / "resumed", "training.resume=auto")
    a = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fp16_under_fsdp_is_refused_naming_the_engines_that_scale():
    with pytest.raises(ConfigError) as err:
        load_train_config(None, ["training.precision=fp16", "training.distributed=fsdp", "training.device=cuda"],
                          base={"data": {"train": ["unused.jsonl"]}})
    assert "`training.precision: fp16` is not supported with `training.distributed: fsdp`" in str(err.value)
    assert "`training.distributed: ddp` or `deepspeed`" in str(err.value)
