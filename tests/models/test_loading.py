"""The one loading path: local folders, hub ids without a hub, builtin names, and its security defaults."""

from __future__ import annotations

import json
import shutil
import sys
import time
import types

import pytest
import torch

from tuneforge.configs.schema import ModelConfig
from tuneforge.errors import UserError
from tuneforge.models.loading import hub_reachable, load_model_and_tokenizer, load_tokenizer


def test_local_folder_loads_ready_for_training(tiny_llama_dir):
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_llama_dir)), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    assert tok.padding_side == "right" and tok.pad_token == "<|finetune_right_pad_id|>"
    assert model.config._attn_implementation == "tuneforge_auto"  # model.attn_implementation: auto, on CPU
    assert model.generation_config.pad_token_id == tok.pad_token_id


def test_attn_implementation_is_passed_through(tiny_qwen2_dir):
    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_qwen2_dir), attn_implementation="eager"))
    assert model.config._attn_implementation == "eager"


def test_missing_pad_token_falls_back_to_eos(tiny_qwen2_dir, tmp_path):
    folder = shutil.copytree(tiny_qwen2_dir, tmp_path / "m")
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["pad_token"] = None
    cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    tok = load_tokenizer(ModelConfig(name_or_path=str(folder)))
    assert tok.pad_token == tok.eos_token == "<|im_end|>" and tok.padding_side == "right"


def _save_pickle_model(src, dest):
    """The same model with its weights as a pickle (transformers 5 no longer writes those itself)."""
    from safetensors.torch import load_file

    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(src / "model.safetensors"), dest / "pytorch_model.bin")


def test_pickle_weights_refused_unless_allowed(tiny_llama_dir, tmp_path):
    folder = tmp_path / "pickled"
    _save_pickle_model(tiny_llama_dir, folder)
    with pytest.raises(UserError) as err:
        load_model_and_tokenizer(ModelConfig(name_or_path=str(folder)))
    assert "pytorch_model.bin" in str(err.value) and "model.allow_pickle" in str(err.value)
    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(folder), allow_pickle=True))
    reference, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_llama_dir)))
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)


def _custom_code_folder(src, dest, marker):
    """A model folder whose config needs its own Python code; importing that code writes `marker`."""
    shutil.copytree(src, dest)
    (dest / "configuration_custom.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig\n\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'tuneforge_custom'\n", encoding="utf-8")
    cfg = json.loads((dest / "config.json").read_text(encoding="utf-8"))
    cfg.update(model_type="tuneforge_custom", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (dest / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return dest


def test_trust_remote_code_is_off_by_default(tiny_llama_dir, tmp_path):
    assert ModelConfig().trust_remote_code is False
    marker = tmp_path / "code-ran"
    folder = _custom_code_folder(tiny_llama_dir, tmp_path / "custom", marker)
    with pytest.raises(UserError, match="trust_remote_code"):
        load_model_and_tokenizer(ModelConfig(name_or_path=str(folder)))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["./no/such/folder", "/definitely/not/here"])
def test_missing_folder_is_a_clear_error(name):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(ModelConfig(name_or_path=name))


def test_folders_that_are_not_models(tmp_path, tiny_llama_dir, tiny_qwen2_dir):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match=r"To train on from it \(e.g. DPO after SFT\), merge it first: `tuneforge "
                                        r"export --adapter .*adapter --out .*adapter-merged`"):
        load_model_and_tokenizer(ModelConfig(name_or_path=str(tmp_path / "adapter")))
    for config, name in (('{"peft_type": "PROMPT_TUNING"}', "prompt_tuning"), ('{"tuneforge_method": "adapter"}',
                                                                              "adapter")):
        (tmp_path / "adapter" / "adapter_config.json").write_text(config)  # its export is no merged model
        with pytest.raises(UserError, match=rf"Its method \({name}\) cannot be merged into the base weights"):
            load_model_and_tokenizer(ModelConfig(name_or_path=str(tmp_path / "adapter")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_model_and_tokenizer(ModelConfig(name_or_path=str(tmp_path / "empty")))
    with pytest.raises(UserError, match="is a file"):
        load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_llama_dir / "config.json")))
    # config and weights copied without the tokenizer files: transformers builds an empty tokenizer, and the run
    # used to fail on "no trainable token was left" in the data
    # a reward model (what stage rm writes) loaded as a causal LM dropped its score head: chat printed noise
    shutil.copytree(tiny_llama_dir, tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    (tmp_path / "rm" / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"]}))
    with pytest.raises(UserError, match="holds a reward model .*Use it as the reward of stage ppo or grpo"):
        load_model_and_tokenizer(ModelConfig(name_or_path=str(tmp_path / "rm")))
    for model_dir in (tiny_llama_dir, tiny_qwen2_dir):  # llama fails inside transformers, qwen2 loads empty
        folder = tmp_path / f"no_tokenizer_{model_dir.name}"
        folder.mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy(model_dir / name, folder / name)
        with pytest.raises(UserError, match="no_tokenizer.* has no usable tokenizer.*Copy the tokenizer files"):
            load_tokenizer(ModelConfig(name_or_path=str(folder)))


def test_hub_id_without_hub_fails_fast_with_advice():
    t0 = time.perf_counter()
    with pytest.raises(UserError) as err:
        load_model_and_tokenizer(ModelConfig(name_or_path="Qwen/Qwen2.5-0.5B-Instruct"))
    assert "unreachable" in str(err.value) and "local folder" in str(err.value)
    assert time.perf_counter() - t0 < 30  # no minute of retries (generous bound: slow shared CI)


def test_hub_probe_reports_unreachable_endpoint(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    assert hub_reachable(timeout=1.0) is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable() is False


def test_unknown_builtin_suggests_closest():
    with pytest.raises(UserError, match="smollm2-135m-instruct"):
        load_tokenizer(ModelConfig(name_or_path="builtin:smollm2-135m"))


def test_chat_template_override_goes_through_data_templates(tiny_qwen2_dir, monkeypatch):
    calls = []

    def resolve_chat_template(tokenizer, override):
        calls.append(override)
        return "{% for m in messages %}{{ m['content'] }}{% endfor %}"

    fake = types.ModuleType("tuneforge.data.templates")
    fake.resolve_chat_template = resolve_chat_template
    monkeypatch.setitem(sys.modules, "tuneforge.data.templates", fake)
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_qwen2_dir), chat_template="plain"))
    assert calls == ["plain"]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"
    load_tokenizer(ModelConfig(name_or_path=str(tiny_qwen2_dir)))
    assert calls == ["plain"]  # no override: the data package is not consulted


