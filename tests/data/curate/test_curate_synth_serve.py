"""Every synth method and `safety --distill` end to end against `tuneforge serve` with the tiny model: the text is
noise, so the test checks the pipeline (requests answered, every item either kept or rejected with a rule, the
files written) and that a rerun into the same folder resumes from progress.jsonl without asking again."""

from __future__ import annotations

import json

import pytest

from tests.data.curate.helpers import parse, read_jsonl, write_jsonl
from tuneforge.data.curate.distill import distill
from tuneforge.data.curate.synth import synth

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    from tuneforge.inference.serve.app import create_app
    from tuneforge.inference.serve.main import ServeArgs, ServerThread, build_state

    state = build_state(ServeArgs(model=str(tiny_llama_dir), served_model_name="tiny", max_batch_size=8))
    with ServerThread(create_app(state)) as url:
        yield url + "/v1"


def inputs(tmp_path) -> dict[str, list[str]]:
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [{"id": f"s{k}", "instruction": text, "instances": []} for k, text in
                        enumerate(["Give three tips for staying healthy.", "Name the capital of France.",
                                   "Translate good morning into Spanish."])])
    instructions = write_jsonl(tmp_path / "inst.jsonl", [{"instruction": "Describe how bread rises.", "output": "x"},
                                                         {"prompt": "Why is the sky blue?"}])
    (tmp_path / "doc.md").write_text("# Tides\n\nTides are caused by the moon's gravity.\n\n## Sun\n\nThe sun also "
                                     "pulls on the oceans, less strongly.\n", encoding="utf-8")
    responses = write_jsonl(tmp_path / "resp.jsonl", [{"text": "Bread rises because yeast makes gas."}])
    return {"self_instruct": [seeds, "--num-instructions", "2", "--batch", "2", "--max-rounds", "2"],
            "evol_instruct": [instructions], "qa_from_docs": [str(tmp_path / "doc.md")],
            "backtranslate": [responses, "--candidates", "2"]}


def run(method, server, out, data):
    argv = ["--base-url", server, "--model", "tiny", "--out", str(out), "--max-tokens", "12", "--retries", "1"]
    if method == "distill":
        return distill(parse("safety", ["--distill", "--data", data[0], *argv]))
    return synth(parse("synth", [method, "--data", data[0], *data[1:], *argv]))


@pytest.mark.parametrize("method", ["self_instruct", "evol_instruct", "qa_from_docs", "backtranslate", "distill"])
def test_method_against_tuneforge_serve_and_resume(method, server, tmp_path):
    data = inputs(tmp_path)
    data["distill"] = data["evol_instruct"]
    out = tmp_path / "out"
    first = run(method, server, out, data[method])
    teacher = first["teacher"]
    assert teacher["failed"] == 0 and teacher["answered"] > 0
    # a request repeated within the run (e.g. a self_instruct round that kept nothing new) is answered by the
    # run's earlier reply ("repeated"), never asked twice; a rerun finds every one in progress.jsonl ("reused")
    keys = [json.loads(line)["key"] for line in (out / "progress.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(keys) == len(set(keys)) == teacher["answered"]
    kept = read_jsonl(out / f"{method}.jsonl")
    rejected = read_jsonl(out / "rejected.jsonl")
    assert len(kept) == first["rows"] and len(rejected) == sum(first["rejected"].values())
    for row in kept:
        assert [m["role"] for m in row["messages"]][-2:] == ["user", "assistant"]
    second = run(method, server, out, data[method])
    assert second["teacher"]["answered"] == 0 and second["teacher"]["sent"] == 0  # all from progress.jsonl
    assert second["teacher"]["reused"] + second["teacher"]["repeated"] == (teacher["answered"] + teacher["reused"]
                                                                           + teacher["repeated"])
    assert read_jsonl(out / f"{method}.jsonl") == kept
