"""A held-out set that does not split evenly over FSDP processes: rank 0 ran one eval batch more than rank 1, and
that forward waited for rank 1's weight shards for good (the run hung at its first evaluation). The short rank now
runs filler batches it does not count, so the eval loss is that of one process over the same rows."""

from __future__ import annotations

import json

import pytest

from tests.test_training import ROOT, one_process_and_two
from tuneforge.training.metrics import read_metrics


def _eval_losses(out) -> list[float]:
    return [r["eval_loss"] for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]


# rank 0: 2 batches of 2, rank 1: 1; one row: rank 1 holds none (the same code path: slow, opt-in)
@pytest.mark.parametrize("rows", [5, pytest.param(1, marks=pytest.mark.slow)])
def test_fsdp_evaluates_an_uneven_held_out_set_as_one_process(tiny_llama_dir, tmp_path, rows):
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text("".join(json.dumps({"instruction": f"What is {i} + {i}?", "output": f"{2 * i}"}) + "\n"
                                for i in range(rows)), encoding="utf-8")
    common = [str(ROOT / "examples" / "sft_lora_tiny.yaml"), f"model.name_or_path={tiny_llama_dir}",
              f"data.eval=[{held_out}]", "data.eval_ratio=0", "training.max_steps=2", "training.eval_steps=1",
              "training.save_steps=0", "training.progress_bar=false", "training.plot_loss=false",
              "training.device=cpu", "training.precision=fp32", "training.batch_size=2"]
    one_process_and_two(tmp_path, common, "fsdp", "training.distributed=fsdp")
    one, fsdp = _eval_losses(tmp_path / "one"), _eval_losses(tmp_path / "fsdp")
    assert len(one) == len(fsdp) >= 2 and fsdp == pytest.approx(one, abs=1e-5)
