"""The alignment stages proven on the real model (builtin:smollm2-135m-instruct, CPU; slow, opt-in with -m slow).

Data: the bundled preference pairs (tuneforge/assets/example_prefs: chosen = the correct short answer, rejected = a
wrong or rambling one), held-out pairs use templates and values never seen in training. README ("Alignment") quotes
the numbers these tests measured.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tuneforge.configs.schema import load_train_config
from tuneforge.train import run_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PREFS = ROOT / "tuneforge" / "assets" / "example_prefs"
MODEL = "builtin:smollm2-135m-instruct"


def heldout(n: int = 60) -> list[dict]:
    return [json.loads(line) for line in (PREFS / "heldout.jsonl").read_text(encoding="utf-8").splitlines()[:n]]


def run(stage: str, out: Path, *overrides: str, log=print):
    cfg = load_train_config(str(ROOT / "examples" / f"{stage}_tiny.yaml"), [
        f"model.name_or_path={MODEL}", f"output_dir={out}", "data.eval=[]", "data.max_length=128",
        "training.progress_bar=false", "training.plot_loss=false", "training.save_steps=0", "training.eval_steps=0",
        "training.logging_steps=10", "lora.target_modules=[all-linear]", "lora.rank=16", "lora.alpha=32",
        *overrides])
    return run_config(cfg, log=log)


# bf16 autocast: this CPU multiplies bf16 natively, a quarter of the fp32 cost. Measured 2026-11-30: 60 steps at lr
# 4e-4 gave 0.900 at the end of training (bf16 eval) but the saved folder scores 0.883 on these 60 pairs (0.853 on
# all 150; arithmetic pairs are the weak family), so the proof now runs 2 epochs. Measured 2026-11-30 15:04 UTC on an
# idle machine (2 threads, 6 min): training-batch accuracy 0.94 at step 150, but the saved folder scores 0.850 on
# these held-out pairs, so this proof still FAILS; more data or a lower lr is the next thing to try.
RM_STEPS = ("training.max_steps=150", "training.lr=4e-4", "training.warmup_steps=5", "training.precision=bf16")


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> Path:
    """One rm run shared by the rm proof and the PPO proof that uses it as its reward."""
    out = tmp_path_factory.mktemp("rm")
    run("rm", out, *RM_STEPS)
    return out


def _rendered(tokenizer, rows, replies) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]},
                                           {"role": "assistant", "content": reply}], tokenize=False)
            for r, reply in zip(rows, replies)]


def test_rm_heldout_pairwise_accuracy(reward_model):
    """Measured numbers: README ("Alignment", on the real model) and bench/RESULTS.md."""
    from tuneforge.models.reward import load_reward_model

    rows = heldout()
    scorer = load_reward_model(reward_model)
    chosen = scorer.score(_rendered(scorer.tokenizer, rows, [r["chosen"] for r in rows]))
    rejected = scorer.score(_rendered(scorer.tokenizer, rows, [r["rejected"] for r in rows]))
    accuracy = float((chosen > rejected).float().mean())
    print(f"rm held-out pairwise accuracy: {accuracy:.3f} on {len(rows)} pairs")
    assert accuracy >= 0.9


def _exact_match(model, tokenizer, rows) -> float:
    from tuneforge.data.example_task import exact_match
    from tuneforge.inference import generate_replies

    replies = generate_replies(model, tokenizer, [[{"role": "user", "content": r["prompt"]}] for r in rows],
                               max_new_tokens=24)
    return sum(exact_match(reply, r["answer"]) for reply, r in zip(replies, rows)) / len(rows)


def _implicit_reward_accuracy(peft_model, tokenizer, rows) -> float:
    """Share of held-out pairs where log pi/ref of the chosen reply beats that of the rejected one."""
    from tuneforge.data.encode import encode_chat
    from tuneforge.data.types import IGNORE_INDEX
    from tuneforge.training.reference import Reference, response_logps

    reference, wins = Reference(peft_model), 0
    for r in rows:
        sides = [encode_chat(tokenizer, [{"role": "user", "content": r["prompt"]},
                                         {"role": "assistant", "content": r[k]}], loss_on="assistant")
                 for k in ("chosen", "rejected")]
        width = max(len(s.input_ids) for s in sides)
        ids = torch.tensor([s.input_ids + [0] * (width - len(s.input_ids)) for s in sides])
        mask = torch.tensor([[1] * len(s.input_ids) + [0] * (width - len(s.input_ids)) for s in sides])
        labels = torch.tensor([s.labels + [IGNORE_INDEX] * (width - len(s.labels)) for s in sides])
        with torch.no_grad():
            ratio = response_logps(peft_model, ids, mask, labels).sum - reference.logps(ids, mask, labels).sum
        wins += int(ratio[0] > ratio[1])
    return wins / len(rows)


# Measured 2026-11-30 for dpo (load 10-12, 44 min): exact match 0.017 -> 0.017 and implicit-reward accuracy 0.850, so
# both goals fail at these settings (the rejected replies' log-ratio fell, the chosen one barely rose). kto, 15:26 UTC
# on an idle machine (2 threads, 3.7 min): exact match 0.017 -> 0.183, implicit-reward accuracy 0.917: passes.
PREFERENCE_STEPS = ("training.max_steps=60", "training.lr=3e-4", "training.warmup_steps=5", "training.precision=bf16")


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_preference_training_raises_exact_match(stage, tmp_path):
    from peft import PeftModel

    from tuneforge.models.loading import load_model_and_tokenizer

    rows = heldout()
    base_cfg = load_train_config(None, [], base={"data": {"train": ["x"]}}).model
    base, tokenizer = load_model_and_tokenizer(base_cfg)
    before = _exact_match(base, tokenizer, rows)
    out = tmp_path / stage
    run(stage, out, *PREFERENCE_STEPS, f"{stage}.beta=0.1")
    tuned = PeftModel.from_pretrained(base, str(out))
    after = _exact_match(tuned, tokenizer, rows)
    implicit = _implicit_reward_accuracy(tuned, tokenizer, rows)
    print(f"{stage}: held-out exact match {before:.3f} -> {after:.3f}; implicit-reward accuracy {implicit:.3f}")
    assert after >= before + 0.1 and implicit >= 0.9


PROMPTS = ROOT / "tuneforge" / "assets" / "example_prompts"
# Measured 2026-11-30 15:41 UTC, idle machine, 2 threads (9.5 min with the rm): rm score -4.186 -> -3.363, exact
# match 0 -> 0, KL 19.6 at step 30; the +0.5 margin below holds with room.
PPO_STEPS = ("training.max_steps=30", "training.lr=2e-4", "training.precision=bf16")


def _mean_reward(scorer, model, tokenizer, rows) -> tuple[float, float]:
    """(mean reward-model score, exact-match share) of greedy replies to held-out prompts."""
    from tuneforge.data.example_task import exact_match
    from tuneforge.inference import generate_replies

    prompts = [r["messages"][:1] for r in rows]
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens=24, batch_size=16)
    texts = [tokenizer.apply_chat_template([*p, {"role": "assistant", "content": c}], tokenize=False)
             for p, c in zip(prompts, replies)]
    matches = sum(exact_match(c, r["answer"]) for c, r in zip(replies, rows))
    return float(scorer.score(texts).mean()), matches / len(rows)


def test_ppo_raises_the_reward_model_score_of_heldout_replies(reward_model, tmp_path, monkeypatch):
    """PPO on the example prompts (arithmetic and units) with the rm trained above as its reward; measured on 32
    held-out prompts (unseen templates and values), greedy replies scored by that same reward model."""
    from peft import PeftModel

    from tuneforge.models.loading import load_model_and_tokenizer
    from tuneforge.models.reward import load_reward_model

    monkeypatch.chdir(ROOT)
    rows = [json.loads(line) for line in (PROMPTS / "heldout.jsonl").read_text(encoding="utf-8").splitlines()][:32]
    scorer = load_reward_model(reward_model)
    base, tokenizer = load_model_and_tokenizer(load_train_config(None, [], base={"data": {"train": ["x"]}}).model)
    before = _mean_reward(scorer, base, tokenizer, rows)
    cfg = load_train_config(None, [
        "stage=ppo", "method=lora", f"model.name_or_path={MODEL}", f"output_dir={tmp_path}",
        f"data.train=[{PROMPTS / 'train.jsonl'}]", "data.max_length=96", "lora.rank=16", "lora.alpha=32",
        "lora.target_modules=[all-linear]", f"ppo.reward={{{reward_model}: 1.0}}", "ppo.max_new_tokens=24",
        "training.batch_size=8", "training.scheduler=constant", "training.progress_bar=false",
        "training.plot_loss=false", "training.save_steps=0", "training.logging_steps=5", *PPO_STEPS])
    run_config(cfg)
    after = _mean_reward(scorer, PeftModel.from_pretrained(base, str(tmp_path)), tokenizer, rows)
    print(f"ppo: held-out mean reward {before[0]:.3f} -> {after[0]:.3f} (exact match {before[1]:.3f} -> "
          f"{after[1]:.3f}) on {len(rows)} prompts")
    assert after[0] > before[0] + 0.5
