#!/usr/bin/env python3
"""Server throughput: 32 concurrent clients against the same 32 requests sent one after another.

    .venv/bin/python bench/bench_server.py                      # SmolLM2-135M-Instruct on CPU, 32 clients
    .venv/bin/python bench/bench_server.py --clients 16 --max-tokens 48 --model /tmp/tiny-llama

Starts `tuneforge serve` as its own process (so the clients' event loop does not share a GIL with the server),
waits for /health, sends one warm-up request, then runs the same requests twice with the official openai client:
1. sequential: one request at a time, each waiting for the previous answer (what a server without batching gives);
2. concurrent: all clients at once (asyncio), which the engine decodes as one continuously refilled batch.
Requests are the chat prompts of tuneforge/assets/example_task/heldout.jsonl (the first --clients), greedy
(temperature 0) so both runs produce the same tokens, with max_tokens --max-tokens. Throughput is generated
tokens (usage.completion_tokens, summed) per second of wall time for the whole set; the ratio is the result.
`--ignore-eos` makes every reply exactly --max-tokens long (the same work in both runs, whatever the model says).
The server runs with OMP_NUM_THREADS=1 by default (--threads): on a machine shared with other jobs, torch's
spinning worker threads made decoding 10-20x slower here and the timings pure noise (measured: 16 tokens took
40-52 s with 2 threads, 3-4 s with 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "tuneforge" / "assets" / "example_task" / "heldout.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, batch: int, threads: int | None) -> subprocess.Popen:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    else:
        env.pop("OMP_NUM_THREADS", None)
    cmd = [sys.executable, "-m", "tuneforge", "serve", "--model", model, "--port", str(port), "--max-batch-size",
           str(batch), "--log-level", "warning"]
    return subprocess.Popen(cmd, env=env, cwd=ROOT)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit("the server did not become ready")


def requests(n: int) -> list[list[dict]]:
    rows = [json.loads(line) for line in PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [[m for m in row["messages"] if m["role"] != "assistant"] for row in rows[:n]]


async def one(client, model: str, messages, max_tokens: int, ignore_eos: bool = False) -> tuple[int, float, str]:
    start = time.perf_counter()
    r = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                             extra_body={"ignore_eos": True} if ignore_eos else None)
    return r.usage.completion_tokens, time.perf_counter() - start, r.choices[0].message.content


async def run(url: str, model: str, prompts, max_tokens: int, concurrent: bool, ignore_eos: bool):
    import httpx
    import openai

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(prompts) + 4)) as http:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, http_client=http)
        await one(client, model, prompts[0], 4)  # warm-up: first-call costs out of both measurements
        start = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one(client, model, p, max_tokens, ignore_eos) for p in prompts))
        else:
            results = [await one(client, model, p, max_tokens, ignore_eos) for p in prompts]
        return results, time.perf_counter() - start


def report(name: str, results, wall: float) -> dict:
    tokens = sum(r[0] for r in results)
    latency = [r[1] for r in results]
    row = {"run": name, "requests": len(results), "tokens": tokens, "wall_s": round(wall, 2),
           "tok_per_s": round(tokens / wall, 1), "p50_latency_s": round(statistics.median(latency), 2),
           "max_latency_s": round(max(latency), 2)}
    print(f"{name:<11} {len(results):>3} requests {tokens:>5} tokens {wall:7.2f} s {tokens / wall:7.1f} tok/s  "
          f"latency p50 {row['p50_latency_s']:.2f} s, max {row['max_latency_s']:.2f} s", flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server (0: torch default)")
    parser.add_argument("--ignore-eos", action="store_true", help="every reply exactly --max-tokens long")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args.model, port, args.clients, args.threads)
    try:
        wait_ready(url, proc)
        import httpx

        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        prompts = requests(args.clients)
        print(f"{args.model} on {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
              f"{len(prompts)} requests, max_tokens {args.max_tokens}, greedy, ignore_eos {args.ignore_eos}, "
              f"server threads {args.threads or 'default'}", flush=True)
        seq_results, seq_wall = asyncio.run(run(url, model, prompts, args.max_tokens, False, args.ignore_eos))
        con_results, con_wall = asyncio.run(run(url, model, prompts, args.max_tokens, True, args.ignore_eos))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    rows = [report("sequential", seq_results, seq_wall), report("concurrent", con_results, con_wall)]
    same = sum(a[2] == b[2] for a, b in zip(seq_results, con_results))
    ratio = rows[1]["tok_per_s"] / rows[0]["tok_per_s"]
    print(f"throughput ratio concurrent/sequential: {ratio:.2f}x  (same answer in both runs: {same}/{len(prompts)})")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "ratio": round(ratio, 2), "same_answers": same}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
