"""`tuneforge convert-config`: LLaMA-Factory training YAMLs become TuneForge configs that load and run; what has no
equivalent is listed, never dropped silently."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from tuneforge.cli import main as cli_main
from tuneforge.configs.llamafactory import convert
from tuneforge.configs.schema import load_train_config
from tuneforge.train import run_config
from tuneforge.training.metrics import read_metrics

# the shape of LLaMA-Factory's examples/train_lora/llama3_lora_sft.yaml
LLAMA3_LORA_SFT = """\
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/llama3-8b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
report_to: none

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""


def _registry(folder: Path) -> Path:
    """A LLaMA-Factory data folder: dataset_info.json naming two alpaca files."""
    folder.mkdir(parents=True)
    rows = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(12)]
    for name in ("identity", "alpaca_en_demo"):
        (folder / f"{name}.json").write_text(json.dumps(rows), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps(
        {"identity": {"file_name": "identity.json"}, "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"}}))
    return folder / "dataset_info.json"


def test_llama3_lora_sft_converts_loads_and_trains(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # LLaMA-Factory resolves dataset_dir (default: data) from where it runs
    _registry(tmp_path / "data")
    (tmp_path / "lf.yaml").write_text(LLAMA3_LORA_SFT, encoding="utf-8")
    assert cli_main(["convert-config", "lf.yaml", "--out", "tf.yaml"]) == 0
    out = capsys.readouterr().out
    for key in ("do_train", "overwrite_cache", "preprocessing_num_workers", "ddp_timeout", "report_to",
                "per_device_eval_batch_size"):
        assert f"  {key}: " in out, key  # listed as not carried over, with the reason
    assert "template llama3" in out and "not LLaMA-Factory's templates of those names" in out  # the difference to check

    text = (tmp_path / "tf.yaml").read_text(encoding="utf-8")
    assert text.startswith("# Converted from lf.yaml") and "#   do_train: True" in text
    cfg = load_train_config("tf.yaml")
    assert (cfg.stage, cfg.method, cfg.output_dir) == ("sft", "lora", "saves/llama3-8b/lora/sft")
    assert cfg.model.name_or_path == "meta-llama/Meta-Llama-3-8B-Instruct" and cfg.model.trust_remote_code
    lora = cfg.options("lora")
    assert (lora.rank, lora.alpha, lora.target_modules) == (8, 16.0, ["all-linear"])
    assert [(s.path, s.max_samples) for s in cfg.data.train] == [("identity", 1000), ("alpaca_en_demo", 1000)]
    assert cfg.data.registry == "data/dataset_info.json" and cfg.data.max_length == 2048
    assert cfg.data.eval_ratio == pytest.approx(0.1)
    t = cfg.training
    assert (t.lr, t.batch_size, t.grad_accum, t.epochs, t.scheduler) == (1e-4, 1, 8, 3.0, "cosine")
    assert (t.warmup_ratio, t.precision, t.logging_steps, t.save_steps, t.eval_steps) == (0.1, "bf16", 10, 500, 500)
    assert t.gradient_checkpointing and t.num_workers == 4 and t.plot_loss and t.resume is None

    # the converted file trains as it is (shortened, on a tiny model): the dataset names resolve through the registry
    run_dir = tmp_path / "run"
    cfg = load_train_config("tf.yaml", [f"model.name_or_path={tiny_llama_dir}", f"output_dir={run_dir}",
                                        "model.trust_remote_code=false", "training.max_steps=2",
                                        "training.precision=fp32", "training.num_workers=0",
                                        "training.save_steps=0", "training.eval_steps=0", "data.max_length=64", "training.logging_steps=1",
                                        "training.progress_bar=false", "training.plot_loss=false"])
    run_config(cfg, log=lambda _: None)
    losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_llamafactory_defaults_are_written_out():
    """What LLaMA-Factory leaves at its (Hugging Face) default is spelled out where TuneForge's default differs."""
    conv = convert({"model_name_or_path": "m", "dataset": "identity", "lora_rank": 16, "lora_target": "q_proj,v_proj",
                    "max_steps": 100})
    c = conv.config
    assert c["method"] == "lora" and c["lora"] == {"rank": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"]}
    assert c["training"]["lr"] == 5e-5 and c["training"]["batch_size"] == 8 and c["training"]["scheduler"] == "linear"
    assert c["training"]["max_steps"] == 100 and "epochs" not in c["training"]
    assert c["training"]["gradient_checkpointing"] is True and c["data"]["max_length"] == 2048
    assert any("data/dataset_info.json does not exist here" in n for n in conv.notes)
    load_train_config(None, base=c)


@pytest.mark.parametrize("lf, method, extra", [
    ({"quantization_bit": 4, "quantization_type": "fp4"}, "qlora", {"qlora": {"quant_type": "fp4"}}),
    ({"quantization_bit": 8}, "qlora", {"qlora": {"load_in_8bit": True}}),
    ({"use_dora": True}, "dora", {}),
    ({"use_rslora": True}, "rslora", {}),
    ({"pissa_init": True}, "pissa", {}),
    ({"loraplus_lr_ratio": 16.0}, "lora_plus", {"lora_plus": {"ratio": 16.0}}),
    ({"pissa_init": True, "loraplus_lr_ratio": 16.0}, "pissa", {}),  # no lora_plus section the run would ignore
    ({"finetuning_type": "full", "stage": "pt", "dataset": "c4_demo", "flash_attn": "fa2"}, "full",
     {"model": {"name_or_path": "m", "attn_implementation": "flash_attention_2"}}),
    ({"finetuning_type": "freeze", "freeze_trainable_layers": 4, "freeze_extra_modules": "embed_tokens"}, "freeze",
     {"freeze": {"trainable_layers": 4, "trainable_modules": ["embed_tokens"]}}),
])
def test_methods_and_variants(lf, method, extra):
    conv = convert({"model_name_or_path": "m", "dataset": "identity", **lf})
    assert conv.config["method"] == method
    for section, values in extra.items():
        assert {k: conv.config[section][k] for k in values} == values
    cfg = load_train_config(None, base=conv.config)
    assert cfg.method == method and cfg.ignored_sections == []


def test_what_differs_is_noted_not_dropped_silently():
    conv = convert({"model_name_or_path": "m", "dataset": "a", "finetuning_type": "freeze",
                    "freeze_trainable_modules": "mlp", "val_size": 200, "lr_scheduler_type": "polynomial",
                    "use_unsloth": True, "train_on_prompt": True, "adapter_name_or_path": "saves/old"})
    notes = " ".join(conv.notes)
    assert "freeze_trainable_modules ['mlp']" in notes and "val_size 200" in notes and "polynomial" in notes
    assert any(d.startswith("use_unsloth: True") for d in conv.dropped)
    assert any(d.startswith("adapter_name_or_path: 'saves/old' (training starts a new adapter") for d in conv.dropped)
    assert conv.config["data"]["loss_on"] == "all"


def test_keys_at_a_value_tuneforge_has_are_not_listed_as_without_equivalent():
    """num_train_epochs beside max_steps has an equivalent (max_steps wins in both tools); mask_history: false is the
    default. Neither belongs in the 'no TuneForge equivalent' list."""
    conv = convert({"model_name_or_path": "m", "dataset": "a", "max_steps": 2, "num_train_epochs": 1,
                    "train_on_prompt": True, "mask_history": False})
    assert conv.dropped == []
    assert conv.config["training"]["max_steps"] == 2 and conv.config["training"]["epochs"] == 1
    assert conv.config["data"]["loss_on"] == "all"
    assert load_train_config(None, base=conv.config).training.max_steps == 2


# LLaMA-Factory's examples/deepspeed/ds_z3_config.json: Hugging Face style, "auto" values, no optimizer section
LF_DS_Z3 = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
            "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
                     "hysteresis": 2, "min_loss_scale": 1}, "bf16": {"enabled": "auto"},
            "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                                  "sub_group_size": 1e9, "reduce_bucket_size": "auto",
                                  "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                                  "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
                                  "stage3_gather_16bit_weights_on_model_save": True}}


