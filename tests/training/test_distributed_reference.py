"""DPO and KTO with method=full under `training.distributed=fsdp`: their reference is a frozen copy of the starting
model, made by `copy.deepcopy`, which FSDP2 refuses ("FSDP does not support deepcopy": the run crashed before its
first step). Now a second model is built and sharded the same way; 2 processes x batch 2 train as 1 x 4."""

from __future__ import annotations

import math

import pytest

from tests.test_training import ROOT, losses, one_process_and_two


@pytest.mark.parametrize("example", ["dpo_tiny.yaml", pytest.param("kto_tiny.yaml", marks=pytest.mark.slow)])
def test_full_fine_tune_reference_under_fsdp_matches_one_process(tiny_qwen2_dir, tmp_path, example):
    common = [str(ROOT / "examples" / example), f"model.name_or_path={tiny_qwen2_dir}", "method=full",
              "training.max_steps=3", "data.eval=[]", "training.progress_bar=false", "training.plot_loss=false",
              "training.eval_steps=0", "training.save_steps=0", "training.device=cpu", "training.precision=fp32"]
    one_process_and_two(tmp_path, common, "fsdp", "training.distributed=fsdp")
    one, sharded = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    if example == "dpo_tiny.yaml":  # the reference is the starting policy: DPO's first loss is ln 2
        assert sharded[0] == pytest.approx(math.log(2), abs=1e-6)
    assert len(sharded) == 3 and one == pytest.approx(sharded, abs=1e-5)
    assert (tmp_path / "fsdp" / "model.safetensors").is_file()
