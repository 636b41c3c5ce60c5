"""Typed config: unknown keys, wrong types and impossible combinations are refused before any work starts."""

from __future__ import annotations

import pytest

from tuneforge.cli import main as cli_main
from tuneforge.configs.schema import dump_config, load_train_config
from tuneforge.errors import ConfigError

BASE = {"data": {"train": ["x.jsonl"]}}


def load(overrides, base=None):
    return load_train_config(None, overrides, base=dict(base or BASE))


def test_defaults_and_nested_overrides():
    cfg = load(["training.lr=1e-4", "lora.rank=32", "data.max_length=256", "training.adam_betas=[0.9, 0.95]"])
    assert cfg.training.lr == pytest.approx(1e-4)
    assert cfg.options("lora").rank == 32
    assert cfg.data.max_length == 256
    assert cfg.training.adam_betas == [0.9, 0.95]
    assert cfg.data.train[0].path == "x.jsonl" and cfg.data.train[0].format == "auto"


@pytest.mark.parametrize("override, key, hint", [
    (["training.lrr=1e-4"], "training.lrr", "training.lr"),
    (["training.lr_rate=1e-4"], "training.lr_rate", "training.lr"),  # a whole word beats letter similarity
    (["lora.rnak=4"], "lora.rnak", "lora.rank"),
    (["trainig.lr=1"], "trainig", "training"),
    (["data.max_lenght=5"], "data.max_lenght", "data.max_length"),
])
def test_unknown_key_names_closest(override, key, hint):
    with pytest.raises(ConfigError) as e:
        load(override)
    assert f"`{key}`" in str(e.value) and f"`{hint}`" in str(e.value)


@pytest.mark.parametrize("override, key", [
    (["training.batch_size=two"], "training.batch_size"),
    (["training.batch_size=2.5"], "training.batch_size"),
    (["training.lr=fast"], "training.lr"),
    (["training.gradient_checkpointing=maybe"], "training.gradient_checkpointing"),
    (["training.precision=fp8"], "training.precision"),
    (["stage=dpoo"], "stage"),
])
def test_wrong_types_are_refused(override, key):
    with pytest.raises(ConfigError) as e:
        load(override)
    assert f"`{key}`" in str(e.value)


def test_literal_suggests_closest_choice():
    with pytest.raises(ConfigError, match="Did you mean `bf16`"):
        load(["training.precision=bf61"])


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_chunked_loss_always_under_a_sharding_engine_is_refused_before_loading(engine):
    """The loop refused it only after every torchrun process had loaded the model and read the data."""
    with pytest.raises(ConfigError, match=f"`training.chunked_loss: always` cannot apply with "
                                          f"`training.distributed: {engine}`"):
        load(["training.chunked_loss=always", f"training.distributed={engine}"])


def test_a_literal_with_no_close_choice_lists_the_choices_once():
    """The message listed the choices, then listed them again (sorted) as `Valid names:`."""
    with pytest.raises(ConfigError) as e:
        load(["training.distributed=horovod"])
    assert str(e.value).count("fsdp") == 1 and "Valid names" not in str(e.value), str(e.value)