def test_a_deepspeed_json_becomes_training_deepspeed(tmp_path, monkeypatch):
    """TuneForge reads LLaMA-Factory's DeepSpeed JSON as it is, so `deepspeed: FILE` carries over."""
    from tuneforge.training.deepspeed_zero import load_user_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds_z3_config.json").write_text(json.dumps(LF_DS_Z3), encoding="utf-8")
    conv = convert({"model_name_or_path": "m", "dataset": "a", "deepspeed": "ds_z3_config.json", "bf16": True})
    assert conv.dropped == []
    cfg = load_train_config(None, base=conv.config)
    assert cfg.training.distributed == "deepspeed" and cfg.training.deepspeed == "ds_z3_config.json"
    ds = load_user_config(cfg.training.deepspeed, cfg.training, world_size=2, hidden_size=64)
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_batch_size"] == 16 and ds["bf16"]["enabled"] is True
    missing = convert({"model_name_or_path": "m", "dataset": "a", "deepspeed": "elsewhere/ds.json"})
    assert any("elsewhere/ds.json does not exist here" in n for n in missing.notes)


def test_registry_names_are_checked(tmp_path):
    registry = _registry(tmp_path / "lfdata")
    conv = convert({"model_name_or_path": "m", "dataset": "identity,missing_set", "dataset_dir": str(registry.parent)})
    assert conv.config["data"]["registry"] == str(registry)
    assert any("missing_set are not in" in n for n in conv.notes)


