"""Metric values equal sacrebleu / rouge-score computed directly on the same strings (English and Chinese)."""

from __future__ import annotations

import jieba
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from tuneforge.eval.metrics import corpus_bleu, extract_number, rouge, text_metrics

EN_PRED = ["the cat sat on the mat", "a quick brown fox jumps", "hello world"]
EN_REF = ["the cat is on the mat", "the quick brown fox jumps over", "hello world"]
ZH_PRED = ["今天天气很好，我们去公园散步。", "我喜欢吃苹果"]
ZH_REF = ["今天天气不错，我们一起去公园散步吧。", "我爱吃苹果和香蕉"]


def test_bleu_equals_sacrebleu_english_and_chinese():
    assert corpus_bleu(EN_PRED, EN_REF) == pytest.approx(sacrebleu.corpus_bleu(EN_PRED, [EN_REF]).score)
    want = sacrebleu.corpus_bleu(ZH_PRED, [ZH_REF], tokenize="zh").score
    assert corpus_bleu(ZH_PRED, ZH_REF) == pytest.approx(want) and 0 < want < 100


def test_rouge_equals_rouge_score_english():
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for key in ("rouge1", "rouge2", "rougeL"):
        want = sum(scorer.score(r, p)[key].fmeasure for p, r in zip(EN_PRED, EN_REF)) / len(EN_PRED)
        assert rouge(EN_PRED, EN_REF)[key] == pytest.approx(want)


def test_rouge_chinese_is_segmented_with_jieba():
    class Words:
        def tokenize(self, text):
            return [w for w in jieba.lcut(text) if w not in "，。！？ "]

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=Words())
    got = rouge(ZH_PRED, ZH_REF)
    for key in ("rouge1", "rouge2", "rougeL"):
        want = sum(scorer.score(r, p)[key].fmeasure for p, r in zip(ZH_PRED, ZH_REF)) / len(ZH_PRED)
        assert got[key] == pytest.approx(want)
    assert 0 < got["rouge1"] < 1  # rouge-score's default tokenizer would erase Chinese and give 0


def test_exact_match_and_gsm8k_extraction():
    assert text_metrics(["7", "Hello."], ["7", "hello"])["exact_match"] == 0.5
    assert extract_number("so 3 + 4 = 7 apples\n#### 1,234") == "1234"
    assert extract_number("She pays $18.00 in the end.") == "18"
    assert extract_number("The answer is -5.") == "-5"
    assert extract_number("no digits") is None
    assert extract_number("#### 18\nQuestion: and twice that?\n#### 36") == "18"  # the first answer counts
    assert extract_number("#### \n#### 7") == "7"
    assert extract_number("#### .5") == "0.5" == extract_number("#### 0.50") and extract_number("-.5 m") == "-0.5"


def test_gsm8k_instruction_gives_nothing_to_copy_after_the_marks():
    """"End with a line '#### N' where N is the final number" made SmolLM2-135M-Instruct write a literal "#### N"
    (2 of 10 GSM8K test questions, 4-shot), and "for example '#### 42'" made it end 5 of 10 with "#### 42", which
    is then scored as its answer: the instruction names the marks and says a number follows, nothing to copy."""
    import re

    from tuneforge.eval.generation_tasks import gsm8k_messages

    asked = gsm8k_messages("What is 1 + 1?", [], cot=True)[-1]["content"]
    instruction = asked.removeprefix("What is 1 + 1?\n")
    assert "####" in instruction and "number" in instruction
    assert not re.search(r"####\s*(\w|<)", instruction)  # no "#### N", "#### <number>" or "#### 42"
    assert gsm8k_messages("What is 1 + 1?", [], cot=False)[-1]["content"] == "What is 1 + 1?"


def test_generation_uses_the_adapter_on_the_model(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.eval.generation_tasks import generate_replies

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompts = [[{"role": "user", "content": "Who are you?"}]]
    base = generate_replies(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), tokenizer, prompts, 8)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    lora = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    tuned = generate_replies(get_peft_model(model, lora).eval(), tokenizer, prompts, 8)
    assert tuned[0][0] != base[0][0]  # a random, non-zero LoRA changes greedy text; the engine must not run the bare base


def test_report_shows_a_missing_rate_as_a_dash_and_count_deltas_whole():
    """A grade task where every grade was invalid has no judge_score: the row stays, with "-", not vanished."""
    from tuneforge.eval.report import table

    results = {"base": {"grade:p": {"judge_score": 6.5, "judge_invalid": 1}},
               "tuned": {"grade:p": {"judge_score": None, "judge_invalid": 3}}}
    rows = table(results, "base")
    assert rows[0] == ["task", "metric", "base", "tuned", "tuned - base"]
    assert ["grade:p", "judge_score", "6.5000", "-", "-"] in rows
    assert ["grade:p", "judge_invalid", "1", "3", "+2"] in rows


