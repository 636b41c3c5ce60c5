"""`tuneforge serve` through the official openai client, against a real server on a loopback port.

The server (uvicorn in a thread, the tiny Llama model, two LoRA adapters with random non-zero weights so each
answers differently) is started once for the module. Answers are compared with what plain transformers/PEFT
`generate` gives for the same adapter, and streamed answers with non-streamed ones.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from tuneforge.errors import UserError
from tuneforge.inference import SamplingParams
from tuneforge.inference.serve.app import create_app
from tuneforge.inference.serve.main import ServeArgs, ServerThread, build_state

KEY = "sk-test-key"
HI = [{"role": "user", "content": "Hi"}]


def make_lora(base_dir, out_dir, seed: int, targets=("q_proj", "v_proj", "o_proj", "down_proj")):
    """A PEFT LoRA adapter folder with random non-zero A and B (an untrained LoRA would change nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=list(targets)))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {"math": make_lora(tiny_llama_dir, root / "math", 1), "poet": make_lora(tiny_llama_dir, root / "poet", 2)}


@pytest.fixture(scope="module")
def server(tiny_llama_dir, adapters):
    args = ServeArgs(model=str(tiny_llama_dir), adapter=[f"{n}={d}" for n, d in adapters.items()], api_key=KEY,
                     max_tokens_limit=2000, max_body_bytes=20_000, max_batch_size=8, max_n=4)
    state = build_state(args)
    with ServerThread(create_app(state)) as url:
        yield url, state


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def idle(engine, timeout: float = 10.0) -> bool:
    """The engine holds no request (running or waiting) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.in_flight == 0:
            return True
        time.sleep(0.02)
    return False


def hf_greedy_text(base_dir, adapter_dir, ids: list[int], stop_ids, max_new_tokens: int) -> str:
    """What plain transformers (+ PEFT with this one adapter) generates greedily for these prompt ids."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.eval().generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                    do_sample=False, eos_token_id=list(stop_ids), pad_token_id=min(stop_ids))
    new = out[0, len(ids):].tolist()
    new = new[:next((i for i, t in enumerate(new) if t in stop_ids), len(new))]
    return AutoTokenizer.from_pretrained(base_dir).decode(new, skip_special_tokens=True)


def test_models_lists_base_and_each_adapter(client, server):
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny-llama", "math", "poet"]
    assert client.models.retrieve("math").id == "math"
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"  # no key needed for health checks


def test_each_model_answers_with_its_own_weights(client, server, tiny_llama_dir, adapters):
    engine = server[1].engine
    ids = engine.encode_chat(HI)
    answers = {}
    for model_id, adapter_dir in [("tiny-llama", None), *adapters.items()]:
        r = client.chat.completions.create(model=model_id, messages=HI, max_tokens=10, temperature=0)
        answers[model_id] = r.choices[0].message.content
        assert answers[model_id] == hf_greedy_text(tiny_llama_dir, adapter_dir, ids, engine.stop_ids, 10)
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens >= 1
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert len(set(answers.values())) == 3, answers  # the adapters really change the answer


