"""The alignment stages (rm, dpo, kto, coh) end to end on tiny models (CPU, fp32): they learn, resume exactly, agree
across reference strategies and process counts, and refuse bad input clearly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_training import one_process_and_two
from tuneforge.configs.schema import load_train_config
from tuneforge.errors import ConfigError, DataError, UserError
from tuneforge.train import run_config
from tuneforge.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
PREFS = ROOT / "tuneforge" / "assets" / "example_prefs" / "train.jsonl"
FAST = ["training.progress_bar=false", "training.plot_loss=false", "training.save_steps=0", "training.eval_steps=0",
        "training.warmup_steps=0", "training.scheduler=constant", "data.max_length=64", "data.eval=[]"]


def config(stage, model_dir, out, *overrides, rows=16):
    data = f"data.train=[{{path: {PREFS}, format: pairwise, max_samples: {rows}}}]"
    return load_train_config(str(ROOT / "examples" / f"{stage}_tiny.yaml"),
                             [f"model.name_or_path={model_dir}", f"output_dir={out}", data, *FAST, *overrides])


def train(stage, model_dir, out, *overrides, rows=16, log=None):
    return run_config(config(stage, model_dir, out, *overrides, rows=rows), log=log or (lambda _: None))


def metric(out, key="loss") -> list[float]:
    return [r[key] for r in read_metrics(Path(out) / "metrics.jsonl") if key in r]


# 16 pairs seen again and again (2 batches of 8), 12 steps. Measured on tiny-qwen2 (first data), mean of the first -> last 3
# losses: rm lora 0.41 -> 0.18 (accuracy 0.92), full 0.59 -> 0.13; dpo lora 0.62 -> 0.38 (accuracy 0.875), full
# 0.57 -> 0.25; kto lora 0.50 -> 0.42, full 0.50 -> 0.37; coh lora 7.10 -> 6.53, full 7.03 -> 5.93
# rm with LoRA at 1e-2 oscillated on the rebuilt data (0.45 -> 0.60): 5e-3 gives 0.46 -> 0.20.
LEARNS = {"lora": ["training.lr=1e-2", "lora.target_modules=[all-linear]"], "full": ["training.lr=1e-3"]}
STAGE_LR = {("rm", "lora"): "training.lr=5e-3"}


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("stage", ["rm", "dpo", "kto", "coh"])
def test_stage_learns(stage, method, tiny_qwen2_dir, tmp_path):
    out, logs = tmp_path / "run", []
    train(stage, tiny_qwen2_dir, out, f"method={method}", "training.max_steps=12", *LEARNS[method],
          *[STAGE_LR[stage, method]] if (stage, method) in STAGE_LR else [], log=logs.append)
    curve = metric(out)
    done = [line for line in logs if line.startswith("done:")]  # every stage ends as sft does: with its loss
    said = re.match(r"done: 12 steps, final loss ([-\d.e]+)[,;]", done[0]) if done else None
    assert said and float(said.group(1)) == pytest.approx(curve[-1], rel=1e-3), done
    assert len(curve) == 12 and sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.02, curve
    if stage in ("rm", "dpo"):
        key = "accuracy" if stage == "rm" else "rewards/accuracies"
        assert sum(metric(out, key)[-3:]) / 3 >= 0.75, metric(out, key)
    adapter = (out / "adapter_config.json").is_file() or (out / "adapter" / "adapter_config.json").is_file()
    assert adapter == (method == "lora")
    described = [line for line in logs if line.startswith(f"method {method}: ")]  # what is trained, said once
    assert len(described) == 1 and " trainable of " in described[0], described


@pytest.mark.parametrize("stage,extra", [("rm", []), ("dpo", ["dpo.precompute_reference=true"]),
                                         ("dpo", ["method=full"]), ("kto", []), ("coh", [])],
                         ids=["rm", "dpo-precomputed", "dpo-full-live", "kto", "coh"])
def test_resume_is_bit_identical(stage, extra, tiny_qwen2_dir, tmp_path):
    common = ["training.max_steps=4", "training.lr=5e-3", *extra]
    train(stage, tiny_qwen2_dir, tmp_path / "straight", *common)
    first = train(stage, tiny_qwen2_dir, tmp_path / "resumed", *common, "training.stop_after_steps=2")
    assert not first.finished
    train(stage, tiny_qwen2_dir, tmp_path / "resumed", *common, "training.resume=auto")
    assert metric(tmp_path / "straight") == metric(tmp_path / "resumed")
    weights = "model.safetensors" if stage == "rm" or "method=full" in extra else "adapter_model.safetensors"
    a, b = (load_file(str(tmp_path / run / weights)) for run in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)



@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_a_prompt_method_starts_dpo_at_ln2_live_or_precomputed(method, tiny_qwen2_dir, tmp_path):
    """The reference is the policy training starts from: with a prompt method that is the model with its initial
    virtual tokens (switching the adapter off, as for LoRA, dropped them: the first loss was 0.68 or 0.73)."""
    import math

    for extra in ([], ["dpo.precompute_reference=true"]):
        out = tmp_path / f"{method}{len(extra)}"
        train("dpo", tiny_qwen2_dir, out, f"method={method}", "training.max_steps=2", "training.lr=5e-2", *extra)
        loss = metric(out)
        assert loss[0] == pytest.approx(math.log(2), abs=1e-6) and loss[1] != loss[0], (extra, loss)

def test_dpo_logs_its_reward_metrics_on_the_held_out_pairs(tiny_qwen2_dir, tmp_path):
    """Like TRL's eval_rewards/*: the stage's own metrics over the held-out set, at each eval and at the end."""
    heldout = PREFS.with_name("heldout.jsonl")
    out = tmp_path / "run"
    train("dpo", tiny_qwen2_dir, out, "training.max_steps=4", "training.eval_steps=2", "training.lr=5e-3",
          f"data.eval=[{{path: {heldout}, format: pairwise, max_samples: 8}}]")
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert r["eval_rewards/accuracies"] * 8 == pytest.approx(round(r["eval_rewards/accuracies"] * 8))
        assert r["eval_rewards/margins"] == pytest.approx(r["eval_rewards/chosen"] - r["eval_rewards/rejected"],
                                                          abs=1e-6)
    assert rows[-1]["eval_rewards/margins"] != rows[0]["eval_rewards/margins"]  # measured again, not carried

def test_resuming_with_another_objective_is_said(tiny_qwen2_dir, tmp_path):
    """Changing dpo.loss or beta between a stop and its resume is allowed, but metrics.jsonl then mixes two losses
    and the config records only the new one: the run says so, naming each change; an unchanged resume says nothing."""
    common = ["training.max_steps=3", "training.stop_after_steps=1"]
    train("dpo", tiny_qwen2_dir, tmp_path / "run", *common)
    same, other = [], []
    train("dpo", tiny_qwen2_dir, tmp_path / "run", *common, "training.resume=auto", log=same.append)
    train("dpo", tiny_qwen2_dir, tmp_path / "run", "training.max_steps=3", "training.resume=auto", "dpo.loss=ipo",
          "dpo.beta=0.5", log=other.append)
    assert not [line for line in same if "another objective" in line]
    note = [line for line in other if "another objective" in line]
    assert len(note) == 1 and "dpo.loss sigmoid -> ipo, dpo.beta 0.1 -> 0.5" in note[0] and "steps 1-2" in note[0]

@pytest.mark.parametrize("method", ["lora", "full"])
def test_live_and_precomputed_reference_give_the_same_loss_and_gradients(method, tiny_qwen2_dir, tmp_path):
    common = [f"method={method}", "training.max_steps=3", "training.lr=5e-3", "training.batch_size=4"]
    train("dpo", tiny_qwen2_dir, tmp_path / "live", *common)
    train("dpo", tiny_qwen2_dir, tmp_path / "pre", *common, "dpo.precompute_reference=true")
    for key in ("loss", "grad_norm", "rewards/margins"):
        assert metric(tmp_path / "live", key) == pytest.approx(metric(tmp_path / "pre", key), rel=1e-4, abs=1e-6)
    assert metric(tmp_path / "live", "rewards/margins")[-1] != 0  # the policy moved: the test compares something
    # the MFU counts the live reference's forward pass (2N + 4LdS per token) and not the precomputed one
    live, pre = ([r["model_tflops"] / r["tokens_per_s"] for r in read_metrics(tmp_path / run / "metrics.jsonl")
                  if "mfu" in r][-1] for run in ("live", "pre"))
    assert live > pre * 1.2


def _lora_model(model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def test_lora_reference_is_the_untouched_base_model(tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM

    from tuneforge.training.reference import Reference, response_logps

    ids = torch.randint(3, 1000, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :5] = -100
    peft_model = _lora_model(tiny_qwen2_dir)  # random B: the adapters change the outputs
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        want = response_logps(base, batch).sum
        policy = response_logps(peft_model, batch).sum
    got = Reference(peft_model).logps(batch).sum
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(policy, want, atol=1e-3)
    assert Reference(peft_model).copy is None  # no second copy of the model is held


@pytest.mark.parametrize("noise", ["dropout", "neftune"])
def test_a_live_reference_is_the_base_model_in_eval_mode(noise, tiny_qwen2_dir):
    """With adapters the reference is the policy itself, which is in training mode: its pass got the model's dropout
    and NEFTune's noise, so it changed from call to call and was not the precomputed reference (eval mode)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.training.reference import Reference, response_logps
    from tuneforge.tricks import neftune_hook

    noisy = {"attention_dropout": 0.5, "attn_implementation": "eager"} if noise == "dropout" else {}
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, **noisy),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    if noise == "neftune":
        neftune_hook(model, alpha=15.0)
    ids = torch.randint(3, 1000, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        want = response_logps(model, batch).sum
    model.train()
    reference = Reference(model)
    for _ in range(2):
        assert torch.allclose(reference.logps(batch).sum, want, atol=1e-5)
    assert all(m.training for m in model.modules())  # the policy goes on training in training mode


def test_full_reference_is_a_frozen_copy_of_the_start(tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM

    from tuneforge.training.reference import Reference

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir)
    reference = Reference(model)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # training moves the policy ...
    assert not torch.equal(next(reference.module.parameters()), next(model.parameters()))  # ... not the reference
    assert not any(p.requires_grad for p in reference.module.parameters())


def _texts(tokenizer, n=5):
    rows = [json.loads(line) for line in PREFS.read_text(encoding="utf-8").splitlines()[:n]]
    return [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]},
                                           {"role": "assistant", "content": r["chosen"]}], tokenize=False)
            for r in rows]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_reward_folder_loads_in_transformers_with_the_same_scores(method, tiny_llama_dir, tmp_path):
    """tiny-llama ends each turn with <|eot_id|>, and here pads with it too (as many Llama 3 fine-tunes do): the
    score is read at that last <|eot_id|>, and the folder's pad token is another one, so transformers' own pooling
    (last token that is not pad) agrees, padded batch or one text at a time."""
    import shutil

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tuneforge.models.reward import load_reward_model

    model_dir = tmp_path / "base"
    shutil.copytree(tiny_llama_dir, model_dir)
    base_tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base_tokenizer.pad_token = base_tokenizer.eos_token
    base_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "rm"
    heldout = PREFS.with_name("heldout.jsonl")
    train("rm", model_dir, out, f"method={method}", "training.max_steps=3", "training.lr=5e-3",
          f"data.eval=[{{path: {heldout}, format: pairwise, max_samples: 8}}]")
    hf = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    texts = _texts(tokenizer)
    scorer = load_reward_model(out, batch_size=8)
    batched = scorer.score(texts)
    one_by_one = torch.cat([scorer.score([t]) for t in texts])
    enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        hf_batched = hf(**enc).logits.squeeze(-1)
        hf_single = torch.cat([hf(**tokenizer(t, add_special_tokens=False, return_tensors="pt")).logits[:, 0]
                               for t in texts])
    assert enc["attention_mask"].min() == 0  # the batch really is padded
    assert tokenizer.pad_token != "<|eot_id|>" and all(t.endswith("<|eot_id|>") for t in texts)
    for other in (one_by_one, hf_batched, hf_single):
        assert torch.allclose(batched, other, atol=1e-5), (batched, other)
    assert batched.std() > 0
    assert (out / "adapter" / "adapter_config.json").is_file() == (method == "lora")
    card = (out / "README.md").read_text(encoding="utf-8")  # a reward model is scored, never chatted with
    assert "load_reward_model" in card and "AutoModelForSequenceClassification" in card and "tuneforge chat" not in card
    accuracy = metric(out, "eval_pairwise_accuracy")  # measured after the loop on the held-out pairs
    assert len(accuracy) == 1 and accuracy[0] * 8 == round(accuracy[0] * 8)  # a share of 8 pairs
    assert f"| eval pairwise accuracy | {accuracy[0]:.4g} " in card


