"""Chat rendering and the loss mask, on every real template in ../shared/assets/templates (and the golden fixtures).

For each template the ids must equal `tokenizer.apply_chat_template(...)` and the labelled tokens, decoded, must
be exactly each assistant reply followed by the end-of-turn marker listed below for that template. The table is
written by hand from the templates, so the check does not rely on how encode.py finds the spans.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.data.chat_fixtures import TEMPLATES_DIR, make_tokenizer, needs_templates, template_names, tokenizer_for
from tuneforge.data import BUILTIN_TEMPLATES, IGNORE_INDEX, encode_chat, resolve_chat_template
from tuneforge.errors import ConfigError, DataError

SYSTEM = {"role": "system", "content": "You are a careful assistant."}
CONVERSATION = [{"role": "user", "content": "What is two plus two?"},
                {"role": "assistant", "content": "Two plus two is four."},
                {"role": "user", "content": "Say hello in Chinese, please."},
                {"role": "assistant", "content": "你好！That means hello."}]

EOS_DS = "<｜end▁of▁sentence｜>"
# template -> (text after a reply that is not the last, text after the last reply); whitespace at the very end of
# a labelled span is not compared (a newline after the end marker may or may not be part of the span).
EXPECTED_END = {
    "baichuan2-chat": ("", ""),  # no end marker in this template: the reply alone
    "chatglm3-6b": ("", ""),
    "chatml-openhermes": ("<|im_end|>", "<|im_end|>"),
    "deepseek-coder-instruct": ("\n<|EOT|>", "\n<|EOT|>"),
    "deepseek-llm-chat": (EOS_DS, EOS_DS),
    "deepseek-r1": (EOS_DS, EOS_DS),
    "deepseek-r1-distill-qwen": (EOS_DS, EOS_DS),
    "deepseek-v2.5": (EOS_DS, EOS_DS),
    "gemma-2-it": ("<end_of_turn>", "<end_of_turn>"),
    "gemma-3-it": ("<end_of_turn>", "<end_of_turn>"),
    "gemma-7b-it": ("<end_of_turn>", "<end_of_turn>"),
    "glm-4-9b-chat": ("", ""),
    "glm-4-9b-chat-early": ("", ""),
    "internlm2-chat": ("<|im_end|>", "<|im_end|>\n</s>"),
    "llama-3-instruct": ("<|eot_id|>", "<|eot_id|>"),
    "llama-3.1-instruct": ("<|eot_id|>", "<|eot_id|>"),
    "llama-3.2-instruct": ("<|eot_id|>", "<|eot_id|>"),
    "mistral-7b-instruct-v0.1": ("</s>", "</s>"),
    "mistral-7b-instruct-v0.2-v1-system": ("</s>", "</s>"),
    "mistral-7b-instruct-v0.3": (" </s>", " </s>"),
    "mistral-nemo-instruct-2407": ("</s>", "</s>"),
    "mixtral-8x7b-instruct-v0.1": ("</s>", "</s>"),
    "phi-3-medium-instruct": ("<|end|>", "<|end|>"),
    "phi-3-mini-instruct": ("<|end|>", "<|end|>\n<|endoftext|>"),
    "phi-3.5-mini-instruct": ("<|end|>", "<|end|>\n<|endoftext|>"),
    "qwen1.5-chat": ("<|im_end|>", ""),  # this template leaves the last turn open
    "qwen2-instruct": ("<|im_end|>", "<|im_end|>"),
    "qwen2.5-instruct": ("<|im_end|>", "<|im_end|>"),
    "qwen3": ("<|im_end|>", "<|im_end|>"),
    "yi-chat": ("<|im_end|>", "<|im_end|>"),
    "yi-chat-chatml-xinference": ("<|im_end|>", "<|im_end|>"),
    "zephyr": ("</s>", "</s>"),
}


def labelled_segments(encoded, tokenizer) -> list[str]:
    """The decoded runs of consecutive labelled tokens."""
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def merged_system(messages: list[dict]) -> list[dict]:
    first_user = messages[1]
    return [{"role": "user", "content": messages[0]["content"] + "\n\n" + first_user["content"]}, *messages[2:]]


def reference_ids(tokenizer, messages, tools=None) -> list[int]:
    """What apply_chat_template gives; for templates that refuse or drop a system message, the documented
    adaptation (system prompt in the first user turn)."""
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
        if messages[0]["role"] != "system" or messages[0]["content"] in text:
            return tokenizer.apply_chat_template(messages, tools=tools, tokenize=True)["input_ids"]
    except Exception:  # noqa: BLE001 - the template refused the system message
        pass
    return tokenizer.apply_chat_template(merged_system(messages), tools=tools, tokenize=True)["input_ids"]


def test_every_template_has_an_expectation():
    assert set(template_names()) <= set(EXPECTED_END), set(template_names()) - set(EXPECTED_END)


@needs_templates
@pytest.mark.parametrize("with_system", [False, True], ids=["no-system", "system"])
@pytest.mark.parametrize("name", template_names() or ["<none>"])
def test_ids_and_mask_match_template(name, with_system):
    tokenizer = tokenizer_for(name)
    messages = ([SYSTEM] if with_system else []) + CONVERSATION
    encoded = encode_chat(tokenizer, messages)
    assert encoded.input_ids == reference_ids(tokenizer, messages)
    middle, last = EXPECTED_END[name]
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    expected = [(replies[0] + middle).strip(), (replies[1] + last).strip()]
    assert [s.strip() for s in labelled_segments(encoded, tokenizer)] == expected


@needs_templates
@pytest.mark.parametrize("name", ["qwen2.5-instruct", "llama-3-instruct", "gemma-2-it", "mistral-7b-instruct-v0.1"])
def test_loss_on_last_and_all(name):
    tokenizer = tokenizer_for(name)
    last = encode_chat(tokenizer, CONVERSATION, loss_on="last")
    middle, end = EXPECTED_END[name]
    assert [s.strip() for s in labelled_segments(last, tokenizer)] == [(CONVERSATION[3]["content"] + end).strip()]
    everything = encode_chat(tokenizer, CONVERSATION, loss_on="all")
    assert everything.labels == everything.input_ids


@needs_templates
@pytest.mark.parametrize("name", ["llama-3-instruct", "gemma-7b-it", "baichuan2-chat"])
def test_templates_that_trim_replies(name):
    tokenizer = tokenizer_for(name)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Hello there.\n"}]
    encoded = encode_chat(tokenizer, messages)
    assert encoded.input_ids == tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert [s.strip() for s in labelled_segments(encoded, tokenizer)] == ["Hello there." + EXPECTED_END[name][1]]


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
TOOL_CONVERSATION = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": '{"sky": "cloudless"}', "tool_call_id": "call00001"},
    {"role": "assistant", "content": "It is sunny in Paris."}]


@needs_templates
@pytest.mark.parametrize("name", ["qwen2.5-instruct", "qwen3", "llama-3.1-instruct", "llama-3.2-instruct",
                                  "mistral-7b-instruct-v0.3", "mistral-nemo-instruct-2407"])
def test_tool_calls_with_native_templates(name):
    tokenizer = tokenizer_for(name)
    encoded = encode_chat(tokenizer, TOOL_CONVERSATION, tools=TOOLS)
    reference = tokenizer.apply_chat_template(TOOL_CONVERSATION, tools=TOOLS, tokenize=True)["input_ids"]
    assert encoded.input_ids == reference
    call, reply = [s.strip() for s in labelled_segments(encoded, tokenizer)]
    end = EXPECTED_END[name][1].strip()
    assert "get_weather" in call and "Paris" in call and call.endswith(end)
    assert "cloudless" not in call + reply  # the tool result is input, never a target
    assert reply == ("It is sunny in Paris." + EXPECTED_END[name][1]).strip()


def without_ids(messages: list[dict]) -> list[dict]:
    return [{**{k: v for k, v in m.items() if k != "tool_call_id"},
             **({"tool_calls": [{k: v for k, v in c.items() if k != "id"} for c in m["tool_calls"]]}
                if m.get("tool_calls") else {})} for m in messages]


@needs_templates
@pytest.mark.parametrize("name", ["mistral-7b-instruct-v0.3", "mistral-nemo-instruct-2407"])
@pytest.mark.parametrize("ids", ["none", "openai"])
def test_mistral_tool_calls_get_ids_the_template_accepts(name, ids):
    """Mistral's templates write each call's id and the result's tool_call_id, and refuse a conversation without
    them (Nemo: 9 letters or digits). sharegpt/glaive rows carry no ids, OpenAI clients send `call_...` ones: both
    used to be refused (or, through the fallback, render the result as a user turn)."""
    tokenizer = tokenizer_for(name)
    conversation = without_ids(TOOL_CONVERSATION)
    if ids == "openai":
        conversation[1]["tool_calls"][0]["id"] = conversation[2]["tool_call_id"] = "call_Ab12Cd34Ef56Gh78"
    encoded = encode_chat(tokenizer, conversation, tools=TOOLS)
    text = tokenizer.decode(encoded.input_ids)
    call_id = re.search(r'"id": "(\w+)"', text).group(1)
    if ids == "openai" and name == "mistral-7b-instruct-v0.3":  # v0.3 takes any id: the client's is kept
        assert call_id == "call_Ab12Cd34Ef56Gh78"
    else:
        assert len(call_id) == 9 and call_id.isalnum()
    assert text.count(call_id) == 2  # the call and the result that answers it
    assert "[TOOL_RESULTS]" in text and "[INST]" not in text.split("[TOOL_RESULTS]", 1)[1]  # not a user turn
    assert encode_chat(tokenizer, conversation, tools=TOOLS).input_ids == encoded.input_ids  # reproducible


@needs_templates
@pytest.mark.parametrize("name", ["qwen2.5-instruct", "qwen3", "llama-3.1-instruct", "mistral-7b-instruct-v0.3",
                                  "mistral-nemo-instruct-2407", "chatml-openhermes", "gemma-2-it"])
def test_a_conversation_may_end_on_a_tool_call(name):
    """LLaMA-Factory trains rows that end on a function_call (a model learning when to call a tool): the call is
    the last trained turn, ended as the template ends a turn."""
    tokenizer = tokenizer_for(name)
    encoded = encode_chat(tokenizer, without_ids(TOOL_CONVERSATION[:2]), tools=TOOLS)
    *_, call = [s.strip() for s in labelled_segments(encoded, tokenizer)]
    assert "get_weather" in call and "Paris" in call
    assert "What is the weather" not in call
    assert tokenizer.decode(encoded.input_ids).rstrip().endswith(call)


@needs_templates
def test_tool_calls_become_text_for_templates_without_tool_support():
    tokenizer = tokenizer_for("chatml-openhermes")
    encoded = encode_chat(tokenizer, TOOL_CONVERSATION)
    call_text = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
    assert [s.strip() for s in labelled_segments(encoded, tokenizer)] == [
        call_text + "<|im_end|>", "It is sunny in Paris.<|im_end|>"]


# Templates without a tool role: they refuse it (roles must alternate) or drop it unseen (Phi-3, Zephyr, Yi).
NO_TOOL_ROLE = ["baichuan2-chat", "deepseek-llm-chat", "gemma-2-it", "gemma-3-it", "gemma-7b-it",
                "mistral-7b-instruct-v0.1", "mistral-7b-instruct-v0.2-v1-system", "mixtral-8x7b-instruct-v0.1",
                "phi-3-medium-instruct", "phi-3-mini-instruct", "phi-3.5-mini-instruct", "yi-chat", "zephyr"]
TWO_RESULTS = [TOOL_CONVERSATION[0],
               {"role": "assistant", "content": "", "tool_calls": [
                   {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                   {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
               {"role": "tool", "content": '{"sky": "cloudless"}'}, {"role": "tool", "content": '{"sky": "rainy"}'},
               TOOL_CONVERSATION[3]]


@needs_templates
@pytest.mark.parametrize("name", NO_TOOL_ROLE)
def test_tool_results_become_user_turns_for_templates_without_a_tool_role(name):
    """LLaMA-Factory's glaive_toolcall demo trains on Gemma or Phi-3; here every such row was a bad row. The tool
    results (one user turn per run of them) are input, the call and the reply are targets."""
    tokenizer = tokenizer_for(name)
    encoded = encode_chat(tokenizer, TWO_RESULTS)
    calls = "\n".join(json.dumps({"name": "get_weather", "arguments": {"city": c}}) for c in ("Paris", "Rome"))
    as_user = [TWO_RESULTS[0], {"role": "assistant", "content": calls},
               {"role": "user", "content": '{"sky": "cloudless"}\n{"sky": "rainy"}'}, TWO_RESULTS[4]]
    assert encoded.input_ids == reference_ids(tokenizer, as_user)
    middle, end = EXPECTED_END[name]
    assert [s.strip() for s in labelled_segments(encoded, tokenizer)] == [
        (calls + middle).strip(), ("It is sunny in Paris." + end).strip()]


@needs_templates
@pytest.mark.parametrize("name", ["deepseek-v2.5", "deepseek-r1-distill-qwen"])
def test_templates_that_cannot_express_tool_turns_raise(name):
    """These render a tool call only when its content is None, which transformers drops before rendering."""
    with pytest.raises(DataError, match="cannot express"):
        encode_chat(tokenizer_for(name), TOOL_CONVERSATION, tools=TOOLS)


REASONING = [{"role": "user", "content": "What is two plus two?"},
             {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\nFour."},
             {"role": "user", "content": "And three plus three?"},
             {"role": "assistant", "content": "<think>\nAdd again.\n</think>\n\nSix."}]


@needs_templates
@pytest.mark.parametrize("name, expected", [
    # Qwen3 keeps the reasoning of the turn after the last user query only: that turn trains on it.
    ("qwen3", ["Four.<|im_end|>", "<think>\nAdd again.\n</think>\n\nSix.<|im_end|>"]),
    # DeepSeek-R1 drops all reasoning from the rendered history: only the answers are there to train on.
    ("deepseek-r1", ["Four." + EOS_DS, "Six." + EOS_DS]),
    ("deepseek-r1-distill-qwen", ["Four." + EOS_DS, "Six." + EOS_DS]),
    ("chatml-openhermes", [m["content"] + "<|im_end|>" for m in REASONING[1::2]]),
])
def test_reasoning_templates(name, expected):
    tokenizer = tokenizer_for(name)
    encoded = encode_chat(tokenizer, REASONING)
    assert encoded.input_ids == tokenizer.apply_chat_template(REASONING, tokenize=True)["input_ids"]
    assert [s.strip() for s in labelled_segments(encoded, tokenizer)] == expected


def golden_cases() -> list[tuple[str, str]]:
    golden = TEMPLATES_DIR / "golden"
    if not golden.is_dir():
        return []
    cases = {v["chat_template"]: k for k, v in json.loads((golden / "hfjs_e2e_custom_templates.json")
                                                          .read_text(encoding="utf-8")).items()}
    for case in json.loads((golden / "llamacpp_test_chat_template_cases.json").read_text(encoding="utf-8")):
        cases.setdefault(case["template"], case["name"])
    return [(name, template) for template, name in cases.items()]


# After a reply only whitespace and tag-like special tokens may be labelled, never the next turn's text.
SUFFIX = re.compile(r"(\s|<[^<>\s]+>|\[/?[A-Z_]+\])*")


@needs_templates
@pytest.mark.parametrize("name, template", golden_cases() or [("<none>", "")], ids=lambda v: v[:40])
def test_golden_fixture_templates(name, template):
    """Templates of ~70 more models (hf.js and llama.cpp fixtures): ids equal, reply + markers labelled."""
    tokenizer = make_tokenizer(template)
    try:
        text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"the template cannot render a plain conversation ({e})")
    if not all(m["content"] in text for m in CONVERSATION):
        with pytest.raises(DataError):  # it drops turns (an inference-only template): refuse clearly
            encode_chat(tokenizer, CONVERSATION)
        return
    encoded = encode_chat(tokenizer, CONVERSATION)
    assert encoded.input_ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"]
    segments = [s.strip() for s in labelled_segments(encoded, tokenizer)]
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert len(segments) == 2
    for segment, reply in zip(segments, replies):
        assert segment.startswith(reply) and SUFFIX.fullmatch(segment[len(reply):]), segment


# ---- built-in templates and resolve_chat_template -------------------------------------------------------------

@pytest.mark.parametrize("name, end", [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>"), ("qwen", "<|im_end|>"),
                                       ("default", "</s>")])
def test_builtin_templates(name, end):
    tokenizer = make_tokenizer(None)
    encoded = encode_chat(tokenizer, [SYSTEM] + CONVERSATION, chat_template=name)
    rendered = tokenizer.apply_chat_template([SYSTEM] + CONVERSATION, chat_template=BUILTIN_TEMPLATES[name],
                                             tokenize=True)["input_ids"]
    assert encoded.input_ids == rendered
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert [s.strip() for s in labelled_segments(encoded, tokenizer)] == [r + end for r in replies]


def test_builtin_qwen_template_renders_tool_calls():
    tokenizer = make_tokenizer(None)
    encoded = encode_chat(tokenizer, TOOL_CONVERSATION, tools=TOOLS, chat_template="qwen")
    call, reply = [s.strip() for s in labelled_segments(encoded, tokenizer)]
    assert call == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    assert reply == "It is sunny in Paris.<|im_end|>"


def test_resolve_chat_template(tmp_path):
    own = make_tokenizer("{{ messages[0]['content'] }}")
    assert resolve_chat_template(own, None) == "{{ messages[0]['content'] }}"
    assert resolve_chat_template(own, "llama3") == BUILTIN_TEMPLATES["llama3"]
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}", encoding="utf-8")
    assert resolve_chat_template(own, str(path)) == path.read_text(encoding="utf-8")
    # A tokenizer without a template gets the built-in whose special tokens it has (this one has <|im_start|>).
    assert resolve_chat_template(make_tokenizer(None), None) == BUILTIN_TEMPLATES["chatml"]
    with pytest.raises(ConfigError, match="chatml"):
        resolve_chat_template(own, "chatlm")
    with pytest.raises(ConfigError, match="missing.jinja"):
        resolve_chat_template(own, str(tmp_path / "missing.jinja"))


TOOL_THEN_USER = [*TOOL_CONVERSATION, {"role": "user", "content": "And in Rome tomorrow?"},
                  {"role": "assistant", "content": "Rain in Rome."}]
# Templates that render tool calls only with content None, which transformers drops: a DataError.
CANNOT_EXPRESS_TOOLS = {"deepseek-r1-distill-qwen", "deepseek-v2.5"}


@needs_templates
@pytest.mark.parametrize("name", template_names() or ["<none>"])
def test_tool_turn_then_another_user_turn(name):
    """Mistral v0.3 and Nemo render [AVAILABLE_TOOLS] before the *last* user turn, so a prompt rendered up to an
    earlier turn matches the full text only in `<s>`: the user's question was labelled as part of the tool call."""
    tokenizer = tokenizer_for(name)
    if name in CANNOT_EXPRESS_TOOLS:
        with pytest.raises(DataError, match="cannot"):
            encode_chat(tokenizer, TOOL_THEN_USER, tools=TOOLS)
        return
    encoded = encode_chat(tokenizer, TOOL_THEN_USER, tools=TOOLS)
    call, reply, last = labelled_segments(encoded, tokenizer)
    middle, end = EXPECTED_END[name]
    assert "get_weather" in call and "Paris" in call and call.strip().endswith(middle)
    for text in ("What is the weather", "[INST]", "cloudless", "Rome tomorrow"):  # inputs are never targets
        assert text not in call + reply + last, (text, call)
    assert [reply.strip(), last.strip()] == [("It is sunny in Paris." + middle).strip(), ("Rain in Rome." + end).strip()]


