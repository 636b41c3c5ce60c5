"""KTO under torchrun: the mismatched rows of its KL reference point pair row i with row i + 1 of the global
micro-batch, so 2 processes x batch 2 train as 1 process x batch 4 (README, Multi-process training). Collated per
process, the pairs stayed within each process's share and the loss drifted (0.0099 by step 4) once z0 rose above 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_training import ROOT, losses, one_process_and_two
from tuneforge.data.collate import collate_kto, collate_kto_padding_free
from tuneforge.data.types import IGNORE_INDEX, EncodedKTO
from tuneforge.training.metrics import read_metrics

PAIRS = ROOT / "tuneforge" / "assets" / "example_prefs" / "train.jsonl"


def kto_item(prompt: list[int], reply: list[int]) -> EncodedKTO:
    return EncodedKTO(prompt + reply, [IGNORE_INDEX] * len(prompt) + reply, label=True, prompt_length=len(prompt))


@pytest.mark.parametrize("collate", [collate_kto, collate_kto_padding_free])
def test_each_rank_keeps_its_rows_of_the_global_batch_and_their_mismatched_rows(collate):
    """Rank 1 of 2 (batch 2) from a global batch of 4: its rows 2 and 3, and row 3's mismatched row takes row 0's
    reply (the next row of the global batch), as one process with batch 4 builds it."""
    from tuneforge.recipes.kto import own_rows

    items = [kto_item([10 + i, 20 + i], [30 + i] * (i + 1)) for i in range(4)]
    mine = own_rows(collate(items, 0), 2, 2, 4)
    expected = collate(items, 0)
    if "sequence_ids" in mine:
        assert mine["sequence_ids"].tolist() == [[0] * 5 + [1] * 6 + [2] * 6 + [3] * 3]
        # rows 2 and 3, then prompt 2 + reply 3 and prompt 3 + reply 0 (row 0: the next row of the global batch)
        assert mine["input_ids"].tolist() == [[12, 22, 32, 32, 32, 13, 23, 33, 33, 33, 33,
                                               12, 22, 33, 33, 33, 33, 13, 23, 30]]
        assert mine["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1, 2]]
    else:
        assert all(torch.equal(mine[k], expected[k][2:4]) for k in expected)
        assert mine["kl_input_ids"][1].tolist()[:3] == [13, 23, 30]
    assert mine["kto_label"].tolist() == [True, True]


def desirable_rows(path: Path, n: int = 200) -> Path:
    """KTO rows whose replies are all desirable and alike (short answers): training raises the mismatched replies'
    log-probs too, so the KL point z0 is above 0 from step 2 (with the pairs' own data it stays clamped at 0)."""
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()[:n]]
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"], "label": True}) + "\n"
                            for r in rows))
    return path


@pytest.mark.parametrize("padding_free", ["auto", pytest.param("never", marks=pytest.mark.slow)])
def test_kto_two_processes_match_one_with_the_kl_point_above_zero(tiny_qwen2_dir, tmp_path, padding_free):
    common = [str(ROOT / "examples" / "kto_tiny.yaml"), f"model.name_or_path={tiny_qwen2_dir}",
              f"data.train=[{desirable_rows(tmp_path / 'kto.jsonl')}]", "data.eval=[]", "training.max_steps=5",
              "training.lr=2e-2", "training.progress_bar=false", "training.plot_loss=false", "training.eval_steps=0",
              "training.save_steps=0", "training.device=cpu", "training.precision=fp32",
              f"training.padding_free={padding_free}"]
    one_process_and_two(tmp_path, common, "two")
    assert max(r["kl"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if "kl" in r) > 0.1
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), abs=1e-5)
    kl = [[r["kl"] for r in read_metrics(tmp_path / run / "metrics.jsonl") if "kl" in r] for run in ("one", "two")]
    assert kl[0] == pytest.approx(kl[1], abs=1e-4)