def test_reward_model_folder_of_the_wrong_kind_is_refused(tiny_qwen2_dir, tmp_path):
    from tuneforge.models.reward import load_reward_model

    with pytest.raises(UserError, match=r"not a reward model: it holds a Qwen2ForCausalLM"):
        load_reward_model(tiny_qwen2_dir)
    out = tmp_path / "rm"
    train("rm", tiny_qwen2_dir, out, "training.max_steps=1")
    with pytest.raises(UserError, match=f"adapter that `stage: rm` keeps beside .* folder {out} instead"):
        load_reward_model(out / "adapter")
    assert load_reward_model(out).score_ids([[5, 6, 7]]).shape == (1,)


def test_prompt_without_room_for_the_reply_is_a_counted_skip(tiny_qwen2_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"What is {i} + 1?", "chosen": str(i + 1), "rejected": str(i)} for i in range(8)]
    rows.append({"prompt": "Tell me " + "very " * 80 + "much.", "chosen": "ok", "rejected": "no"})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    lines = []
    train("dpo", tiny_qwen2_dir, tmp_path / "out", f"data.train=[{{path: {data}, format: pairwise}}]",
          "training.max_steps=1", log=lines.append)
    said = "\n".join(lines)
    assert "8 training" in said and "no room" in said and "line 9" in said, said
    with pytest.raises(DataError, match="no room|No training"):
        train("dpo", tiny_qwen2_dir, tmp_path / "out2", f"data.train=[{{path: {data}, format: pairwise}}]",
              "training.max_steps=1", "data.max_length=8")


