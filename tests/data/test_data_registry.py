"""The dataset registry (LLaMA-Factory's dataset_info.json): names -> files, formats, column mappings."""

from __future__ import annotations

import json

import pytest

from tests.data.chat_fixtures import REGISTRY, needs_registry
from tuneforge.configs.schema import DatasetSpec
from tuneforge.data import readers
from tuneforge.data.build import load_examples, read_spec
from tuneforge.data.registry import Registry
from tuneforge.data.types import DataReport
from tuneforge.errors import DataError


def load(names: list[str], registry: Registry) -> tuple[list, DataReport]:
    report = DataReport()
    return load_examples([DatasetSpec(path=n) for n in names], registry, None, report), report


@needs_registry
def test_llamafactory_registry_by_name():
    registry = Registry(REGISTRY)
    examples, report = load(["alpaca_en_demo", "identity", "glaive_toolcall_en_demo"], registry)
    assert report.rows_read == 999 + 91 + 300 and not report.bad_rows
    alpaca = examples[0]
    assert alpaca.source.endswith("alpaca_en_demo.json:record 1")
    assert [m["role"] for m in alpaca.messages] == ["user", "assistant"]
    assert alpaca.messages[0]["content"] == "Describe a process of making crepes."
    identity = examples[999]
    assert identity.source.endswith("identity.json:record 1") and "{{name}}" in identity.messages[1]["content"]
    glaive = examples[999 + 91:]
    with_tools = [e for e in glaive if e.tools]
    assert len(with_tools) == 191  # the rows whose `tools` cell is not empty
    assert all(t["type"] == "function" and t["function"]["name"] for e in with_tools for t in e.tools)
    calls = [m for e in glaive for m in e.messages if m.get("tool_calls")]
    assert len({id(c) for c in calls}) >= 153  # every function_call turn became an assistant tool call
    assert all(isinstance(c["tool_calls"][0]["function"]["arguments"], dict) for c in calls)
    assert any(m["role"] == "tool" for e in glaive for m in e.messages)


@needs_registry
def test_llamafactory_pretraining_entries_and_bad_rows():
    registry = Registry(REGISTRY)
    examples, report = load(["wiki_demo", "c4_demo"], registry)
    assert len(examples) == 30 + 300 and all(e.text and e.messages is None for e in examples)
    # Two rows of this upstream file put an observation after a plain reply: reported, with file and record.
    examples, report = load(["glaive_toolcall_zh_demo"], registry)
    assert len(examples) == 298
    assert [b.source.rsplit(":", 1)[1] for b in report.bad_rows] == ["record 198", "record 294"]
    assert all(b.field == "conversations[2]" and "`tool` turn cannot follow" in b.problem for b in report.bad_rows)


@needs_registry
def test_ranking_datasets_read_as_preference_pairs():
    spec = Registry(REGISTRY).resolve(DatasetSpec(path="dpo_en_demo"))
    assert spec.format == "pairwise" and spec.columns == {"messages": "conversations", "chosen": "chosen",
                                                          "rejected": "rejected"}
    rows = read_spec(DatasetSpec(path="dpo_en_demo"), Registry(REGISTRY), None)
    assert len(rows) == 300 and all(r.chosen and r.rejected for r in rows)
    kto = Registry(REGISTRY).resolve(DatasetSpec(path="kto_en_demo"))
    assert kto.format == "kto" and kto.columns["label"] == "label"


def test_own_registry_paths_columns_and_tags(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "qa.json").write_text(json.dumps([{"q": "2+2?", "ctx": "math", "a": "4"}]),
                                               encoding="utf-8")
    (tmp_path / "data" / "chat.jsonl").write_text(json.dumps(
        {"dialog": [{"speaker": "me", "says": "Hi"}, {"speaker": "bot", "says": "Hello"}], "sys": "Be kind."}) + "\n",
        encoding="utf-8")
    info = {"qa": {"file_name": "data/qa.json", "columns": {"prompt": "q", "query": "ctx", "response": "a"}},
            "chat": {"file_name": "data/chat.jsonl", "formatting": "sharegpt",
                     "columns": {"messages": "dialog", "system": "sys"},
                     "tags": {"role_tag": "speaker", "content_tag": "says", "user_tag": "me", "assistant_tag": "bot"}},
            "remote": {"hf_hub_url": "someone/remote-set"}}
    registry_path = tmp_path / "dataset_info.json"
    registry_path.write_text(json.dumps(info), encoding="utf-8")
    registry = Registry(registry_path)
    (qa, chat), report = load(["qa", "chat"], registry)
    assert qa.messages == [{"role": "user", "content": "2+2?\nmath"}, {"role": "assistant", "content": "4"}]
    assert qa.source == f"{tmp_path / 'data' / 'qa.json'}:record 1"  # relative to the registry file
    assert chat.messages == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello"}]
    spec = registry.resolve(DatasetSpec(path="remote"))
    assert spec.path == "someone/remote-set" and spec.format == "alpaca"


