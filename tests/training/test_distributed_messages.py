"""Under torchrun every process loads the same model: transformers' `Loading weights` bar showed once per process
(README: messages once, not once per process). Ranks other than 0 now turn the library progress bars off."""

from __future__ import annotations

import pytest
from transformers.utils import logging as hf_logging

from tuneforge.training.runtime import setup_runtime


@pytest.mark.parametrize("rank, shown", [("0", True), ("1", False)])
def test_progress_bars_show_on_rank_0_only(monkeypatch, rank, shown):
    monkeypatch.setenv("RANK", rank)  # WORLD_SIZE stays 1: no process group is started
    hf_logging.enable_progress_bar()
    try:
        runtime = setup_runtime("cpu", "fp32")
        assert runtime.rank == int(rank)
        assert hf_logging.is_progress_bar_enabled() is shown
    finally:  # quiet_progress_bars also turned the Hub's off, for the rest of the session
        hf_logging.enable_progress_bar()
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()


def test_fsdp_with_an_eval_suite_is_refused_instead_of_hanging(tiny_llama_dir, tmp_path):
    """The suite runs on rank 0 alone; with FSDP its forward waited for the other ranks' shards and torchrun hung at
    the first eval step (ZeRO-3 alike). Refused before the model loads; in one process FSDP holds every shard, so the
    suite works there."""
    import torch

    from tests.test_training import config
    from tuneforge.errors import UserError
    from tuneforge.training.distributed import check_eval_suite_unsharded
    from tuneforge.training.runtime import Runtime

    cfg = config(tiny_llama_dir, tmp_path / "out", "training.distributed=fsdp", "training.eval_steps=1",
                 "training.eval_suite={tasks: [mmlu], data_dir: eval, limit: 2}")
    two = Runtime(device=torch.device("cpu"), dtype=torch.float32, rank=0, world_size=2, engine="fsdp")
    with pytest.raises(UserError, match="training.eval_suite .*fsdp.* `training.distributed=ddp`"):
        check_eval_suite_unsharded(cfg.training, two)
    one = Runtime(device=torch.device("cpu"), dtype=torch.float32, engine="fsdp")
    check_eval_suite_unsharded(cfg.training, one)  # one process holds every shard
    zero = Runtime(device=torch.device("cpu"), dtype=torch.float32, rank=0, world_size=2, engine="deepspeed")
    ds_json = tmp_path / "ds.json"
    ds_json.write_text('{"zero_optimization": {"stage": 3}}', encoding="utf-8")
    for setting, hangs in ((3, True), (2, False), (str(ds_json), True)):
        cfg.training.deepspeed = setting
        if hangs:
            with pytest.raises(UserError, match="deepspeed with ZeRO-3"):
                check_eval_suite_unsharded(cfg.training, zero)
        else:
            check_eval_suite_unsharded(cfg.training, zero)