def test_stage_options_are_checked(tiny_qwen2_dir, tmp_path):
    with pytest.raises(ConfigError, match="at least 2"):
        config("kto", tiny_qwen2_dir, tmp_path, "training.batch_size=1")
    with pytest.raises(ConfigError, match="uses no reference"):
        config("dpo", tiny_qwen2_dir, tmp_path, "dpo.loss=simpo", "dpo.precompute_reference=true")
    with pytest.raises(ConfigError, match="cannot be merged"):
        config("rm", tiny_qwen2_dir, tmp_path, "method=prompt_tuning")
    with pytest.raises(ConfigError, match="dpo.loss"):
        config("dpo", tiny_qwen2_dir, tmp_path, "dpo.loss=sigmod")


@pytest.mark.parametrize("loss", ["ipo", "hinge", "robust", "simpo", "orpo"])
def test_every_dpo_loss_trains(loss, tiny_qwen2_dir, tmp_path):
    extra = ["dpo.label_smoothing=0.1"] if loss == "robust" else ["dpo.beta=2.0"] if loss == "simpo" else []
    train("dpo", tiny_qwen2_dir, tmp_path / "out", f"dpo.loss={loss}", "training.max_steps=6", "method=full",
          "training.lr=1e-3", "dpo.sft_weight=0.5", *extra)
    curve = metric(tmp_path / "out")
    assert curve[-1] < curve[0], curve


