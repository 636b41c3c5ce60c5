"""The bundled example task: deterministic, held-out split disjoint from training, selectable families, exact match,
and the committed files are what the generator writes."""

from __future__ import annotations

import json
import re

import pytest

from tuneforge.data.example_task import (
    DEFAULT_DIR,
    FAMILIES,
    IDENTITY_EN,
    IDENTITY_ZH,
    exact_match,
    generate_example_task,
    make_rows,
)
from tuneforge.data.formats import guess_format, to_example


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def questions(rows) -> set[str]:
    return {r["messages"][0]["content"] for r in rows}


def test_deterministic_per_seed(tmp_path):
    a = generate_example_task(tmp_path / "a", n_train=100, n_heldout=30, seed=3)
    b = generate_example_task(tmp_path / "b", n_train=100, n_heldout=30, seed=3)
    c = generate_example_task(tmp_path / "c", n_train=100, n_heldout=30, seed=4)
    for split in ("train", "heldout"):
        assert a[split].read_bytes() == b[split].read_bytes()
        assert a[split].read_bytes() != c[split].read_bytes()


def test_heldout_is_disjoint_and_uses_new_templates_and_values():
    train, heldout = make_rows(list(FAMILIES), 1000, False, 0), make_rows(list(FAMILIES), 300, True, 0)
    assert not questions(train) & questions(heldout)
    for family in ("units", "strings", "arithmetic"):  # open-ended values: held-out answers never seen in training
        seen = {r["answer"] for r in train if r["family"] == family}
        assert not seen & {r["answer"] for r in heldout if r["family"] == family}, family
    identity = [r for r in heldout if r["family"] == "identity"]
    assert {r["answer"] for r in identity} == {IDENTITY_EN, IDENTITY_ZH}


def test_rows_are_openai_messages_with_answers_in_both_languages():
    rows = make_rows(list(FAMILIES), 50, False, 0)
    assert {r["family"] for r in rows} == set(FAMILIES) and {r["lang"] for r in rows} == {"en", "zh"}
    for row in rows:
        ex = to_example(row, guess_format(row, {}, "x"), "x", {}, {})  # validates like any user data
        assert [m["role"] for m in ex.messages] == ["user", "assistant"]
        assert ex.messages[1]["content"] == row["answer"]
    units = [r for r in rows if r["family"] == "units"]
    assert any(r["answer"].endswith(" m") for r in units) or any(r["answer"].endswith(" 米") for r in units)


def test_known_answers():
    rows = make_rows(["units", "strings", "arithmetic", "lookup"], 400, False, 0)
    for row in rows:
        question, answer = row["messages"][0]["content"], row["answer"]
        numbers = [int(n) for n in re.findall(r"\d+", question)]
        if row["family"] == "strings":
            assert answer == question.split("'")[1].upper()
        if row["family"] == "arithmetic":
            assert answer == str(sum(numbers))
        if row["family"] == "units" and (" km " in question or "千米" in question):
            assert answer in (f"{numbers[0] * 1000} m", f"{numbers[0] * 1000} 米")
        if row["family"] == "lookup" and row["lang"] == "en" and "'red'" in question:
            assert answer == "红色"


def test_families_are_selectable(tmp_path):
    paths = generate_example_task(tmp_path, families=("identity", "lookup"), n_train=20, n_heldout=10)
    assert {r["family"] for r in read(paths["train"])} == {"identity", "lookup"}
    assert len(read(paths["heldout"])) == 10
    with pytest.raises(ValueError, match="unknown example-task families"):
        make_rows(["identity", "poetry"], 5, False, 0)


@pytest.mark.parametrize("prediction, answer, expected", [
    ("7000 m", "7000 m", True), ("  7000   m. ", "7000 m", True), ("APPLE!", "APPLE", True),
    ("我是 TuneForge 助手，一个用 TuneForge 微调的模型", IDENTITY_ZH, True), ("apple", "APPLE", False),
    ("7000 m and more", "7000 m", False), ("70 00 m", "7000 m", False),
])
def test_exact_match(prediction, answer, expected):
    assert exact_match(prediction, answer) is expected


def test_committed_files_are_regenerated_by_the_default_command(tmp_path):
    paths = generate_example_task(tmp_path)  # the defaults of `python -m tuneforge.data.example_task`
    for split, path in paths.items():
        assert (DEFAULT_DIR / path.name).read_bytes() == path.read_bytes(), split
    assert sum(p.stat().st_size for p in DEFAULT_DIR.iterdir()) < 300_000
