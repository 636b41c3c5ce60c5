"""Many concurrent streaming clients (asyncio openai client) against one server: every answer complete and equal
to the single-request answer with the same seed and model, memory bounded, and the server still answers after.

200 clients of a tiny model with few tokens take about 10 s on 2 cores, so the full test is in the default suite.
"""

from __future__ import annotations

import asyncio
import itertools

import httpx
import openai
import pytest

from tests.inference.test_serve import HI, KEY, idle, make_lora
from tuneforge.inference.serve.app import create_app
from tuneforge.inference.serve.main import ServeArgs, ServerThread, build_state

MODELS = ("tiny-llama", "math", "poet")
SEEDS = range(4)
TOKENS = 6


@pytest.fixture(scope="module")
def loaded_server(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("load-loras")
    adapters = [f"math={make_lora(tiny_llama_dir, root / 'math', 1)}", f"poet={make_lora(tiny_llama_dir, root / 'p', 2)}"]
    state = build_state(ServeArgs(model=str(tiny_llama_dir), adapter=adapters, api_key=KEY, max_batch_size=16))
    with ServerThread(create_app(state)) as url:
        yield url, state


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def single_answers(url) -> dict:
    """The reference: each (model, seed) asked alone, one request after another."""
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    return {(m, s): client.chat.completions.create(model=m, messages=HI, max_tokens=TOKENS, temperature=1.0,
                                                   seed=s).choices[0].message.content
            for m, s in itertools.product(MODELS, SEEDS)}


async def stream_all(url, jobs: list[tuple[str, int]], timeout: float) -> list[tuple[str, str | None]]:
    limits = httpx.Limits(max_connections=len(jobs) + 8, max_keepalive_connections=len(jobs) + 8)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, http_client=http)

        async def one(model: str, seed: int):
            stream = await client.chat.completions.create(model=model, messages=HI, max_tokens=TOKENS,
                                                          temperature=1.0, seed=seed, stream=True)
            text, finish = "", None
            async for chunk in stream:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            return text, finish

        return await asyncio.wait_for(asyncio.gather(*(one(m, s) for m, s in jobs)), timeout)


def run_load(loaded_server, clients: int, timeout: float) -> None:
    url, state = loaded_server
    reference = single_answers(url)
    before = rss_mb()
    jobs = [(MODELS[i % len(MODELS)], SEEDS[i % len(SEEDS)]) for i in range(clients)]
    results = asyncio.run(stream_all(url, jobs, timeout))
    grown = rss_mb() - before
    assert len(results) == clients
    for (model, seed), (text, finish) in zip(jobs, results):
        assert finish in ("stop", "length")  # answered to the end
        assert text == reference[(model, seed)], (model, seed)
    assert idle(state.engine), "requests left behind in the engine"
    assert grown < 400, f"memory grew by {grown:.0f} MB for {clients} clients"
    after = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    assert after.chat.completions.create(model="math", messages=HI, max_tokens=TOKENS, temperature=1.0,
                                         seed=0).choices[0].message.content == reference[("math", 0)]


def test_200_concurrent_streaming_clients(loaded_server):
    run_load(loaded_server, 200, timeout=300)