def test_streaming_equals_non_streaming_with_usage(client):
    kwargs = dict(model="math", messages=HI, max_tokens=12, temperature=0.9, top_p=0.95, seed=7)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_wire_format_ends_with_done(server):
    body = {"model": "poet", "messages": HI, "max_tokens": 4, "stream": True}
    r = httpx.post(server[0] + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_n_choices_streamed_equal_non_streamed(client):
    kwargs = dict(model="poet", messages=HI, max_tokens=8, temperature=1.0, seed=11, n=3)
    whole = client.chat.completions.create(**kwargs)
    texts = {i: "" for i in range(3)}
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert [texts[i] for i in range(3)] == [c.message.content for c in whole.choices]
    assert len({c.message.content for c in whole.choices}) > 1  # seed + i per choice: they differ


def test_stop_and_logprobs(client, server):
    base = client.chat.completions.create(model="math", messages=HI, max_tokens=12, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = base.choices[0].logprobs.content
    assert len(content) == base.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5) for t in content)  # greedy = best
    text = base.choices[0].message.content
    assert b"".join(bytes(t.bytes) for t in content).decode("utf-8", "replace") == text  # bytes rebuild the text
    stop = text[len(text) // 2:][:2]
    cut = client.chat.completions.create(model="math", messages=HI, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    eos = sorted(server[1].engine.stop_ids)
    forced = client.chat.completions.create(model="math", messages=HI, max_tokens=12, temperature=0,
                                            extra_body={"ignore_eos": True, "stop_token_ids": eos})
    assert forced.usage.completion_tokens == 12 and forced.choices[0].finish_reason == "length"


def test_text_completions(client, server):
    engine = server[1].engine
    r = client.completions.create(model="tiny-llama", prompt=["Hello", "Two plus"], max_tokens=6, temperature=0,
                                  logprobs=2)
    assert [c.index for c in r.choices] == [0, 1]
    direct = [engine.stream(p, SamplingParams(max_new_tokens=6)) for p in ("Hello", "Two plus")]
    assert [c.text for c in r.choices] == ["".join(d.text for d in s) for s in direct]
    assert len(r.choices[0].logprobs.tokens) == len(r.choices[0].logprobs.token_logprobs)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-llama", prompt="Hello", max_tokens=6, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_auth_required(server):
    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.chat.completions.create(model="math", messages=HI, max_tokens=2)
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    r = httpx.get(server[0] + "/v1/models")  # no header at all
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_penalties_and_logit_bias_reach_the_engine(client, server):
    """presence/frequency_penalty were refused with a 400 and logit_bias silently ignored (unknown fields are)."""
    tokenizer = server[1].engine.tokenizer
    forced = client.chat.completions.create(model="math", messages=HI, max_tokens=3, temperature=0,
                                            logit_bias={"7": 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].message.content == tokenizer.decode([7, 7, 7])
    plain = client.chat.completions.create(model="math", messages=HI, max_tokens=8, temperature=0)
    pulled = client.chat.completions.create(model="math", messages=HI, max_tokens=8, temperature=0,
                                            presence_penalty=-2, frequency_penalty=-2)
    assert pulled.choices[0].message.content != plain.choices[0].message.content
    text = client.completions.create(model="math", prompt="Hi", max_tokens=2, temperature=0, logit_bias={"9": 100},
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert text == tokenizer.decode([9, 9])


@pytest.mark.parametrize("kwargs, status, param", [
    (dict(model="nope"), 404, "model"),
    (dict(max_tokens=2001), 400, "max_tokens"),
    (dict(max_completion_tokens=5000), 400, "max_completion_tokens"),
    (dict(temperature=3.5), 400, "temperature"),
    (dict(top_p=0), 400, "top_p"),
    (dict(n=5), 400, "n"),
    (dict(presence_penalty=2.5), 400, "presence_penalty"),
    (dict(logit_bias={"x": 1}), 400, "logit_bias"),
    (dict(messages=[]), 400, "messages"),
    (dict(tool_choice="required"), 400, "tool_choice"),
])
def test_bad_requests_get_openai_errors(client, kwargs, status, param):
    request = {"model": "math", "messages": HI, "max_tokens": 2, **kwargs}
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(**request)
    assert err.value.status_code == status
    assert err.value.body["param"] == param and err.value.body["message"]


def test_body_limit_malformed_json_and_server_survives(client, server):
    url, headers = server[0] + "/v1/chat/completions", {"Authorization": f"Bearer {KEY}",
                                                         "Content-Type": "application/json"}
    r = httpx.post(url, content=b"{" + b" " * 30_000 + b"}", headers=headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    chunked = httpx.post(url, content=iter([b"{", b" " * 30_000, b"}"]), headers=headers)  # no Content-Length
    assert chunked.status_code == 413
    malformed = httpx.post(url, content=b'{"model": "math", "messages": [', headers=headers)
    assert malformed.status_code == 400
    assert malformed.json()["error"] == {"message": "The request body is not valid JSON (at character 31): Expecting "
                                                    "value.", "type": "invalid_request_error", "param": None,
                                         "code": None}
    too_long = [{"role": "user", "content": "x " * 5000}]  # body under the limit, prompt over the context
    refused = httpx.post(url, json={"model": "math", "messages": too_long}, headers=headers)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    assert refused.json()["error"]["message"].startswith(  # OpenAI's words, not the engine's "shorten the prompt"
        "This model's maximum context length is 2048 tokens. However, your messages resulted in ")
    text = httpx.post(server[0] + "/v1/completions", json={"model": "math", "prompt": "x " * 5000}, headers=headers)
    assert text.status_code == 400 and text.json()["error"]["param"] == "prompt"
    assert "However, your prompt resulted in " in text.json()["error"]["message"]
    assert client.chat.completions.create(model="math", messages=HI, max_tokens=2).choices[0].message is not None


def test_a_max_tokens_the_context_cannot_hold_is_refused_as_openai_does(client):
    """It was silently cut to the room left (finish_reason `length`); without max_tokens that room is still used."""
    long = [{"role": "user", "content": "x " * 700}]  # well inside the 2048 positions, not with 1999 more
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="math", messages=long, max_tokens=1999)
    message = err.value.body["message"]
    assert message.startswith("This model's maximum context length is 2048 tokens. However, you requested ")
    assert err.value.body["param"] == "max_tokens" and "in the completion" in message
    assert client.chat.completions.create(model="math", messages=long, max_tokens=2).usage.completion_tokens <= 2


def test_disconnect_mid_stream_frees_the_slot(server):
    url, engine = server[0], server[1].engine
    body = {"model": "math", "messages": HI, "max_tokens": 2000, "stream": True, "temperature": 0,
            "ignore_eos": True}  # runs for 2000 tokens (many seconds) unless cancelled
    with httpx.stream("POST", url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = (line for line in r.iter_lines() if line)
        assert all(next(lines).startswith("data: ") for _ in range(3))  # role chunk, then tokens flowing
        assert engine.in_flight == 1  # it is being generated
    assert idle(engine, timeout=5.0), "the disconnected request still holds a slot"


def test_adapter_matching_no_module_is_an_error_at_load(tiny_llama_dir, adapters, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "renamed"
    shutil.copytree(adapters["math"], bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    save_file({k.replace("self_attn", "attention"): v for k, v in tensors.items()}, bad / "adapter_model.safetensors")
    args = ServeArgs(model=str(tiny_llama_dir), adapter=[f"bad={bad}"])
    with pytest.raises(UserError, match="match no module of the base model"):
        build_state(args)
    with pytest.raises(UserError, match="no adapter_config.json"):
        build_state(ServeArgs(model=str(tiny_llama_dir), adapter=[f"x={tmp_path}"]))
    with pytest.raises(UserError, match="Adapter `x`: .*renamed.adapter_config.json is a file, not an adapter folder"):
        build_state(ServeArgs(model=str(tiny_llama_dir), adapter=[f"x={bad / 'adapter_config.json'}"]))


def test_adapter_of_another_base_gets_chats_error_before_loading(tiny_llama_dir, tiny_qwen2_dir, tmp_path,
                                                                  monkeypatch):
    from tuneforge.models import loading

    other = make_lora(tiny_qwen2_dir, tmp_path / "qwen_lora", 3)
    monkeypatch.setattr(loading, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("loaded the base"))
    with pytest.raises(UserError, match=rf"^The adapter {other} does not fit the base model `{tiny_llama_dir}` "
                                        r"\(model_type qwen2 vs llama") as err:
        build_state(ServeArgs(model=str(tiny_llama_dir), adapter=[f"q={other}"]))
    assert "size mismatch" not in str(err.value) and "Pass the model it was trained on as --model" in str(err.value)


def test_peft_failure_on_another_base_is_one_line(tiny_llama_dir, tmp_path):
    """The recorded base is not on disk, so only the load can tell: PEFT's list becomes chat's one-line error."""
    from tuneforge.models.presets import init_model

    wide = init_model("tiny-llama", tmp_path / "wide", hidden_size=128)  # every LoRA tensor of another shape
    other = make_lora(wide, tmp_path / "wide_lora", 3)
    config = json.loads((other / "adapter_config.json").read_text(encoding="utf-8"))
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "someone/gone"}))
    with pytest.raises(UserError, match=r"does not fit the base model .*trained on `someone/gone`") as err:
        build_state(ServeArgs(model=str(tiny_llama_dir), adapter=[f"q={other}"]))
    assert len(str(err.value).splitlines()) == 1


def test_echo_and_token_prompts(client, server):
    engine = server[1].engine
    ids = engine.encode("Hello")
    by_text = client.completions.create(model="poet", prompt="Hello", max_tokens=4, temperature=0, echo=True)
    by_ids = client.completions.create(model="poet", prompt=ids, max_tokens=4, temperature=0)
    assert by_text.choices[0].text.startswith("Hello")
    assert by_text.choices[0].text.endswith(by_ids.choices[0].text) and by_ids.usage.prompt_tokens == len(ids)


def test_serve_verb_binds_loopback_and_warns_when_open_without_key(tiny_llama_dir, monkeypatch, capsys):
    import uvicorn

    from tuneforge.cli import main as cli_main
    from tuneforge.training.runtime import free_port

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app.state.tf, kw)))
    assert cli_main(["serve", "--model", str(tiny_llama_dir), "--port", "8123"]) == 0
    state, kw = calls[-1]
    assert kw["host"] == "127.0.0.1" and kw["port"] == 8123 and state.api_key is None
    assert "warning" not in capsys.readouterr().err
    monkeypatch.setenv("TUNEFORGE_API_KEY", "from-env")
    assert cli_main(["serve", "--model", str(tiny_llama_dir), "--host", "0.0.0.0", "--port", str(free_port())]) == 0
    assert calls[-1][0].api_key == "from-env" and "warning" not in capsys.readouterr().err
    monkeypatch.delenv("TUNEFORGE_API_KEY")
    assert cli_main(["serve", "--model", str(tiny_llama_dir), "--host", "0.0.0.0", "--port", str(free_port())]) == 0
    assert "without an API key" in capsys.readouterr().err


def test_a_taken_or_impossible_port_is_refused_before_the_model_loads(tiny_llama_dir, monkeypatch, capsys):
    # a taken port loaded the model, then ended in uvicorn's "[Errno 98]" (exit 3); --port 99999 in OverflowError
    import socket

    from tuneforge.cli import main as cli_main
    from tuneforge.inference.serve import main as serve_main

    monkeypatch.setattr(serve_main, "build_state", lambda args: pytest.fail("the model loaded"))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert cli_main(["serve", "--model", str(tiny_llama_dir), "--port", str(port)]) == 2
    assert f"Port {port} on 127.0.0.1 is in use" in capsys.readouterr().err
    assert cli_main(["serve", "--model", str(tiny_llama_dir), "--port", "99999"]) == 2
    assert "--port 99999 is not a TCP port" in capsys.readouterr().err
    assert cli_main(["serve", "--model", str(tiny_llama_dir), "--port", "0"]) == 2
    assert "--port 0 is not a TCP port" in capsys.readouterr().err

    def no_such_host(host, *args, **kwargs):  # as a resolver answers, without waiting on one
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(serve_main.socket, "getaddrinfo", no_such_host)
    assert cli_main(["serve", "--model", str(tiny_llama_dir), "--host", "no-such-host.invalid"]) == 2
    assert "--host no-such-host.invalid is not an address" in capsys.readouterr().err


def test_adapter_values_are_checked_after_loading(tiny_llama_dir, adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneforge.inference.serve.models import check_adapter_matches

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(adapters["math"]),
                                      adapter_name="math")
    weights = adapters["math"] / "adapter_model.safetensors"
    check_adapter_matches(model, "math", weights)  # loaded as saved: fine
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B.math" in n).zero_()  # as if mis-loaded
    with pytest.raises(UserError, match="do not hold the file's values"):
        check_adapter_matches(model, "math", weights)


def test_the_adapter_check_does_not_look_a_builtin_base_up_on_the_hub(tiny_llama_dir, adapters, monkeypatch):
    """An adapter trained on builtin:smollm2-135m-instruct: PEFT's save_embedding_layers="auto" asked the Hub about
    that name at serve start-up (a network wait offline, then a raw "Could not find a config file" warning)."""
    import warnings

    import peft.utils.save_and_load as peft_save
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneforge.inference.serve.models import check_adapter_matches

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(adapters["math"]),
                                      adapter_name="math")
    model.peft_config["math"].base_model_name_or_path = "builtin:smollm2-135m-instruct"
    asked = []
    monkeypatch.setattr(peft_save, "check_file_exists_on_hf_hub", lambda *a, **k: asked.append(a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_adapter_matches(model, "math", adapters["math"] / "adapter_model.safetensors")
    assert asked == []


def test_serve_verb_end_to_end_in_its_own_process(tiny_llama_dir, adapters):
    """The real `tuneforge serve` process: starts, answers the openai client, and stops cleanly on SIGTERM."""
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "serve", "--model", str(tiny_llama_dir), "--port",
                             str(port), "--adapter", f"math={adapters['math']}", "--log-level", "warning"],
                            env={**os.environ, "TUNEFORGE_API_KEY": KEY, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=30)
        deadline = time.monotonic() + 120
        while True:
            try:
                assert [m.id for m in client.models.list()] == ["tiny-llama", "math"]
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.3)
        r = client.chat.completions.create(model="math", messages=HI, max_tokens=3, temperature=0)
        assert r.usage.completion_tokens >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode in (0, -signal.SIGTERM), out  # uvicorn re-raises the signal after a graceful shutdown
    assert f"Serving tiny-llama, math at http://127.0.0.1:{port}/v1" in out


