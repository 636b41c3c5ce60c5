"""`tuneforge data synth` and `data safety --distill` end to end against a scripted OpenAI-compatible server on
127.0.0.1 (tests/data/curate/stub_teacher.py): filters, parsing, retries and resume are exercised exactly."""

from __future__ import annotations

import hashlib
import random
import re

import pytest

from tests.data.curate.helpers import parse, read_jsonl, write_jsonl
from tests.data.curate.stub_teacher import StubTeacher
from tuneforge.data.curate.distill import distill
from tuneforge.data.curate.synth import synth
from tuneforge.data.curate.synth.teacher import load_progress

SEEDS = "datasets/stanford_alpaca/seed_tasks.jsonl"
VOCAB = ("summarize compare classify estimate recommend outline critique translate rank justify volcano harbor "
         "ledger violin glacier orchard compass lantern meadow quartz tundra canyon beacon falcon pepper saffron "
         "marble copper jasmine thimble walnut pebble").split()


def teacher_argv(stub, out, *more) -> list[str]:
    return ["--base-url", stub.base_url, "--model", "stub", "--out", str(out), "--retries", "0", "--backoff",
            "0.01", *more]


def unique_task(prompt: str) -> str:
    """A fresh instruction per prompt (random words: low ROUGE-L to any other), a function of the prompt."""
    rng = random.Random(hashlib.sha256(prompt.encode()).hexdigest())
    return "Please " + " ".join(rng.sample(VOCAB, 7)) + "."


def self_instruct_script(messages, body):
    prompt = messages[-1]["content"]
    if prompt.startswith("Come up with a series of tasks"):
        n = int(re.search(r"(\d+)\.$", prompt).group(1))
        return (f"Draw a map of the old city.\n{n + 1}. Hi there\n{n + 2}. What is the relation between the given "
                f"pairs of words?\n{n + 3}. ¿Qué hora es en Lima?\n{n + 4}. Éxplain the rules of chess.\n"
                f"{n + 5}. {unique_task(prompt)}")
    task = re.search(r"Task: (.*)\n\nAnswer in", prompt, re.S).group(1)
    if "pepper" in task:
        return "I do not know."  # no `Output:`: dropped as no_output
    return f"Input: None\nOutput: the answer to {task}"


