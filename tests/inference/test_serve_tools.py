"""Tool calls (parsing per chat-template family, streamed through the openai client), the vLLM backend's command
line, and the serve verb's safety defaults. No model is loaded: a scripted engine replays fixed replies."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest

from tuneforge.cli import main as cli_main
from tuneforge.errors import UserError
from tuneforge.inference import Delta
from tuneforge.inference.serve.app import ServerState, create_app
from tuneforge.inference.serve.main import ServeArgs, ServerThread, is_loopback
from tuneforge.inference.serve.models import ServedModels
from tuneforge.inference.serve.tools import ToolCallParser, parse_tool_calls, tool_family

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                              "parameters": {"type": "object",
                                                             "properties": {"city": {"type": "string"}}}}}
REPLIES = {
    "hermes": 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
              '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
              '{"name": "get_weather", "parameters": {"city": "Oslo"}}',
    "mistral": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
               '{"name": "get_weather", "arguments": {"city": "Oslo"}}]',
}


@pytest.mark.parametrize("family", sorted(REPLIES))
def test_tool_calls_parsed_whole_and_streamed_alike(family):
    content, calls = parse_tool_calls(REPLIES[family], family)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                 ("get_weather", {"city": "Oslo"})]
    assert content == ("Let me look." if family == "hermes" else "")
    parser, events = ToolCallParser(family), []
    for ch in REPLIES[family]:  # one character at a time: markers arrive split
        events += parser.feed(ch)
    events += parser.finish()
    assert [e.name for e in events if not isinstance(e, str)] == ["get_weather"] * 2
    assert "".join(e for e in events if isinstance(e, str)).strip() == content


@pytest.mark.parametrize("family, text", [
    ("hermes", "Plain answer with <b>tags</b> and a < sign."),
    ("hermes", 'Broken <tool_call>{"name": oops</tool_call> end'),
    ("llama3", "{not json at all"),
    ("llama3", "The set {1, 2} is small."),
    ("mistral", "[1, 2] is a list."),
])
def test_text_that_is_not_a_call_stays_content(family, text):
    assert parse_tool_calls(text, family) == (text, [])
    parser, streamed = ToolCallParser(family), []
    for ch in text:
        streamed += parser.feed(ch)
    assert "".join(streamed + parser.finish()) == text


def test_tool_family_from_real_chat_templates(shared_assets):
    templates = shared_assets / "templates"
    assert tool_family((templates / "qwen2.5-instruct.jinja").read_text()) == "hermes"
    assert tool_family((templates / "llama-3.1-instruct.jinja").read_text()) == "llama3"
    assert tool_family((templates / "mistral-7b-instruct-v0.3.jinja").read_text()) == "mistral"


class _Tokenizer:
    """Characters as tokens: enough for prefill encoding and logprob token text."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, **kwargs):
        return "".join(chr(i) for i in ids)


class ScriptedEngine:
    """Replays a fixed reply (continuing after any prefilled prompt text) in 3-character deltas."""

    def __init__(self, reply: str):
        self.reply, self.tokenizer, self.running, self.prompts = reply, _Tokenizer(), True, []

    def encode_chat(self, messages, tools=None, chat_template=None):
        self.prompts.append((messages, tools))
        return [1, 2, 3]

    def room_after(self, ids, adapter=None):
        return 4096 - len(ids)

    def submit(self, ids, params, adapter=None):
        prefill = "".join(chr(i) for i in ids[3:])
        text = self.reply.removeprefix(prefill)
        pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
        deltas = [Delta(text=p, token_ids=[ord(c) for c in p]) for p in pieces]
        deltas[-1].finish_reason = "stop"

        async def aiter():
            for d in deltas:
                yield d

        return SimpleNamespace(aiter=aiter, cancel=lambda: None, generated=len(text))