def test_perplexity_of_a_preference_file_is_that_of_its_prompts_and_chosen_replies(tiny_llama_dir, tmp_path):
    """ppl:PAIRS.json raised AttributeError ('PairExample' has no `text`); it scores the text the data prefers."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.eval.generation_tasks import run_perplexity
    from tuneforge.eval.loglik import perplexity

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."}) + "\n")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    got = run_perplexity(model, tokenizer, str(pairs), tmp_path / "out")
    assert got == perplexity(model, tokenizer, ["Name a colour.\nBlue."])


def test_perplexity_saves_each_text_and_a_rerun_scores_only_new_or_edited_rows(tiny_llama_dir, tmp_path,
                                                                                monkeypatch):
    """ppl: wrote no predictions.jsonl and recomputed everything on every run, unlike every other task (the README
    promises a re-run redoes nothing)."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.eval import loglik
    from tuneforge.eval.generation_tasks import run_perplexity

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("One fish.", "Two fish.", "Red fish.")))
    first = run_perplexity(model, tokenizer, str(data), tmp_path / "out")
    assert first == loglik.perplexity(model, tokenizer, ["One fish.", "Two fish.", "Red fish."])
    records = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [f"{data}:line {i}" for i in (1, 2, 3)] and all(r["tokens"] for r in records)
    scored = []
    real = loglik._text_nll
    monkeypatch.setattr(loglik, "_text_nll", lambda *a: scored.append(a[1]) or real(*a))
    assert run_perplexity(model, tokenizer, str(data), tmp_path / "out") == first and scored == []
    data.write_text(data.read_text().replace("Two fish.", "Blue fish."))
    again = run_perplexity(model, tokenizer, str(data), tmp_path / "out")
    assert len(scored) == 1 and again == loglik.perplexity(model, tokenizer, ["One fish.", "Blue fish.", "Red fish."])


def test_perplexity_scores_every_token_of_a_long_text_in_strided_windows(tiny_llama_dir):
    """A text longer than max_length was cut: its tail went unscored and `tokens` undercounted. Now every token is
    scored; a text that fits one window is scored with its whole context, exactly as one forward pass does, and a
    longer one in windows whose first half is context only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.eval.loglik import perplexity

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = "The quick brown fox jumps over the lazy dog. " * 6
    ids = tokenizer(text).input_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
    whole = perplexity(model, tokenizer, [text], max_length=len(ids))
    assert whole["tokens"] == len(ids) - 1
    assert whole["nll_per_token"] == pytest.approx(nll.mean().item(), rel=1e-5)
    windowed = perplexity(model, tokenizer, [text], max_length=16)  # windows 0-15, 8-23, 16-31, ...: stride 8
    assert len(ids) % 8 == 0 and len(ids) > 16  # whole windows, as the reference below reads them
    assert windowed["tokens"] == len(ids) - 1
    expected = nll[:15].sum().item()
    for begin in range(8, len(ids) - 8, 8):
        window = torch.tensor([ids[begin:begin + 16]])
        with torch.no_grad():
            part = model(input_ids=window).logits[0, -9:-1]
        expected += torch.nn.functional.cross_entropy(part, window[0, -8:], reduction="sum").item()
    assert windowed["nll_per_token"] == pytest.approx(expected / (len(ids) - 1), rel=1e-5)


def test_report_keeps_each_tasks_rows_together():
    """The pairwise rates exist only for the non-baseline models, added after every task ran: their rows came after
    the next task's rows, splitting the judge task in two in report.md."""
    from tuneforge.eval.report import table

    results = {"base": {"judge:p": {"truncated_replies": 0}, "ppl:p": {"perplexity": 9.0}},
               "tuned": {"judge:p": {"truncated_replies": 1, "win_rate": 0.5}, "ppl:p": {"perplexity": 8.0}}}
    assert [row[:2] for row in table(results, "base")[1:]] == [
        ["judge:p", "truncated_replies"], ["judge:p", "win_rate"], ["ppl:p", "perplexity"]]


def test_chart_draws_no_bar_for_a_missing_value(monkeypatch):
    """The baseline has no win_rate against itself (and a judge that parsed nothing gives none): the chart drew
    those as bars at 0, a loss the report table does not show."""
    import math

    import matplotlib.axes

    from tuneforge.eval.report import chart_png

    drawn = []
    real = matplotlib.axes.Axes.bar
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", lambda self, x, h, *a, **k: drawn.append(list(h))
                        or real(self, x, h, *a, **k))
    assert chart_png({"base": {"judge:p": {"truncated_replies": 0}},
                      "tuned": {"judge:p": {"truncated_replies": 0, "win_rate": 0.5}}}, "judge:p")
    assert drawn[0][0] == 0 and math.isnan(drawn[0][1]) and drawn[1] == [0, 0.5]