def test_real_llamafactory_registry(shared_assets):
    """LLaMA-Factory's own dataset_info.json (shared assets): the dataset names of its examples resolve and read."""
    from tuneforge.data.build import read_datasets

    data = shared_assets / "datasets" / "llamafactory"
    conv = convert(yaml.safe_load(LLAMA3_LORA_SFT) | {"dataset_dir": str(data)})
    assert not any("are not in" in n for n in conv.notes), conv.notes
    cfg = load_train_config(None, base=conv.config)
    train, evals, report = read_datasets(cfg.data)
    assert len(train) + len(evals) == 91 + 999 and not report.bad_rows  # identity + alpaca_en_demo, all rows


@pytest.mark.parametrize("lf, words", [
    ({"stage": "dpo", "pref_loss": "kto_pair"}, "pref_loss: kto_pair"),
    ({"stage": "grpo"}, "stage: grpo"),
    ({"finetuning_type": "oft"}, "finetuning_type: oft"),
    ({"quantization_bit": 4, "quantization_method": "hqq"}, "quantization_method: hqq"),
    ({"do_predict": True, "adapter_name_or_path": "saves/x"}, "predicts or evaluates"),
])
def test_what_cannot_be_converted_is_a_clear_error(lf, words, tmp_path, capsys):
    path = tmp_path / "lf.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "m", "dataset": "a", **lf}))
    assert cli_main(["convert-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_a_typo_in_a_llamafactory_key_is_named_with_the_key_it_meant():
    conv = convert({"model_name_or_path": "m", "dataset": "a", "learing_rate": 1e-4, "use_unsloth": True})
    assert any(d.startswith("learing_rate: 0.0001 (not a LLaMA-Factory key: did you mean `learning_rate`?")
               for d in conv.dropped), conv.dropped
    assert conv.config["training"]["lr"] == 5e-5  # the typo is not read as the rate: LLaMA-Factory's default stays
    assert not any("did you mean" in d for d in conv.dropped if d.startswith("use_unsloth"))  # a real key: its reason


def test_the_source_is_never_overwritten_and_a_tuneforge_config_is_named(tmp_path, capsys):
    path = tmp_path / "lf.yaml"
    path.write_text(LLAMA3_LORA_SFT, encoding="utf-8")
    assert cli_main(["convert-config", str(path), "--out", str(tmp_path / "." / "lf.yaml")]) == 2
    assert "would replace it" in capsys.readouterr().err and path.read_text(encoding="utf-8") == LLAMA3_LORA_SFT
    tuneforge_config = Path(__file__).resolve().parents[1] / "examples" / "sft_lora_tiny.yaml"
    assert cli_main(["convert-config", str(tuneforge_config)]) == 2
    assert "is already a TuneForge config" in capsys.readouterr().err


def test_missing_source_file(tmp_path, capsys):
    assert cli_main(["convert-config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_print_to_stdout_without_out(tmp_path, capsys):
    path = tmp_path / "lf.yaml"
    path.write_text(LLAMA3_LORA_SFT, encoding="utf-8")
    assert cli_main(["convert-config", str(path)]) == 0
    printed = capsys.readouterr().out
    assert load_train_config(None, base=yaml.safe_load(printed)).training.grad_accum == 8


def test_a_deepspeed_json_not_copied_yet_still_converts(tmp_path, monkeypatch, capsys):
    """LLaMA-Factory's examples name `examples/deepspeed/ds_z3_config.json`, a file of its repository: converting
    elsewhere writes the config (the path kept, a note saying to copy the file), rather than failing to load it."""
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "llama3_full_sft.yaml"
    source.write_text(yaml.safe_dump({"model_name_or_path": "m", "dataset": "a", "finetuning_type": "full",
                                      "deepspeed": "examples/deepspeed/ds_z3_config.json"}), encoding="utf-8")
    assert cli_main(["convert-config", str(source), "--out", "out.yaml"]) == 0
    training = yaml.safe_load((tmp_path / "out.yaml").read_text(encoding="utf-8"))["training"]
    assert training["deepspeed"] == "examples/deepspeed/ds_z3_config.json" and training["distributed"] == "deepspeed"
    assert "ds_z3_config.json does not exist here: copy LLaMA-Factory's JSON" in capsys.readouterr().out


def test_a_warmup_steps_below_one_is_a_share():
    """LLaMA-Factory's galore example has `warmup_steps: 0.1`, which Hugging Face reads as a share of the steps."""
    conv = convert({"model_name_or_path": "m", "dataset": "a", "warmup_steps": 0.1, "warmup_ratio": 0.05})
    training = conv.config["training"]
    assert training["warmup_ratio"] == 0.1 and "warmup_steps" not in training and conv.dropped == []
    assert any("warmup_steps 0.1" in n for n in conv.notes) and any("warmup_ratio 0.05" in n for n in conv.notes)
    assert load_train_config(None, base=conv.config).training.warmup_ratio == 0.1
    assert convert({"model_name_or_path": "m", "dataset": "a", "warmup_steps": 20.0}).config["training"][
        "warmup_steps"] == 20


def test_llamafactory_features_without_equivalent_say_why_once():
    """galore, badam, llama_pro, ...: the reason and the nearest TuneForge way, on the feature's first key."""
    conv = convert({"model_name_or_path": "m", "dataset": "a", "finetuning_type": "full", "use_galore": True,
                    "galore_rank": 128, "galore_target": "mlp,self_attn", "mixture_of_depths": "convert",
                    "pissa_iter": 16, "resize_vocab": True, "bf16": True, "pure_bf16": True})
    dropped = dict(d.split(": ", 1) for d in conv.dropped)
    assert "GaLore" in dropped["use_galore"] and "method: lora" in dropped["use_galore"]
    assert dropped["galore_rank"] == "128 (see use_galore)" and dropped["galore_target"].endswith("(see use_galore)")
    assert all("no TuneForge equivalent" not in why for why in dropped.values()), dropped
    assert "pure_bf16" not in dropped and conv.config["training"]["precision"] == "bf16"
    pro = convert({"model_name_or_path": "m", "dataset": "a", "finetuning_type": "freeze", "use_llama_pro": True})
    assert any(d.startswith("use_llama_pro: True (") and "freeze.trainable_modules" in d for d in pro.dropped)