@pytest.mark.parametrize("override, words", [
    (["method=lorra"], "Did you mean `lora`"),
    (["training.max_steps=0"], "Nothing to train"),
    (["lora.rank=0"], "lora.rank"),
    (["method=freeze", "freeze.trainable_layers=0"], "nothing would train"),
    (["training.precision=fp16", "training.device=cpu"], "needs a GPU"),
    (["data.eval_ratio=1.5"], "data.eval_ratio"),
    (["training.resume=/nonexistent/ckpt"], "no such checkpoint"),
    (["lora.alpha=-1"], "lora.alpha` must be > 0"),
    (["training.warmup_ratio=2"], "warmup_ratio` is a share"),
    (["model.name_or_path="], "model.name_or_path` is empty"),
    (["dpo.beta=0.5"], "`dpo:` holds options of stage dpo, and this run is stage sft"),
    (["training.save_total_limit=-1"], "save_total_limit` \\(0 keeps every checkpoint\\)"),
    (["stage=grpo", "training.distributed=deepspeed"], r"FSDP is refused too\): use `training.distributed: ddp`"),
    (["stage=dpo", "dpo.beta=-1"], r"`dpo.beta` must be > 0, got -1.0 \(set on the command line: `dpo.beta=-1`\)\.$"),
    (["stage=dpo", "dpo.beta=nan"], r"`dpo.beta` must be a number, got nan"),
    (["stage=dpo", "dpo.loss=hinge", "dpo.label_smoothing=0.3"], r"`dpo.loss: hinge` ignores it"),
    (["stage=dpo", "dpo.loss=robust"], r"robust` \(rDPO\) with `dpo.label_smoothing: 0` is plain sigmoid DPO"),
    (["stage=dpo", "dpo.simpo_gamma=0.5"], r"`dpo.simpo_gamma` \(0.5\) is read by `dpo.loss: simpo` only"),
    (["stage=dpo", "dpo.loss=simpo", "dpo.simpo_gamma=-1"], r"`dpo.simpo_gamma` is SimPO's target reward margin"),
    (["stage=dpo", "data.loss_on=all"], r"`data.loss_on: all` chooses which chat turns .* stage dpo scores the reply"),
    (["stage=grpo", "data.loss_on=last"], r"`data.loss_on: last` .* stage grpo scores the reply alone"),
    (["stage=kto", "kto.undesirable_weight=0"], r"`kto.undesirable_weight` must be > 0, got 0.0 \(0 would ignore"),
    (["stage=coh", "coh.good_phrase="], r"`coh.good_phrase` and `coh.bad_phrase` must both be set"),
    (["stage=coh", 'coh.bad_phrase="A good answer:"'], r"are the same \('A good answer:'\)"),
    (["stage=ppo", "ppo.gamma=5"], r"`ppo.gamma` must be in \[0, 1\], got 5.0"),
    (["stage=ppo", "ppo.kl_coef=-1"], r"`ppo.kl_coef` must be >= 0 \(a negative one rewards drifting"),
    (["stage=ppo", "ppo.lam=-3", "ppo.clip_eps=-0.2"], r"(?s)`ppo.clip_eps` must be > 0.*`ppo.lam` must be in \[0, 1\]"),
    (["stage=ppo", "ppo.mini_batch_size=-1"], r"`ppo.mini_batch_size` must be >= 0 \(0: all completions"),
    (["stage=grpo", "grpo.beta=-1"], r"`grpo.beta` must be >= 0 \(0: no reference\), got -1.0"),
    (["stage=grpo", "grpo.clip_eps_high=0.05"], r"`grpo.clip_eps_high` must be >= grpo.clip_eps \(0.2\), got 0.05"),
    (["method=prompt_tuning", "data.packing=true"], r"packed row would give them to its first example only"),
    (["method=prefix_tuning", "training.gradient_checkpointing=true"], r"does not work with `prefix_tuning`"),
])
def test_impossible_combinations(override, words):
    with pytest.raises(ConfigError, match=words):
        load(override)


def test_empty_train_data_refused():
    with pytest.raises(ConfigError, match="data.train"):
        load_train_config(None, [], base={})


