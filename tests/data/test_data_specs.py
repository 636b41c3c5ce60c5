"""Dataset specs and `data.mix` are checked key by key before any file is read: `max_samples`, the roles of
`columns`, `split` on a local file, the mixture's settings; in a training config together with its other mistakes."""

from __future__ import annotations

import json

import pytest

from tuneforge.configs.schema import DataConfig, DatasetSpec, MixConfig, load_train_config
from tuneforge.data.build import read_datasets
from tuneforge.errors import ConfigError


def one_row_file(tmp_path) -> str:
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"q": "Hi", "a": "Hello"}) + "\n", encoding="utf-8")
    return str(path)


def load(overrides: list[str]):
    return load_train_config(None, overrides, base={"data": {"train": ["x.jsonl"]}})


@pytest.mark.parametrize("max_samples", [0, -1])
def test_max_samples_below_one_is_a_config_error_not_all_rows_bad(tmp_path, max_samples):
    spec = DatasetSpec(path=one_row_file(tmp_path), max_samples=max_samples, columns={"instruction": "q",
                                                                                       "output": "a"})
    with pytest.raises(ConfigError) as err:
        read_datasets(DataConfig(train=[spec]))
    assert str(err.value) == (f"`data.train[0]` ({spec.path}): `max_samples` must be at least 1; leave it out to "
                              f"read every row (got {max_samples}).")
    with pytest.raises(ConfigError, match=r"`data.train\[0\]` \(x.jsonl\): `max_samples` must be at least 1"):
        load([f"data.train=[{{path: x.jsonl, max_samples: {max_samples}}}]"])


def test_unknown_column_role_is_named_with_the_format_roles_and_a_hint(tmp_path):
    spec = DatasetSpec(path=one_row_file(tmp_path), format="alpaca", columns={"instrction": "q", "output": "a"})
    with pytest.raises(ConfigError) as err:
        read_datasets(DataConfig(train=[spec]))
    message = str(err.value)
    assert "`columns` maps the unknown role `instrction`" in message and "Did you mean `instruction`?" in message
    assert "the roles of format alpaca are instruction, input, output, system, history, reference" in message
    roles = DatasetSpec(path=spec.path, columns={"instruction": "q", "output": "a"})
    assert len(read_datasets(DataConfig(train=[roles]))[0]) == 1  # real roles pass, format auto too


def test_split_on_a_local_file_is_refused(tmp_path):
    spec = DatasetSpec(path=one_row_file(tmp_path), split="test", columns={"instruction": "q", "output": "a"})
    with pytest.raises(ConfigError, match=r"`split: test` selects a split of a Hugging Face hub dataset, but .* is "
                                          r"local and has no splits"):
        read_datasets(DataConfig(train=[spec]))


def test_bad_mix_values_are_reported_key_by_key():
    with pytest.raises(ConfigError) as err:
        load(["data.mix={strategy: temp, T: -1, size: 0}"])
    message = str(err.value)
    assert "must be section" not in message
    assert "`data.mix.strategy` must be one of proportional, temperature, equal; got 'temp'. Did you mean " \
           "`temperature`?" in message
    assert "`data.mix.T` must be > 0" in message and "`data.mix.size` must be at least 1" in message
    with pytest.raises(ConfigError, match=r"`data.mix` must be a section \(mapping\), got 3"):
        load(["data.mix=3"])
    cfg = DataConfig(train=[DatasetSpec(path="x.jsonl")], mix=MixConfig(K=0))
    with pytest.raises(ConfigError, match=r"`data.mix.K` must be at least 1 row, got 0"):
        read_datasets(cfg)
