"""Format adapters and row validation: each format to `Example`, and bad rows named by field and problem."""

from __future__ import annotations

import json

import pytest

from tuneforge.data.formats import RowProblem, guess_format, to_example
from tuneforge.errors import DataError


def example(data: dict, fmt: str, columns=None, tags=None):
    return to_example(data, fmt, "f.jsonl:line 1", columns or {}, tags or {})


def problem(data: dict, fmt: str, columns=None, tags=None) -> tuple[str, str]:
    with pytest.raises(RowProblem) as info:
        example(data, fmt, columns, tags)
    return info.value.field, info.value.problem


def test_alpaca_with_input_system_and_history():
    ex = example({"instruction": "Translate", "input": "hello", "output": "bonjour", "system": "Be brief.",
                  "history": [["Hi", "Hello!"]]}, "alpaca")
    assert ex.source == "f.jsonl:line 1"
    assert ex.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello!"},
                           {"role": "user", "content": "Translate\nhello"},
                           {"role": "assistant", "content": "bonjour"}]


def test_alpaca_column_mapping_and_json_history_from_csv():
    ex = example({"question": "2+2?", "answer": "4", "history": '[["1+1?", "2"]]'}, "alpaca",
                 columns={"instruction": "question", "output": "answer"})
    assert [m["content"] for m in ex.messages] == ["1+1?", "2", "2+2?", "4"]


@pytest.mark.parametrize("data, field, words", [
    ({"output": "x"}, "instruction", "missing"),
    ({"instruction": "x", "output": ""}, "output", "empty"),
    ({"instruction": "x", "output": ["a", "b"]}, "output", "expected a string"),
    ({"instruction": "x", "output": "y", "history": [["q"]]}, "history[0]", "pair"),
    ({"instruction": "x", "output": "y", "system": 3}, "system", "expected a string"),
])
def test_alpaca_bad_rows(data, field, words):
    got_field, got_problem = problem(data, "alpaca")
    assert got_field == field and words in got_problem


def test_sharegpt_with_tools_function_calls_and_observations():
    tools = json.dumps([{"name": "get_weather", "description": "Weather", "parameters": {"type": "object"}}])
    ex = example({"conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"sky": "clear"}'},
        {"from": "gpt", "value": "It is clear."}], "system": "You help.", "tools": tools}, "sharegpt")
    assert ex.messages[0] == {"role": "system", "content": "You help."}
    call = ex.messages[2]
    assert call["role"] == "assistant" and call["content"] == ""
    assert call["tool_calls"] == [{"id": "call00001", "type": "function",
                                   "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert ex.messages[3] == {"role": "tool", "content": '{"sky": "clear"}', "tool_call_id": "call00001"}
    assert ex.tools == [{"type": "function", "function": json.loads(tools)[0]}]


def test_sharegpt_ending_on_a_function_call_is_read():
    """LLaMA-Factory trains such rows (the call is the target); they used to be refused as bad rows."""
    ex = example({"conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'}]}, "sharegpt")
    assert ex.messages[-1]["role"] == "assistant"
    assert ex.messages[-1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}


def test_sharegpt_custom_tags():
    tags = {"role_tag": "role", "content_tag": "text", "user_tag": "q", "assistant_tag": "a"}
    ex = example({"chat": [{"role": "q", "text": "Hi"}, {"role": "a", "text": "Hello"}]}, "sharegpt",
                 columns={"messages": "chat"}, tags=tags)
    assert ex.messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


@pytest.mark.parametrize("turns, field, words", [
    ([{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yo"}], "conversations[1].from", "unknown role"),
    ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": 3}], "conversations[1].value", "expected a string"),
    ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "  "}], "conversations[1]", "empty"),
    ([{"from": "human", "value": "Hi"}, {"from": "human", "value": "Hi"}], "conversations[1]",
     "cannot follow a `user` turn"),
    ([{"from": "gpt", "value": "Hi"}], "conversations[0]", "cannot follow the start"),
    ([{"from": "human", "value": "Hi"}], "conversations", "ends with a `user` turn"),
    ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}, {"from": "system", "value": "S"}],
     "conversations[2]", "system message may only come first"),
    ([{"from": "human", "value": "Hi"}, {"from": "function_call", "value": "not json"}],
     "conversations[1].value", "function call must be JSON"),
    ([{"from": "human", "value": "Hi"}, {"from": "observation", "value": "42"}], "conversations[1]",
     "cannot follow a `user` turn"),
    ([{"from": "human", "value": "Hi"}, {"from": "function_call", "value": '{"name": "f", "arguments": {}}'},
      {"from": "observation", "value": "42"}], "conversations", "ends with a `tool` turn; it must end with the "
                                                                 "assistant's reply or tool call"),
    ([], "conversations", "empty conversation"),
])
def test_sharegpt_bad_rows(turns, field, words):
    got_field, got_problem = problem({"conversations": turns}, "sharegpt")
    assert got_field == field and words in got_problem, (got_field, got_problem)


def test_openai_messages_with_parts_and_tool_calls():
    ex = example({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "value": "in Rome?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "abc", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "abc"},
        {"role": "assistant", "content": "Sunny."}],
        "tools": [{"type": "function", "function": {"name": "get_weather"}}]}, "openai")
    assert ex.messages[0]["content"] == "Weather in Rome?"
    assert ex.messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Rome"}  # JSON text -> object
    assert ex.messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "abc"}
    assert ex.tools == [{"type": "function", "function": {"name": "get_weather"}}]