def test_chain_of_hindsight_puts_feedback_in_user_turns_and_loss_on_answers(tiny_qwen2_dir):
    from transformers import AutoTokenizer

    from tuneforge.configs.schema import CoHConfig
    from tuneforge.data.encode import encode_chat
    from tuneforge.data.types import PairExample
    from tuneforge.recipes.coh import hindsight_example

    pair = PairExample("f:1", [{"role": "user", "content": "2+2?"}], [{"role": "assistant", "content": "4"}],
                       [{"role": "assistant", "content": "5"}])
    example = hindsight_example(pair, CoHConfig(order="good_first"), seed=0)
    assert [m["role"] for m in example.messages] == ["user", "assistant", "user", "assistant"]
    assert example.messages[0]["content"] == "2+2?\n\nA good answer:" and example.messages[1]["content"] == "4"
    assert example.messages[2]["content"] == "A bad answer:" and example.messages[3]["content"] == "5"
    flipped = hindsight_example(pair, CoHConfig(order="bad_first"), seed=0)
    assert flipped.messages[1]["content"] == "5" and flipped.messages[2]["content"] == "A good answer:"
    orders = {hindsight_example(PairExample(f"f:{i}", pair.prompt, pair.chosen, pair.rejected), CoHConfig(), 0)
              .messages[1]["content"] for i in range(20)}
    assert orders == {"4", "5"}  # random order, seeded per row

    tok = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    enc = encode_chat(tok, example.messages, loss_on="assistant")
    learned = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100])
    assert "4" in learned and "5" in learned and "answer" not in learned and "2+2" not in learned


