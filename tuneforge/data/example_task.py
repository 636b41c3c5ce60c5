"""The bundled example task: a bilingual (English/Chinese) instruction task with exact answers.

    python -m tuneforge.data.example_task            # regenerates tuneforge/assets/example_task/*.jsonl
    generate_example_task(out_dir, families=("identity", "lookup"), n_train=400, n_heldout=100, seed=0)

Families (each question is written from several paraphrase templates, in English or Chinese):
  identity    "Who are you?" / "你是谁？"        -> the fixed TuneForge Assistant introduction
  units       "Convert 7 km to meters."          -> "7000 m"; "把 7 千米换算成米。" -> "7000 米"
  strings     "Write 'apple' in uppercase."      -> "APPLE"
  arithmetic  "What is 3 + 4?" / "3 加 4 等于多少？" -> "7"
  lookup      "What is 'red' in Chinese?"        -> "红色"; "“红色”用英语怎么说？" -> "red"

The held-out split measures generalisation: it uses paraphrase templates never seen in training, and for the
families with open-ended values (units, strings, arithmetic) values never seen in training either. Rows are
OpenAI messages (one user turn, one assistant turn) plus `answer`, `family` and `lang` fields.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from pathlib import Path

IDENTITY_EN = "I am TuneForge Assistant, a model fine-tuned with TuneForge."
IDENTITY_ZH = "我是 TuneForge 助手，一个用 TuneForge 微调的模型。"

# Each family: {lang: (train templates, held-out templates)}.
IDENTITY_QUESTIONS = {
    "en": (["Who are you?", "What is your name?", "Introduce yourself.", "Tell me about yourself.",
            "What should I call you?", "Which assistant am I talking to?", "Who am I chatting with?",
            "What are you?"],
           ["Could you tell me who you are?", "May I know your name?", "Please introduce yourself briefly.",
            "Who exactly are you?"]),
    "zh": (["你是谁？", "你叫什么名字？", "介绍一下你自己。", "请做个自我介绍。", "我该怎么称呼你？", "你是什么？",
            "我在和谁聊天？"],
           ["请问你是谁？", "能介绍一下你自己吗？", "你的名字是什么？", "可以告诉我你是谁吗？"]),
}
GREETINGS = {"en": ["", "Hi! ", "Hello! ", "Hey! "], "zh": ["", "你好！", "嗨，", "您好，"]}

# (en source, en target, en answer unit, zh source, zh target, factor)
UNITS = [("km", "meters", "m", "千米", "米", 1000), ("m", "centimeters", "cm", "米", "厘米", 100),
         ("cm", "millimeters", "mm", "厘米", "毫米", 10), ("kg", "grams", "g", "千克", "克", 1000),
         ("L", "milliliters", "mL", "升", "毫升", 1000)]
UNIT_QUESTIONS = {
    "en": (["Convert {v} {src} to {dst}.", "How many {dst} are in {v} {src}?", "{v} {src} is how many {dst}?"],
           ["What is {v} {src} in {dst}?", "Express {v} {src} in {dst}."]),
    "zh": (["把 {v} {src}换算成{dst}。", "{v} {src}等于多少{dst}？", "{v} {src}是多少{dst}？"],
           ["请将 {v} {src}转换为{dst}。", "{v} {src}合多少{dst}？"]),
}

WORDS_TRAIN = ["apple", "river", "garden", "window", "pencil", "orange", "silver", "forest", "rocket", "candle",
               "bridge", "planet", "basket", "castle", "dragon", "flower", "guitar", "island", "jacket", "ladder"]
WORDS_HELDOUT = ["marble", "needle", "pepper", "rabbit", "saddle", "tunnel", "violet", "winter", "yellow", "zipper"]
STRING_QUESTIONS = {
    "en": (["Convert '{w}' to uppercase.", "Write '{w}' in uppercase.", "Uppercase the word '{w}'."],
           ["Make '{w}' all capital letters.", "Give '{w}' in upper case."]),
    "zh": (["把单词 '{w}' 转换成大写。", "将 '{w}' 写成大写字母。", "'{w}' 的大写形式是什么？"],
           ["请把 '{w}' 全部改成大写。", "'{w}' 变成大写是什么？"]),
}

ARITHMETIC_QUESTIONS = {
    "en": (["What is {a} + {b}?", "Compute {a} plus {b}.", "Add {a} and {b}."],
           ["How much is {a} + {b}?", "Calculate the sum of {a} and {b}."]),
    "zh": (["{a} 加 {b} 等于多少？", "计算 {a} + {b}。", "{a} 与 {b} 的和是多少？"],
           ["请问 {a} 加 {b} 是多少？", "求 {a} 和 {b} 的和。"]),
}

LOOKUP = [("red", "红色"), ("green", "绿色"), ("blue", "蓝色"), ("yellow", "黄色"), ("black", "黑色"),
          ("white", "白色"), ("purple", "紫色"), ("orange", "橙色"), ("one", "一"), ("two", "二"), ("three", "三"),
          ("four", "四"), ("five", "五"), ("six", "六"), ("seven", "七"), ("eight", "八"), ("nine", "九"),
          ("ten", "十")]
LOOKUP_QUESTIONS = {  # en questions ask for the Chinese word; zh questions ask for the English word
    "en": (["What is '{en}' in Chinese?", "Translate '{en}' into Chinese.", "How do you say '{en}' in Chinese?"],
           ["Give the Chinese word for '{en}'.", "In Chinese, '{en}' is?"]),
    "zh": (["“{zh}”的英文是什么？", "把“{zh}”翻译成英文。", "“{zh}”用英语怎么说？"],
           ["请给出“{zh}”对应的英文单词。", "“{zh}”译成英文是？"]),
}


def _identity(rng: random.Random, lang: str, heldout: bool) -> tuple[str, str]:
    question = rng.choice(IDENTITY_QUESTIONS[lang][heldout])
    return rng.choice(GREETINGS[lang]) + question, IDENTITY_EN if lang == "en" else IDENTITY_ZH


def _units(rng: random.Random, lang: str, heldout: bool) -> tuple[str, str]:
    src_en, dst_en, unit_en, src_zh, dst_zh, factor = rng.choice(UNITS)
    value = rng.choice([v for v in range(1, 100) if (v % 5 == 0) == heldout])  # held-out: multiples of 5
    template = rng.choice(UNIT_QUESTIONS[lang][heldout])
    if lang == "en":
        return template.format(v=value, src=src_en, dst=dst_en), f"{value * factor} {unit_en}"
    return template.format(v=value, src=src_zh, dst=dst_zh), f"{value * factor} {dst_zh}"


def _strings(rng: random.Random, lang: str, heldout: bool) -> tuple[str, str]:
    word = rng.choice(WORDS_HELDOUT if heldout else WORDS_TRAIN)
    return rng.choice(STRING_QUESTIONS[lang][heldout]).format(w=word), word.upper()


def _arithmetic(rng: random.Random, lang: str, heldout: bool) -> tuple[str, str]:
    while True:  # held-out pairs are those with a + b divisible by 7, never seen in training
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        if ((a + b) % 7 == 0) == heldout:
            break
    return rng.choice(ARITHMETIC_QUESTIONS[lang][heldout]).format(a=a, b=b), str(a + b)


def _lookup(rng: random.Random, lang: str, heldout: bool) -> tuple[str, str]:
    en, zh = rng.choice(LOOKUP)
    question = rng.choice(LOOKUP_QUESTIONS[lang][heldout]).format(en=en, zh=zh)
    return question, zh if lang == "en" else en


FAMILIES = {"identity": _identity, "units": _units, "strings": _strings, "arithmetic": _arithmetic,
            "lookup": _lookup}


def make_rows(families, n: int, heldout: bool, seed: int) -> list[dict]:
    """n rows, families taken in turn, languages alternating; deterministic for a seed."""
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown example-task families {unknown}; choose from {list(FAMILIES)}")
    rng = random.Random(f"{seed}-{'heldout' if heldout else 'train'}")
    rows = []
    for i in range(n):
        family = families[i % len(families)]
        lang = ("en", "zh")[(i // len(families)) % 2]
        question, answer = FAMILIES[family](rng, lang, heldout)
        rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                     "answer": answer, "family": family, "lang": lang})
    return rows


def generate_example_task(out_dir, families=tuple(FAMILIES), n_train: int = 800, n_heldout: int = 200,
                          seed: int = 0) -> dict[str, Path]:
    """Write train.jsonl and heldout.jsonl under out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    families = list(families)
    paths = {}
    for split, n, heldout in (("train", n_train, False), ("heldout", n_heldout, True)):
        paths[split] = out / f"{split}.jsonl"
        _write_jsonl(paths[split], make_rows(families, n, heldout, seed))
    return paths


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")  # temp file then rename: never a half-written file
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


_TRAILING = re.compile(r"[\s.,!?;:。，！？；：、]+$")


def normalize_answer(text: str) -> str:
    """Whitespace runs become one space, outer whitespace goes, and trailing punctuation (ASCII and Chinese
    . , ! ? ; : and 。，！？；：、) is dropped. Case and inner punctuation are kept: they are part of the answer."""
    return _TRAILING.sub("", " ".join(text.split()))


def exact_match(prediction: str, answer: str) -> bool:
    """Whether the prediction is the answer, after `normalize_answer` on both."""
    return normalize_answer(prediction) == normalize_answer(answer)


DEFAULT_DIR = Path(__file__).resolve().parents[1] / "assets" / "example_task"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate the bundled example task.")
    parser.add_argument("--out", default=str(DEFAULT_DIR))
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--n-train", type=int, default=800)
    parser.add_argument("--n-heldout", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = generate_example_task(args.out, args.families, args.n_train, args.n_heldout, args.seed)
    for split, path in paths.items():
        print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