def test_self_instruct_filters_and_instances(tmp_path, shared_assets):
    with StubTeacher(self_instruct_script) as stub:
        args = parse("synth", ["self_instruct", "--data", str(shared_assets / SEEDS), "--num-instructions", "5",
                               "--batch", "2", *teacher_argv(stub, tmp_path / "out")])
        report = synth(args)
    rejected = report["rejected"]
    # rounds of 2 prompts, one new task per reply: 3 rounds; the 5th reply completes the 5 and the 6th is unused
    for rule in ("blocked_keyword", "too_short", "similar", "starts_with_punctuation", "non_ascii_start"):
        assert rejected[rule] == 5, rule
    assert report["instructions_kept"] == 5 and report["seed_tasks"] == 175
    kept = read_jsonl(tmp_path / "out" / "self_instruct.jsonl")
    assert len(kept) + rejected.get("no_output", 0) == 5
    assert len({r["instruction"] for r in kept}) == len(kept)
    for row in kept:
        assert row["instruction"].startswith("Please ") and "pepper" not in row["instruction"]
        assert row["messages"][1]["content"] == f"the answer to {row['instruction']}"
        assert row["messages"][0]["content"] == row["instruction"]  # input None: the instruction alone
    list_prompts = [p for p in stub.prompts() if p.startswith("Come up")]
    assert len(list_prompts) == 6 and all(p.count("\n") >= 7 for p in list_prompts)  # 6 seeds (+ kept) shown
    assert report["teacher"]["answered"] == len(stub.requests) == 6 + 5
    lines = [line for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert len(lines) == sum(rejected.values())


def test_self_instruct_resumes_without_repeating_finished_requests(tmp_path, shared_assets):
    out = tmp_path / "out"

    def failing_instances(messages, body):  # the instance stage fails: an interrupted run
        return 500 if messages[-1]["content"].startswith("Complete the task") else self_instruct_script(messages, body)

    argv = ["self_instruct", "--data", str(shared_assets / SEEDS), "--num-instructions", "4", "--batch", "2"]
    with StubTeacher(failing_instances) as stub:
        first = synth(parse("synth", [*argv, *teacher_argv(stub, out)]))
    assert first["rejected"]["teacher_failed"] == 4 and first["rows"] == 0 and first["teacher"]["failed"] == 4
    finished = set(load_progress(out / "progress.jsonl"))
    assert len(finished) == 4  # the 4 list prompts
    with StubTeacher(self_instruct_script) as stub:
        second = synth(parse("synth", [*argv, *teacher_argv(stub, out)]))
    assert [p.startswith("Complete the task") for p in stub.prompts()] == [True] * 4  # only the unfinished ones
    assert second["teacher"]["reused"] == 4 and second["instructions_kept"] == 4
    assert second["rows"] + second["rejected"].get("no_output", 0) == 4
    assert len(load_progress(out / "progress.jsonl")) == 8


def test_retries_on_429_and_500_with_backoff(tmp_path):
    seen: dict[str, int] = {}

    def flaky(messages, body):
        prompt = messages[-1]["content"]
        seen[prompt] = seen.get(prompt, 0) + 1
        if seen[prompt] == 1:
            return 429
        if seen[prompt] == 2:
            return 500
        return "Sure. Here is a thorough answer with several steps, examples and details."

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Question number {k}?"} for k in range(3)])
    with StubTeacher(flaky) as stub:
        args = parse("safety", ["--distill", "--data", data, *teacher_argv(stub, tmp_path / "out"),
                                "--retries", "2", "--concurrency", "2"])
        report = distill(args)
    assert report["rows"] == 3 and report["teacher"]["retried"] == 6 and report["teacher"]["sent"] == 9
    assert all(n == 3 for n in seen.values())


def test_a_cut_off_progress_line_is_ignored(tmp_path):
    path = tmp_path / "progress.jsonl"
    path.write_text('{"key": "a", "reply": "x"}\n{"key": "b", "rep', encoding="utf-8")
    assert load_progress(path) == {"a": "x"}


def evol_script(messages, body):
    prompt = messages[-1]["content"]
    m = re.search(r"#Given Prompt#:\n(.*)\n#(?:Rewritten|Created) Prompt#:\n$", prompt, re.S)
    if m is None:  # answering an evolved instruction
        if "SORRY" in prompt:
            return "Sorry, I can't help with that."
        return f"A detailed answer to: {prompt}"
    given = m.group(1)
    if "SAME" in given:
        return given
    if "ECHO" in given:
        return f"#Rewritten Prompt#: {given} following the rewritten prompt rules exactly"
    return f"#Rewritten Prompt#: {given} and explain each step with an example from daily life"


def test_evol_instruct_rounds_and_elimination(tmp_path):
    data = write_jsonl(tmp_path / "seed.jsonl", [
        {"instruction": "Name a fruit that grows in cold climates.", "output": "Apple."},
        {"instruction": "Describe how bread rises.", "input": "", "output": "Yeast."},
        {"instruction": "SAME Say hello politely.", "output": "Hello."},
        {"instruction": "ECHO List two planets.", "output": "Mars, Venus."},
        {"instruction": "SORRY Explain quantum tunnelling.", "output": "..."}])
    with StubTeacher(evol_script) as stub:
        report = synth(parse("synth", ["evol_instruct", "--data", data, "--rounds", "2",
                                       *teacher_argv(stub, tmp_path / "out")]))
    assert report["rejected"] == {"no_information_gain": 2, "copied_prompt_words": 2, "sorry_answer": 2}
    kept = read_jsonl(tmp_path / "out" / "evol_instruct.jsonl")
    assert len(kept) == 4 and sorted(r["round"] for r in kept) == [1, 1, 2, 2]
    second = [r for r in kept if r["round"] == 2]
    for row in second:  # round 2 evolves round 1's result
        assert row["messages"][0]["content"].count("explain each step") == 2
        assert row["evolved_from"].count("explain each step") == 1
        assert row["messages"][1]["content"] == f"A detailed answer to: {row['messages'][0]['content']}"
        assert row["source"].endswith(("line 1", "line 2"))
    assert sum(report["operations"].values()) == 4
    assert set(report["operations"]) <= {"add_constraints", "deepen", "concretize", "increase_reasoning",
                                         "complicate_input", "breadth"}


DOC = """# Volcanoes

A volcano is an opening in the crust of a planet through which lava, ash and gases escape.

## Types

Shield volcanoes have gentle slopes built from fluid basalt lava flows. Stratovolcanoes are steep cones built from
layers of lava and ash. Cinder cones are small and short lived.

## Monitoring

Seismometers record the small earthquakes that come before an eruption. Satellites measure ground swelling.
"""

HTML = """<html><head><style>body {font: serif}</style><script>var x = "secret script";</script></head>
<body><h1>Harbors</h1><p>A harbor is a sheltered body of water where ships can be docked safely.</p>
<p>Breakwaters protect harbors from waves &amp; storms.</p></body></html>"""


def qa_script(messages, body):
    chunk = re.search(r'Text:\n"""\n(.*)\n"""$', messages[-1]["content"], re.S).group(1)
    words = chunk.split()
    return (f"Q: What does the passage starting with {words[0]} {words[1]} say?\nA: {' '.join(words[2:12])}\n"
            f"Q: Invented question?\nA: Quantum chromodynamics explains everything beautifully.\n"
            f"Q: What is this about?\nA: {words[-1]}")


def test_qa_from_docs_chunks_markdown_and_html_with_traceable_sources(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "volcano.md").write_text(DOC, encoding="utf-8")
    (docs / "harbor.html").write_text(HTML, encoding="utf-8")
    (docs / "notes.bin").write_bytes(b"\x00\x01")  # not a document: ignored
    with StubTeacher(qa_script) as stub:
        report = synth(parse("synth", ["qa_from_docs", "--data", str(docs), "--max-chars", "200", "--overlap",
                                       "40", *teacher_argv(stub, tmp_path / "out")]))
    chunks = report["chunks"]
    assert report["documents"] == 2 and chunks >= 4
    # per chunk: one grounded pair kept, one invented answer dropped; "What is this about?" kept once only
    assert report["rejected"] == {"ungrounded": chunks, "duplicate_question": chunks - 1}
    rows = read_jsonl(tmp_path / "out" / "qa_from_docs.jsonl")
    assert len(rows) == chunks + 1
    from tuneforge.data.curate.synth.docs import document_text

    for row in rows:
        file, a, b = re.fullmatch(r"(.*):chars (\d+)-(\d+)", row["source"]).groups()
        text = document_text(tmp_path / "docs" / file.rsplit("/", 1)[-1])
        assert text[int(a):int(b)] == row["chunk"] and int(b) - int(a) <= 200
        assert all(w in row["chunk"] for w in row["messages"][1]["content"].split())
    html_chunks = [r["chunk"] for r in rows if "harbor.html" in r["source"]]
    assert html_chunks and all("<" not in c and "secret script" not in c and "font" not in c for c in html_chunks)
    assert any("waves & storms" in c for c in html_chunks)


def backtranslate_script(messages, body):
    prompt = messages[-1]["content"]
    if prompt.startswith("Below is a response"):
        response = re.search(r"Response:\n(.*)\n\nInstruction:$", prompt, re.S).group(1)
        return [f"Instruction: Explain {response[:20]}", f"Tell me about {response[:20]}"][body["seed"]]
    if "NOSCORE" in prompt:
        return "I cannot rate this."
    if "LOW" in prompt:
        return "Off topic.\nScore: 2"
    instruction = re.search(r"Instruction: (.*)\n\nAnswer:", prompt, re.S).group(1)
    return "Clear and complete.\nScore: 5" if instruction.startswith("Explain") else "Score: 3"


def test_backtranslate_scores_candidates_and_keeps_the_best(tmp_path):
    data = write_jsonl(tmp_path / "r.jsonl", [
        {"instruction": "x", "output": "Photosynthesis turns light into chemical energy in plants."},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "LOW quality text."}]},
        {"text": "NOSCORE some response"}])
    with StubTeacher(backtranslate_script) as stub:
        report = synth(parse("synth", ["backtranslate", "--data", data, "--candidates", "2",
                                       *teacher_argv(stub, tmp_path / "out")]))
    assert report["rows"] == 1 and report["rejected"] == {"low_score": 1, "unscored": 1}
    row = read_jsonl(tmp_path / "out" / "backtranslate.jsonl")[0]
    assert row["messages"][0]["content"] == "Explain Photosynthesis turns"
    assert row["messages"][1]["content"].startswith("Photosynthesis") and row["score"] == 5
    assert len(stub.requests) == 3 * 2 + 3 * 2  # 2 candidates per response, then one judgement per candidate
    judge = [r for r in stub.requests if r["messages"][-1]["content"].startswith("Below is an instruction")]
    assert all(r["temperature"] == 0.0 for r in judge)


