"""`tuneforge data synth`: bad settings, failing teachers and skipped inputs are reported, never silent; Chinese text
is filtered like English (against the scripted server of stub_teacher.py)."""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.data.curate.helpers import parse, read_jsonl, write_jsonl
from tests.data.curate.stub_teacher import GONE, StubTeacher
from tests.data.curate.test_curate_synth import DOC, qa_script, teacher_argv
from tuneforge.data.curate.distill import distill
from tuneforge.data.curate.synth import report_md, synth, synth_cli
from tuneforge.errors import DataError, UserError

ALPACA = [{"instruction": "Name a fruit that grows in cold climates.", "output": "Apple."},
          {"instruction": "Describe how bread rises.", "output": "Yeast makes gas."}]


@pytest.mark.parametrize("method,argv,message", [
    ("backtranslate", ["--candidates", "0"], "`--candidates` must be at least 1, got 0"),
    ("backtranslate", ["--candidates", "-2"], "`--candidates` must be at least 1, got -2"),
    ("backtranslate", ["--min-score", "9"], "`--min-score` must be from 1 to 5"),
    ("backtranslate", ["--min-score", "0"], "`--min-score` must be from 1 to 5"),
    ("self_instruct", ["--num-instructions", "0"], "`--num-instructions` must be at least 1, got 0"),
    ("self_instruct", ["--num-instructions", "-3"], "`--num-instructions` must be at least 1, got -3"),
    ("self_instruct", ["--batch", "0"], "`--batch` must be at least 1, got 0"),
    ("self_instruct", ["--max-rounds", "0"], "`--max-rounds` must be at least 1, got 0"),
    ("self_instruct", ["--max-rouge", "2"], r"`--max-rouge` must be in \(0, 1\]"),
    ("self_instruct", ["--max-rouge", "0"], r"`--max-rouge` must be in \(0, 1\]"),
    ("evol_instruct", ["--rounds", "0"], "`--rounds` must be at least 1, got 0"),
    ("evol_instruct", ["--breadth-share", "1.5"], "`--breadth-share` is a share"),
    ("qa_from_docs", ["--questions", "0"], "`--questions` must be at least 1, got 0"),
    ("qa_from_docs", ["--questions", "-1"], "`--questions` must be at least 1, got -1"),
    ("qa_from_docs", ["--min-grounded", "2"], "`--min-grounded` is a share"),
    ("qa_from_docs", ["--max-chars", "50"], "`--max-chars` must be at least 100, got 50"),
    ("evol_instruct", ["--retries", "-1"], "`--retries` must be at least 0, got -1"),
    ("evol_instruct", ["--concurrency", "0"], "`--concurrency` must be at least 1, got 0"),
    ("evol_instruct", ["--max-tokens", "0"], "`--max-tokens` must be at least 1, got 0"),
])
def test_counts_and_ranges_are_refused_up_front_naming_the_flag(tmp_path, method, argv, message):
    data = write_jsonl(tmp_path / "rows.jsonl", ALPACA)
    out = tmp_path / "out"
    # nothing listens on port 9: the check must come before any request
    args = parse("synth", [method, "--data", data, "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
                           "--out", str(out), "--retries", "0", "--backoff", "0", *argv])
    with pytest.raises(UserError, match=message):
        synth(args)
    assert not out.exists()


def test_qa_pairs_beyond_questions_are_counted(tmp_path):
    doc = tmp_path / "docs" / "volcano.md"
    doc.parent.mkdir()
    doc.write_text(DOC, encoding="utf-8")
    with StubTeacher(qa_script) as stub:  # 3 pairs per reply
        report = synth(parse("synth", ["qa_from_docs", "--data", str(doc), "--questions", "1",
                                       *teacher_argv(stub, tmp_path / "out")]))
    chunks = report["chunks"]
    assert report["rejected"]["extra_pairs"] == 2 * chunks
    assert report["rows"] == chunks  # the first pair of each reply is grounded and kept
    extra = [r for r in read_jsonl(tmp_path / "out" / "rejected.jsonl") if r["rule"] == "extra_pairs"]
    assert {r["question"] for r in extra} == {"Invented question?", "What is this about?"}