def test_relative_path_that_looks_local_is_a_missing_folder(tmp_path, monkeypatch):
    """`runs/x` when ./runs exists is the output of a run not trained yet, not a hub id (and not a hub lookup)."""
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # would have gone to the hub before
    monkeypatch.setattr("tuneforge.models.loading.hub_reachable", lambda timeout=3.0: pytest.fail("asked the hub"))
    for name in ("runs/x", "./x", "runs/x/y"):
        with pytest.raises(UserError, match=f"Model folder {name} does not exist"):
            load_tokenizer(ModelConfig(name_or_path=name))


def test_looks_local():
    from tuneforge.models.loading import looks_local

    assert looks_local("./x") and looks_local("/abs/x") and looks_local("a/b/c") and looks_local("~/x")
    assert not looks_local("Qwen/Qwen2.5-0.5B-Instruct") and not looks_local("gpt2")
    assert not looks_local("builtin:smollm2-135m-instruct")


def test_dataset_name_without_hub_fails_in_seconds(tmp_path, monkeypatch):
    """A name that is neither a file nor in the registry, with the hub unreachable: `datasets` is asked in offline
    mode (the local cache, or an error at once), not left to retry for about 26 s."""
    import datasets
    import huggingface_hub.constants

    from tuneforge.configs.schema import DataConfig, DatasetSpec
    from tuneforge.data.build import read_datasets
    from tuneforge.errors import DataError

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # as when the variable is not set at import
    monkeypatch.setattr("tuneforge.models.loading.hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr("tuneforge.data.build.hub_reachable", lambda timeout=3.0: False)
    modes = []

    def load_dataset(name, split):
        modes.append((datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE))
        if name == "someone/cached":
            return [{"text": "from the cache"}]
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(DataError, match="someone/corpus: no such file or folder, and not a Hugging Face dataset in "
                                        "the local cache either: the hub is unreachable"):
        read_datasets(DataConfig(train=[DatasetSpec(path="someone/corpus")]))
    train, _, _ = read_datasets(DataConfig(train=[DatasetSpec(path="someone/cached")]))
    assert len(train) == 1  # a dataset in the local cache still loads without a hub
    assert modes == [(True, True), (True, True)] and datasets.config.HF_HUB_OFFLINE is False  # restored after
    (tmp_path / "runs").mkdir()
    with pytest.raises(DataError, match=r"runs/train: no such file or folder \(relative paths"):
        read_datasets(DataConfig(train=[DatasetSpec(path="runs/train")]))
    assert len(modes) == 2  # a path that looks local never reaches `datasets`


def test_a_folder_without_config_names_the_key_and_the_flag(tmp_path):
    """The same check serves train (a config key) and chat/export/eval/serve (--model): both names are given."""
    from tuneforge.models.loading import check_local_folder

    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(UserError, match=r"no config.json.*`model.name_or_path` \(or `--model`\)"):
        check_local_folder(tmp_path)
    with pytest.raises(UserError, match=r"is a file; the model \(`model.name_or_path`, or `--model`\)"):
        check_local_folder(tmp_path / "weights.bin")


def test_atomic_folder_removes_temp_folders_of_killed_writers(tmp_path):
    """A SIGKILLed export left `.out.tmp-PID/` (a partial model) beside --out for good; the next write of that
    folder removes it, and leaves one whose process still runs."""
    import os

    from tuneforge.models.loading import atomic_folder

    dead = tmp_path / ".out.tmp-99999999"  # above any pid_max: no such process
    alive = tmp_path / f".out.tmp-{os.getppid()}"
    other = tmp_path / ".other.tmp-99999999"  # another folder's write: not ours to judge
    for folder in (dead, alive, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "config.json").write_text("{}")
    assert (tmp_path / "out" / "config.json").is_file()
    assert not dead.exists() and alive.is_dir() and other.is_dir()
