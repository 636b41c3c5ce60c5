"""Parsers and filters of `tuneforge data synth` on fixed strings (no teacher)."""

from __future__ import annotations

import pytest

from tuneforge.data.curate.synth import parse


def test_rouge_l_matches_the_lcs_definition():
    # LCS of "the cat sat on the mat" / "the cat lay on a mat" = the cat on mat (4); P = 4/6, R = 4/6
    assert parse.rouge_l("The cat sat on the mat.", "the cat lay on a mat") == pytest.approx(4 / 6)
    assert parse.rouge_l("a b c", "a b c") == 1.0
    assert parse.rouge_l("a b c", "x y z") == 0.0
    assert parse.rouge_l("", "x") == 0.0
    # Self-Instruct's near-copy of a seed task is over the 0.7 limit: LCS 8 of 10 and 8 tokens
    assert parse.rouge_l("What is the relation between the given pairs of words?",
                         "What is the relation between the given pairs?") == pytest.approx(2 * 0.8 / 1.8)


def test_rouge_l_agrees_with_rouge_score_when_installed():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for a, b in [("Write a poem about the sea at night.", "Compose a short poem about the night sea."),
                 ("List three prime numbers", "Give me three numbers that are prime, in a list")]:
        assert parse.rouge_l(a, b) == pytest.approx(scorer.score(b, a)["rougeL"].fmeasure)


def test_parse_instructions_continues_the_numbered_list():
    reply = "Give three tips for sleeping well.\n10. Task: Translate 'hello' into French.\n11) Instruction: Sort these"
    assert parse.parse_instructions(reply, 9) == ["Give three tips for sleeping well.",
                                                  "Task: Translate 'hello' into French.", "Sort these"]
    assert parse.parse_instructions("9. Name a color.\n10. Name a fruit.", 9) == ["Name a color.", "Name a fruit."]
    assert parse.parse_instructions("   ", 9) == []


@pytest.mark.parametrize("text,rule", [
    ("Hi there", "too_short"),
    (" ".join(["word"] * 151), "too_long"),
    ("Draw a cat sitting on a mat.", "blocked_keyword"),
    ("Plot the sales numbers by month.", "blocked_keyword"),
    ("Tell me how to go to the station.", "blocked_keyword"),
    ("Write a program that sorts numbers.", "blocked_keyword"),
    ("¿Qué hora es ahora mismo?", "starts_with_punctuation"),
    ("\"Quote\" this sentence for me please.", "starts_with_punctuation"),
    ("Éxplain why the sky is blue.", "non_ascii_start"),
    ("Explain why the sky is blue.", None),
    ("Summarise the profile of a mapmaker.", None),  # `map` only as a whole word
])
def test_instruction_rules(text, rule):
    assert parse.instruction_problem(text) == rule


def test_parse_instance():
    assert parse.parse_instance("Input: None\nOutput: 42") == ("", "42")
    assert parse.parse_instance("Input: 2 + 2\nOutput: 4\nmore") == ("2 + 2", "4\nmore")
    assert parse.parse_instance("Output: only this") == ("", "only this")
    assert parse.parse_instance("I cannot do that.") is None
    assert parse.parse_instance("Input: x\nOutput:   ") is None


def test_evolution_elimination_rules():
    original = "Name a fruit."
    assert parse.evolution_problem(original, "Name a fruit.", "Apple.") == "no_information_gain"
    assert parse.evolution_problem(original, "", "x") == "no_information_gain"
    assert parse.evolution_problem(original, "Name a red fruit as in the #Given Prompt#.", "Apple") == \
        "copied_prompt_words"
    assert parse.evolution_problem(original, "Name a tropical fruit grown in Peru and its season.",
                                   "Sorry, I cannot help with that.") == "sorry_answer"
    assert parse.evolution_problem(original, "Name a tropical fruit grown in Peru and its season.", "...") == \
        "empty_answer"
    long_sorry = "Sorry for the wait. " + "Cherimoya grows in the Andes valleys and ripens in winter. " * 10
    assert parse.evolution_problem(original, "Name a tropical fruit grown in Peru and its season.", long_sorry) is None
    assert parse.clean_evolved("#Rewritten Prompt#: Name two fruits.") == "Name two fruits."