def test_every_request_failing_is_an_error_naming_url_and_first_error(tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", ALPACA)
    with StubTeacher(lambda messages, body: 500) as stub:
        with pytest.raises(UserError) as err:
            synth(parse("synth", ["evol_instruct", "--data", data, *teacher_argv(stub, tmp_path / "out")]))
    message = str(err.value)
    assert message.startswith("Every request failed: 2 requests to the teacher at " + stub.base_url)
    assert "HTTP 500" in message and "\n" not in message
    assert not (tmp_path / "out" / "evol_instruct.jsonl").exists()  # no empty "train-ready" file


def test_a_dead_teacher_fails_distill_too(tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "How do I pick a lock?"}])
    with pytest.raises(UserError, match=r"Every request failed: 1 request to the teacher at http://127.0.0.1:9/v1 "
                                        r"failed; first error: Connect"):
        distill(parse("safety", ["--distill", "--data", data, "--base-url", "http://127.0.0.1:9/v1", "--model",
                                 "m", "--out", str(tmp_path / "out"), "--retries", "0"]))


def test_a_teacher_that_goes_down_mid_run_stops_it_and_a_rerun_resumes(tmp_path, monkeypatch):
    """A server that dies after 4 replies cost every remaining request its whole back-off (1+2+4+8+16 = 31 s with the
    defaults: hours on 500 items). Three requests in a row that cannot connect stop the run, naming the endpoint,
    what was saved and how to resume; the rerun asks only what was not answered."""
    from tuneforge.data.curate.synth import teacher

    waits = []
    real_sleep = asyncio.sleep

    async def no_wait(seconds):  # the back-off is counted, not waited
        waits.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(teacher.asyncio, "sleep", no_wait)
    data = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": f"Describe step {i} of baking bread."}
                                                 for i in range(12)])
    out = tmp_path / "out"
    argv = ["evol_instruct", "--data", data, "--concurrency", "1", "--out", str(out), "--model", "stub"]
    with StubTeacher(lambda messages, body: GONE if len(stub.requests) > 4 else evol_echo(messages, body)) as stub:
        with pytest.raises(UserError) as err:
            synth(parse("synth", [*argv, "--base-url", stub.base_url]))
    message = str(err.value)
    assert message.startswith(f"The teacher at {stub.base_url} is unreachable: 3 requests in a row could not connect "
                              f"after 5 retries each")
    assert f"Saved in {out / 'progress.jsonl'}: 4 finished requests (4 from this run)" in message
    assert "rerun the same command with the same `--out`" in message and "\n" not in message
    assert sum(waits) == 3 * 31  # three requests' back-off, not the eight left
    assert len(read_jsonl(out / "progress.jsonl")) == 4 and not (out / "evol_instruct.jsonl").exists()
    answered_before = stub.prompts()[:4]
    with StubTeacher(evol_echo) as stub:
        report = synth(parse("synth", [*argv, "--base-url", stub.base_url]))
    assert report["teacher"]["reused"] == 4 and not set(answered_before) & set(stub.prompts())
    assert report["teacher"]["failed"] == 0 and report["rows"] == 12


def evol_echo(messages, body):
    prompt = messages[-1]["content"]
    m = re.search(r"#Given Prompt#:\n(.*)\n#(?:Rewritten|Created) Prompt#:\n$", prompt, re.S)
    if m is None:
        return f"A detailed answer to: {prompt}"
    if "BAD400" in m.group(1):
        return 400
    if "NULL" in m.group(1):
        return None  # content null
    return f"{m.group(1)} and explain each step with an example from daily life"


def test_some_failed_requests_print_their_first_error_and_the_run_goes_on(tmp_path, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", [*ALPACA, {"instruction": "BAD400 Summarise this long text."},
                                                 {"instruction": "NULL Say something kind."}])
    with StubTeacher(evol_echo) as stub:
        args = parse("synth", ["evol_instruct", "--data", data, *teacher_argv(stub, tmp_path / "out"),
                               "--retries", "3"])
        assert synth_cli(args) == 0
        sent = len(stub.requests)
    report = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert sorted(r["rule"] for r in report) == ["no_content", "teacher_rejected"]
    assert sent == 2 * 2 + 2  # 400 and null content are not retried: asking again gets the same answer
    console = capsys.readouterr().out
    assert "evol_instruct: 2 rows" in console and "2 failed" in console
    assert "teacher_rejected" in console and "no_content" in console
    assert "first errors: HTTP 400" in console or "first errors: the reply has no text" in console
    assert "context length" in console  # the hint for an HTTP 400
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "scripted failure" in md and "context length" in md


