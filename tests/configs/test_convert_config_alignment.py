"""`tuneforge convert-config` on LLaMA-Factory's alignment stages (rm, dpo, kto, ppo): the stage's keys land in
TuneForge's `dpo:` / `kto:` / `ppo:` sections, the converted files load and train (shortened, tiny model, LLaMA-Factory's
own demo data from the shared assets), and every key that cannot carry over is named with the reason."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from tuneforge.cli import main as cli_main
from tuneforge.configs.llamafactory import convert
from tuneforge.configs.schema import load_train_config
from tuneforge.errors import UserError
from tuneforge.train import run_config
from tuneforge.training.metrics import read_metrics

# the shape of LLaMA-Factory's examples/train_lora/llama3_lora_{dpo,kto,ppo,reward}.yaml
COMMON = """\
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
do_train: true
finetuning_type: lora
lora_target: all
template: llama3
cutoff_len: 1024
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 5.0e-6
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
"""
DPO = COMMON + "stage: dpo\npref_beta: 0.1\npref_loss: sigmoid\ndataset: dpo_en_demo\noutput_dir: saves/dpo\n"
KTO = COMMON + "stage: kto\npref_beta: 0.1\ndataset: kto_en_demo\noutput_dir: saves/kto\n"
RM = COMMON + "stage: rm\ndataset: dpo_en_demo\noutput_dir: saves/reward\n"
PPO = COMMON + """\
stage: ppo
reward_model: saves/llama3-8b/lora/reward
dataset: identity,alpaca_en_demo
output_dir: saves/ppo
max_new_tokens: 512
top_k: 0
top_p: 0.9
"""
SHORT = ["training.max_steps=2", "training.precision=fp32", "training.save_steps=0", "training.eval_steps=0",
         "data.max_length=512", "training.logging_steps=1", "training.progress_bar=false", "training.plot_loss=false",
         "training.gradient_checkpointing=false"]


def lf(text: str, **changes) -> dict:
    return {**yaml.safe_load(text), **changes}


def dropped(conv) -> dict[str, str]:
    """key -> the reason it did not carry over."""
    return {d.split(":", 1)[0]: d for d in conv.dropped}


@pytest.mark.parametrize("stage, text, data", [("dpo", DPO, "dpo_en_demo"), ("kto", KTO, "kto_en_demo"),
                                               ("rm", RM, "dpo_en_demo")])
def test_llamafactory_example_converts_and_trains(stage, text, data, shared_assets, tiny_qwen2_dir, tmp_path,
                                                  capsys):
    """LLaMA-Factory's example config of the stage, with its dataset_dir pointing at LLaMA-Factory's own demo data:
    the converted file loads, reads the demo pairs / KTO rows through the registry, and trains."""
    source = tmp_path / "lf.yaml"
    source.write_text(yaml.safe_dump(lf(text, dataset_dir=str(shared_assets / "datasets" / "llamafactory"),
                                        max_samples=16)), encoding="utf-8")
    assert cli_main(["convert-config", str(source), "--out", str(tmp_path / "tf.yaml")]) == 0
    printed = capsys.readouterr().out
    assert "  ddp_timeout: " in printed and "  preprocessing_num_workers: " in printed  # named, not dropped silently
    cfg = load_train_config(str(tmp_path / "tf.yaml"))
    batch = (2, 4) if stage == "kto" else (1, 8)  # kto: 2 rows per micro-batch (its KL estimate), same global batch
    assert (cfg.stage, cfg.method, cfg.training.lr) == (stage, "lora", 5e-6)
    assert (cfg.training.batch_size, cfg.training.grad_accum) == batch
    if stage == "dpo":
        assert (cfg.dpo.loss, cfg.dpo.beta, cfg.dpo.sft_weight) == ("sigmoid", 0.1, 0.0)
    if stage == "kto":
        assert (cfg.kto.beta, cfg.kto.desirable_weight, cfg.kto.undesirable_weight) == (0.1, 1.0, 1.0)
    out = tmp_path / "run"
    cfg = load_train_config(str(tmp_path / "tf.yaml"), [f"model.name_or_path={tiny_qwen2_dir}", f"output_dir={out}",
                                                        "training.batch_size=2", "training.grad_accum=1", *SHORT])
    run_config(cfg, log=lambda _: None)
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("changes, want", [
    ({"pref_loss": "sigmoid", "dpo_label_smoothing": 0.1, "pref_ftx": 0.5},
     {"loss": "sigmoid", "label_smoothing": 0.1, "sft_weight": 0.5, "beta": 0.1}),
    ({"pref_loss": "ipo", "pref_beta": 0.5}, {"loss": "ipo", "beta": 0.5}),
    ({"pref_loss": "hinge"}, {"loss": "hinge"}),
    ({"pref_loss": "orpo", "pref_beta": 0.2}, {"loss": "orpo", "beta": 0.2}),
    ({"pref_loss": "simpo", "pref_beta": 2.0}, {"loss": "simpo", "beta": 2.0, "simpo_gamma": 0.5}),  # LF's gamma
    ({"pref_loss": "simpo", "simpo_gamma": 1.5}, {"loss": "simpo", "simpo_gamma": 1.5}),
])
def test_dpo_family_keys(changes, want):
    conv = convert(lf(DPO, **changes))
    assert {k: conv.config["dpo"][k] for k in want} == want
    assert not {"pref_loss", "pref_beta", "pref_ftx", "simpo_gamma", "dpo_label_smoothing"} & set(dropped(conv))
    cfg = load_train_config(None, base=conv.config)
    assert cfg.dpo.loss == want["loss"]
    if want["loss"] != "simpo":
        assert cfg.dpo.simpo_gamma == 1.0  # TuneForge's default stays: only SimPO reads it


def test_kto_weights():
    conv = convert(lf(KTO, pref_beta=0.3, kto_chosen_weight=1.33, kto_rejected_weight=0.5))
    assert conv.config["kto"] == {"beta": 0.3, "desirable_weight": 1.33, "undesirable_weight": 0.5}
    assert load_train_config(None, base=conv.config).kto.undesirable_weight == 0.5
    assert "pref_ftx" in dropped(convert(lf(KTO, pref_ftx=0.1)))  # TuneForge's kto has no SFT term


def test_ppo_maps_reward_model_batches_and_sampling(tmp_path, capsys):
    """TRL's PPO (what LLaMA-Factory runs) rolls out batch x grad_accum x ppo_buffer_size prompts per process and
    updates on batch x grad_accum of them: TuneForge's rollout is batch_size x grad_accum and its updates
    mini_batch_size completions. The generation keys are the rollout's sampling settings (LF's defaults written
    out where the file leaves them); the KL coefficient is TRL's starting 0.2."""
    conv = convert(lf(PPO, ppo_buffer_size=2, ppo_epochs=2))
    ppo, t = conv.config["ppo"], conv.config["training"]
    assert ppo == {"reward": {"saves/llama3-8b/lora/reward": 1.0}, "epochs": 2, "mini_batch_size": 8,
                   "kl_coef": 0.2, "max_new_tokens": 512, "temperature": 0.95, "top_p": 0.9, "top_k": 0}
    assert (t["batch_size"], t["grad_accum"]) == (1, 16)
    notes = " ".join(conv.notes)
    assert "reward_model saves/llama3-8b/lora/reward" in notes and "stage: rm" in notes and "kl_coef" in notes
    # the reward folder does not exist yet: the file is still written (and loads once the rm run made it)
    source = tmp_path / "lf.yaml"
    source.write_text(PPO, encoding="utf-8")
    assert cli_main(["convert-config", str(source), "--out", str(tmp_path / "tf.yaml")]) == 0
    rm_dir = tmp_path / "saves" / "llama3-8b" / "lora" / "reward"
    rm_dir.mkdir(parents=True)
    text = (tmp_path / "tf.yaml").read_text(encoding="utf-8").replace("saves/llama3-8b/lora/reward", str(rm_dir))
    cfg = load_train_config(None, base=yaml.safe_load(text))
    assert cfg.ppo.reward == {str(rm_dir): 1.0} and cfg.ppo.epochs == 4 and cfg.ppo.top_p == 0.9


