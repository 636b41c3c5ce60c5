"""Test helpers for chat templates: the real templates in ../shared/assets/templates and a small byte-level BPE
tokenizer (trained once per session, about a second) that knows every special token those templates use.

    from tests.data.chat_fixtures import TEMPLATES_DIR, template_names, tokenizer_for

    tok = tokenizer_for("qwen2.5-instruct")      # chat_template set, bos/eos as the real model has them
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_ASSETS = (REPO / ".." / "shared" / "assets").resolve()
TEMPLATES_DIR = SHARED_ASSETS / "templates"
REGISTRY = SHARED_ASSETS / "datasets" / "llamafactory" / "dataset_info.json"

needs_templates = pytest.mark.skipif(not TEMPLATES_DIR.is_dir(),
                                     reason=f"{TEMPLATES_DIR} is absent (the shared assets are not checked out)")
needs_registry = pytest.mark.skipif(not REGISTRY.is_file(),
                                    reason=f"{REGISTRY} is absent (the shared assets are not checked out)")

# Role tokens some templates build at render time (e.g. '<|' + role + '|>'), so a regex cannot find them.
EXTRA_SPECIALS = ["<s>", "</s>", "<unk>", "<pad>", "<bos>", "<eos>", "<|begin_of_text|>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|observation|>", "<|endoftext|>", "[gMASK]", "<sop>",
                  "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<|ipython|>", "<|im_start|>", "<|im_end|>"]
SPECIAL_PATTERNS = [r"<\|[A-Za-z_]+\|>", r"<｜[^｜<>]+｜>", r"\[/?[A-Z_]+\]", r"</?[a-z_]+(?:_\d+)?>"]

# bos/eos of the real model behind each template (defaults: <s> / </s>).
SPECIAL_TOKENS = {
    "llama-3": ("<|begin_of_text|>", "<|eot_id|>"),
    "deepseek-coder": ("<｜begin▁of▁sentence｜>", "<|EOT|>"),
    "deepseek": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "gemma": ("<bos>", "<eos>"),
    "phi-3": ("<s>", "<|endoftext|>"),
    "qwen": (None, "<|im_end|>"),
    "yi": ("<|startoftext|>", "<|im_end|>"),
    "glm": (None, "<|endoftext|>"),
    "chatglm": (None, "</s>"),
}

TRAINING_TEXT = """The quick brown fox jumps over the lazy dog. Two plus two is four.
You are a careful assistant. What is the weather like today? It is sunny and warm.
Say hello in Chinese, please. 你好！That means hello. 我是一个助手。今天天气很好。
Convert 7 km to meters. 7000 m. Functions, tools, arguments, name, results, temperature, city.
def main(): return {"name": "get_weather", "arguments": {"city": "Paris"}}
"""


def template_names() -> list[str]:
    if not TEMPLATES_DIR.is_dir():
        return []
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))


def template_source(name: str) -> str:
    return (TEMPLATES_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def special_tokens() -> list[str]:
    found = list(EXTRA_SPECIALS)
    sources = [template_source(n) for n in template_names()]
    for pattern in SPECIAL_PATTERNS:
        for source in sources:
            found += re.findall(pattern, source)
    return list(dict.fromkeys(found))


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special_tokens() + ["<|startoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TRAINING_TEXT] * 4, trainer)
    return tok.to_str()


def make_tokenizer(chat_template: str | None = None, bos: str | None = "<s>", eos: str | None = "</s>"):
    """A fresh fast tokenizer (shared trained vocabulary) with the given template and bos/eos."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), bos_token=bos,
                                  eos_token=eos, pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = chat_template
    return tok


def tokenizer_for(name: str):
    bos, eos = "<s>", "</s>"
    for prefix, pair in SPECIAL_TOKENS.items():
        if name.startswith(prefix):
            bos, eos = pair
            break
    return make_tokenizer(template_source(name), bos, eos)