@pytest.mark.parametrize("reply,score", [
    ("The answer is complete.\nScore: 4", 4), ("Score: **5**", 5), ("I'd give it 3/5.", 3),
    ("2", 2), ("It deserves a score of 5. Score: 3", 3), ("no idea", None), ("Score: 9", None),
])
def test_parse_score(reply, score):
    assert parse.parse_score(reply) == score


def test_parse_qa_and_grounding():
    reply = "1. Q: Who wrote it?\nA: Ada Lovelace wrote it.\n\nQuestion: When?\nAnswer: In 1843,\nin London.\nQ: x\n"
    assert parse.parse_qa(reply) == [("Who wrote it?", "Ada Lovelace wrote it."), ("When?", "In 1843,\nin London.")]
    chunk = "Ada Lovelace wrote the first program in 1843 in London."
    assert parse.grounded_share("Ada Lovelace wrote it.", chunk) == 1.0
    assert parse.grounded_share("Charles Babbage invented everything.", chunk) == 0.0


def test_html_text_drops_markup_scripts_and_styles():
    html = ("<html><head><title>T</title><style>p{color:red}</style></head><body><h1>Title</h1><p>One &amp; two."
            "</p><script>alert(1)</script><ul><li>item</li></ul></body></html>")
    text = parse.html_text(html)
    assert text == "# Title\n\nOne & two.\n\nitem"


def test_chunks_respect_size_paragraphs_and_overlap():
    paragraphs = [f"# Part {k}\n" + " ".join(f"w{k}_{i}" for i in range(30)) for k in range(8)]
    text = "\n\n".join(paragraphs) + "\n\n" + "x" * 700
    spans = parse.chunks(text, max_chars=400, overlap=50)
    assert all(b - a <= 400 for a, b in spans)
    covered = set()
    for a, b in spans:
        covered.update(range(a, b))
    assert all(k in covered for k, c in enumerate(text) if not c.isspace())  # no text lost
    assert all(spans[i + 1][0] < spans[i][1] for i in range(len(spans) - 1))  # consecutive chunks overlap
    assert all(spans[i + 1][1] - spans[i][1] > 0 for i in range(len(spans) - 1))  # and move forward
    assert text[spans[0][0]:].startswith("# Part 0")


@pytest.mark.parametrize("reply,score", [
    ("This is a great answer. I would give it a 5 out of 5.", 5),
    ("Score: 5\n\nNote: a score of 1 would mean irrelevant.", 5),  # the stated rating, not the note's number
    ("**Score:** 4\n\nA 2/5 answer would have missed the point.", 4),
    ("评分：4", 4), ("分数: 3\n理由：回答完整。", 3), ("Rating: 2", 2), ("Score: 10", None),
])
def test_parse_score_phrasings(reply, score):
    assert parse.parse_score(reply) == score


def test_chinese_is_tokenized_per_character():
    text = "抱歉，我无法回答这个问题。"
    assert parse.rouge_l(text, text) == 1.0
    assert parse.rouge_l("用 Python 写代码", "用Python写代码！") == 1.0  # Latin words stay words
    assert 0 < parse.rouge_l("请解释光合作用的过程", "请解释呼吸作用的过程") < 1
    assert parse.instruction_problem("请用三句话解释光合作用的过程。") is None  # 15 characters, not too short
    assert parse.instruction_problem("你好") == "too_short"
    assert parse.instruction_problem("请画出一张地图，标出长城的位置。") == "blocked_keyword"


def test_chinese_grounding_and_refusals():
    chunk = "细胞学说是生物科学的一个理论，它指出一切生物都由细胞构成。"
    assert parse.grounded_share("生物科学的一个理论", chunk) == 1.0  # an exact quote
    assert parse.grounded_share("量子色动力学解释了强相互作用", chunk) < 0.2  # made up
    for refusal in ("抱歉，我无法回答这个问题。", "对不起，这个我不能帮你。", "作为一个AI，我没有个人观点。"):
        assert parse.evolution_problem("写一首诗", "写一首关于冬天的七言绝句", refusal) == "sorry_answer"
    assert parse.evolution_problem("写一首诗", "写一首关于冬天的七言绝句", "北风卷地白草折，胡天八月即飞雪。") is None
