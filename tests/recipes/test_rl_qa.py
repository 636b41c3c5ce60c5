"""The sampling stages (grpo, ppo) as a TRL / OpenRLHF user runs them: the log-probs they train on are those of the
distribution the rollouts were sampled from (temperature), and a prompt the model's context cannot continue is
refused before training, naming its row and the fix."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tuneforge.configs.schema import load_train_config
from tuneforge.errors import UserError
from tuneforge.train import run_config


def rl_config(stage: str, model_dir, out, data, *overrides):
    base = [f"stage={stage}", "method=full", f"model.name_or_path={model_dir}", f"output_dir={out}",
            f"data.train=[{{path: {data}, format: prompt}}]", "data.max_length=64", "training.progress_bar=false",
            "training.plot_loss=false", "training.scheduler=constant", "training.save_steps=0",
            f"{stage}.max_new_tokens=6", f"{stage}.reward={{length: 1.0}}", "training.batch_size=2",
            "training.max_steps=1"]
    return load_train_config(None, base + list(overrides))


def write_prompts(path, contents: list[str]) -> str:
    path.write_text("".join(json.dumps({"prompt": c}) + "\n" for c in contents), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_log_probs_are_those_of_the_sampling_temperature(stage, tiny_qwen2_dir, tmp_path, monkeypatch):
    """At temperature 0.5 the rollouts come from softmax(logits / 0.5): the old-policy and reference log-probs the
    first update uses must be that distribution's (as TRL's GRPOTrainer, OpenRLHF and verl compute them), not the
    untempered model's, or the ratio, the KL and the gradient belong to another policy than the sampled one."""
    import tuneforge.recipes.grpo as grpo
    import tuneforge.recipes.ppo as ppo
    from tuneforge.training import rl

    module = {"grpo": grpo, "ppo": ppo}[stage]
    seen, refs = [], []
    forward, ref_forward = module.policy_forward, rl.Reference.token_logps

    def recording(model, batch, *args, **kwargs):
        out = forward(model, batch, *args, **kwargs)
        seen.append((batch, out[0].detach(), out[1]))
        return out

    def recording_ref(self, batch, *args, **kwargs):
        out = ref_forward(self, batch, *args, **kwargs)
        refs.append(out.detach())
        return out

    monkeypatch.setattr(module, "policy_forward", recording)
    monkeypatch.setattr(rl.Reference, "token_logps", recording_ref)
    data = write_prompts(tmp_path / "p.jsonl", ["What is 2 + 3?", "Name a colour."])
    extra = ["grpo.num_generations=2", "grpo.epochs=2", "grpo.beta=0.1"] if stage == "grpo" else []
    run_config(rl_config(stage, tiny_qwen2_dir, tmp_path / "out", data, f"{stage}.temperature=0.5", *extra),
               log=lambda _: None)

    batch, old, mask = seen[0]  # the rollout's old-policy pass, before any update
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:].clamp(min=0)
    tempered = torch.log_softmax(logits / 0.5, -1).gather(-1, targets[..., None]).squeeze(-1)
    untempered = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    assert mask.any() and not torch.allclose(tempered[mask], untempered[mask], atol=1e-3)
    torch.testing.assert_close(old[mask], tempered[mask], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(refs[0][mask], tempered[mask], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_a_prompt_past_the_context_is_refused_before_training_naming_its_row(stage, tiny_qwen2_dir, tmp_path):
    """data.max_length above the model's context (2048 for the tiny preset) lets a 2100-token prompt through; the
    engine cannot continue it. Refused before the first step, naming the row and the key to set (it stopped the run
    at the step that sampled it with "The prompt is N tokens ... shorten the prompt", naming no row)."""
    data = write_prompts(tmp_path / "p.jsonl", ["What is 2 + 3?", "Name a colour.", "word " * 2100, "Say hi."])
    extra = ["grpo.num_generations=2"] if stage == "grpo" else []
    cfg = rl_config(stage, tiny_qwen2_dir, tmp_path / "out", data, "data.max_length=4096", *extra)
    with pytest.raises(UserError) as e:
        run_config(cfg, log=lambda _: None)
    said = str(e.value)
    assert "p.jsonl:line 3" in said and "context of 2048 tokens" in said and "`data.max_length` to at most 2047" in said
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


TRL_STYLE = '''
def accuracy(completions, answer, **kwargs):  # TRL passes dataset columns as keywords
    return [float(c == a) for c, a in zip(completions, answer)]

def nothing():
    return 1.0
'''


@pytest.mark.parametrize("fn,said", [("accuracy", "requires `answer`, which a reward call does not pass"),
                                     ("nothing", "takes no argument for the completion")])
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_reward_function_wanting_arguments_no_call_passes_is_refused_before_the_model_loads(
        fn, said, on_error, tiny_qwen2_dir, tmp_path, monkeypatch):
    """A TRL reward `accuracy(completions, answer, **kwargs)` failed on every call: at the first step with a
    TypeError, or with on_reward_error: skip it scored every completion 0 for the whole run and trained on nothing.
    Refused up front, saying how a reward function is called and that the answer comes as `reference`."""
    (tmp_path / "trl_style_rewards.py").write_text(TRL_STYLE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    import tuneforge.training.setup as setup

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the reward was checked")

    monkeypatch.setattr(setup, "setup_model", no_model)
    data = write_prompts(tmp_path / "p.jsonl", ["What is 2 + 3?", "Name a colour."])
    cfg = rl_config("grpo", tiny_qwen2_dir, tmp_path / "out", data, "grpo.num_generations=2",
                    f"grpo.reward={{trl_style_rewards:{fn}: 1.0}}", f"grpo.on_reward_error={on_error}")
    with pytest.raises(UserError) as e:
        run_config(cfg, log=lambda _: None)
    assert f"Reward `trl_style_rewards:{fn}` {said}" in str(e.value) and "as `reference`" in str(e.value)


def test_grpo_says_how_many_prompts_and_completions_a_step_samples(tiny_qwen2_dir, tmp_path):
    """training.batch_size counts prompts here and completions in TRL (per_device_train_batch_size, divisible by
    num_generations): a TRL config carried over (batch_size 8, num_generations 8) samples 64 completions a step, not
    8. The run says the arithmetic once, at the start."""
    lines = []
    data = write_prompts(tmp_path / "p.jsonl", ["What is 2 + 3?", "Name a colour.", "Say hi.", "Count to 3."])
    run_config(rl_config("grpo", tiny_qwen2_dir, tmp_path / "out", data, "grpo.num_generations=3",
                         "training.grad_accum=2", "training.batch_size=1"), log=lines.append)
    assert "grpo: each step samples 2 prompts x 3 completions = 6 completions per process" in "\n".join(lines)