def test_yaml_file_and_dump_roundtrip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage: pt\nmethod: full\ndata:\n  train: [a.txt]\ntraining:\n  lr: 3e-4\n")
    cfg = load_train_config(str(path), ["training.max_steps=5"])
    assert cfg.stage == "pt" and cfg.training.lr == pytest.approx(3e-4) and cfg.training.max_steps == 5
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    cfg2 = load_train_config(str(again))
    assert dump_config(cfg2) == dump_config(cfg)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: [sft\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_train_config(str(bad))


def test_cli_reports_config_error_without_traceback(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("data: {train: [a.jsonl]}\ntraining: {lrr: 1}\n")
    code = cli_main(["train", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "training.lrr" in err and "Did you mean `training.lr`" in err and "Traceback" not in err


def test_cli_help_lists_verbs_and_generated_options(capsys):
    assert cli_main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in ("train", "init-model", "chat", "methods"):
        assert verb in out
    assert cli_main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    # help text comes from the field metadata: check a few fields and the method sections
    assert "training.lr" in out and "Peak learning rate" in out
    assert "lora.rank" in out and "freeze.trainable_layers" in out


def test_cli_unknown_verb(capsys):
    assert cli_main(["trian"]) == 2
    assert "Did you mean `train`" in capsys.readouterr().err


@pytest.mark.parametrize("override, ours", [
    (["learning_rate=1e-4"], "training.lr"),
    (["training.learning_rate=1e-4"], "training.lr"),
    (["num_train_epochs=3"], "training.epochs"),
    (["per_device_train_batch_size=2"], "training.batch_size"),
    (["gradient_accumulation_steps=8"], "training.grad_accum"),
    (["model_name_or_path=x"], "model.name_or_path"),
    (["finetuning_type=lora"], "method"),
    (["lora_rank=8"], "lora.rank"),
    (["lora.lora_rank=8"], "lora.rank"),
    (["lora_target=all"], "lora.target_modules"),
    (["cutoff_len=2048"], "data.max_length"),
    (["template=llama3"], "model.chat_template"),
    (["dataset=identity"], "data.train"),
    (["lr_scheduler_type=cosine"], "training.scheduler"),
    (["bf16=true"], "training.precision"),
    (["val_size=0.1"], "data.eval_ratio"),
    (["max_samples=10"], "data.train"),
    # a key of ours in the wrong section gets its right place
    (["warmup_ratio=0.1"], "training.warmup_ratio"),
    (["logging_steps=5"], "training.logging_steps"),
    (["training.output_dir=x"], "output_dir"),
    (["data.lr=1"], "training.lr"),
])
def test_other_tools_names_point_to_ours(override, ours):
    with pytest.raises(ConfigError) as e:
        load(override)
    assert f"Did you mean `{ours}`" in str(e.value), str(e.value)


def test_names_with_no_equivalent_say_so():
    with pytest.raises(ConfigError, match="`do_train` .*has no TuneForge equivalent.*always trains"):
        load(["do_train=true"])


def test_every_config_error_is_reported_at_once(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {train: [a.jsonl], max_lenght: 5}\ntraining: {lrr: 1, batch_size: x}\n"
                    "lora: {rank: two}\nlearning_rate: 3\n")
    with pytest.raises(ConfigError) as e:
        load_train_config(str(path), ["training.epochs=abc"])
    message = str(e.value)
    assert message.startswith(f"6 problems in {path}:")
    for key in ("data.max_lenght", "training.lrr", "training.batch_size", "lora.rank", "learning_rate",
                "training.epochs"):
        assert f"`{key}`" in message, key
    assert e.value.problems[0].startswith("Unknown config key")  # the single problems stay available


def test_key_mistakes_and_combination_errors_come_in_one_error(tmp_path):
    """An unknown method or a batch size of 0 used to surface only after the typos were fixed: a second round."""
    path = tmp_path / "c.yaml"
    path.write_text("method: lroa\ndata: {train: [a.jsonl], max_lenght: 5}\ntraining: {batch_size: 0, lrr: 1}\n")
    with pytest.raises(ConfigError) as e:
        load_train_config(str(path), [])
    assert str(e.value).startswith(f"4 problems in {path}:"), str(e.value)
    for words in ("`data.max_lenght`", "`training.lrr`", "Unknown method `lroa`. Did you mean `lora`?",
                  "`training.batch_size` and `training.grad_accum` must be at least 1"):
        assert words in str(e.value), words


def test_combination_errors_are_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load(["training.max_steps=0", "data.eval_ratio=1.5", "lora.rank=0"])
    message = str(e.value)
    assert "Nothing to train" in message and "data.eval_ratio" in message and "lora.rank" in message


def test_llamafactory_file_points_to_convert_config(tmp_path, capsys):
    path = tmp_path / "lf.yaml"
    path.write_text("model_name_or_path: x\nfinetuning_type: lora\ndataset: identity\ncutoff_len: 512\n")
    assert cli_main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"tuneforge convert-config {path}" in err and "Did you mean `data.max_length`" in err


@pytest.mark.parametrize("flag, says", [("--resume", "`training.resume=auto`"), ("--output_dir", "`output_dir=runs/x`"),
                                        ("--seed", "`seed=VALUE`")])
def test_a_command_line_flag_gets_the_override_it_meant(flag, says):
    with pytest.raises(ConfigError, match=f"`{flag}` is a command-line flag; overrides are config keys .*{says}"):
        load([flag])


def test_a_single_problem_names_the_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: lroa\ndata: {train: [a.jsonl]}\n")
    with pytest.raises(ConfigError) as e:
        load_train_config(str(path), [])
    assert str(e.value) == f"{path}: Unknown method `lroa`. Did you mean `lora`?"


def test_a_problem_with_a_command_line_value_says_it_came_from_there(tmp_path):
    """The message names the YAML file; a bad value typed after it is not in that file, so each problem says where
    it came from (and only those: the file's own problems stay as they are)."""
    path = tmp_path / "c.yaml"
    path.write_text("data: {train: [a.jsonl]}\ntraining: {lrr: 1}\n")
    with pytest.raises(ConfigError) as e:
        load_train_config(str(path), ["training.lr=abc", "method=lorra", "training.epochs=2"])
    lr, lrr, method = (next(p for p in e.value.problems if p.split("`")[1] == key)
                       for key in ("training.lr", "training.lrr", "lorra"))
    assert lr.endswith("got 'abc' (set on the command line: `training.lr=abc`).")
    assert method.endswith("(set on the command line: `method=lorra`)")
    assert "command line" not in lrr  # `Did you mean training.lr` names an override key, but not as its subject


def test_null_for_a_list_says_how_to_give_none():
    """`data.eval=null` (to drop an example config's eval files) was refused without saying what to give instead."""
    with pytest.raises(ConfigError, match=r"`data.eval` must be a list, got None\. For none, give the empty list: "
                                          r"`data.eval: \[\]` \(`data.eval=\[\]` on the command line\)"):
        load(["data.eval=null"])
    assert load(["data.eval=[]"]).data.eval == []


def test_trls_batch_size_name_says_grpo_counts_prompts():
    """TRL's per_device_train_batch_size counts completions; carried over to a grpo run it sampled
    num_generations times as many (the hint said the meaning was the same)."""
    with pytest.raises(ConfigError, match=r"In grpo it counts prompts, each sampled grpo.num_generations times "
                                          r"\(TRL's counts completions\)"):
        load(["per_device_train_batch_size=8"])


def test_a_list_yaml_could_not_read_is_refused_not_taken_as_one_item():
    """`lora.target_modules=[*proj]` is not YAML (`*` starts an alias): it became the one-item list ['[*proj]'],
    a glob character class (for freeze.trainable_modules it matched every parameter and trained the whole model)."""
    with pytest.raises(ConfigError, match=r"`lora.target_modules` is the text `\[\*proj, \*fc\]`, not a list.*"
                                          r"\"lora.target_modules=\['\*proj', '\*fc'\]\""):
        load(["lora.target_modules=[*proj, *fc]"])
    assert load(["lora.target_modules=['*proj']"]).options("lora").target_modules == ["*proj"]


def test_only_the_files_own_keys_make_it_look_like_a_llamafactory_config(tmp_path):
    """LLaMA-Factory keys typed as overrides on a TuneForge config got "This looks like a LLaMA-Factory config:
    convert-config ..." about a file that is TuneForge's; a LLaMA-Factory file still gets that advice."""
    ours = tmp_path / "ours.yaml"
    ours.write_text("data: {train: [x.jsonl]}\n")
    with pytest.raises(ConfigError) as info:
        load_train_config(str(ours), ["per_device_train_batch_size=2", "lora_target=all", "val_size=0.1"])
    assert "convert-config" not in str(info.value) and "training.batch_size" in str(info.value)
    theirs = tmp_path / "lf.yaml"
    theirs.write_text("stage: sft\nfinetuning_type: lora\nlora_target: all\ndataset: alpaca_en_demo\n")
    with pytest.raises(ConfigError, match="This looks like a LLaMA-Factory config: `tuneforge convert-config"):
        load_train_config(str(theirs))
