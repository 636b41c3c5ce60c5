"""`tuneforge eval` reads every task's files before the first model loads: a missing gsm8k folder, too many
gsm8k_shots, a data:/ppl:/judge:/grade:/xstest:/cvalues: file that is not there or not in its format, a chat
template file that does not exist. Each was found only when its task (or its model) came up, after every earlier
model and task had run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tuneforge.cli import main
from tuneforge.errors import UserError
from tuneforge.eval.run import load_eval_config
from tuneforge.eval.suite import check_task_data

MODEL = {"model": "builtin:smollm2-135m-instruct"}
MODELS = [MODEL, MODEL | {"name": "other"}]  # two: judge:PATH compares a model against the baseline


@pytest.fixture
def no_model_loads(monkeypatch):
    monkeypatch.setattr("tuneforge.eval.suite.load_model", lambda entry: pytest.fail("loaded a model"))


def _gsm8k(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    rows = [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(n)]
    for name in ("train.jsonl", "test.jsonl"):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _problems(tasks: list[str], **settings) -> str:
    cfg = load_eval_config(None, [], {"models": MODELS, "tasks": tasks, **settings})
    with pytest.raises(UserError) as err:
        check_task_data(cfg)
    return str(err.value)


def test_every_task_file_is_checked_and_named_at_once(tmp_path):
    missing = tmp_path / "missing.jsonl"
    tasks = ["gsm8k", f"data:{missing}", f"ppl:{missing}", f"judge:{missing}", f"grade:{missing}",
             f"xstest:{tmp_path / 'missing.csv'}", f"cvalues:{missing}", "mmlu", "gsm8k_typo"]
    message = _problems(tasks, data_dir=str(tmp_path / "nowhere"), judge={"url": "http://127.0.0.1:9/v1"})
    assert message.startswith(f"{len(tasks)} problems")
    for task in tasks:
        assert f"Task `{task}`" in message or task == "mmlu", task
    assert re.search(r"Task `gsm8k`: .*nowhere/gsm8k/test.jsonl does not exist", message)
    assert re.search(rf"Task `data:{missing}`: {missing}: no such file", message)
    assert re.search(r"mmlu: .*nowhere/mmlu does not exist", message)  # with shots, as with shots=0 below
    assert "Task `gsm8k_typo` is unknown" in message
    assert "does not exist" in _problems(["mmlu@0"], data_dir=str(tmp_path / "nowhere"))
    (tmp_path / "nowhere" / "mmlu" / "dev").mkdir(parents=True)
    assert "no `test` folder" in _problems(["mmlu@0"], data_dir=str(tmp_path / "nowhere"))


def test_task_files_are_read_in_their_format(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"messages": [}\n')
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "Say hi."}) + "\n")
    (tmp_path / "xs.csv").write_text("id,text\n1,hello\n")
    (tmp_path / "cv.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    _gsm8k(tmp_path / "gsm8k", 2)
    (tmp_path / "gsm8k" / "test.jsonl").write_text(json.dumps({"q": "?", "a": "1"}) + "\n")
    cases = [(f"data:{tmp_path / 'bad.jsonl'}", r"bad.jsonl"),
             (f"data:{tmp_path / 'prompts.jsonl'}", r"scores each reply against a reference"),
             (f"xstest:{tmp_path / 'xs.csv'}", r"expected XSTest columns prompt, type, label"),
             (f"cvalues:{tmp_path / 'cv.jsonl'}", r"cv.jsonl:2: not valid JSON"),
             (f"gsm8k:{tmp_path / 'gsm8k'}", r"row 1 lacks GSM8K's `question` and `answer` fields \(found q, a\)")]
    for task, expected in cases:
        assert re.search(rf"Task `{re.escape(task)}`: .*{expected}", _problems([task])), task
    cfg = load_eval_config(None, [], {"models": MODELS, "tasks": [f"judge:{tmp_path / 'prompts.jsonl'}"],
                                      "judge": {"url": "http://127.0.0.1:9/v1"}})
    check_task_data(cfg)  # judged prompts need no reference


def test_more_gsm8k_shots_than_train_holds_fail_before_any_model_loads(tmp_path, no_model_loads, capsys):
    """gsm8k_shots above the examples in train.jsonl silently asked with fewer, under the report's K-shot label."""
    from tuneforge.eval.generation_tasks import run_gsm8k

    folder = _gsm8k(tmp_path / "gsm8k", 3)
    argv = ["eval", "--model", MODEL["model"], "--tasks", "gsm8k", "--data-dir", str(tmp_path), "--out",
            str(tmp_path / "out"), "gsm8k_shots=4"]
    assert main(argv) == 2
    assert re.search(r"Task `gsm8k`: gsm8k_shots=4, but .*train.jsonl holds 3 example\(s\). Set `gsm8k_shots` to 3 "
                     r"or less", capsys.readouterr().err)
    with pytest.raises(UserError, match="gsm8k_shots=4"):  # the task itself says so too (a config built in code)
        run_gsm8k(None, None, folder, tmp_path / "o", shots=4)