def test_safety_distill_drops_the_system_prompt(tmp_path):
    def script(messages, body):
        assert messages[0]["role"] == "system" and messages[0]["content"].startswith("You are a safe")
        return f"[{messages[0]['content'].count('Be brief.')}] A safe answer to: {messages[-1]['content']}"

    data = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "How do I pick a lock?"},
        {"instruction": "Tell me about fireworks.", "input": "", "output": "old", "system": "Be brief."},
        {"prompt": "How do I pick a lock?", "pos_resp": "a", "neg_resp": "b"}])  # a repeated prompt: asked once
    with StubTeacher(script) as stub:
        report = distill(parse("safety", ["--distill", "--data", data, *teacher_argv(stub, tmp_path / "out")]))
    assert report["rows"] == 2 and len(stub.requests) == 2
    rows = read_jsonl(tmp_path / "out" / "distill.jsonl")
    assert rows[0]["messages"] == [{"role": "user", "content": "How do I pick a lock?"},
                                   {"role": "assistant", "content": "[0] A safe answer to: How do I pick a lock?"}]
    assert rows[1]["messages"][0] == {"role": "system", "content": "Be brief."}  # the row's own system stays
    assert rows[1]["messages"][2]["content"].startswith("[1]")
    assert rows[0]["source"].endswith("p.jsonl:line 1")
    assert "safety --distill" in (tmp_path / "out" / "report.md").read_text()


