"""Multiple-choice benchmarks: the published files parse, the harness prompt layout, and scores that equal a
log-likelihood computed by hand on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneforge.errors import DataError
from tuneforge.eval.benchmarks import BENCHMARKS, Question, build_prompt, load_mapping, load_subjects, subject_files
from tuneforge.eval.loglik import continuation_logprobs
from tuneforge.eval.multiple_choice import MCSettings, accuracy_table, run_multiple_choice

SPLITS = {"mmlu": ("dev", "val", "test"), "ceval": ("dev", "val"), "cmmlu": ("dev", "test")}


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_every_subject_file_present_parses(shared_assets, name):
    folder = shared_assets / "eval" / name
    mapping = load_mapping(name, folder)
    for split in SPLITS[name]:
        files = subject_files(BENCHMARKS[name], folder, split)
        assert files, f"no {split} files for {name}"
        for subject, questions in load_subjects(name, folder, split).items():
            assert questions and all(len(q.options) == 4 and q.answer in "ABCD" for q in questions)
            assert subject in mapping  # every subject has a category
    assert {v["category"] for v in mapping.values()} >= {"STEM", "Humanities"}


def test_kshot_prompt_layout():
    shots = [Question("x", 0, "1+1?", ["1", "2", "3", "4"], "B"), Question("x", 1, "2+2?", ["4", "5", "6", "7"], "A")]
    q = Question("x", 0, "3+3?", ["5", "6", "7", "8"], "B")
    assert build_prompt(BENCHMARKS["mmlu"], "arithmetic", shots, q) == (
        "The following are multiple choice questions (with answers) about arithmetic.\n\n"
        "1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "2+2?\nA. 4\nB. 5\nC. 6\nD. 7\nAnswer: A\n\n"
        "3+3?\nA. 5\nB. 6\nC. 7\nD. 8\nAnswer:")
    assert build_prompt(BENCHMARKS["cmmlu"], "数学", [], q) == (
        "以下是关于数学的单项选择题，请直接给出正确答案的选项。\n\n3+3?\nA. 5\nB. 6\nC. 7\nD. 8\n答案：")


def test_unlabelled_row_is_a_data_error(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "algebra_test.csv").write_text("What?,a,b,c,d,\n")
    with pytest.raises(DataError, match="algebra_test.csv:1.*not one of A, B, C, D"):
        load_subjects("mmlu", tmp_path)


def _manual(model, tokenizer, context: str, option: str) -> float:
    """log P(option | context) from one full forward over context+option, no cache, no batching."""
    ctx = tokenizer(context).input_ids
    whole = tokenizer(context + option).input_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_scores_equal_a_manual_loglikelihood(tiny):
    model, tokenizer = tiny
    requests = [("Question: 2+2?\nAnswer:", [" A", " B", " C", " D"]),
                ("A much longer context so the batch is padded on the right.\nAnswer:", [" A", " B", " C", " D"]),
                ("Pick a colour:", [" red", " dark green", " a very light blue", " B"])]  # multi-token: KV reuse
    scores = continuation_logprobs(model, tokenizer, requests, batch_size=2)
    for (context, options), got in zip(requests, scores):
        want = [_manual(model, tokenizer, context, o) for o in options]
        assert got == pytest.approx(want, abs=1e-4)


def _write_bench(folder, n=3):
    for split in ("dev", "test"):
        (folder / split).mkdir(parents=True)
        for subject in ("algebra", "history"):
            rows = [f"{subject} q{i}?,w{i},x{i},y{i},z{i},{'ABCD'[i % 4]}" for i in range(n)]
            (folder / split / f"{subject}_{split}.csv").write_text("\n".join(rows) + "\n")
    (folder / "mapping.json").write_text(json.dumps({"algebra": {"name": "algebra", "category": "STEM"},
                                                     "history": {"name": "history", "category": "Humanities"}}))


def test_run_writes_auditable_predictions_and_resumes(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    _write_bench(tmp_path / "bench")
    settings = MCSettings("mmlu", str(tmp_path / "bench"), shots=2, limit=2)
    first = run_multiple_choice(model, tokenizer, settings, tmp_path / "out", progress=False)
    records = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 4 and first["questions"] == 4  # --limit 2 per subject
    r = records[0]
    assert r["prompt"].count("Answer:") == 3 and r["prediction"] == max(r["scores"], key=r["scores"].get)
    assert first["accuracy_micro"] == sum(x["correct"] for x in records) / 4
    # a re-run scores nothing again
    monkeypatch.setattr("tuneforge.eval.multiple_choice.continuation_logprobs", lambda *a, **k: pytest.fail("rerun"))
    assert run_multiple_choice(model, tokenizer, settings, tmp_path / "out", progress=False) == first


def test_accuracy_micro_macro_and_categories():
    records = [{"subject": "a", "correct": c} for c in (True, True, True, False)] + [{"subject": "b", "correct": False}]
    table = accuracy_table(records, {"a": {"category": "STEM"}, "b": {"category": "STEM"}})
    assert table["accuracy_micro"] == 3 / 5
    assert table["accuracy_macro"] == (3 / 4 + 0) / 2
    assert table["category/STEM"] == 3 / 5 and table["subject/a"] == 0.75


def test_chat_template_option_scores_after_the_engine_prompt(tiny, tmp_path):
    from tuneforge.inference.engine import encode_chat

    model, tokenizer = tiny
    _write_bench(tmp_path / "bench", n=1)
    settings = MCSettings("mmlu", str(tmp_path / "bench"), shots=0, chat_template=True, subjects=["algebra"])
    result = run_multiple_choice(model, tokenizer, settings, tmp_path / "out", progress=False)
    record = json.loads((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()[0])
    ids = encode_chat(tokenizer, [{"role": "user", "content": "The following are multiple choice questions (with "
                                   "answers) about algebra.\n\nalgebra q0?\nA. w0\nB. x0\nC. y0\nD. z0\nAnswer:"}])
    assert record["prompt"] == tokenizer.decode(ids) and result["chat_template"] is True
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), dim=-1)
    want = logprobs[tokenizer("A", add_special_tokens=False).input_ids[0]].item()
    assert record["scores"]["A"] == pytest.approx(want, abs=1e-4)


def test_an_edited_question_is_scored_again(tiny, tmp_path):
    """Saved scores are keyed by file row: a CSV fixed in place (a wrong answer key) must not keep the old answer
    in the accuracy of a re-run into the same folder."""
    model, tokenizer = tiny
    _write_bench(tmp_path / "bench", n=2)
    settings = MCSettings("mmlu", str(tmp_path / "bench"), shots=0, subjects=["algebra"])
    run_multiple_choice(model, tokenizer, settings, tmp_path / "out", progress=False)
    first = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    wrong = next(letter for letter in "ABCD" if letter != first[0]["prediction"])
    path = tmp_path / "bench" / "test" / "algebra_test.csv"
    path.write_text(path.read_text().replace("algebra q0?,w0,x0,y0,z0,A", f"algebra q0?,w0,x0,y0,z0,{wrong}"))
    again = run_multiple_choice(model, tokenizer, settings, tmp_path / "out", progress=False)
    assert again["questions"] == 2
    assert again["accuracy_micro"] == (0 + first[1]["correct"]) / 2  # question 0 is now answered wrongly


def test_more_shots_than_the_dev_split_holds_is_a_user_error(tiny, tmp_path):
    """MMLU's dev split has 5 questions per subject: shots=6 used to run 5-shot under a "6-shot" report line."""
    from tuneforge.errors import UserError

    model, tokenizer = tiny
    _write_bench(tmp_path / "bench", n=2)
    settings = MCSettings("mmlu", str(tmp_path / "bench"), shots=3)
    with pytest.raises(UserError, match=r"mmlu: shots=3, but the dev split of 2 subject\(s\).*\(algebra: 2\).*2 or less"):
        run_multiple_choice(model, tokenizer, settings, tmp_path / "out", progress=False)
    settings.shots = 2
    assert run_multiple_choice(model, tokenizer, settings, tmp_path / "out", progress=False)["shots"] == 2


def test_questions_longer_than_the_models_context_are_counted(tiny, tmp_path, monkeypatch):
    """A prompt past max_position_embeddings was scored without a word (5-shot MMLU reaches ~3,100 tokens, over a
    2,048-token model's context): the score is meaningless there, and the report now counts such questions."""
    model, tokenizer = tiny
    _write_bench(tmp_path / "bench")
    settings = MCSettings("mmlu", str(tmp_path / "bench"), shots=2, limit=2)
    got = run_multiple_choice(model, tokenizer, settings, tmp_path / "out", progress=False)
    records = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert got["over_context"] == 0 and records[0]["context_tokens"] == len(tokenizer(records[0]["prompt"]).input_ids)
    shortest = min(r["context_tokens"] for r in records)
    monkeypatch.setattr(model.config, "max_position_embeddings", shortest)  # the same questions, a smaller model
    again = run_multiple_choice(model, tokenizer, settings, tmp_path / "out", progress=False)
    assert again["over_context"] == sum(r["context_tokens"] >= shortest for r in records) >= 1
