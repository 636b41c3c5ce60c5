"""`tuneforge data inspect`: counts, languages, empty/duplicate fields, and token statistics that equal what the
training encoder produces; plus the `tuneforge data` CLI surface."""

from __future__ import annotations

import json
import os

import pytest

from tests.data.curate.helpers import parse, write_jsonl
from tuneforge.cli import main as cli_main
from tuneforge.data.curate.inspect import inspect
from tuneforge.data.types import IGNORE_INDEX

ROWS = [{"instruction": "Say hi", "input": "", "output": "Hello there, nice to meet you."},
        {"instruction": "把 7 千米换算成米。", "input": "", "output": "7000 米"},
        {"instruction": "Say hi", "input": "", "output": "Hi!"},
        {"instruction": "Summarise", "input": "A long text " * 40, "output": "A text.", "history": [["a", "b"]]},
        {"instruction": "Broken", "output": ""}]


def test_counts_languages_and_fields(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    report = inspect(parse("inspect", ["--data", path, "--out", str(tmp_path / "out")]))
    assert report["rows"] == 5 and report["bad_rows"] == 1 and "rows.jsonl:line 5" in report["bad_rows_first"][0]
    assert report["languages"] == {"en": 3, "zh": 1}
    assert report["turns"] == {1: 3, 2: 1}
    assert report["empty_fields"] == {"column `input`": 3, "column `output`": 1}
    assert report["duplicate_fields"]["column `instruction`"] == 1  # "Say hi" twice
    assert report["duplicate_fields"].get("whole row (normalised)", 0) == 0
    assert "tokens" not in report
    for name in ("lengths.png", "turns.png", "languages.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "**5 rows**" in (tmp_path / "out" / "report.md").read_text(encoding="utf-8")


def test_token_statistics_match_the_training_encoder(tmp_path, tiny_qwen2_dir):
    """Lengths are the rows rendered whole (to choose max_length by); loss tokens are those of what training keeps
    after the cut (build_datasets), and their share is of the tokens training keeps."""
    from transformers import AutoTokenizer

    from tuneforge.configs.schema import DataConfig, DatasetSpec
    from tuneforge.data.build import build_datasets, load_examples
    from tuneforge.data.encode import encode_chat
    from tuneforge.data.types import DataReport

    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    report = inspect(parse("inspect", ["--data", path, "--model", str(tiny_qwen2_dir), "--max-length", "40",
                                       "--out", str(tmp_path / "out")]))
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    encoded = [encode_chat(tokenizer, e.messages) for e in load_examples([DatasetSpec(path=path)], None, None,
                                                                          DataReport())]
    lengths = [len(e) for e in encoded]
    kept, _, _ = build_datasets(DataConfig(train=[DatasetSpec(path=path)], max_length=40, on_error="skip"),
                                tokenizer, "sft")
    loss = sum(1 for e in kept for label in e.labels[1:] if label != IGNORE_INDEX)
    tokens = report["tokens"]
    assert (tokens["min"], tokens["max"], tokens["total"]) == (min(lengths), max(lengths), sum(lengths))
    assert tokens["kept"] == sum(map(len, kept)) < sum(lengths)
    assert tokens["loss_tokens"] == loss and tokens["loss_share"] == pytest.approx(loss / tokens["kept"], abs=1e-4)
    assert tokens["rows_cut"] == sum(n > 40 for n in lengths) >= 1
    saved = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert saved["tokens"]["rows_cut"] == tokens["rows_cut"]


def test_token_statistics_use_the_configs_data_settings(tmp_path, tiny_qwen2_dir):
    """With --config, each row is measured as training encodes it: its `data.system` prompt and its special-token
    policy (a reply spelling `<|im_end|>`, escaped to plain text) count, so inspect's lengths are the lengths of the
    ids training builds, and those `--show` prints."""
    from transformers import AutoTokenizer

    from tuneforge.configs.schema import load_train_config
    from tuneforge.data.build import build_datasets

    rows = [*ROWS[:3], {"instruction": "End a turn", "input": "", "output": "Write <|im_end|> there."}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    config = tmp_path / "cfg.yaml"
    config.write_text(f"model: {{name_or_path: {tiny_qwen2_dir}}}\ndata:\n  train: [{path}]\n"
                      f"  system: You answer in one short sentence, politely and without any lists.\n"
                      f"  special_tokens_in_text: escape\n", encoding="utf-8")
    report = inspect(parse("inspect", ["--config", str(config), "--model", str(tiny_qwen2_dir),
                                       "--out", str(tmp_path / "out")]))
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    built, _, _ = build_datasets(load_train_config(config).data, tokenizer, "sft")
    lengths = [len(e) for e in built]
    loss = sum(1 for e in built for label in e.labels[1:] if label != IGNORE_INDEX)
    tokens = report["tokens"]
    assert (tokens["min"], tokens["max"], tokens["total"]) == (min(lengths), max(lengths), sum(lengths))
    assert tokens["loss_tokens"] == loss and tokens["rows_cut"] == 0 and tokens["render_errors"] == 0


def test_data_verb_help_and_errors(tmp_path, capsys):
    assert cli_main(["data"]) == 0 and "clean" in capsys.readouterr().out
    assert cli_main(["data", "clean", "--help"]) == 0
    assert "--jaccard" in capsys.readouterr().out
    assert cli_main(["data", "clen"]) == 2 and "Did you mean `clean`" in capsys.readouterr().err
    assert cli_main(["data", "inspect", "--out", str(tmp_path)]) == 2
    assert "No datasets given" in capsys.readouterr().err
    assert cli_main(["data", "inspect", "--data", "missing.jsonl", "--out", str(tmp_path)]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["inspect", "clean"])
def test_an_out_folder_that_cannot_be_created_is_one_paragraph(tmp_path, capsys, verb):
    # a FileNotFoundError traceback from mkdir (/proc takes no folders); a file on the way is named
    write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q", "output": "a"}])
    (tmp_path / "taken").write_text("x")
    for out, why in (("/proc/tf-out", "Cannot write --out /proc/tf-out: no such file or directory"),
                     (str(tmp_path / "taken" / "sub"), f"{tmp_path / 'taken'} is a file, not a folder")):
        if out.startswith("/proc") and not os.path.isdir("/proc/self"):
            continue
        assert cli_main(["data", verb, "--data", str(tmp_path / "d.jsonl"), "--out", out]) == 2
        assert why in capsys.readouterr().err


def test_config_datasets_are_read_like_training(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", ROWS[:2])
    config = tmp_path / "cfg.yaml"
    config.write_text("data:\n  train: [{path: train.jsonl, max_samples: 1}]\n", encoding="utf-8")
    report = inspect(parse("inspect", ["--config", str(config), "--out", str(tmp_path / "out")]))
    assert report["rows"] == 1 and report["languages"] == {"en": 1}


def test_registry_names_resolve_like_training(tmp_path, shared_assets):
    registry = shared_assets / "datasets/llamafactory/dataset_info.json"
    report = inspect(parse("inspect", ["--registry", str(registry), "--data", "identity", "--out",
                                       str(tmp_path / "out")]))
    assert report["rows"] == 91 and report["bad_rows"] == 0
    assert report["rows_per_dataset"] == {"identity": 91}
    (warning,) = report["placeholder_warnings"]  # identity.json's {{name}}/{{author}} are the user's to fill in
    assert "85 rows contain the placeholders {{author}}, {{name}}" in warning and "sed -i" in warning


def test_text_rows_count_tokens_as_pretraining_does(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    texts = ["A document for continued pre-training.", "另一个文档。" * 20]
    path = write_jsonl(tmp_path / "pt.jsonl", [{"text": t} for t in texts])
    report = inspect(parse("inspect", ["--data", path, "--model", str(tiny_llama_dir), "--max-length", "32",
                                       "--out", str(tmp_path / "out")]))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    lengths = [len(tokenizer(t)["input_ids"]) + 1 for t in texts]  # + eos, as stage pt encodes
    assert report["kinds"] == {"text": 2} and report["tokens"]["total"] == sum(lengths)
    assert report["tokens"]["rows_cut"] == sum(n > 32 for n in lengths)
    assert report["languages"] == {"en": 1, "zh": 1}


@pytest.mark.parametrize("verb", [[], ["clean"], ["inspect"], ["mix"], ["safety"], ["synth"]])
def test_help_examples_are_whole_commands(verb, capsys):
    """The examples come from the docstring lines that start with the command; a line continued with `\\` would
    show without its continuation and break when copied."""
    assert cli_main(["data", *verb, "--help"]) == 0
    examples = capsys.readouterr().out.split("examples:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert examples and all(line.strip().startswith("tuneforge data") and not line.endswith("\\")
                            for line in examples)
    if verb == ["mix"] or not verb:
        assert any("mix" in line and line.endswith("--out data/mix") for line in examples)


def test_config_help_says_relative_paths_start_from_the_current_folder(tmp_path, monkeypatch, capsys):
    assert cli_main(["data", "inspect", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "relative paths from the current folder as `tuneforge train` reads them" in text
    assert "relative paths from the config's folder;" not in text
    (tmp_path / "cfgdir" / "data").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "x.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "cfgdir" / "data" / "x.jsonl", ROWS[:4])
    (tmp_path / "cfgdir" / "sub.yaml").write_text("data:\n  train: [data/x.jsonl]\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    report = inspect(parse("inspect", ["--config", "cfgdir/sub.yaml", "--out", "out"]))
    assert report["rows"] == 2  # ./data/x.jsonl, as `tuneforge train cfgdir/sub.yaml` would read


@pytest.mark.parametrize("verb", ["inspect", "clean"])
@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_a_file_without_rows_is_refused_as_training_refuses_it(tmp_path, capsys, verb, content):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(content, encoding="utf-8")
    good = write_jsonl(tmp_path / "good.jsonl", ROWS[:2])
    assert cli_main(["data", verb, "--data", good, str(empty), "--out", str(tmp_path / "out")]) == 2
    assert f"{empty}: no data rows in this file" in capsys.readouterr().err


def test_a_refused_run_leaves_no_empty_output_folder(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    for verb in ("inspect", "clean"):
        out = tmp_path / f"out_{verb}"
        assert cli_main(["data", verb, "--data", str(tmp_path / "empty.jsonl"), "--out", str(out)]) == 2
        assert "no data rows in this file" in capsys.readouterr().err and not out.exists()
    kept = tmp_path / "kept"
    kept.mkdir()  # a folder the user made is theirs: left alone
    assert cli_main(["data", "inspect", "--data", str(tmp_path / "empty.jsonl"), "--out", str(kept)]) == 2
    assert kept.is_dir()


def test_show_prints_encoded_rows_with_the_trained_tokens_marked(tmp_path, tiny_qwen2_dir, capsys):
    """LLaMA-Factory prints one encoded example so a wrong template or loss mask shows; `--show N` prints N, encoded
    by the training encoder with the config's stage, model, template and data settings (here its system prompt)."""
    from transformers import AutoTokenizer

    from tuneforge.configs.schema import DataConfig, DatasetSpec
    from tuneforge.data.build import build_datasets
    from tuneforge.data.curate.show import TRAIN_CLOSE, TRAIN_OPEN

    path = write_jsonl(tmp_path / "rows.jsonl", ROWS[:2])
    config = tmp_path / "cfg.yaml"
    config.write_text(f"model: {{name_or_path: {tiny_qwen2_dir}}}\ndata:\n  train: [{path}]\n  system: Be brief.\n",
                      encoding="utf-8")
    assert cli_main(["data", "inspect", "--config", str(config), "--show", "1", "--out", str(tmp_path / "out")]) == 0
    shown = capsys.readouterr().out.split("=== row ")[1:]
    assert len(shown) == 1 and shown[0].startswith(f"1: {path}:line 1 (stage sft) ===")
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    (trained,), _, _ = build_datasets(DataConfig(train=[DatasetSpec(path=path, max_samples=1)], system="Be brief."),
                                      tokenizer, "sft")
    loss = sum(1 for label in trained.labels[1:] if label != -100)
    assert f"{len(trained)} tokens, {loss} trained" in shown[0]
    text = shown[0].split("\n", 2)[2]
    plain = text.replace(TRAIN_OPEN, "").replace(TRAIN_CLOSE, "")
    assert plain.rstrip("\n") == tokenizer.decode(trained.input_ids).rstrip("\n")
    assert "Be brief." in text and text.count(TRAIN_OPEN) == 1  # one reply, its end-of-turn marker included
    assert f"{TRAIN_OPEN}Hello there, nice to meet you.<|im_end|>\n{TRAIN_CLOSE}" in text


def test_show_encodes_preference_pairs_as_dpo_does_and_needs_a_model(tmp_path, tiny_qwen2_dir, shared_assets,
                                                                    capsys):
    from transformers import AutoTokenizer

    from tuneforge.configs.schema import DataConfig, DatasetSpec
    from tuneforge.data.build import build_datasets
    from tuneforge.data.curate.show import TRAIN_CLOSE, TRAIN_OPEN

    path = str(shared_assets / "datasets/llamafactory/dpo_en_demo.json")
    out = str(tmp_path / "out")
    assert cli_main(["data", "inspect", "--data", path, "--show", "1", "--out", out]) == 2
    assert "`--show` prints rows encoded with a model's tokenizer" in capsys.readouterr().err
    report = inspect(parse("inspect", ["--data", path, "--model", str(tiny_qwen2_dir), "--max-length", "4096",
                                       "--show", "1", "--out", out]))
    assert report["rows"] == 300 and report["kinds"] == {"pairs": 300} and report["tokens"]["total"] > 0
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    (pair,), _, _ = build_datasets(DataConfig(train=[DatasetSpec(path=path, max_samples=1)], max_length=4096),
                                   tokenizer, "dpo")
    shown = report["shown"].split("=== row 1: ")[1]
    assert "(stage pairwise)" in shown and f"prompt: {pair.chosen_prompt_length} tokens (no loss)" in shown
    for name, side, start in (("chosen", pair.chosen, pair.chosen_prompt_length),
                              ("rejected", pair.rejected, pair.rejected_prompt_length)):
        loss = sum(1 for label in side.labels[1:] if label != -100)
        assert f"--- {name}: {len(side)} tokens with the prompt, {loss} trained" in shown
        reply = tokenizer.decode(side.input_ids[start:])
        assert f"{TRAIN_OPEN}{reply}{TRAIN_CLOSE}" in shown  # the whole reply is trained, the prompt is not


def test_kto_rows_are_inspected_with_loss_on_the_last_reply(tmp_path, tiny_qwen2_dir, shared_assets):
    path = str(shared_assets / "datasets/llamafactory/kto_en_demo.json")
    report = inspect(parse("inspect", ["--data", path, "--model", str(tiny_qwen2_dir), "--show", "2",
                                       "--out", str(tmp_path / "out")]))
    assert report["kinds"] == {"kto": 300} and report["bad_rows"] == 0
    assert report["shown"].count("=== row ") == 2 and "(stage kto)" in report["shown"]
    assert "label: desirable" in report["shown"] or "label: undesirable" in report["shown"]


def test_a_pairs_length_is_its_longer_side_as_max_length_applies(tmp_path, tiny_qwen2_dir):
    """max_length applies to each side of a pair: the length shown (and compared with max_length) is the longer
    side, not both sides together, which made pairs that fit look cut."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    from tuneforge.configs.schema import DataConfig, DatasetSpec
    from tuneforge.data.build import build_datasets

    pairs = [{"prompt": "Name a colour.", "chosen": "Blue, the colour of a clear sky at noon.",
              "rejected": "I would rather not say which colour I like best today."},
             {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    data = DataConfig(train=[DatasetSpec(path=path)], max_length=4096)
    built, _, _ = build_datasets(data, tokenizer, "dpo")
    sides = [(len(p.chosen), len(p.rejected)) for p in built]
    fits = max(map(max, sides))  # every side fits, both sides together do not
    assert sum(sides[0]) > fits
    report = inspect(parse("inspect", ["--data", path, "--model", str(tiny_qwen2_dir), "--max-length", str(fits),
                                       "--out", str(tmp_path / "out")]))
    tokens = report["tokens"]
    assert (tokens["min"], tokens["max"]) == (min(map(max, sides)), fits) and tokens["rows_cut"] == 0
    assert tokens["total"] == tokens["kept"] == sum(map(sum, sides))
    assert build_datasets(replace(data, max_length=fits), tokenizer, "dpo")[2].truncated == []


def test_a_prompt_too_long_for_max_length_is_counted_and_shown_as_skipped(tmp_path, tiny_qwen2_dir):
    rows = [{"messages": [{"role": "user", "content": "Please read this. " * 40},
                          {"role": "assistant", "content": "Done."}], "label": True},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
             "label": False}]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    report = inspect(parse("inspect", ["--data", path, "--model", str(tiny_qwen2_dir), "--max-length", "64",
                                       "--show", "1", "--out", str(tmp_path / "out")]))
    tokens = report["tokens"]
    assert tokens["rows_no_room"] == 1 and tokens["rows_cut"] == 0 and tokens["max"] > 64
    shown = report["shown"].split("=== row 1: ")[1]
    assert "not encoded: the prompt leaves no room for the reply within max_length 64 (prompt of " in shown
    assert "examples skipped" not in shown  # the whole run's wording, for one row
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "Loss tokens (KTO rows: the last reply)" in md and "prompt leaves no room" in md


def test_typed_rows_are_inspected_as_the_pairs_dpo_trains_on(tmp_path, tiny_qwen2_dir, shared_assets):
    """CValues' pos_resp/neg_resp rows (format typed) train dpo as they are; inspect read them as a refusal."""
    from transformers import AutoTokenizer

    from tuneforge.configs.schema import DataConfig, DatasetSpec
    from tuneforge.data.build import build_datasets

    path = str(shared_assets / "datasets/cvalues/cvalues_comparison_sample_from_mindrlhf.jsonl")
    report = inspect(parse("inspect", ["--data", path, "--model", str(tiny_qwen2_dir), "--show", "1",
                                       "--out", str(tmp_path / "out")]))
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    (pair,), _, _ = build_datasets(DataConfig(train=[DatasetSpec(path=path)]), tokenizer, "dpo")
    assert report["kinds"] == {"pairs": 1} and report["bad_rows"] == 0
    assert report["tokens"]["total"] == len(pair.chosen) + len(pair.rejected)
    assert "(pair 1: refuse > risky) (stage pairwise)" in report["shown"]
    assert "**1 row**," in (tmp_path / "out" / "report.md").read_text(encoding="utf-8")


def test_prompt_rows_have_no_answers_to_call_duplicate(tmp_path, shared_assets):
    path = str(shared_assets / "datasets/cvalues/cvalues_responsibility_prompts.jsonl")
    report = inspect(parse("inspect", ["--data", path, "--out", str(tmp_path / "out")]))
    assert report["rows"] == 664 and "answer (normalised)" not in report["duplicate_fields"]


def test_report_md_keeps_the_placeholder_warning_out_of_the_table(tmp_path, shared_assets):
    """In Markdown a line right after a table is one more row of it: the warning needs its own paragraph."""
    path = str(shared_assets / "datasets/llamafactory/identity.json")
    inspect(parse("inspect", ["--data", path, "--out", str(tmp_path / "out")]))
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8").splitlines()
    at = next(i for i, line in enumerate(md) if line.startswith("Warning: "))
    assert md[at - 1] == "" and md[at - 2].startswith("| ")