@pytest.mark.parametrize("status", [401, 403, 404])
def test_auth_and_model_errors_still_abort(tmp_path, status):
    data = write_jsonl(tmp_path / "rows.jsonl", ALPACA)
    with StubTeacher(lambda messages, body: status) as stub:
        with pytest.raises(UserError, match=rf"refused a request \(HTTP {status}.*Check `--model` and `--api-key`"):
            synth(parse("synth", ["evol_instruct", "--data", data, *teacher_argv(stub, tmp_path / "out")]))


def test_chinese_echoes_and_refusals_are_eliminated(tmp_path):
    def script(messages, body):
        prompt = messages[-1]["content"]
        m = re.search(r"#Given Prompt#:\n(.*)\n#(?:Rewritten|Created) Prompt#:\n$", prompt, re.S)
        if m and "不变" in m.group(1):
            return m.group(1)  # the instruction unchanged
        if m:
            return f"{m.group(1)}并举出三个生活中的例子说明每一步"
        return "抱歉，我无法回答这个问题。" if "拒绝" in prompt else "面包发酵是因为酵母产生二氧化碳气体，使面团膨胀。"

    data = write_jsonl(tmp_path / "zh.jsonl", [{"instruction": "不变：请介绍一下长城的历史。"},
                                               {"instruction": "拒绝：解释量子隧穿效应。"},
                                               {"instruction": "解释面包为什么会发酵。"}])
    with StubTeacher(script) as stub:
        report = synth(parse("synth", ["evol_instruct", "--data", data, *teacher_argv(stub, tmp_path / "out")]))
    assert report["rejected"] == {"no_information_gain": 1, "sorry_answer": 1}
    assert report["rows"] == 1


def test_chinese_tasks_pass_self_instruct_rules_and_similar_ones_are_dropped(tmp_path):
    task = "请用三句话解释光合作用的过程。"

    def script(messages, body):
        prompt = messages[-1]["content"]
        if prompt.startswith("Come up"):
            n = int(re.search(r"(\d+)\.$", prompt).group(1))
            return f"{task}\n{n + 1}. {task}\n{n + 2}. 写一首关于冬天的七言绝句，主题是雪。"
        return "Input: None\nOutput: 光合作用把光能转化为化学能。"

    seeds = write_jsonl(tmp_path / "seeds.jsonl", [{"instruction": "列出三种常见的水果。"},
                                                   {"instruction": "把这句话翻译成英文：今天天气很好。"}])
    with StubTeacher(script) as stub:
        report = synth(parse("synth", ["self_instruct", "--data", seeds, "--num-instructions", "2", "--batch", "1",
                                       *teacher_argv(stub, tmp_path / "out")]))
    assert report["instructions_kept"] == 2 and report["rejected"] == {"similar": 1}
    assert [r["instruction"] for r in read_jsonl(tmp_path / "out" / "self_instruct.jsonl")] == [
        task, "写一首关于冬天的七言绝句，主题是雪。"]


def test_chinese_quote_from_the_document_is_grounded(tmp_path):
    doc = tmp_path / "cell.md"
    doc.write_text("细胞学说是生物科学的一个理论。它指出一切生物都由细胞构成。\n", encoding="utf-8")

    def script(messages, body):
        return "Q: 细胞学说是什么？\nA: 生物科学的一个理论\nQ: 谁提出的？\nA: 施莱登和施旺在十九世纪提出"

    with StubTeacher(script) as stub:
        report = synth(parse("synth", ["qa_from_docs", "--data", str(doc), *teacher_argv(stub, tmp_path / "out")]))
    assert report["rows"] == 1 and report["rejected"] == {"ungrounded": 1}
    assert read_jsonl(tmp_path / "out" / "qa_from_docs.jsonl")[0]["messages"][1]["content"] == "生物科学的一个理论"


def test_documents_without_text_and_other_files_are_listed(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "volcano.md").write_text(DOC, encoding="utf-8")
    (docs / "empty.md").write_text("", encoding="utf-8")
    (docs / "blank.txt").write_text("  \n\n \t\n", encoding="utf-8")
    (docs / "manual.pdf").write_bytes(b"%PDF-1.4")
    (docs / "notes.rst").write_text("Notes\n=====\n", encoding="utf-8")
    with StubTeacher(qa_script) as stub:
        assert synth_cli(parse("synth", ["qa_from_docs", "--data", str(docs),
                                         *teacher_argv(stub, tmp_path / "out")])) == 0
    report = __import__("json").loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    skipped = {s["file"].rsplit("/", 1)[-1]: s["reason"] for s in report["skipped_files"]}
    assert skipped.keys() == {"empty.md", "blank.txt", "manual.pdf", "notes.rst"}
    assert skipped["empty.md"] == skipped["blank.txt"] == "no text"
    assert skipped["manual.pdf"].startswith("unsupported suffix")
    assert report["documents"] == 1
    console = capsys.readouterr().out
    assert "4 input files skipped" in console and "manual.pdf (unsupported suffix" in console


