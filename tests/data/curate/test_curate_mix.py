"""`tuneforge data mix`: the share and allocation arithmetic exactly, repetition, seeds, and the written mixture."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from tests.data.curate.helpers import parse, read_jsonl, write_jsonl
from tuneforge.cli import main as cli_main
from tuneforge.configs.schema import DatasetSpec
from tuneforge.data.build import load_examples
from tuneforge.data.curate.mix import allocate, mix, rates, sample, weights
from tuneforge.data.types import DataReport
from tuneforge.errors import DataError, UserError


def test_largest_remainder_allocation_is_exact():
    assert allocate(10, [1, 1, 1]) == [4, 3, 3]  # ties go to the earlier dataset
    assert allocate(7, [5, 3]) == [4, 3]  # quotas 4.375 and 2.625: the larger remainder gets the spare row
    assert allocate(100, [1, 2, 3, 4]) == [10, 20, 30, 40]
    assert allocate(5, [1, 1, 1, 1, 1, 1]) == [1, 1, 1, 1, 1, 0]
    assert allocate(1, [1, 1000]) == [0, 1]
    assert allocate(3, [1, 1, 1]) == [1, 1, 1]


def test_allocation_always_sums_to_size_and_stays_within_one_of_the_quota():
    rng = random.Random(1)
    for _ in range(300):
        w = [rng.randint(1, 10_000) for _ in range(rng.randint(1, 7))]
        size = rng.randint(1, 50_000)
        counts = allocate(size, w)
        assert sum(counts) == size
        for c, x in zip(counts, w):
            assert abs(c - size * x / sum(w)) < 1


def test_temperature_shares_follow_t5():
    sizes = [100, 10_000]
    assert weights(sizes, "temperature", T=2) == [10.0, 100.0]  # e^(1/2)
    assert allocate(110, weights(sizes, "temperature", T=2)) == [10, 100]
    assert rates(sizes, "temperature", T=1) == pytest.approx(rates(sizes, "proportional"))
    assert rates(sizes, "temperature", T=1e6) == pytest.approx([0.5, 0.5], abs=1e-4)  # large T: uniform
    assert weights(sizes, "temperature", T=1, K=400) == [100.0, 400.0]  # K caps the big dataset
    assert allocate(50, weights(sizes, "temperature", T=1, K=400)) == [10, 40]
    assert rates([3, 30, 300], "equal") == [1 / 3] * 3
    assert rates([1, 3], "proportional") == [0.25, 0.75]


def test_sample_repeats_whole_dataset_then_samples_the_rest():
    picked = sample(3, 7, random.Random(0))
    counts = Counter(picked)
    assert len(picked) == 7 and set(counts) == {0, 1, 2} and sorted(counts.values()) == [2, 2, 3]
    assert len(set(sample(10, 4, random.Random(0)))) == 4  # below the size: without replacement


def make_sets(tmp_path) -> tuple[str, str]:
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"a{i}", "output": f"A{i}"} for i in range(40)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": f"b{i}"},
                                                         {"role": "assistant", "content": f"B{i}"}]}
                                           for i in range(4)])
    return a, b


def test_mix_writes_exact_counts_and_says_what_repeats(tmp_path, capsys):
    a, b = make_sets(tmp_path)
    out = tmp_path / "mix"
    assert cli_main(["data", "mix", "--data", a, b, "--strategy", "equal", "--size", "21", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "repeated x2.50" in printed and "50.00%" in printed
    rows = read_jsonl(out / "mix.jsonl")
    assert Counter(r["dataset"] for r in rows) == {a: 11, b: 10}
    b_rows = Counter(r["source"] for r in rows if r["dataset"] == b)
    assert sorted(b_rows.values()) == [2, 2, 3, 3]  # every row twice, two of them a third time
    a_rows = Counter(r["source"] for r in rows if r["dataset"] == a)
    assert max(a_rows.values()) == 1  # 11 of 40: no repeats
    read = DataReport()  # the training data path reads the mixture as it is
    examples = load_examples([DatasetSpec(path=str(out / "mix.jsonl"))], None, None, read)
    assert not read.bad_rows and len(examples) == 21
    assert {e.messages[0]["content"] for e in examples} == {r["messages"][0]["content"] for r in rows}
    first = (out / "mix.jsonl").read_bytes()
    mix(parse("mix", ["--data", a, b, "--strategy", "equal", "--size", "21", "--out", str(out)]))
    assert (out / "mix.jsonl").read_bytes() == first  # same seed, same mixture
    report = mix(parse("mix", ["--data", a, b, "--strategy", "equal", "--size", "21", "--seed", "1", "--out",
                               str(out)]))
    assert (out / "mix.jsonl").read_bytes() != first
    assert [d["count"] for d in report["datasets"]] == [11, 10] and report["datasets"][1]["repeat"] == 2.5


def test_mix_defaults_to_total_size_and_refuses_bad_rows(tmp_path):
    a, b = make_sets(tmp_path)
    report = mix(parse("mix", ["--data", a, b, "--strategy", "proportional", "--out", str(tmp_path / "m")]))
    assert [d["count"] for d in report["datasets"]] == [40, 4]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "output": ""}, {"instruction": "y",
                                                                                     "output": "z"}])
    with pytest.raises(DataError, match="bad.jsonl:line 1"):
        mix(parse("mix", ["--data", a, bad, "--out", str(tmp_path / "m")]))
    report = mix(parse("mix", ["--data", a, bad, "--on-error", "skip", "--out", str(tmp_path / "m")]))
    assert len(report["bad_rows_skipped"]) == 1 and report["datasets"][1]["rows"] == 1
    with pytest.raises(UserError, match="--T"):
        mix(parse("mix", ["--data", a, "--T", "0", "--out", str(tmp_path / "m")]))


@pytest.mark.parametrize("verb", ["mix", "clean"])
def test_text_rows_and_conversations_are_not_written_into_one_file(tmp_path, verb):
    from tuneforge.data.curate.clean import clean

    chat, _ = make_sets(tmp_path)
    text = write_jsonl(tmp_path / "pt.jsonl", [{"text": f"Document number {i} for pre-training."} for i in range(3)])
    run = {"mix": mix, "clean": clean}[verb]
    message = (rf"{text} holds plain-text rows \(pre-training data, e.g. {text}:line 1\) and {chat} conversations "
               rf"\(e.g. {chat}:line 1\); `tuneforge data {verb}` writes one file")
    with pytest.raises(DataError, match=message):
        run(parse(verb, ["--data", chat, text, "--out", str(tmp_path / "out")]))
    assert not (tmp_path / "out" / f"{verb}.jsonl").exists()
    assert run(parse(verb, ["--data", text, "--out", str(tmp_path / "pt")]))["out"]  # one kind alone is fine


def test_out_must_be_a_folder(tmp_path):
    a, _ = make_sets(tmp_path)
    with pytest.raises(UserError, match="is a file"):
        mix(parse("mix", ["--data", a, "--out", a]))


def _two_datasets(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"a{i}", "output": f"answer a{i}"} for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"b{i}", "output": f"answer b{i}"} for i in range(5)])
    return a, b


def test_data_mix_in_a_training_config_draws_the_allocation(tmp_path):
    from tuneforge.configs.schema import DataConfig, MixConfig
    from tuneforge.data.build import read_datasets

    a, b = _two_datasets(tmp_path)

    def read(seed, **mix):
        cfg = DataConfig(train=[DatasetSpec(path=a), DatasetSpec(path=b)], mix=MixConfig(**mix), seed=seed)
        return read_datasets(cfg)[0]

    examples = read(0, strategy="temperature", T=2.0, size=30)
    by_file = Counter(e.source.split(":")[0] for e in examples)
    expected = allocate(30, weights([20, 5], "temperature", 2.0))
    assert [by_file[a], by_file[b]] == expected == [20, 10]  # sqrt(20):sqrt(5) = 2:1; b repeated twice
    assert Counter(e.messages[0]["content"] for e in examples if e.source.startswith(b)) == {f"b{i}": 2
                                                                                            for i in range(5)}
    again = read(0, strategy="temperature", T=2.0, size=30)
    assert [e.source for e in again] == [e.source for e in examples]  # a function of the seed: resume sees it
    assert [e.source for e in read(1, strategy="temperature", T=2.0, size=30)] != [e.source for e in examples]
    equal = read(0, strategy="equal", size=8)
    assert Counter(e.source.split(":")[0] for e in equal) == {a: 4, b: 4}
    capped = read(0, strategy="temperature", T=1.0, K=5)  # size: all 25 rows; K caps a at 5 -> equal shares
    assert Counter(e.source.split(":")[0] for e in capped) == {a: 13, b: 12}


def test_a_training_run_with_data_mix(tmp_path, tiny_llama_dir):
    from pathlib import Path

    from tuneforge.configs.schema import load_train_config
    from tuneforge.train import run_config

    a, b = _two_datasets(tmp_path)
    root = Path(__file__).resolve().parents[3]
    cfg = load_train_config(str(root / "examples" / "sft_lora_tiny.yaml"), [
        f"model.name_or_path={tiny_llama_dir}", f"output_dir={tmp_path / 'run'}", f"data.train=[{a},{b}]",
        "data.mix={strategy: equal, size: 12}", "training.max_steps=2", "training.progress_bar=false",
        "training.plot_loss=false", "training.save_steps=0", "training.eval_steps=0", "data.eval_ratio=0.0",
        "data.max_length=64"])
    assert cfg.data.mix.strategy == "equal" and cfg.data.mix.size == 12
    run_config(cfg, log=lambda _: None)
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_written_datasets_get_the_usual_file_mode(tmp_path):
    """mkstemp makes its file 0600; a dataset written for a team must be as readable as any file the user writes."""
    import os

    from tuneforge.data.curate.rows import AtomicWriter

    old = os.umask(0o022)
    try:
        with AtomicWriter(tmp_path / "rows.jsonl") as w:
            w.write_row({"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "rows.jsonl").stat().st_mode & 0o777 == 0o644


def test_skipped_bad_rows_are_said_on_the_console(tmp_path, capsys):
    """With `--on-error skip` the console printed the shares and nothing of the rows left out."""
    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "What is 2 + 2?", "output": "4"},
                                              {"instruction": "Say nothing.", "output": ""}])
    assert cli_main(["data", "mix", "--data", data, "--on-error", "skip", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "1 bad row skipped" in out and "a.jsonl:line 2" in out
    with pytest.raises(DataError, match="^1 row is bad"):
        mix(parse("mix", ["--data", data, "--out", str(tmp_path / "out2")]))


def test_many_bad_rows_of_one_kind_are_one_line_and_the_rest_counted(tmp_path):
    """mix listed the first 20 bad rows, one line each, and never said how many more there were."""
    rows = [{"instruction": f"Q{i}", "output": ""} for i in range(25)]
    rows += [{"instruction": f"R{i}"} for i in range(22)]
    data = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Hi", "output": "Hello"}] + rows)
    with pytest.raises(DataError) as err:
        mix(parse("mix", ["--data", data, "--out", str(tmp_path / "out")]))
    lines = str(err.value).splitlines()
    assert lines[0] == "47 rows are bad:" and len(lines) == 4, lines
    assert lines[1].startswith(f"  - {data}:lines 2, 3, 4, 5, 6, ... (25 rows): field `output`: empty")
    assert lines[2].startswith(f"  - {data}:lines 27, 28, 29, 30, 31, ... (22 rows): field `output`: missing")


def test_own_weights_need_not_sum_to_one(tmp_path, capsys):
    """LLaMA-Factory users give interleave_probs; `--weights` did not exist (argparse suggested `--registry`)."""
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(40)])
    (tmp_path / "b.csv").write_text("instruction,output\n" + "".join(f"Ask {i},Reply {i}\n" for i in range(10)))
    b = str(tmp_path / "b.csv")  # formats differ: the mixture is rows of one layout whatever the inputs
    runs = [mix(parse("mix", ["--data", a, b, "--weights", *w, "--size", "80", "--out", str(tmp_path / f"o{k}")]))
            for k, w in enumerate([["0.5", "0.3"], ["5", "3"]])]
    assert [d["count"] for d in runs[0]["datasets"]] == [50, 30] and runs[0]["strategy"] == "weights"
    assert [d["share"] for d in runs[0]["datasets"]] == [0.625, 0.375]
    assert read_jsonl(tmp_path / "o0" / "mix.jsonl") == read_jsonl(tmp_path / "o1" / "mix.jsonl")
    assert "they sum to 0.8, so each share is weight / 0.8" in (tmp_path / "o0" / "report.md").read_text()
    assert runs[0]["datasets"][1]["repeat"] == 3.0  # 30 of 10 rows: each row three times
    with pytest.raises(UserError, match=r"`--weights` has 1 value but there are 2 datasets \(.*a.jsonl, .*b.csv\)"):
        mix(parse("mix", ["--data", a, b, "--weights", "1", "--out", str(tmp_path / "o2")]))
    with pytest.raises(UserError, match="not all 0"):
        mix(parse("mix", ["--data", a, b, "--weights", "0", "0", "--out", str(tmp_path / "o2")]))