def test_chain_of_hindsight_gives_no_loss_to_the_replies_of_a_multi_turn_prompt(tiny_qwen2_dir, tmp_path):
    """An hh-rlhf or multi-turn pair's earlier replies are context (dpo and rm give them no loss); coh trained on
    them as answers."""
    from transformers import AutoTokenizer

    from tuneforge.configs.schema import CoHConfig
    from tuneforge.data.encode import encode_chat
    from tuneforge.data.types import PairExample
    from tuneforge.recipes.coh import hindsight_example

    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
              {"role": "user", "content": "2+2?"}]
    pair = PairExample("f:1", prompt, [{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}])
    tok = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    enc = encode_chat(tok, hindsight_example(pair, CoHConfig(order="good_first"), seed=0).messages,
                      loss_on="assistant")
    learned = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100])
    assert "4" in learned and "5" in learned and "Hello" not in learned
    rows = tmp_path / "pairs.jsonl"  # and through a run: the earlier reply stays in the conversation, unlabelled
    rows.write_text("".join(json.dumps({"messages": prompt, "chosen": str(i), "rejected": str(i + 1)}) + "\n"
                            for i in range(8)), encoding="utf-8")
    result = run_config(load_train_config(str(ROOT / "examples" / "coh_tiny.yaml"), [
        f"model.name_or_path={tiny_qwen2_dir}", f"output_dir={tmp_path / 'run'}", f"data.train=[{rows}]", *FAST,
        "training.max_steps=1", "training.batch_size=4"]), log=lambda _: None)
    assert result.finished



def _one_vs_two_processes(stage, model_dir, tmp_path, *extra):
    common = [str(ROOT / "examples" / f"{stage}_tiny.yaml"), f"model.name_or_path={model_dir}",
              f"data.train=[{{path: {PREFS}, format: pairwise, max_samples: 16}}]", "training.max_steps=3",
              "training.device=cpu", "training.lr=5e-3", *FAST, *extra]
    one_process_and_two(tmp_path, common)
    one, two = metric(tmp_path / "one"), metric(tmp_path / "two")
    assert len(one) == len(two) == 3 and one == pytest.approx(two, abs=1e-5), (one, two)
    # the stage's metrics are the step's over both ranks, not rank 0's half of the batch
    for key in ("accuracy", "reward_margin") if stage == "rm" else ("rewards/accuracies", "rewards/margins"):
        a, b = metric(tmp_path / "one", key), metric(tmp_path / "two", key)
        assert a == pytest.approx(b, abs=1e-5), (key, a, b)


def test_dpo_two_processes_match_one(tiny_qwen2_dir, tmp_path):
    _one_vs_two_processes("dpo", tiny_qwen2_dir, tmp_path, "method=full")


@pytest.mark.slow
def test_rm_two_processes_match_one(tiny_qwen2_dir, tmp_path):
    _one_vs_two_processes("rm", tiny_qwen2_dir, tmp_path)



def _recording(monkeypatch, stage_class) -> list[dict]:
    """Every metrics dict the stage returns while training, as it returned it (per pair)."""
    seen = []
    original = stage_class.loss

    def loss(self, model, batch):
        loss_sum, metrics = original(self, model, batch)
        if model.training:
            seen.append({k: torch.as_tensor(v).detach().clone() for k, v in metrics.items()})
        return loss_sum, metrics

    monkeypatch.setattr(stage_class, "loss", loss)
    return seen


@pytest.mark.parametrize("stage", ["rm", "dpo", "kto"])
def test_logged_metrics_are_the_mean_over_every_micro_batch_of_the_step(stage, tiny_qwen2_dir, tmp_path,
                                                                        monkeypatch):
    """grad_accum 2 x batch 4: the logged accuracy / margins are the means over all 8 pairs of the step (weighted by
    pairs), worked out here from what each micro-batch returned; not the last micro-batch's. Step 2 of dpo/kto,
    where the policy has moved from the reference (at step 1 every implicit reward is 0)."""
    from tuneforge.recipes.dpo import DPOStage
    from tuneforge.recipes.kto import KTOStage
    from tuneforge.recipes.rm import RewardStage

    seen = _recording(monkeypatch, {"rm": RewardStage, "dpo": DPOStage, "kto": KTOStage}[stage])
    train(stage, tiny_qwen2_dir, tmp_path / "out", "training.max_steps=2", "training.batch_size=4",
          "training.grad_accum=2", "training.lr=1e-2", "method=full")
    step2 = seen[2:4]
    assert len(seen) == 4
    key = {"rm": "accuracy", "dpo": "rewards/accuracies", "kto": "rewards/chosen"}[stage]
    by_hand = torch.cat([m[key].flatten() for m in step2]).mean().item()
    last_only = step2[-1][key].mean().item()
    assert metric(tmp_path / "out", key)[1] == pytest.approx(by_hand, abs=1e-6)
    assert by_hand != pytest.approx(last_only, abs=1e-6)  # the micro-batches differ: the test tells them apart
    if stage == "kto":  # desirable rows only, however many each micro-batch had
        assert metric(tmp_path / "out", "kl")[1] == pytest.approx(sum(float(m["kl"]) for m in step2) / 2, abs=1e-6)