def _scripted_client(reply: str, family: str):
    engine = ScriptedEngine(reply)
    served = ServedModels(model=None, tokenizer=engine.tokenizer, base_id="m")
    return engine, ServerThread(create_app(ServerState(engine=engine, served=served, tool_family=family)))


@pytest.mark.parametrize("family", ["hermes", "mistral"])
def test_tool_calls_through_the_openai_client(family):
    engine, server = _scripted_client(REPLIES[family], family)
    with server as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        ask = dict(model="m", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER])
        whole = client.chat.completions.create(**ask)
        calls = whole.choices[0].message.tool_calls
        assert whole.choices[0].finish_reason == "tool_calls"
        assert [json.loads(c.function.arguments)["city"] for c in calls] == ["Paris", "Oslo"]
        assert engine.prompts[0][1] == [WEATHER]  # the template was given the tools
        streamed: dict[int, dict] = {}
        finish = None
        for chunk in client.chat.completions.create(**ask, stream=True):
            for tc in chunk.choices[0].delta.tool_calls or []:
                streamed.setdefault(tc.index, {"name": "", "args": ""})
                streamed[tc.index]["name"] += tc.function.name or ""
                streamed[tc.index]["args"] += tc.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        assert [json.loads(v["args"])["city"] for _, v in sorted(streamed.items())] == ["Paris", "Oslo"]
        assert finish == "tool_calls"
        none = client.chat.completions.create(**ask, tool_choice="none")
        assert none.choices[0].message.tool_calls is None and engine.prompts[-1][1] is None


@pytest.mark.parametrize("family", ["hermes", "mistral"])
def test_parallel_tool_calls_false_returns_one_call(family):
    """`parallel_tool_calls: false` was accepted and ignored: a model writing two calls returned both, where OpenAI
    returns one at most. Whole and streamed alike."""
    _, server = _scripted_client(REPLIES[family], family)
    with server as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        ask = dict(model="m", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER],
                   parallel_tool_calls=False)
        calls = client.chat.completions.create(**ask).choices[0].message.tool_calls
        assert [json.loads(c.function.arguments)["city"] for c in calls] == ["Paris"]
        streamed = [tc.function.arguments for chunk in client.chat.completions.create(**ask, stream=True)
                    for tc in chunk.choices[0].delta.tool_calls or [] if tc.function.arguments]
        assert [json.loads(a)["city"] for a in streamed] == ["Paris"]


def test_named_tool_choice_starts_the_call_for_the_model():
    engine, server = _scripted_client(REPLIES["hermes"].split("\n", 1)[1], "hermes")
    with server as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Weather?"}],
                                           tools=[WEATHER], tool_choice={"type": "function",
                                                                         "function": {"name": "get_weather"}})
        assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
        with pytest.raises(openai.BadRequestError, match="not among"):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], tools=[WEATHER],
                                           tool_choice={"type": "function", "function": {"name": "other"}})


@pytest.mark.parametrize("tool_choice, reply", [  # what SmolLM2 wrote in QA, after the forced openings
    ("required", '<tool_call>\n{"name": "get_weather", "description": "Paris, France, USA, USA'),
    ({"type": "function", "function": {"name": "get_weather"}},
     '<tool_call>\n{"name": "get_weather", "arguments": 1}\n\nThe weather in Paris is mild.'),
])
def test_forced_tool_choice_without_a_call_is_an_error_not_text(tool_choice, reply):
    """A client that asked for a call reads tool_calls[0]; a reply that does not parse as one must not come back as
    a normal answer (streamed or not). With tool_choice auto the same reply is plain content."""
    _, server = _scripted_client(reply, "hermes")
    with server as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        ask = dict(model="m", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER])
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(**ask, tool_choice=tool_choice)
        assert err.value.code == "tool_use_failed" and err.value.body["param"] == "tool_choice"
        assert "does not parse as one" in err.value.message and '{"name": "get_weather"' in err.value.message
        streamed = []
        with pytest.raises(openai.APIError, match="does not parse as one"):
            for chunk in client.chat.completions.create(**ask, tool_choice=tool_choice, stream=True):
                streamed.append(chunk.choices[0].delta.content or "")
        assert "".join(streamed) == ""  # the held-back call text never went out as content
        auto = client.chat.completions.create(**ask).choices[0]
        assert auto.message.content == reply and auto.message.tool_calls is None


