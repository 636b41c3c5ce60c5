"""Chat templates: the tokenizer's own, or a built-in fallback, or one the user names.

`model.chat_template` (and `resolve_chat_template(tokenizer, override)`) accepts:

- nothing: the tokenizer's own `chat_template` (no drift from how the model was trained). A tokenizer without one
  gets a built-in fallback picked from its vocabulary: `chatml` when it has `<|im_start|>`, `llama3` when it has
  `<|start_header_id|>`, else `default`;
- a built-in name: `chatml`, `llama3`, `qwen` or `default`;
- a path to a `.jinja` file, or the Jinja source itself.

The built-ins are written here (Jinja, rendered by transformers like any tokenizer template) so a tokenizer that
ships no template still trains and chats with a sensible, documented format.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tuneforge.errors import ConfigError, did_you_mean

log = logging.getLogger(__name__)

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama 3 instruct layout; tool results use Llama's `ipython` role.
LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# ChatML with Qwen's default system prompt and Qwen2.5's tool-call layout (<tools>, <tool_call>, <tool_response>).
QWEN = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' or (message['role'] == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message['content'] %}{{- '\\n' + message['content'] }}{%- endif %}"
    "{%- for call in message.tool_calls %}"
    "{%- set call = call.function if call.function is defined else call %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call.name + '\", \"arguments\": ' + call.arguments | tojson + "
    "'}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# A plain layout for base models without special tokens. The generation prompt has no trailing space so that
# "Assistant: Hello" tokenizes the same in training (" Hello" is one piece) as when generating after "Assistant:".
DEFAULT = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- 'System: ' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' %}{{- 'User: ' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- 'Assistant: ' + message['content'] + (eos_token or '') + '\\n\\n' }}"
    "{%- else %}{{- message['role'] | capitalize + ': ' + message['content'] + '\\n\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'Assistant:' }}{%- endif %}"
)

BUILTIN_TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "qwen": QWEN, "default": DEFAULT}


def resolve_chat_template(tokenizer, override: str | None = None, tools: list | None = None) -> str:
    """The Jinja source to render chats with (see the module docstring for what `override` may be)."""
    if override:
        return _template_from_override(override)
    own = getattr(tokenizer, "chat_template", None)
    if own:
        return own if isinstance(own, str) else tokenizer.get_chat_template(None, tools)
    name = fallback_template_name(tokenizer)
    log.warning("The tokenizer has no chat template; using the built-in `%s` template.", name)
    return BUILTIN_TEMPLATES[name]


def fallback_template_name(tokenizer) -> str:
    """The built-in template whose special tokens the tokenizer already has."""
    vocab = tokenizer.get_vocab()
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        return "chatml"
    if "<|start_header_id|>" in vocab and "<|eot_id|>" in vocab:
        return "llama3"
    return "default"


def is_jinja_source(override: str) -> bool:
    """A `model.chat_template` value that is the template's Jinja text itself."""
    return "{%" in override or "{{" in override


def names_a_file(override: str) -> bool:
    """A `model.chat_template` value that is a path (neither a built-in name nor Jinja source)."""
    return override not in BUILTIN_TEMPLATES and not is_jinja_source(override)


def _template_from_override(override: str) -> str:
    if override in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[override]
    if is_jinja_source(override):
        return override  # the Jinja source itself
    path = Path(override).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    hint = did_you_mean(override, BUILTIN_TEMPLATES) if not override.endswith(".jinja") else ""
    raise ConfigError(f"`model.chat_template` (--chat-template) is {override!r}: not a built-in template "
                      f"({', '.join(BUILTIN_TEMPLATES)}) and not an existing .jinja file (relative paths count from "
                      f"the current folder, {Path.cwd()})."
                      f"{hint or ' Give a built-in name or the path of a .jinja file.'}")
