"""Per-item results on disk, so an interrupted evaluation resumes where it stopped.

    store = ItemStore(out / "smollm2" / "mmlu" / "predictions.jsonl", settings={"shots": 5})
    done = store.done()                 # {item id: record} finished under the same settings
    store.add({"id": "anatomy/3", ...})

The file is the predictions file users read (one JSON object per line). It is appended to, line by line, rather
than rewritten through a temp file: a crash loses at most the line being written, and a torn last line is
ignored when reading. A record made under other settings (shots, template, ...) is never reused, and neither is
one whose input changed under the same id (`input_key`): an edited or replaced data file keeps its row ids.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def settings_key(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def input_key(value) -> str:
    """A short digest of what an item asked (its messages or prompt, its reference), saved with its record."""
    return settings_key(value)


def end_torn_line(path: Path) -> None:
    """An interrupted run can leave a JSON-lines file's last line without its newline: the next record appended
    would join it and be unreadable too (a reply lost to the judge, which reads them back; a judge reply re-sent)."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, 2)
        if f.read(1) != b"\n":
            f.write(b"\n")


class ItemStore:
    def __init__(self, path: Path, settings: dict):
        self.path = Path(path)
        self.key = settings_key(settings)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        end_torn_line(self.path)

    def done(self) -> dict[str, dict]:
        found: dict[str, dict] = {}
        if not self.path.is_file():
            return found
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by an interrupted run: that item is simply redone
            if isinstance(record, dict) and record.get("settings") == self.key and "id" in record:
                found[record["id"]] = record
        return found

    @staticmethod
    def read_all(path: Path) -> list[dict]:
        """The records of a predictions file made under the settings of its last record (later duplicates win)."""
        found: dict[str, dict] = {}
        if Path(path).is_file():
            for line in Path(path).read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and "id" in record:
                    found[record["id"]] = record
        last = list(found.values())[-1:]
        return [r for r in found.values() if last and r.get("settings") == last[0].get("settings")]

    def add(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({**record, "settings": self.key}, ensure_ascii=False) + "\n")
            f.flush()