def test_vllm_command_line(tiny_llama_dir, tmp_path):
    from tests.inference.test_serve import make_lora
    from tuneforge.inference.serve.vllm import vllm_command

    lora = make_lora(tiny_llama_dir, tmp_path / "lora", 1)
    args = ServeArgs(model=str(tiny_llama_dir), adapter=[f"math={lora}"], port=9001, max_batch_size=32,
                     vllm_args=["--dtype=float16"])
    cmd = vllm_command(args, "tiny-llama", python="python")
    assert cmd[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    text = " ".join(cmd)
    assert f"--model {tiny_llama_dir}" in text and "--served-model-name tiny-llama" in text
    assert "--host 127.0.0.1 --port 9001 --max-num-seqs 32" in text
    assert f"--enable-lora --max-loras 1 --max-lora-rank 8 --lora-modules math={lora}" in text
    assert cmd[-1] == "--dtype=float16" and "--api-key" not in cmd  # the key goes by environment
    with pytest.raises(UserError, match="built-in model"):
        vllm_command(ServeArgs(model="builtin:smollm2-135m-instruct"), "x")
    from safetensors.torch import load_file, save_file

    weights = lora / "adapter_model.safetensors"  # renamed modules: vLLM would load nothing and say nothing
    save_file({k.replace("layers", "blocks"): v for k, v in load_file(weights).items()}, weights)
    with pytest.raises(UserError, match="match no weight of the base model"):
        vllm_command(args, "tiny-llama", python="python")


def test_vllm_gets_a_template_it_can_read_and_adapters_trained_with_another_are_named(tiny_llama_dir, tmp_path):
    """`--chat-template chatml` went to vLLM as the word "chatml" (it reads a file or Jinja text), and an adapter
    trained with its own template was served by vLLM with the base model's, unsaid."""
    import shutil

    from tests.inference.test_serve import make_lora, record_template
    from tuneforge.data.templates import BUILTIN_TEMPLATES
    from tuneforge.inference.serve.vllm import vllm_chat_template, vllm_command

    assert vllm_chat_template(ServeArgs(model=str(tiny_llama_dir), chat_template="chatml")) == \
        BUILTIN_TEMPLATES["chatml"]
    lora = make_lora(tiny_llama_dir, tmp_path / "lora", 1)
    assert vllm_chat_template(ServeArgs(model=str(tiny_llama_dir), adapter=[f"math={lora}"])) is None
    own = record_template(Path(shutil.copytree(lora, tmp_path / "own")), "chatml")
    with pytest.raises(UserError, match=r"Adapter\(s\) own were trained with another chat template .* "
                                        r"--chat-template"):
        vllm_chat_template(ServeArgs(model=str(tiny_llama_dir), adapter=[f"math={lora}", f"own={own}"]))
    assert vllm_chat_template(ServeArgs(model=str(tiny_llama_dir), adapter=[f"own={own}"],
                                        chat_template="chatml")) == BUILTIN_TEMPLATES["chatml"]
    cmd = vllm_command(ServeArgs(model=str(tiny_llama_dir)), "m", python="python", template_file=tmp_path / "t.jinja")
    assert cmd[cmd.index("--chat-template") + 1] == str(tmp_path / "t.jinja")


def test_vllm_backend_is_a_clear_error_without_vllm_or_gpu(capsys):
    import importlib.util

    import torch

    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        pytest.skip("vLLM and a GPU are present")
    assert cli_main(["serve", "--model", "x", "--backend", "vllm"]) == 2
    assert "--backend tuneforge" in capsys.readouterr().err


def test_loopback_default_and_warning_for_open_host():
    assert ServeArgs().host == "127.0.0.1" and is_loopback("127.0.0.1") and is_loopback("::1")
    assert is_loopback("localhost") and not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


@pytest.mark.gpu
def test_vllm_backend_serves_the_model(tiny_llama_dir, tmp_path):
    """Starts vLLM's server through `tuneforge serve --backend vllm` and asks it one question."""
    import socket
    import subprocess
    import sys
    import time

    pytest.importorskip("vllm")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "serve", "--model", str(tiny_llama_dir), "--backend",
                             "vllm", "--port", str(port), "--vllm-args=--enforce-eager"])
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.monotonic() + 300
        while True:
            try:
                assert [m.id for m in client.models.list()] == ["tiny-llama"]
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None, "vLLM did not start"
                time.sleep(2)
        r = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=4, temperature=0)
        assert r.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=60)


