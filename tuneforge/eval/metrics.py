"""Text metrics for generation tasks: BLEU (sacrebleu), ROUGE-1/2/L (rouge-score), exact match, GSM8K answers.

    corpus_bleu(predictions, references)            # 0-100, sacrebleu's scale; Chinese uses its "zh" tokenizer
    rouge(predictions, references)                  # mean F1 in [0, 1]; Chinese is segmented with jieba first
    extract_number("... #### 1,234")                # "1234"

Chinese text is detected per corpus (any CJK character in the references). rouge-score's own tokenizer keeps only
[a-z0-9], which would erase Chinese, so Chinese goes through jieba and is joined with spaces, as the field does.
"""

from __future__ import annotations

import re

_CJK = re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf]")
_NUMBER = re.compile(r"-?\$?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")  # .5 too: its point is kept


def is_chinese(texts: list[str]) -> bool:
    return any(_CJK.search(t) for t in texts)


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    import sacrebleu

    tokenize = "zh" if is_chinese(references) else "13a"
    return float(sacrebleu.corpus_bleu(predictions, [references], tokenize=tokenize).score)


class _JiebaTokenizer:
    """rouge-score's tokenizer interface over jieba words (punctuation and spaces dropped, English lowercased)."""

    def tokenize(self, text: str) -> list[str]:
        import logging

        import jieba

        jieba.setLogLevel(logging.WARNING)  # its DEBUG lines ("Building prefix dict ...") went to the console
        return [w.lower() for w in jieba.lcut(text) if w.strip() and re.search(r"\w", w)]


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 over pairs."""
    from rouge_score import rouge_scorer

    keys = ["rouge1", "rouge2", "rougeL"]
    tokenizer = _JiebaTokenizer() if is_chinese(references) else None
    scorer = rouge_scorer.RougeScorer(keys, use_stemmer=False, tokenizer=tokenizer)
    totals = dict.fromkeys(keys, 0.0)
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)
        for k in keys:
            totals[k] += scores[k].fmeasure
    n = max(1, len(predictions))
    return {k: v / n for k, v in totals.items()}


def exact_match_rate(predictions: list[str], references: list[str]) -> float:
    from tuneforge.data.example_task import exact_match

    return sum(exact_match(p, r) for p, r in zip(predictions, references)) / max(1, len(predictions))


def _clean_number(text: str) -> str:
    text = text.replace(",", "").replace("$", "").rstrip(".")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    if text.startswith(("-.", ".")):
        text = text.replace(".", "0.", 1)  # .5 and 0.5 are one answer
    return text


def extract_number(text: str) -> str | None:
    """GSM8K's answer: the number after the first `####` that has one (lm-evaluation-harness' strict match: a model
    that goes on to invent a follow-up question and its `#### N` is held to its first answer), else the last number
    in the text."""
    for after in text.split("####")[1:]:
        found = _NUMBER.findall(after)
        if found:
            return _clean_number(found[0])
    found = _NUMBER.findall(text)
    return _clean_number(found[-1]) if found else None


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    return {"bleu": corpus_bleu(predictions, references), **rouge(predictions, references),
            "exact_match": exact_match_rate(predictions, references)}
