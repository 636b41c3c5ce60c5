"""bench/bench_vs_trl.py cannot rot: its workers train 2 steps of each algorithm on the tiny preset with both
toolkits, and its sanity check (same pairs, same moved policy) finds the same DPO loss in TuneForge and TRL."""

from __future__ import annotations

import math

import pytest

from tests.bench.scripts import load_script

pytest.importorskip("trl")

@pytest.fixture(scope="module")
def bench():
    return load_script("bench_vs_trl")


def job(model_dir, framework: str, algo: str) -> dict:
    return {"framework": framework, "model": "tiny", "method": "lora", "algo": algo, "model_dir": str(model_dir),
            "steps": 2, "warmup": 1, "batch": 2, "max_length": 128, "lr": 1e-4,
            "beta": 0.1 if algo == "dpo" else 0.04, "G": 2, "max_new_tokens": 4}


@pytest.mark.parametrize("algo", ["dpo", "grpo"])
def test_both_toolkits_train_and_count_tokens(bench, tiny_qwen2_dir, tmp_path, algo):
    import tuneforge.training.loop as loop
    from tuneforge.training.rl import RLTrainer

    before = (loop.Trainer.train_step, RLTrainer.train_step)
    for framework in ("tuneforge", "trl"):
        run = bench.run_tuneforge if framework == "tuneforge" else bench.run_trl
        found = bench.summarise(run(job(tiny_qwen2_dir, framework, algo), str(tmp_path / framework)), warmup=1)
        assert found["n_steps"] == 2 and found["tok_s"] > 0
        # DPO: 2 pairs = 4 rows of prompt + reply; GRPO: 2 prompts x 2 completions of at most 4 tokens
        assert found["tokens_step"] > (4 * 8 if algo == "dpo" else 4 * 5)
        if algo == "dpo":  # the policy starts as its reference: every pair's loss is log 2
            assert found["first_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (loop.Trainer.train_step, RLTrainer.train_step) == before  # the timing hooks are taken off again


def test_dpo_loss_matches_trl_on_the_same_pairs(bench, tiny_qwen2_dir):
    found = bench.check_dpo(job(tiny_qwen2_dir, "tuneforge", "dpo"))
    assert found["same_token_ids"]  # both render the pairs with the chat template to the same ids
    assert abs(found["tuneforge"] - math.log(2)) > 1e-3  # the policy was moved: more than the trivial log 2
    assert found["tuneforge"] == pytest.approx(found["trl"], abs=1e-5)