def test_unknown_name_gets_a_hint(tmp_path, monkeypatch):
    registry_path = tmp_path / "dataset_info.json"
    registry_path.write_text(json.dumps({"alpaca_en_demo": {"file_name": "x.json"}}), encoding="utf-8")

    def offline(name, split):
        raise DataError(f"`{name}` ... hub failed")

    monkeypatch.setattr(readers, "read_hub", offline)
    with pytest.raises(DataError, match="Did you mean `alpaca_en_demo`"):
        read_spec(DatasetSpec(path="alpaca_en_dem"), Registry(registry_path), None)


def _registry(tmp_path, entries: dict) -> Registry:
    path = tmp_path / "dataset_info.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    return Registry(path)


def _hub_fails(monkeypatch, reachable: bool = False) -> None:
    def fails(name, split):
        raise DataError(f"`{name}` ... hub failed") from ConnectionError("no route to host")

    monkeypatch.setattr(readers, "read_hub", fails)
    monkeypatch.setattr("tuneforge.data.build.hub_reachable", lambda: reachable)


def test_registry_entry_whose_file_is_missing_names_the_entry_and_file(tmp_path, monkeypatch):
    registry = _registry(tmp_path, {"mllm_demo": {"file_name": "mllm_demo.json"}, "identity": {"file_name": "i.json"}})
    monkeypatch.chdir(tmp_path.parent)  # the file is looked up next to the registry, not in the current folder
    with pytest.raises(DataError) as err:
        read_spec(DatasetSpec(path="mllm_demo"), registry, None)
    message = str(err.value)
    assert f"registry entry `mllm_demo` points at {tmp_path / 'mllm_demo.json'}, which does not exist" in message
    assert "current folder" not in message and "Valid names" not in message and "Did you mean" not in message


def test_name_not_in_registry_says_so_and_suggests_only_close_names(tmp_path, monkeypatch):
    registry = _registry(tmp_path, {name: {"file_name": f"{name}.json"} for name in
                                    ("alpaca_en_demo", "evol_instruct_de", "identity", "glaive_toolcall_en_demo")})
    _hub_fails(monkeypatch)
    with pytest.raises(DataError) as err:
        read_spec(DatasetSpec(path="no_such_ds"), registry, None)
    assert f"`no_such_ds` is not a name in the dataset registry {registry.path}" in str(err.value)
    assert "Did you mean" not in str(err.value) and "evol_instruct_de" not in str(err.value)
    with pytest.raises(DataError, match="Did you mean `identity`"):
        read_spec(DatasetSpec(path="identty"), registry, None)


def test_hub_entry_with_the_hub_unreachable_says_it_is_a_hub_dataset(tmp_path, monkeypatch):
    registry = _registry(tmp_path, {"alpaca_en": {"hf_hub_url": "llamafactory/alpaca_en"}})
    _hub_fails(monkeypatch)
    with pytest.raises(DataError) as err:
        read_spec(DatasetSpec(path="alpaca_en"), registry, None)
    message = str(err.value)
    assert "Registry entry `alpaca_en`" in message and "Hugging Face hub dataset `llamafactory/alpaca_en`" in message
    assert "the hub is unreachable from here" in message and "Did you mean" not in message
    _hub_fails(monkeypatch, reachable=True)
    with pytest.raises(DataError, match=r"loading it from the hub failed \(ConnectionError: no route to host\)"):
        read_spec(DatasetSpec(path="alpaca_en"), registry, None)


def test_hub_entries_keep_their_split_and_refuse_a_subset(tmp_path):
    """LLaMA-Factory's adgen_eval is the `validation` split of a hub dataset; dpo_mix_en the `en` configuration."""
    path = tmp_path / "dataset_info.json"
    path.write_text(json.dumps({
        "adgen_eval": {"hf_hub_url": "HasturOfficial/adgen", "split": "validation",
                       "columns": {"prompt": "content", "response": "summary"}},
        "dpo_mix_en": {"hf_hub_url": "llamafactory/DPO-En-Zh-20k", "subset": "en", "ranking": True},
        "local": {"file_name": "local.json", "split": "train"}}))
    registry = Registry(path)
    assert registry.resolve(DatasetSpec(path="adgen_eval")).split == "validation"
    assert registry.resolve(DatasetSpec(path="adgen_eval", split="test")).split == "test"  # the spec's own wins
    assert registry.resolve(DatasetSpec(path="local")).split == "train"
    with pytest.raises(DataError, match=r"entry `dpo_mix_en`.*subset: en.*file_name"):
        registry.resolve(DatasetSpec(path="dpo_mix_en"))


@needs_registry
def test_llamafactory_v1_reasoning_tool_use_demo():
    """Its rows have reasoning and tool_call parts; every row reads, those that end on a tool call too (the call is
    the last trained turn, as LLaMA-Factory trains it)."""
    path = REGISTRY.parent / "reason_tool_use_demo_50.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    ends_on_call = {i for i, r in enumerate(rows, start=1)
                    if any(p["type"] == "tool_call" for p in r["messages"][-1]["content"])}
    report = DataReport()
    examples = load_examples([DatasetSpec(path=str(path))], None, None, report)
    assert not report.bad_rows and len(examples) == len(rows) and ends_on_call
    assert {i for i, e in enumerate(examples, start=1) if e.messages[-1].get("tool_calls")} == ends_on_call
    assert any(m.get("tool_calls") for e in examples for m in e.messages)
    assert all("<think>" in m["content"] for e in examples for m in e.messages if m["role"] == "assistant")