@pytest.mark.parametrize("messages, field, words", [
    ([{"role": "robot", "content": "x"}], "messages[0].role", "unknown role"),
    ([{"role": "user", "content": [{"type": "image"}]}], "messages[0].content[0]", "only text parts"),
    ([{"role": "system", "content": [{"type": [], "value": "Be exact."}]}], "messages[0].content[0]",
     "only text parts"),  # a part type that is no string was "cannot be processed (TypeError: unhashable type)"
    ([{"role": "user", "content": [{"type": {"a": 1}, "text": "Hi"}]}], "messages[0].content[0]", "only text parts"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}], "messages[1]", "empty"),
    ("not a list", "messages", "expected a list"),
])
def test_openai_bad_rows(messages, field, words):
    got_field, got_problem = problem({"messages": messages}, "openai")
    assert got_field == field and words in got_problem, (got_field, got_problem)


def test_text_rows():
    assert example({"text": "Plain words."}, "text").text == "Plain words."
    assert problem({"content": "x"}, "text")[0] == "text"


@pytest.mark.parametrize("row, fmt", [
    ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
    ({"conversations": [{"from": "human", "value": "a"}]}, "sharegpt"),
    ({"messages": [{"role": "user", "content": "a"}]}, "openai"),
    ({"conversations": [{"role": "user", "content": "a"}]}, "openai"),
    ({"text": "a"}, "text"),
])
def test_guess_format(row, fmt):
    assert guess_format(row, {}, "f.jsonl") == fmt


def test_guess_format_names_file_and_keys():
    with pytest.raises(DataError, match=r"f.jsonl: .*keys \['answer', 'question'\].*columns"):
        guess_format({"question": "a", "answer": "b"}, {}, "f.jsonl")
    assert guess_format({"question": "a", "answer": "b"}, {"instruction": "question", "output": "answer"},
                        "f.jsonl") == "alpaca"


