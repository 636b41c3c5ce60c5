"""`training.eval_suite` is checked when the training config loads, as `tuneforge eval` checks its own config and
task files: a bad `shots`, a missing benchmark folder or a mistyped key failed only at the first eval step, after
the model had loaded and trained up to it (possibly hours)."""

from __future__ import annotations

import pytest

from tests.eval.test_multiple_choice import _write_bench
from tuneforge.configs.schema import load_train_config
from tuneforge.errors import ConfigError

BASE = ["data.train=[x]", "training.eval_steps=2"]


def _suite(text: str) -> list[str]:
    return BASE + [f"training.eval_suite={text}"]


def test_eval_suite_task_data_is_checked_at_config_load(tmp_path):
    _write_bench(tmp_path / "eval" / "mmlu", n=2)  # 2 dev questions per subject
    with pytest.raises(ConfigError) as e:
        load_train_config(None, _suite(f"{{tasks: [mmlu], data_dir: {tmp_path / 'eval'}, shots: 3}}")
                          + ["training.lr=-x"])  # one problem among the config's others
    message = str(e.value)
    assert message.startswith("2 problems") and "`training.lr`" in message
    assert "`training.eval_suite`: mmlu: shots=3, but the dev split of 2 subject(s) holds fewer examples" in message
    with pytest.raises(ConfigError, match=r"`training.eval_suite`: mmlu: no `test` folder in .*nowhere/mmlu"):
        load_train_config(None, _suite(f"{{tasks: [mmlu], data_dir: {tmp_path / 'nowhere'}, shots: 0}}"))
    cfg = load_train_config(None, _suite(f"{{tasks: [mmlu], data_dir: {tmp_path / 'eval'}, shots: 2}}"))
    assert cfg.training.eval_suite["shots"] == 2


def test_eval_suite_keys_and_settings_are_checked_at_config_load(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_train_config(None, _suite(f"{{tasks: [mmlu, 'data:{tmp_path / 'none.jsonl'}'], limt: 3, "
                                       f"models: [m], data_dir: {tmp_path}}}"))
    message = str(e.value)
    assert "Unknown config key `training.eval_suite.limt`. Did you mean `training.eval_suite.limit`?" in message
    assert "`training.eval_suite.models` is not used" in message
    with pytest.raises(ConfigError) as e:
        load_train_config(None, _suite(f"{{tasks: [mmlu, 'data:{tmp_path / 'none.jsonl'}'], data_dir: {tmp_path}}}"))
    assert f"`training.eval_suite`: Task `data:{tmp_path / 'none.jsonl'}`: {tmp_path / 'none.jsonl'}: no such" \
        in str(e.value)
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
