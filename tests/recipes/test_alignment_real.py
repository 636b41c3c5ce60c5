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


def test_rm_heldout_pairwise_accuracy(tmp_path):
    """Measured 2026-11-30 (2 CPU cores, ~6 min): 60 steps (0.8 epoch) gave 0.867 held-out accuracy (train
    accuracy still rising, 0.89 at step 60), short of the 0.9 goal; 150 steps (2 epochs) has not been run yet."""
    from tuneforge.models.loading import load_model_and_tokenizer
    from tuneforge.models.reward import load_reward_model

    rows = heldout()
    out = tmp_path / "rm"
    run("rm", out, "training.max_steps=150", "training.lr=2e-4", "training.warmup_steps=5")
    scorer = load_reward_model(out)
    _, tokenizer = load_model_and_tokenizer(load_train_config(None, [], base={"data": {"train": ["x"]}}).model)

    def texts(key):
        return [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]},
                                               {"role": "assistant", "content": r[key]}], tokenize=False)
                for r in rows]

    accuracy = float((scorer.score(texts("chosen")) > scorer.score(texts("rejected"))).float().mean())
    print(f"rm held-out pairwise accuracy after 150 steps: {accuracy:.3f} on {len(rows)} pairs")
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


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_preference_training_raises_exact_match(stage, tmp_path):
    from peft import PeftModel

    from tuneforge.models.loading import load_model_and_tokenizer

    rows = heldout()
    base_cfg = load_train_config(None, [], base={"data": {"train": ["x"]}}).model
    base, tokenizer = load_model_and_tokenizer(base_cfg)
    before = _exact_match(base, tokenizer, rows)
    out = tmp_path / stage
    run(stage, out, "training.max_steps=60", "training.lr=2e-4", "training.warmup_steps=5",
        f"{stage}.beta=0.1")
    tuned = PeftModel.from_pretrained(base, str(out))
    after = _exact_match(tuned, tokenizer, rows)
    implicit = _implicit_reward_accuracy(tuned, tokenizer, rows)
    print(f"{stage}: held-out exact match {before:.3f} -> {after:.3f}; implicit-reward accuracy {implicit:.3f}")
    assert after >= before + 0.1 and implicit >= 0.9