def test_what_does_not_carry_over_is_named_with_the_reason():
    conv = convert(lf(DPO, ref_model="meta-llama/Other-8B", ref_model_adapters="saves/ref", pref_bco_weight=0.5,
                      ld_alpha=0.5, kto_chosen_weight=2.0, reward_model="saves/rm"))
    why = dropped(conv)
    assert "a separate reference model is not supported" in why["ref_model"]
    assert "BCO" in why["pref_bco_weight"] and "LD-DPO" in why["ld_alpha"] and "ref_model_adapters" in why
    assert "only LLaMA-Factory's stage kto reads it; this config is stage dpo" in why["kto_chosen_weight"]
    assert "stage ppo" in why["reward_model"]
    ppo = dropped(convert(lf(PPO, ppo_target=3.0, ppo_score_norm=True, ppo_whiten_rewards=True,
                             reward_model_adapters="saves/rm_adapter")))
    assert "adaptive KL" in ppo["ppo_target"] and "normalise" in ppo["ppo_score_norm"]
    assert "advantages" in ppo["ppo_whiten_rewards"] and "reward_model_adapters" in ppo
    # the same model as reference, and no-op values, are what TuneForge does anyway: nothing to report
    same = convert(lf(DPO, ref_model="meta-llama/Meta-Llama-3-8B-Instruct", pref_bco_weight=0.0, ld_alpha=None))
    assert not {"ref_model", "pref_bco_weight", "ld_alpha"} & set(dropped(same))


@pytest.mark.parametrize("changes, words", [
    ({"pref_loss": "kto_pair"}, "pref_loss: kto_pair"),
    ({"stage": "ppo"}, "needs `reward_model`"),
    ({"stage": "ppo", "reward_model": "http://rm", "reward_model_type": "api"}, "reward_model_type: api"),
])
def test_what_cannot_be_converted_is_a_clear_error(changes, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(")):
        convert(lf(DPO, **changes))


def test_converted_dpo_file_says_what_it_dropped(tmp_path):
    source = tmp_path / "lf.yaml"
    source.write_text(yaml.safe_dump(lf(DPO, pref_bco_weight=0.5)), encoding="utf-8")
    assert cli_main(["convert-config", str(source), "--out", str(tmp_path / "tf.yaml")]) == 0
    text = Path(tmp_path / "tf.yaml").read_text(encoding="utf-8")
    assert "#   pref_bco_weight: 0.5 (BCO" in text and "\ndpo:\n" in text