def test_a_relative_chat_template_is_absolute_and_checked_before_any_model_loads(tmp_path, monkeypatch,
                                                                                  no_model_loads, capsys):
    """As training does: a relative .jinja path counts from the working directory and is recorded absolute (in
    model.json); a template file that is not there fails before the first model loads, naming the model."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "mine.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    cfg = load_eval_config(None, [], {"models": [MODEL | {"chat_template": "tpl/mine.jinja"}]})
    assert cfg.models[0].chat_template == str(tmp_path / "tpl" / "mine.jinja")
    builtin = load_eval_config(None, [], {"models": [MODEL | {"chat_template": "chatml"}]})
    assert builtin.models[0].chat_template == "chatml"

    _gsm8k(tmp_path / "gsm8k", 1)
    config = {"models": [MODEL | {"name": "a"}, MODEL | {"name": "b", "chat_template": "tpl/typo.jinja"}],
              "tasks": ["gsm8k"], "gsm8k_shots": 0, "data_dir": str(tmp_path), "out": str(tmp_path / "out")}
    (tmp_path / "eval.yaml").write_text(json.dumps(config))
    assert main(["eval", "eval.yaml"]) == 2
    assert re.search(r"Model `b`: `chat_template` is .*tpl/typo.jinja'?, not a built-in template .*not an existing "
                     r".jinja file", capsys.readouterr().err)
    config["models"][1]["chat_template"] = "chatlm"
    (tmp_path / "eval.yaml").write_text(json.dumps(config))
    assert main(["eval", "eval.yaml"]) == 2
    assert "Did you mean `chatml`?" in capsys.readouterr().err


def test_a_data_task_row_ending_on_a_tool_call_is_named(tmp_path):
    """Such a row trains (the call is its target), but a data: task has no text reply to score it against: it used
    to be scored against an empty reference."""
    row = {"messages": [{"role": "user", "content": "Weather in Paris?"},
                        {"role": "assistant", "content": None, "tool_calls": [
                            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}]}
    (tmp_path / "calls.jsonl").write_text(json.dumps(row) + "\n")
    task = f"data:{tmp_path / 'calls.jsonl'}"
    assert re.search(r"calls.jsonl.*1.*ends on a tool call.*scores text replies", _problems([task]))


def test_bad_benchmark_rows_are_found_before_any_model_loads(tmp_path):
    """Only the dev split was read before the model loaded: a header line or an answer that is no letter in a test
    CSV surfaced after the model's load and every earlier task, with a hint to score on `test` (it was test); an
    empty subject file dropped out of the accuracies without a word."""
    from tests.eval.test_multiple_choice import _write_bench

    _write_bench(tmp_path / "mmlu", n=2)
    test = tmp_path / "mmlu" / "test"
    (test / "algebra_test.csv").write_text("question,A,B,C,D,answer\n" + (test / "algebra_test.csv").read_text())
    message = _problems(["mmlu", "mmlu@0"], data_dir=str(tmp_path))
    assert "algebra_test.csv:1: the answer is 'answer'" in message and "no header row: delete this line" in message
    assert "Score mmlu on" not in message
    (test / "algebra_test.csv").write_text("What?,a,b,c,d,A\n")
    (test / "history_test.csv").write_text("Who?,a,b,c,d,E\n")
    message = _problems(["mmlu@0"], data_dir=str(tmp_path))
    assert "history_test.csv:1: the answer is 'E'" in message and "Fix this row's answer letter" in message
    (test / "history_test.csv").write_text("What?,a,b,c,d,B\n")
    (test / "empty_test.csv").write_text("")
    assert "empty_test.csv holds no questions" in _problems(["mmlu@0"], data_dir=str(tmp_path))


def test_a_csv_not_named_as_a_subject_is_named_not_skipped(tmp_path):
    """`physics.csv` (not physics_test.csv) in mmlu/test was left out of both accuracies without a word."""
    from tests.eval.test_multiple_choice import _write_bench

    _write_bench(tmp_path / "mmlu", n=2)
    (tmp_path / "mmlu" / "test" / "physics.csv").write_text("What?,a,b,c,d,A\n")
    message = _problems(["mmlu@0"], data_dir=str(tmp_path))
    assert "holds physics.csv, not named as a subject's file (SUBJECT_test.csv)" in message
    assert "Rename it (physics_test.csv)" in message


def test_a_subject_without_dev_examples_names_the_dev_split_and_the_fix(tmp_path):
    """The error said "no file for subject(s) history in FOLDER" for a test subject missing from dev/, not which
    split lacked it nor that shots=0 needs none."""
    from tests.eval.test_multiple_choice import _write_bench

    _write_bench(tmp_path / "mmlu", n=2)
    (tmp_path / "mmlu" / "dev" / "history_dev.csv").unlink()
    message = _problems(["mmlu"], data_dir=str(tmp_path), shots=1)
    assert "no dev file for subject(s) history" in message and "history_dev.csv" in message
    assert "`shots` to 0 (mmlu@0)" in message


def test_a_missing_data_dir_is_said_as_missing_not_as_a_missing_split(tmp_path):
    """`--data-dir ../shared/assets/eval` from another folder said "no `test` folder in .../mmlu", as if the
    benchmark folder existed and lacked a split."""
    message = _problems(["mmlu@0"], data_dir=str(tmp_path / "nowhere"))
    assert f"mmlu: {tmp_path / 'nowhere' / 'mmlu'} does not exist (a relative path counts from the current folder" \
           in message and "no `test` folder" not in message