def test_data_with_no_document_text_is_an_error_naming_it(tmp_path):
    (tmp_path / "empty.md").write_text("", encoding="utf-8")
    with StubTeacher(qa_script) as stub:
        with pytest.raises(DataError, match=r"`--data .*empty.md` gives no document text \(.*empty.md: no text\)"):
            synth(parse("synth", ["qa_from_docs", "--data", str(tmp_path / "empty.md"),
                                  *teacher_argv(stub, tmp_path / "out")]))
        assert stub.requests == []


def too_short_tasks(messages, body):
    prompt = messages[-1]["content"]
    if prompt.startswith("Come up"):
        return "Hi there"  # always too short: nothing is ever kept
    return "Input: None\nOutput: fine"


def test_seed_rows_without_an_instruction_are_counted_and_named(tmp_path, capsys):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [
        {"instruction": "Give three tips for staying healthy."}, {"prompt": "Name a color."},
        {"instruction": "Name the capital of France."}, {"Instruction": "Translate hello."}])
    with StubTeacher(too_short_tasks) as stub:
        synth_cli(parse("synth", ["self_instruct", "--data", seeds, "--num-instructions", "1", "--max-rounds", "1",
                                  "--batch", "1", *teacher_argv(stub, tmp_path / "out")]))
    report = __import__("json").loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert report["seed_tasks"] == 2 and report["rejected"]["input_without_instruction"] == 2
    missing = [r for r in read_jsonl(tmp_path / "out" / "rejected.jsonl") if r["rule"] == "input_without_instruction"]
    assert [r["source"].rsplit(":", 1)[-1] for r in missing] == ["line 2", "line 4"]
    assert missing[1]["keys"] == ["Instruction"]
    assert "seeds.jsonl:line 2, " in capsys.readouterr().out


@pytest.mark.parametrize("method,rows,rule", [
    ("evol_instruct", [ALPACA[0], {"output": "an answer with no prompt"}], "input_without_prompt"),
    ("backtranslate", [{"text": "Bread rises because yeast makes gas."}, {"prompt": "no answer here"}],
     "input_without_response"),
])
def test_input_rows_without_the_needed_field_are_counted(tmp_path, method, rows, rule):
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    with StubTeacher(lambda messages, body: "Instruction: Explain it.\nScore: 5") as stub:
        report = synth(parse("synth", [method, "--data", data, *teacher_argv(stub, tmp_path / "out")]))
    assert report["rejected"][rule] == 1
    assert any("rows.jsonl:line 2" in note for note in report["notes"])


def test_self_instruct_says_when_max_rounds_end_it_short_of_the_target(tmp_path, capsys):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [{"instruction": f"Give {k} tips for staying healthy."}
                                                   for k in range(3)])
    with StubTeacher(too_short_tasks) as stub:
        synth_cli(parse("synth", ["self_instruct", "--data", seeds, "--num-instructions", "5", "--max-rounds", "3",
                                  "--batch", "2", *teacher_argv(stub, tmp_path / "out")]))
    console = capsys.readouterr().out
    assert "target not reached: --num-instructions 5, got 0 after 3 rounds (--max-rounds 3)" in console
    report = __import__("json").loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert report["rounds"] == 3 and "target not reached" in report["notes"][0]


def test_self_instruct_varies_repeated_prompts_and_counts_in_run_repeats_honestly(tmp_path, capsys):
    three = write_jsonl(tmp_path / "three.jsonl", [{"instruction": f"Give {k} tips for staying healthy."}
                                                   for k in range(3)])
    with StubTeacher(too_short_tasks) as stub:  # 3 seeds: 6 orders, and 6 prompts asked
        report = synth(parse("synth", ["self_instruct", "--data", three, "--num-instructions", "1", "--batch", "6",
                                       "--max-rounds", "1", *teacher_argv(stub, tmp_path / "a")]))
        assert len(set(stub.prompts())) == 6 and report["teacher"]["repeated"] == 0
    one = write_jsonl(tmp_path / "one.jsonl", [{"instruction": "Give three tips for staying healthy."}])
    with StubTeacher(too_short_tasks) as stub:  # one seed: a single possible prompt, asked once
        synth_cli(parse("synth", ["self_instruct", "--data", one, "--num-instructions", "1", "--batch", "2",
                                  "--max-rounds", "2", *teacher_argv(stub, tmp_path / "b")]))
        assert len(stub.requests) == 1
    console = capsys.readouterr().out
    assert "1 answered, 3 repeated in this run (asked once), 0 reused from progress" in console


