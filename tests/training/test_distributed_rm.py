"""Stage rm under `training.distributed=fsdp`: its end-of-run pairwise accuracy and its reward-model folder ran on
rank 0 alone with the sharded model, so the accuracy's forward met rank 1 in another collective (gloo aborted:
"Received data size doesn't match expected size") and, without an eval set, the folder writer got weight shards
(safetensors: "invalid python storage"). Now every rank runs the accuracy and the model is gathered first."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from tests.test_training import ROOT, one_process_and_two
from tuneforge.training.metrics import read_metrics


def test_fsdp_reward_model_reports_accuracy_and_writes_the_folder_of_one_process(tiny_qwen2_dir, tmp_path):
    common = [str(ROOT / "examples" / "rm_tiny.yaml"), f"model.name_or_path={tiny_qwen2_dir}", "training.max_steps=2",
              "training.progress_bar=false", "training.plot_loss=false", "training.eval_steps=0",
              "training.save_steps=0", "training.device=cpu", "training.precision=fp32"]
    one_process_and_two(tmp_path, common, "fsdp", "training.distributed=fsdp")
    accuracy = [[r["eval_pairwise_accuracy"] for r in read_metrics(tmp_path / run / "metrics.jsonl")
                 if "eval_pairwise_accuracy" in r] for run in ("one", "fsdp")]
    assert len(accuracy[1]) == 1 and accuracy[0] == accuracy[1]
    a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("one", "fsdp"))
    assert sorted(a) == sorted(b) and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    adapter = load_file(str(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "fsdp", num_labels=1)
    assert torch.equal(model.state_dict()["score.weight"], b["score.weight"])