# ---- adapters that cannot share a server, and names PEFT reserves ------------------------------------------------

def make_method_adapter(method: str, base_dir, out_dir, seed: int = 5, **options):
    """An adapter folder of a registry method with every trainable tensor moved off its identity start."""
    from transformers import AutoModelForCausalLM

    from tuneforge.methods import METHODS

    m = METHODS[method]
    model = m.apply(AutoModelForCausalLM.from_pretrained(base_dir), m.Options(**options), None)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    m.save(model, out_dir)
    return out_dir


def chat_reply(base_dir, adapter_dir, tokens: int) -> str:
    """What `tuneforge chat --adapter DIR` answers greedily (no repetition penalty, as a server request)."""
    from tuneforge.inference.chat import ChatArgs, load_for_chat, reply

    args = ChatArgs(model=str(base_dir), adapter=str(adapter_dir) if adapter_dir else None, max_new_tokens=tokens,
                    repetition_penalty=1.0)
    return reply(*load_for_chat(args), HI, args)


def served_reply(args: ServeArgs, model_id: str, tokens: int) -> tuple[list[str], str, httpx.Response]:
    """(the ids the server lists, its greedy answer as `model_id`, its answer to the base model's id)."""
    state = build_state(args)
    with ServerThread(create_app(state)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        ids = [m.id for m in client.models.list()]
        text = client.chat.completions.create(model=model_id, messages=HI, max_tokens=tokens,
                                              temperature=0).choices[0].message.content
        as_base = httpx.post(url + "/v1/chat/completions", json={"model": "tiny-llama", "messages": HI,
                                                                 "max_tokens": tokens, "temperature": 0})
    return ids, text.strip(), as_base


def test_a_tuneforge_adapter_is_served_alone_built_into_the_model(tiny_llama_dir, adapters, tmp_path, monkeypatch):
    """`method: adapter` cannot be switched per request; it was refused, with advice that led back to itself."""
    bottleneck = make_method_adapter("adapter", tiny_llama_dir, tmp_path / "bottleneck", bottleneck_size=8)
    ids, text, as_base = served_reply(ServeArgs(model=str(tiny_llama_dir), adapter=[f"b={bottleneck}"]), "b", 8)
    assert ids == ["b"]  # the plain base is not served: every request gets the adapter
    assert text == chat_reply(tiny_llama_dir, bottleneck, 8) != chat_reply(tiny_llama_dir, None, 8)
    assert as_base.status_code == 404 and "serves: b." in as_base.json()["error"]["message"]
    from tuneforge.models import loading

    monkeypatch.setattr(loading, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("loaded the base"))
    with pytest.raises(UserError, match=r"^Adapter `b` .* TuneForge `adapter` adapter: .*only alone\. Serve it by "
                                        rf"itself \(`tuneforge serve --model {tiny_llama_dir} --adapter b=.*"
                                        r"--adapter math="):
        build_state(ServeArgs(model=str(tiny_llama_dir), adapter=[f"b={bottleneck}", f"math={adapters['math']}"]))


def test_adapters_of_different_peft_types_get_one_server_per_type(tiny_llama_dir, adapters, tmp_path, monkeypatch):
    """PEFT's "Cannot combine adapters with different peft types" came out as "does not fit the base model"."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.models import loading

    ia3 = make_method_adapter("ia3", tiny_llama_dir, tmp_path / "ia3")
    for kind, config in (("prompt", PromptTuningConfig), ("prefix", PrefixTuningConfig)):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        get_peft_model(model, config(task_type="CAUSAL_LM", num_virtual_tokens=3)).save_pretrained(tmp_path / kind)
    monkeypatch.setattr(loading, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("loaded the base"))
    cases = {(f"math={adapters['math']}", f"poet={adapters['poet']}", f"i={ia3}"): r"\(lora: math, poet; ia3: i\)",
             (f"p={tmp_path / 'prompt'}", f"x={tmp_path / 'prefix'}"): r"\(prompt_tuning: p; prefix_tuning: x\)"}
    for specs, types in cases.items():
        with pytest.raises(UserError, match=rf"^One server takes adapters of one PEFT type .*2 types {types}\. Start "
                                            rf"one server per type.*`tuneforge serve --model {tiny_llama_dir} "
                                            rf"--adapter {specs[0]} .*--port 8000` and ") as err:
            build_state(ServeArgs(model=str(tiny_llama_dir), adapter=list(specs)))
        assert "does not fit" not in str(err.value)


@pytest.mark.parametrize("method", ["ia3", "lora"])
def test_an_adapter_named_like_a_peft_prefix_loads_right(method, tiny_llama_dir, tmp_path):
    """PEFT warned "Adapter name 'ia3' should not be contained in the prefix 'ia3_'" (its weights may be
    re-initialised); the client's name is kept out of PEFT, so the answer is chat's."""
    import warnings

    options = {"rank": 4} if method == "lora" else {}
    first = make_method_adapter(method, tiny_llama_dir, tmp_path / "first", seed=6, **options)
    folder = make_method_adapter(method, tiny_llama_dir, tmp_path / method, **options)
    args = ServeArgs(model=str(tiny_llama_dir), adapter=[f"first={first}", f"{method}={folder}"])  # PEFT's add path
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids, text, _ = served_reply(args, method, 8)
    assert not [w for w in caught if "prefix" in str(w.message)], [str(w.message) for w in caught]
    assert ids == ["tiny-llama", "first", method]
    assert text == chat_reply(tiny_llama_dir, folder, 8) != chat_reply(tiny_llama_dir, None, 8)


# ---- the chat template an adapter run trained with ---------------------------------------------------------------

def record_template(folder, template: str):
    """What a TuneForge run writes next to its adapter: the config with its `model.chat_template` override."""
    (folder / "tuneforge_config.yaml").write_text(f"model:\n  chat_template: {template}\n", encoding="utf-8")
    return folder


def test_each_adapter_is_served_with_the_template_it_was_trained_with(tiny_llama_dir, adapters, tmp_path):
    """serve rendered every request with the base tokenizer's template, while `chat --adapter` (and export) use
    the run's recorded `model.chat_template`: the adapter was served prompts in a format it never saw."""
    import shutil

    from tuneforge.data.encode import encode_prompt
    from tuneforge.data.templates import BUILTIN_TEMPLATES
    from tuneforge.inference.serve.tools import tool_family

    chatml = record_template(Path(shutil.copytree(adapters["math"], tmp_path / "chatml_run")), "chatml")
    args = ServeArgs(model=str(tiny_llama_dir), adapter=[f"c={chatml}", f"poet={adapters['poet']}"])
    state = build_state(args)
    with ServerThread(create_app(state)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        answers = {m: client.chat.completions.create(model=m, messages=HI, max_tokens=6, temperature=0)
                   for m in ("c", "poet", "tiny-llama")}
    engine = state.engine
    assert answers["c"].usage.prompt_tokens == len(encode_prompt(engine.tokenizer, HI, None, "chatml")[0])
    assert answers["c"].usage.prompt_tokens != len(engine.encode_chat(HI))
    assert answers["c"].choices[0].message.content.strip() == chat_reply(tiny_llama_dir, chatml, 6)
    for plain in ("poet", "tiny-llama"):  # no recorded template: the model's own, as before
        assert answers[plain].usage.prompt_tokens == len(engine.encode_chat(HI))
    assert state.tool_family_for("c") == tool_family(BUILTIN_TEMPLATES["chatml"])
    assert state.tool_family_for("poet") == tool_family(engine.tokenizer.chat_template)
    # --chat-template sets one template for every served id, the adapter's included (as for chat --adapter)
    assert build_state(ServeArgs(model=str(tiny_llama_dir), adapter=[f"c={chatml}"], chat_template="llama3")
                       ).served.templates == {}


def test_serve_says_which_adapter_uses_its_own_template(tiny_llama_dir, adapters, tmp_path, monkeypatch, capsys):
    import shutil

    import uvicorn

    from tuneforge.cli import main as cli_main

    chatml = record_template(Path(shutil.copytree(adapters["math"], tmp_path / "chatml_run")), "chatml")
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    assert cli_main(["serve", "--model", str(tiny_llama_dir), "--adapter", f"c={chatml}",
                     f"poet={adapters['poet']}"]) == 0
    out = capsys.readouterr().out
    assert "adapter `c` was trained with the chat template `chatml`" in out and "`tiny-llama`" in out
    assert "adapter `poet`" not in out


def test_another_tools_adapter_uses_the_template_saved_beside_it(tiny_llama_dir, adapters, tmp_path, monkeypatch,
                                                                 capsys):
    """LLaMA-Factory and TRL save the tokenizer, with the chat template they trained with, in the adapter folder,
    and write no tuneforge_config.yaml: chat, serve and export used the base model's template instead."""
    import shutil

    import uvicorn

    from tuneforge.cli import main as cli_main
    from tuneforge.data.templates import BUILTIN_TEMPLATES
    from tuneforge.inference.chat import ChatArgs, load_for_chat

    foreign = Path(shutil.copytree(adapters["math"], tmp_path / "llamafactory_run"))
    (foreign / "chat_template.jinja").write_text(BUILTIN_TEMPLATES["chatml"], encoding="utf-8")
    assert not (foreign / "tuneforge_config.yaml").exists()
    _, tokenizer = load_for_chat(ChatArgs(adapter=str(foreign), model=str(tiny_llama_dir)))
    assert tokenizer.chat_template == BUILTIN_TEMPLATES["chatml"]
    _, tokenizer = load_for_chat(ChatArgs(adapter=str(adapters["poet"]), model=str(tiny_llama_dir)))
    assert tokenizer.chat_template != BUILTIN_TEMPLATES["chatml"]  # nothing saved beside it: the model's own
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    assert cli_main(["serve", "--model", str(tiny_llama_dir), "--adapter", f"lf={foreign}",
                     f"poet={adapters['poet']}"]) == 0
    out = capsys.readouterr().out
    assert f"adapter `lf` was trained with the chat template saved beside it in {foreign}" in out
    assert "adapter `poet`" not in out


def test_a_built_in_adapter_is_served_with_its_trained_template(tiny_llama_dir, tmp_path):
    from tuneforge.data.templates import BUILTIN_TEMPLATES

    bottleneck = make_method_adapter("adapter", tiny_llama_dir, tmp_path / "bottleneck", bottleneck_size=8)
    record_template(bottleneck, "chatml")
    args = ServeArgs(model=str(tiny_llama_dir), adapter=[f"b={bottleneck}"])
    assert build_state(args).engine.tokenizer.chat_template == BUILTIN_TEMPLATES["chatml"]  # the base is not served
    assert served_reply(args, "b", 8)[1] == chat_reply(tiny_llama_dir, bottleneck, 8)