class _Forever:
    """A request that never produces a token: only a cancel ends it."""

    def __init__(self):
        self.cancel_calls = 0

    def cancel(self):
        self.cancel_calls += 1

    async def aiter(self):
        while True:
            await asyncio.sleep(3600)
            yield  # pragma: no cover


def test_client_leaving_a_non_streaming_request_cancels_it():
    engine = ScriptedEngine("unused")
    handles = []
    engine.submit = lambda ids, params, adapter=None: handles.append(_Forever()) or handles[-1]
    served = ServedModels(model=None, tokenizer=engine.tokenizer, base_id="m")
    with ServerThread(create_app(ServerState(engine=engine, served=served))) as url:
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json=body, timeout=0.5)
        deadline = time.monotonic() + 5
        while not (handles and all(h.cancel_calls for h in handles)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(handles) == 2 and all(h.cancel_calls for h in handles)


class _OneThenForever(_Forever):
    async def aiter(self):
        yield Delta(text="first", token_ids=[1])
        await asyncio.sleep(3600)


def test_client_leaving_mid_stream_cancels_at_once_even_between_tokens():
    engine = ScriptedEngine("unused")
    handles = []
    engine.submit = lambda ids, params, adapter=None: handles.append(_OneThenForever()) or handles[-1]
    served = ServedModels(model=None, tokenizer=engine.tokenizer, base_id="m")
    with ServerThread(create_app(ServerState(engine=engine, served=served))) as url:
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body) as r:
            lines = (line for line in r.iter_lines() if line)
            assert '"role": "assistant"' in next(lines) and '"first"' in next(lines)
            assert handles[0].cancel_calls == 0
        deadline = time.monotonic() + 5  # no next token will come: the disconnect itself must cancel
        while not handles[0].cancel_calls and time.monotonic() < deadline:
            time.sleep(0.05)
        assert handles[0].cancel_calls


def test_tools_reach_the_real_chat_template(tiny_qwen2_dir):
    """Through the real tiny Qwen2 model: its ChatML template shows the tools (the prompt grows by their
    rendering) and its tool-call format is picked for parsing."""
    from tuneforge.inference.serve.main import build_state

    state = build_state(ServeArgs(model=str(tiny_qwen2_dir), max_tokens_limit=8))
    assert state.tool_family == "hermes"
    with ServerThread(create_app(state)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        ask = dict(model="tiny-qwen2", messages=[{"role": "user", "content": "Weather?"}], max_tokens=2,
                   temperature=0)
        plain = client.chat.completions.create(**ask).usage.prompt_tokens
        with_tools = client.chat.completions.create(**ask, tools=[WEATHER]).usage.prompt_tokens
        expected = state.engine.encode_chat([{"role": "user", "content": "Weather?"}], [WEATHER])
        assert with_tools == len(expected) > plain + 20
        assert "get_weather" in state.engine.tokenizer.decode(expected)