def test_errors_name_the_rows_own_field_not_the_internal_messages():
    from tuneforge.data.formats import strings_of, user_field

    assert problem({"instruction": "e", "output": "caf\udce9"}, "alpaca")[0] == "output"
    assert problem({"instruction": "e", "input": "\udce9", "output": "x"}, "alpaca")[0] == "input"
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "caf\udce9"}]}
    assert problem(sharegpt, "sharegpt")[0] == "conversations[1].value"
    # what is found later (a special token, while encoding) is named through Example.origins
    ex = example({"instruction": "Q", "input": "ctx", "output": "A", "system": "S", "history": [["h1", "h2"]]},
                 "alpaca")
    def fields(ex) -> dict:  # of the message contents (strings_of also yields keys and roles)
        return {text: field for field, text in strings_of(ex) if not field.endswith((".role", ".<key>"))}

    assert fields(ex) == {"S": "system", "h1": "history[0][0]", "h2": "history[0][1]", "Q\nctx": "instruction + input",
                          "A": "output"}
    ex = example({**sharegpt, "conversations": sharegpt["conversations"][:1] + [{"from": "gpt", "value": "B"}],
                  "system": "S"}, "sharegpt")  # the system column comes first and shifts our indexes
    assert fields(ex) == {"S": "system", "Hi": "conversations[0].value", "B": "conversations[1].value"}
    ex = example({"dialog": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "B"}],
                  "system": "S"}, "openai", columns={"messages": "dialog"})
    assert user_field(ex.origins, "messages[2].content") == "dialog[1].content"
    assert user_field(ex.origins, "messages[0].content") == "system"


def test_null_is_reported_as_null_not_missing():
    assert problem({"instruction": "e", "output": None}, "alpaca") == ("output", "is null; this format needs text "
                                                                                "here (fill it in, or drop the row)")
    assert problem({"conversations": None}, "sharegpt")[1].startswith("is null")
    assert problem({"instruction": "e"}, "alpaca")[1].startswith("missing")


@pytest.mark.parametrize("column, value", [("images", ["cat.jpg"]), ("videos", "clip.mp4"),
                                           ("audios", [{"path": "a.wav"}])])
def test_rows_with_media_are_refused_not_trained_as_text(column, value):
    row = {"messages": [{"role": "user", "content": "<image>What is in this picture?"},
                        {"role": "assistant", "content": "A cat."}], column: value}
    field, words = problem(row, "openai")
    assert field == column and f"holds {column}" in words and "multimodal data is not supported" in words
    assert problem({"instruction": "<image>Name it.", "output": "A cat.", "pics": value}, "alpaca",
                   columns={"images": "pics"})[0] == "pics"  # a registry's column mapping names the user's column
    assert example({**row, column: []}, "openai").messages[1]["content"] == "A cat."  # an empty column is no media


def test_llamafactory_v1_reasoning_and_tool_call_parts():
    """LLaMA-Factory v1 rows (its reason_tool_use_demo) give an assistant turn `reasoning` and `tool_call` parts."""
    ex = example({"messages": [
        {"role": "user", "content": [{"type": "text", "value": "Weather in Rome?"}]},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "Call the tool. "},
                                          {"type": "tool_call", "value": '{"name": "w", "arguments": {"c": "Rome"}}'}]},
        {"role": "tool", "content": [{"type": "text", "value": "sunny"}]},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "It is sunny."},
                                          {"type": "text", "value": "Sunny."}]}]}, "openai")
    call, reply = ex.messages[1], ex.messages[3]
    assert call["tool_calls"] == [{"type": "function", "function": {"name": "w", "arguments": {"c": "Rome"}}}]
    assert call["content"] == "<think>\nCall the tool.\n</think>\n\n"
    assert reply == {"role": "assistant", "content": "<think>\nIt is sunny.\n</think>\n\nSunny."}


@pytest.mark.parametrize("messages, field, words", [
    ([{"role": "user", "content": [{"type": "reasoning", "value": "x"}]}], "messages[0].content[0]",
     "only text parts are supported in a `user` message"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [{"type": "tool_call", "value": "oops"}]}],
     "messages[1].content[0].value", "expected {\"type\": \"function\""),
])
def test_llamafactory_v1_parts_in_the_wrong_place(messages, field, words):
    got_field, got_problem = problem({"messages": messages}, "openai")
    assert got_field == field and words in got_problem, (got_field, got_problem)