def test_out_may_not_overlap_the_inputs(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "volcano.md").write_text(DOC, encoding="utf-8")
    argv = ["qa_from_docs", "--data", str(docs), "--base-url", "http://127.0.0.1:9/v1", "--model", "m"]
    for out in (docs, docs / "synth", tmp_path):  # the input folder, inside it, holding it
        with pytest.raises(UserError, match=r"overlaps the input `--data .*docs`"):
            synth(parse("synth", [*argv, "--out", str(out)]))
    assert sorted(p.name for p in docs.iterdir()) == ["volcano.md"]
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi?"}])
    with pytest.raises(UserError, match="overlaps the input"):
        distill(parse("safety", ["--distill", "--data", data, "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
                                 "--out", str(tmp_path)]))


def test_report_wording_is_singular_for_one():
    report = {"method": "evol_instruct", "rows": 1, "rejected": {}, "out": "o",
              "teacher": {"model": "m", "base_url": "u", "answered": 1, "reused": 0, "repeated": 0, "retried": 1,
                          "failed": 0, "first_errors": []}}
    md = report_md(report)
    assert "**1 row** kept" in md and "1 request answered" in md and "1 retry," in md


def test_safety_wording_is_singular_for_one():
    from tuneforge.data.curate import safety

    err = safety._bad_rows_error({"a:line 1": ["a:line 1: response type 'x' is not in --ranking"]}, 3, 1)
    assert str(err.value if hasattr(err, "value") else err).startswith(
        "1 of 3 safety rows are bad (1 of their responses has a type not in --ranking)")
    md = safety.report_md({"ranking": ["a", "b"], "prompts": 1, "responses": 2, "pairs": 0, "by_types": {},
                           "by_difficulty": {}, "prompts_without_pair": ["a.jsonl:line 1"]})
    assert "1 prompt gave no pair" in md


def test_a_teacher_down_from_the_start_says_nothing_was_saved(tmp_path, monkeypatch):
    """It said "Saved in OUT/progress.jsonl: 0 finished requests", a file that was never written."""
    from tuneforge.data.curate.synth import teacher

    async def no_wait(seconds):
        return None

    monkeypatch.setattr(teacher.asyncio, "sleep", no_wait)
    data = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": f"Describe step {i}."} for i in range(4)])
    argv = ["evol_instruct", "--data", data, "--concurrency", "1", "--out", str(tmp_path / "out"), "--model", "stub"]
    with StubTeacher(lambda messages, body: GONE) as stub:
        with pytest.raises(UserError) as err:
            synth(parse("synth", [*argv, "--base-url", stub.base_url]))
    assert "No request had finished, so nothing was saved. Start the server again" in str(err.value)
    assert "progress.jsonl:" not in str(err.value)


def test_ctrl_c_says_what_is_saved_and_how_to_resume(tmp_path, monkeypatch, capsys):
    """The CLI printed only `interrupted`: the user did not learn that a rerun into the same --out resumes."""
    from tuneforge.cli import main
    from tuneforge.data.curate.synth import teacher

    data = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": f"Describe step {i}."} for i in range(6)])
    out = tmp_path / "out"
    real = teacher.Teacher.complete

    def interrupted_after_two(self, batch, **params):
        if len(self.done) >= 2:
            raise KeyboardInterrupt
        return real(self, batch, **params)

    monkeypatch.setattr(teacher.Teacher, "complete", interrupted_after_two)
    with StubTeacher(evol_echo) as stub:
        code = main(["data", "synth", "evol_instruct", "--data", data, "--concurrency", "1", "--out", str(out),
                     "--model", "stub", "--base-url", stub.base_url])
    err = capsys.readouterr().err
    assert code == 130
    assert re.search(rf"\d+ finished requests saved in {re.escape(str(out / 'progress.jsonl'))}; rerun the same "
                     r"command with the same `--out` to resume", err), err