def test_kto_reference_point_is_averaged_over_processes_while_training():
    """Under DDP z0 is the mean over every process's mismatched rows (then clamped), so 1 and N processes agree."""
    from tuneforge.losses import kto_reference_point
    from tuneforge.recipes.kto import KTOStage

    class TwoRanks:  # all_reduce_sum as if a second rank held rows with log-ratios 3.0 and 5.0
        def all_reduce_sum(self, value):
            return value + torch.tensor([8.0, 2.0])

    stage = KTOStage(None, None, TwoRanks())
    policy, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -4.0])  # log-ratios 1.0 and 2.0
    assert float(stage.reference_point(policy, ref, average=True)) == pytest.approx((1 + 2 + 3 + 5) / 4)
    assert float(stage.reference_point(policy, ref, average=False)) == pytest.approx(1.5)
    assert float(stage.reference_point(policy, ref, average=False)) == float(kto_reference_point(policy, ref))
    assert float(stage.reference_point(ref, policy, average=False)) == 0.0  # negative KL estimates clamp to 0


@pytest.mark.parametrize("padding_free", [False, True])
def test_kto_runs_the_mismatched_rows_without_autograd_and_loses_nothing(tiny_qwen2_dir, padding_free):
    """The policy's pass over the B mismatched rows (z0 only, detached) runs under no_grad, the B conversations with
    autograd: the same loss and gradients as one joint pass over all 2B rows, which also ran backward through them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.data import EncodedKTO, collate_kto, collate_kto_padding_free
    from tuneforge.losses import kto_loss
    from tuneforge.recipes.kto import KTOStage, _stack
    from tuneforge.training.reference import Reference, response_logps

    class OneRank:
        def all_reduce_sum(self, value):
            return value

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    items = [EncodedKTO([5, 6, 7, 8, 9], [-100, -100, 7, 8, 9], label=True, prompt_length=2),
             EncodedKTO([10, 11, 12, 13], [-100, 11, 12, 13], label=False, prompt_length=1),
             EncodedKTO([14, 15, 16, 17, 18, 19], [-100, -100, -100, 17, 18, 19], label=True, prompt_length=3)]
    batch = collate_kto_padding_free(items) if padding_free else collate_kto(items, 0)
    opts = load_train_config(str(ROOT / "examples" / "kto_tiny.yaml"), [f"model.name_or_path={tiny_qwen2_dir}"]).kto
    stage, reference = KTOStage(opts, Reference(model), OneRank()), Reference(model)
    passes = []
    hook = model.get_base_model().model.register_forward_pre_hook(
        lambda m, a, kw: passes.append((torch.is_grad_enabled(), kw["input_ids"].shape)), with_kwargs=True)
    loss, _ = stage.loss(model, batch)
    hook.remove()
    loss.backward()
    got = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    joint = collate_kto(items, 0)  # what the stage did before: one pass with autograd over all 2B rows
    both = {k: _stack(joint[k], joint[f"kl_{k}"], -100 if k == "labels" else 0)
            for k in ("input_ids", "attention_mask", "labels")}
    policy, ref = response_logps(model, both).sum, reference.logps(both).sum
    z0 = stage.reference_point(policy[3:], ref[3:], average=True)
    want, _ = kto_loss(policy[:3], ref[:3], joint["kto_label"], z0, beta=opts.beta)
    want.sum().backward()
    assert float(loss) == pytest.approx(float(want.sum()), rel=1e-5)
    assert all(torch.allclose(a, p.grad, rtol=1e-4, atol=1e-7)
               for a, p in zip(got, [p for p in model.parameters() if p.requires_grad]))
    with_grad = [shape for grad, shape in passes if grad]
    assert len(with_grad) == 1 and with_grad[0].numel() == (15 if padding_free else 3 * 6)  # the conversations only