@needs_templates
@pytest.mark.parametrize("name", ["glm-4-9b-chat", "glm-4-9b-chat-early"])
def test_tool_schemas_go_to_the_system_prompt_when_the_template_drops_them(name):
    """GLM-4's template mentions "tools" but reads a per-message key, so `tools=` was silently dropped."""
    tokenizer = tokenizer_for(name)
    text = tokenizer.decode(encode_chat(tokenizer, TOOL_CONVERSATION, tools=TOOLS).input_ids)
    assert "Weather of a city" in text and text.index("Weather of a city") < text.index("What is the weather")


def test_a_template_reading_a_token_the_tokenizer_lacks_says_so(tiny_qwen2_dir):
    """tiny-qwen2 has no BOS token; a Llama 3 style template reads `bos_token`: the error names it and the fix."""
    from transformers import AutoTokenizer

    from tuneforge.data.encode import encode_prompt
    from tuneforge.errors import DataError

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    assert tokenizer.bos_token is None
    template = "{{ bos_token + messages[0]['content'] }}"  # as Llama 3's: a concatenation fails, a print is empty
    with pytest.raises(DataError, match=r"reads `bos_token`, which this tokenizer does not define.*model's own"):
        encode_prompt(tokenizer, [{"role": "user", "content": "hi"}], chat_template=template)
