#!/usr/bin/env python3
"""`tuneforge data clean` on 100k rows: rows/s and peak memory, against reading the same rows in the same run.

    .venv/bin/python bench/bench_clean.py                 # 100k rows; prints the table for bench/RESULTS.md
    .venv/bin/python bench/bench_clean.py --rows 20000    # quicker

The data is generated here (seeded, no downloads): alpaca-style JSON lines, 80% English-like rows of random words
from a 20k-word vocabulary and 20% Chinese rows of common characters, 20-300 units each, with 3% exact duplicates
(case and spacing changed) and 3% near duplicates (one word or character in 60 changed) of earlier rows of 120+
units injected as the rows are drawn, so the expected duplicate counts are known and checked.

Each measurement runs in its own process: `read` iterates the rows through the data path (reader + format adapter)
and does nothing else, the baseline every data tool pays; `clean` runs the whole verb with default settings
(all rules, exact + near dedup). Peak memory is the worker's VmHWM (peak RSS over its whole life, imports
included); the `read` process shows what Python + the imports cost, so clean's extra memory is the difference.
The process's CPU time (user + system, imports included) is printed beside the wall time: on a shared machine
wall time depends on the load, CPU time much less.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_rows(n: int, seed: int = 0) -> tuple[list[dict], int, int]:
    """n rows: originals, with 3% exact and 3% near copies of earlier long originals placed right where drawn."""
    from tuneforge.models.tokenizer import COMMON_HANZI

    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(20_000)]
    rows, long_rows, exact, near = [], [], 0, 0
    while len(rows) < n:
        draw = rng.random()
        if long_rows and draw < 0.03:
            src = rng.choice(long_rows)
            rows.append({key: (v.upper() if exact % 2 else "  " + v.replace(" ", "  ")) for key, v in src.items()})
            exact += 1
            continue
        if long_rows and draw < 0.06:
            rows.append(dict(src := rng.choice(long_rows), output=_perturb(src["output"])))
            near += 1
            continue
        zh = rng.random() < 0.2
        sep = "" if zh else " "
        words = [rng.choice(COMMON_HANZI) if zh else rng.choice(vocab) for _ in range(rng.randint(20, 300))]
        row = {"instruction": sep.join(words[:rng.randint(5, 15)]), "input": "", "output": sep.join(words[15:])}
        rows.append(row)
        if len(words) >= 120:
            long_rows.append(row)
    return rows, exact, near


def _perturb(text: str) -> str:
    """Change one unit in 60 (Jaccard about 0.9 with word 3-shingles, 0.85 with character 5-shingles)."""
    if " " in text:
        words = text.split(" ")
        for j in range(30, len(words), 60):
            words[j] = words[j] + "x"
        return " ".join(words)
    chars = list(text)
    for j in range(30, len(chars), 60):
        chars[j] = "龘"
    return "".join(chars)


def worker(mode: str, path: str, out: str) -> None:
    from tuneforge.data.curate import rows as rows_mod
    from tuneforge.data.curate.clean import CleanArgs, clean

    args = CleanArgs(out=out, data=[path])
    start = time.perf_counter()
    if mode == "read":
        n = sum(1 for _ in rows_mod.iter_rows(rows_mod.sources_of(args)))
        result = {"rows": n}
    else:
        report = clean(args)
        result = {"rows": report["rows_in"], "kept": report["rows_kept"], "rejected": report["rejected"]}
    result["seconds"] = time.perf_counter() - start
    # VmHWM (peak RSS of this process image): ru_maxrss from wait4 would include the parent's RSS at fork time,
    # and the parent holds the generated rows
    status = Path("/proc/self/status").read_text()
    result["peak_rss_mib"] = int(status.split("VmHWM:")[1].split()[0]) / 1024
    print(json.dumps(result))


def measure(mode: str, path: Path, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, __file__, "--worker", mode, str(path), str(out)], env=env,
                            stdout=subprocess.PIPE, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{mode} worker failed ({status})")
    result = json.loads(output.strip().splitlines()[-1])
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime  # the machine is shared: CPU time is the steady number
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows, exact, near = make_rows(args.rows)
        path = Path(tmp) / "rows.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        size = path.stat().st_size / 2**20
        read = measure("read", path, Path(tmp) / "out-read")
        cleaned = measure("clean", path, Path(tmp) / "out")
    print(f"{len(rows)} rows ({size:.0f} MiB JSON lines), {exact} exact + {near} near duplicates injected; "
          f"cpus: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    print(f"clean found: exact {cleaned['rejected']['exact_duplicate']}, near {cleaned['rejected']['near_duplicate']}, "
          f"other rules {sum(cleaned['rejected'].values()) - cleaned['rejected']['exact_duplicate'] - cleaned['rejected']['near_duplicate']}")
    print("| run | rows/s (wall) | wall s | CPU s (process) | rows per CPU s | peak RSS |")
    print("|---|---|---|---|---|---|")
    for name, r in (("read (data path only)", read), ("clean (all rules, exact + near dedup)", cleaned)):
        print(f"| {name} | {r['rows'] / r['seconds']:.0f} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
              f"{r['rows'] / r['cpu_seconds']:.0f} | {r['peak_rss_mib']:.0f} MiB |")
    print(f"clean / read time: {cleaned['seconds'] / read['seconds']:.2f}x; clean - read peak RSS: "
          f"{cleaned['peak_rss_mib'] - read['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
