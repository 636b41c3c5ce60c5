"""The mistakes a new user makes, each answered by one paragraph that names the file/row/key and the fix (and never
by a traceback, a silently dropped setting or a deleted folder)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tuneforge.cli import main as cli_main
from tuneforge.configs.llamafactory import convert_cli
from tuneforge.configs.schema import DatasetSpec, load_train_config
from tuneforge.configs.typed import apply_overrides
from tuneforge.data.build import open_registry, read_source
from tuneforge.data.readers import read_json, read_jsonl
from tuneforge.data.registry import Registry
from tuneforge.errors import ConfigError, DataError, UserError
from tuneforge.models.presets import init_model

LF_CONFIG = "model_name_or_path: some/model\nstage: sft\nfinetuning_type: lora\ndataset: alpaca_en_demo\n"
ALPACA = {"instruction": "Say hi", "input": "", "output": "hi"}


def _config_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_train_config(str(path))
    return str(err.value)


def test_a_tab_in_the_yaml_is_one_paragraph_naming_the_file_line_and_fix(tmp_path):
    # PyYAML's own text was four lines naming `<unicode string>` and ending at a caret
    message = _config_error(tmp_path, "stage: sft\nmodel:\n\tname_or_path: x\n")
    assert "\n" not in message and "<unicode string>" not in message
    assert "run.yaml" in message and "line 3" in message and "spaces" in message


def test_an_unclosed_quote_points_at_the_line_that_opens_it(tmp_path):
    message = _config_error(tmp_path, 'stage: sft\nmethod: "lora\nmodel:\n  name_or_path: x\n')
    assert "line 2" in message and "closing quote" in message and "\n" not in message


def test_a_key_written_twice_is_refused_not_silently_overwritten(tmp_path):
    message = _config_error(tmp_path, "stage: sft\ntraining:\n  lr: 1.0e-3\n  lr: 1.0e-4\n")
    assert "`lr` twice" in message and "lines 3 and 4" in message
    message = _config_error(tmp_path, "stage: sft\n~: 1\nnull: 2\n")  # two spellings of the null key
    assert "`null` twice" in message and "lines 2 and 3" in message


def test_a_merge_key_may_still_be_overridden(tmp_path):
    from tuneforge.configs.yaml_file import read_yaml_mapping

    path = tmp_path / "run.yaml"
    path.write_text("a: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\n", encoding="utf-8")
    assert read_yaml_mapping(str(path), "Config file", "x.yaml")["c"] == {"x": 3, "y": 2}


def test_a_config_path_that_is_a_folder_says_so(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a YAML file"):
        load_train_config(str(tmp_path))


def test_a_yaml_list_at_the_top_level_names_the_fix(tmp_path):
    message = _config_error(tmp_path, "- stage: sft\n- method: lora\n")
    assert "holds a list" in message and "no leading `- `" in message


@pytest.mark.parametrize("item, expected", [
    ("training.lr", "`training.lr=VALUE`"),
    ("other.yaml", "second config file"),
    ("help", "`--help`"),
    ("training.lr.x=1", "`training.lr` is a single value"),
    ("--training.lr=1e-4", "without dashes: write `training.lr=1e-4`"),
    ("training.lr:1e-4", "write `training.lr=1e-4`"),
])
def test_malformed_overrides_say_what_to_write(item, expected):
    with pytest.raises(ConfigError) as err:
        apply_overrides({"training": {"lr": 1.0}}, [item])
    assert expected in str(err.value)


@pytest.mark.parametrize("items", [["training.lr", "=", "1e-4"], ["training.lr=", "1e-4"], ["training.lr", "=1e-4"]])
def test_spaces_around_the_equals_sign_are_named(items):
    with pytest.raises(ConfigError, match="no spaces around `=`.*Write `training.lr=1e-4`"):
        apply_overrides({}, ["stage=sft", *items])


def test_an_empty_value_is_still_an_override():
    assert apply_overrides({}, ["model.chat_template=", "stage=sft"]) == {"model": {"chat_template": ""},
                                                                           "stage": "sft"}


def test_convert_config_out_that_is_a_folder_is_refused_without_a_temp_file(tmp_path):
    source = tmp_path / "lf.yaml"
    source.write_text(LF_CONFIG, encoding="utf-8")
    folder = tmp_path / "outdir"
    folder.mkdir()
    with pytest.raises(UserError, match="is a folder; --out takes the file"):
        convert_cli(SimpleNamespace(source=str(source), out=str(folder)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lf.yaml", "outdir"]


def test_convert_config_out_in_a_missing_folder_is_written(tmp_path, capsys):
    source = tmp_path / "lf.yaml"
    source.write_text(LF_CONFIG, encoding="utf-8")
    out = tmp_path / "new" / "sub" / "tf.yaml"
    assert convert_cli(SimpleNamespace(source=str(source), out=str(out))) == 0
    assert "stage: sft" in out.read_text(encoding="utf-8")


def test_convert_config_out_below_a_file_names_the_file(tmp_path):
    source = tmp_path / "lf.yaml"
    source.write_text(LF_CONFIG, encoding="utf-8")
    with pytest.raises(UserError, match="lf.yaml is a file, not a folder"):
        convert_cli(SimpleNamespace(source=str(source), out=str(source / "x.yaml")))


def test_a_missing_data_file_suggests_the_file_of_a_close_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "alpaca.json").write_text(json.dumps([ALPACA]), encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_source(DatasetSpec(path="d/alpaca.jsonl"), None, None)
    assert "Did you mean `d/alpaca.json`?" in str(err.value) and "data.registry" not in str(err.value)
    elsewhere = tmp_path / "elsewhere"  # a config's folder, where relative data paths are looked up too
    (elsewhere / "data").mkdir(parents=True)
    (elsewhere / "data" / "train.jsonl").write_text(json.dumps(ALPACA) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_source(DatasetSpec(path="data/trian.jsonl"), None, elsewhere)
    assert f"Did you mean `{elsewhere / 'data' / 'train.jsonl'}`?" in str(err.value)
    assert "does not exist either" not in str(err.value)


def test_a_registry_given_as_its_folder_names_the_file_inside(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reg").mkdir()
    (tmp_path / "reg" / "dataset_info.json").write_text("{}", encoding="utf-8")
    with pytest.raises(DataError, match=r"a folder: give the file inside it, reg/dataset_info.json"):
        open_registry("reg", None)


def test_a_registry_entry_with_a_misspelt_file_name_says_so(tmp_path):
    path = tmp_path / "dataset_info.json"
    path.write_text(json.dumps({"mine": {"filename": "x.json"}}), encoding="utf-8")
    with pytest.raises(DataError, match="It has `filename`: did you mean `file_name`?"):
        Registry(path).resolve(DatasetSpec(path="mine"))


def test_a_json_list_saved_as_jsonl_is_read_as_the_list(tmp_path):
    # every line of a pretty-printed list was a bad row ("not valid JSON"), and nothing said why
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps([ALPACA, ALPACA], indent=2), encoding="utf-8")
    rows = read_jsonl(path)
    assert [row.data for row in rows] == [ALPACA, ALPACA]
    path.write_text(json.dumps([ALPACA, ALPACA]) + "\n", encoding="utf-8")  # the list on one line
    assert [row.data for row in read_jsonl(path)] == [ALPACA, ALPACA]
    path.write_text("[\n]\n", encoding="utf-8")  # an empty list: no rows, said as for any empty file
    with pytest.raises(DataError, match="no data rows"):
        read_jsonl(path)


@pytest.mark.parametrize("name", ["rows.json", "rows.jsonl"])
def test_a_trailing_comma_is_named_with_its_place(tmp_path, name):
    path = tmp_path / name
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"comma at line 2, column 38 comes right before `\]`"):
        (read_json if name.endswith(".json") else read_jsonl)(path)


def test_init_model_force_never_deletes_a_folder_that_is_not_a_model(tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious", encoding="utf-8")
    with pytest.raises(UserError, match="not a model folder"):
        init_model("tiny-llama", folder, force=True)
    assert (folder / "notes.txt").read_text(encoding="utf-8") == "precious"
    a_file = tmp_path / "afile"
    a_file.write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match="is a file"):
        init_model("tiny-llama", a_file, force=True)
    assert a_file.read_text(encoding="utf-8") == "x"


def test_help_before_the_verb_shows_that_verbs_help(capsys):
    assert cli_main(["help", "export"]) == 0
    assert capsys.readouterr().out.startswith("usage: tuneforge export ")


def test_single_dash_help_says_to_use_two_dashes(capsys):
    assert cli_main(["export", "-help"]) == 2
    assert "write `--help` (two dashes)" in capsys.readouterr().err


def test_a_registry_name_without_a_registry_says_to_set_data_registry(tmp_path, monkeypatch):
    def hub_fails(name, split):
        raise DataError(f"`{name}` ... hub failed")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("tuneforge.data.readers.read_hub", hub_fails)
    monkeypatch.setattr("tuneforge.data.build.hub_reachable", lambda: False)
    with pytest.raises(DataError, match=r"set `data.registry` to that file"):
        read_source(DatasetSpec(path="alpaca_en_demo"), None, None)


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_an_empty_config_file_is_called_empty(tmp_path, text):
    assert "run.yaml is empty" in _config_error(tmp_path, text)


def test_a_missing_jinja_template_names_the_flag_and_the_folder(tmp_path, monkeypatch):
    from tuneforge.data.templates import resolve_chat_template

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        resolve_chat_template(None, "nope.jinja")
    assert "--chat-template" in str(err.value) and str(tmp_path) in str(err.value)


def test_a_misspelt_model_folder_suggests_the_folder_of_a_close_name(tmp_path):
    from tuneforge.models.loading import resolve_source

    (tmp_path / "tiny").mkdir()
    with pytest.raises(UserError, match=rf"Did you mean `{tmp_path / 'tiny'}`\?"):
        resolve_source(str(tmp_path / "tinny"))


def test_the_eval_config_reads_yaml_as_train_does(tmp_path):
    # `tuneforge eval tab.yaml` ended in PyYAML's ScannerError traceback, and a key written twice was dropped
    from tuneforge.eval.run import load_eval_config

    tabbed, twice = tmp_path / "tab.yaml", tmp_path / "twice.yaml"
    tabbed.write_text("models:\n\t- model: x\n", encoding="utf-8")
    twice.write_text("out: a\nout: b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"tab\.yaml is not valid YAML at line 2.*spaces"):
        load_eval_config(str(tabbed), [])
    with pytest.raises(ConfigError, match=r"sets `out` twice"):
        load_eval_config(str(twice), [])
    with pytest.raises(ConfigError, match="is a folder"):
        load_eval_config(str(tmp_path), [])


def test_overrides_before_the_config_file_say_the_order(capsys):
    # `tuneforge train training.lr=1e-4 run.yaml` said only "Usage: ..."
    assert cli_main(["train", "training.lr=1e-4", "run.yaml", "method=lora"]) == 2
    assert ("The config file comes first, then the overrides: `tuneforge train run.yaml training.lr=1e-4 "
            "method=lora`") in capsys.readouterr().err
    assert cli_main(["train", "--resume", "run.yaml"]) == 2  # no suggestion that would fail on the flag next
    assert "`--resume` is a command-line flag" in capsys.readouterr().err
