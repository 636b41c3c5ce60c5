"""`training.eval_suite` is checked as `tuneforge eval` checks its own config and task files: its keys and settings
when the training config loads, its task files as training starts, before the model loads. A bad `shots`, a missing
benchmark folder or a mistyped key failed only at the first eval step, after the model had loaded and trained up to
it (possibly hours). Tools that only read the config's data (`tuneforge data inspect --config`) need no benchmark
folder."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.eval.test_multiple_choice import _write_bench
from tuneforge.cli import main
from tuneforge.configs.schema import load_train_config
from tuneforge.errors import ConfigError
from tuneforge.train import run_config

BASE = ["data.train=[x]", "training.eval_steps=2"]


def _suite(text: str) -> list[str]:
    return BASE + [f"training.eval_suite={text}"]


def _train(config: list[str], tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("tuneforge.training.setup.setup_model", lambda *a, **k: pytest.fail("loaded a model"))
    run_config(load_train_config(None, config + [f"output_dir={tmp_path / 'run'}"]), log=lambda _: None)


def test_eval_suite_task_data_is_checked_before_the_model_loads(tmp_path, monkeypatch, capsys):
    _write_bench(tmp_path / "eval" / "mmlu", n=2)  # 2 dev questions per subject
    too_many_shots = _suite(f"{{tasks: [mmlu], data_dir: {tmp_path / 'eval'}, shots: 3}}")
    with pytest.raises(ConfigError) as e:
        _train(too_many_shots, tmp_path, monkeypatch)
    assert "`training.eval_suite`: mmlu: shots=3, but the dev split of 2 subject(s) holds fewer examples" \
        in str(e.value)
    no_folder = _suite(f"{{tasks: [mmlu, 'data:{tmp_path / 'none.jsonl'}'], data_dir: {tmp_path / 'nowhere'}}}")
    with pytest.raises(ConfigError) as e:
        _train(no_folder, tmp_path, monkeypatch)
    message = str(e.value)
    assert message.startswith("2 problems") and re.search(r"mmlu: .*nowhere/mmlu does not exist", message)
    assert f"Task `data:{tmp_path / 'none.jsonl'}`: {tmp_path / 'none.jsonl'}: no such" in message
    assert not (tmp_path / "run").exists()
    # the data tools read the same config without the benchmark folder
    data = tmp_path / "rows.jsonl"
    data.write_text('{"instruction": "Say hi.", "output": "Hi."}\n')
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(yaml_config(no_folder + [f"data.train=[{data}]"])))
    assert main(["data", "inspect", "--config", str(config), "--out", str(tmp_path / "stats")]) == 0, \
        capsys.readouterr().err


def yaml_config(overrides: list[str]) -> dict:
    cfg: dict = {"model": {"name_or_path": "builtin:tiny-llama"}}
    for item in overrides:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        cfg.setdefault(section, {})[name] = yaml.safe_load(value)
    return cfg


def test_eval_suite_keys_and_settings_are_checked_at_config_load(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_train_config(None, _suite(f"{{tasks: [mmlu, 'data:{tmp_path / 'none.jsonl'}'], limt: 3, "
                                       f"models: [m], data_dir: {tmp_path}}}") + ["training.lr=-x"])
    message = str(e.value)
    assert "Unknown config key `training.eval_suite.limt`. Did you mean `training.eval_suite.limit`?" in message
    assert "`training.eval_suite.models` is not used" in message
    assert message.startswith("3 problems") and "`training.lr`" in message  # listed with the config's others
    with pytest.raises(ConfigError, match=r"`training.eval_suite`: `limit` is 0"):
        load_train_config(None, _suite("{tasks: [mmlu], limit: 0}"))


@pytest.mark.parametrize("kind", ["judge", "grade"])
def test_judged_tasks_are_refused_in_the_suite(tmp_path, kind):
    """The suite runs no judge: a judge:/grade: task would generate replies every eval step and log no score."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "hi", "output": "there"}\n')
    with pytest.raises(ConfigError) as e:
        load_train_config(None, _suite(f"{{tasks: ['{kind}:{prompts}'], data_dir: {tmp_path}}}"))
    assert f"task `{kind}:{prompts}` is scored by a judge model, which the suite does not call" in str(e.value)
