"""A small byte-level BPE tokenizer trained locally (about a second) for the `init-model` presets.

    tok = train_tokenizer(TokenizerSpec(...), vocab_size=1536)   # a transformers fast tokenizer

Why train one instead of shipping one: tests need tokenizers with the same *shape* as real model families
(Llama-3 and Qwen2 special tokens, chat templates, digit splitting, specials at the end of the vocabulary) but must
stay tiny and offline. The `tokenizers` library does the training; the text is our own corpus under
`tuneforge/assets/corpus/` plus lines generated here that cover the bundled example task (digits, arithmetic,
units, ASCII, common Chinese characters). Byte-level BPE encodes any text; the corpus only decides the merges.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent.parent / "assets" / "corpus"

# The pre-tokenizer split of GPT-4/Llama-3/Qwen2 tokenizers (a public format spec): contractions, words with one
# leading non-letter, numbers, punctuation runs, newlines, spaces. `{digits}` is `{1,3}` for Llama-3 (numbers in
# groups of up to three digits) and empty for Qwen2 (every digit its own token).
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}DIGITS"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# About 500 frequent Chinese characters, so common words get merges even when the corpus files do not use them.
COMMON_HANZI = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而"
    "方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好"
    "应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向"
    "道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特"
    "件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队"
    "南给色光门即保治北造百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权收证改清美再采转更单风切"
    "打白教速花带安场身车例真务具万每目至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步"
    "群广石记需段研界拉林律叫且究观越织装影算低持音众书布复容儿须际商非验连断深难近矿千周委素技备半办青省列习"
    "响约支般史感劳便团往酸历市克何除消构府称太准精值号率族维划选标写存候毛亲快效斯院查江型眼王按格养易置派层"
    "片始却专状育厂京识适属圆包火住调满县局照参红细引听该铁价严龙飞您谁吗呢吧啊哪怎够字词句母英语汉换算加减乘"
    "除等于米克升秒钟分时天周年倒转写大小元音辅数个答案问题助手模型训练名字叫做请回"
)


@dataclass(frozen=True)
class TokenizerSpec:
    """What a preset's tokenizer looks like: special tokens (appended after the BPE vocabulary, like real models),
    which of them play bos/eos/pad, whether bos is prepended when encoding, and the chat template."""

    special_tokens: tuple[str, ...]
    eos: str
    pad: str
    bos: str | None = None
    add_bos: bool = False  # Llama-3 prepends <|begin_of_text|> on every encode; Qwen2 adds nothing
    digits: str = "single"  # "single" (Qwen2) or "triples" (Llama-3)
    chat_template: str = ""
    model_max_length: int = 2048


def generated_lines() -> list[str]:
    """Lines made by code: arithmetic, unit conversions, counting, ASCII and Chinese characters."""
    lines = [" ".join(str(n) for n in range(start, start + 50)) for start in range(0, 1000, 50)]
    for a in range(0, 60, 7):
        for b in range(1, 40, 9):
            lines.append(f"{a} + {b} = {a + b}; {a} - {b} = {a - b}; {a} * {b} = {a * b}; {a} 加 {b} 等于 {a + b}")
    units = [("kilometers", "meters", "千米", "米", 1000), ("meters", "centimeters", "米", "厘米", 100),
             ("kilograms", "grams", "千克", "克", 1000), ("hours", "minutes", "小时", "分钟", 60),
             ("minutes", "seconds", "分钟", "秒", 60), ("liters", "milliliters", "升", "毫升", 1000)]
    for big, small, big_zh, small_zh, factor in units:
        for n in (1, 2, 3, 5, 8, 12):
            lines.append(f"Convert {n} {big} to {small}: {n * factor} {small}. {n} {big_zh}等于 {n * factor} {small_zh}。")
    lines.append("".join(chr(c) for c in range(32, 127)))
    lines.append("ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789")
    lines += [COMMON_HANZI[i:i + 40] for i in range(0, len(COMMON_HANZI), 40)]
    return lines


def corpus_lines() -> list[str]:
    """The training text: bundled corpus files (sorted, so training is deterministic) plus generated lines."""
    lines = []
    for path in sorted(CORPUS_DIR.glob("*.txt")):
        lines += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines + generated_lines()


def _backend(spec: TokenizerSpec, vocab_size: int):
    """Train the `tokenizers` BPE model; specials are added afterwards so their ids come last (as in Llama/Qwen)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    pattern = SPLIT_PATTERN.replace("DIGITS", "{1,3}" if spec.digits == "triples" else "")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.special_tokens])
    if spec.add_bos:
        bos_id = tok.token_to_id(spec.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B", special_tokens=[(spec.bos, bos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train_tokenizer(spec: TokenizerSpec, vocab_size: int = 1536):
    """A transformers fast tokenizer: byte-level BPE with `vocab_size` learned tokens + the spec's specials."""
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size {vocab_size} is too small: byte-level BPE needs 256 byte tokens plus merges")
    return PreTrainedTokenizerFast(
        tokenizer_object=_backend(spec, vocab_size), bos_token=spec.bos, eos_token=spec.eos, pad_token=spec.pad,
        chat_template=spec.chat_template, model_max_length=spec.model_max_length, padding_side="right",
        clean_up_tokenization_spaces=False)
