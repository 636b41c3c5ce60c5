"""The per-item predictions file, which is also the resume cache and the judge's source of replies."""

from __future__ import annotations

from tuneforge.eval.store import ItemStore


def test_a_torn_last_line_does_not_swallow_the_next_record(tmp_path):
    """An interrupted run left a line without its newline; the resumed run's first record was appended to it, so
    it could not be read back: redone on the next run, and missing from the replies the judge reads."""
    path = tmp_path / "predictions.jsonl"
    store = ItemStore(path, {"task": "t"})
    store.add({"id": "1", "prediction": "a"})
    path.write_text(path.read_text() + '{"id": "2", "predic')  # killed mid-write
    resumed = ItemStore(path, {"task": "t"})
    assert set(resumed.done()) == {"1"}
    resumed.add({"id": "2", "prediction": "b"})
    assert resumed.done()["2"]["prediction"] == "b"
    assert [r["id"] for r in ItemStore.read_all(path)] == ["1", "2"]