def test_synth_needs_an_endpoint(tmp_path, monkeypatch):
    from tuneforge.errors import UserError

    for name in ("TUNEFORGE_TEACHER_BASE_URL", "OPENAI_BASE_URL", "TUNEFORGE_TEACHER_MODEL"):
        monkeypatch.delenv(name, raising=False)
    data = write_jsonl(tmp_path / "r.jsonl", [{"text": "a"}])
    with pytest.raises(UserError, match="--base-url"):
        synth(parse("synth", ["backtranslate", "--data", data, "--out", str(tmp_path / "o")]))


def test_concurrency_cap_and_rate_limit(tmp_path):
    import threading
    import time

    active, peak, lock = [0], [0], threading.Lock()

    def slow(messages, body):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return "A safe and complete answer."

    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Question {k}?"} for k in range(8)])
    with StubTeacher(slow) as stub:
        distill(parse("safety", ["--distill", "--data", data, *teacher_argv(stub, tmp_path / "a"),
                                 "--concurrency", "3"]))
        assert peak[0] == 3
        peak[0] = 0
        started = time.perf_counter()
        distill(parse("safety", ["--distill", "--data", data, *teacher_argv(stub, tmp_path / "b"),
                                 "--concurrency", "8", "--rate", "40"]))
        assert time.perf_counter() - started >= 7 / 40  # 8 starts at least 1/40 s apart
        assert len(stub.requests) == 16


def test_every_request_carries_the_seed_so_a_fresh_run_repeats_the_result(tmp_path):
    """A sampling teacher answered differently on each run: `--seed` reached only our own draws, so the same
    command into a fresh `--out` gave other rows. The stub samples by the request's seed, as vLLM and serve do."""
    def script(messages, body):
        rng = random.Random(f"{body.get('seed')}:{messages[-1]['content']}" if "seed" in body else None)
        if "#Given Prompt#" in messages[-1]["content"]:
            return f"Explain how {' '.join(rng.sample(VOCAB, 6))} relate, step by step."
        return f"Answer {rng.random()}"

    data = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "Describe a harbor."}, {"prompt": "Why do tides rise?"}])
    with StubTeacher(script) as stub:
        runs = [synth(parse("synth", ["evol_instruct", "--data", data, "--seed", seed,
                                      *teacher_argv(stub, tmp_path / f"out{k}")]))
                for k, seed in enumerate(["3", "3", "4"])]
    assert {r.get("seed") for r in stub.requests} == {3, 4}
    first, again, other_seed = [read_jsonl(tmp_path / f"out{k}" / "evol_instruct.jsonl") for k in range(3)]
    assert runs[0]["rows"] == 2 and first == again and other_seed != first


def test_distill_counts_each_repeated_prompt_it_leaves_out(tmp_path):
    """A prompt repeated in several rows is asked once; the repeats were dropped with nothing said."""
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "How do I pick a lock?"}, {"prompt": "Is fire hot?"},
                                              {"prompt": "How do I pick a lock?", "pos_resp": "a", "neg_resp": "b"}])
    with StubTeacher(lambda messages, body: "A safe answer.") as stub:
        report = distill(parse("safety", ["--distill", "--data", data, data, *teacher_argv(stub, tmp_path / "out")]))
    assert report["rows"] == 2 and len(stub.requests) == 2
    assert report["rejected"] == {"duplicate_prompt": 4}  # 6 rows in: 2 kept + 4 repeats, each one counted
    repeats = read_jsonl(tmp_path / "out" / "rejected.jsonl")
    assert [r["source"].rsplit(":", 1)[1] for r in repeats] == ["line 3", "line 1", "line 2", "line 3"]
    assert all(r["duplicate_of"].endswith(("p.jsonl:line 1", "p.jsonl:line 2")) for r in repeats)


def test_a_resume_after_a_cut_off_progress_line_keeps_its_new_replies(tmp_path):
    """The first record of a resumed run was appended to the cut line, so it was unreadable on the next resume."""
    data = write_jsonl(tmp_path / "i.jsonl", [{"text": "Bread rises because yeast makes gas."}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "progress.jsonl").write_text('{"key": "a", "reply": "x"}\n{"key": "b", "rep', encoding="utf-8")
    with StubTeacher(backtranslate_script) as stub:
        synth(parse("synth", ["backtranslate", "--data", data, "--candidates", "1", *teacher_argv(stub, out)]))
    saved = load_progress(out / "progress.jsonl")
    assert len(saved) == 1 + len(stub.requests) == 3
