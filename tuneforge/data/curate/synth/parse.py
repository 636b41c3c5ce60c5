"""Parsers and filters of teacher replies: fixed-string functions, unit-tested without a teacher."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from tuneforge.data.curate.text import is_cjk, units

# ---- ROUGE-L ------------------------------------------------------------------------------------------------------

def _tokens(text: str) -> tuple[str, ...]:
    # The data tools' units (text.units): for English rouge-score's default tokenizer as Self-Instruct used it
    # (lowercase, non-alphanumerics as spaces, no stemming); every CJK character one token, as Chinese has no spaces
    # (rouge-score's tokenizer drops CJK altogether, so two identical Chinese texts would score 0)
    return units(text)


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 of two texts by their longest common subsequence of tokens. Our own LCS (a few lines) rather than
    the rouge-score package: the same number for these tokens, and no dependency for the data tools."""
    x, y = _tokens(a), _tokens(b)
    if not x or not y:
        return 0.0
    prev = [0] * (len(y) + 1)
    for tx in x:
        cur = [0]
        for j, ty in enumerate(y, start=1):
            cur.append(prev[j - 1] + 1 if tx == ty else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(x), lcs / len(y)
    return 2 * p * r / (p + r)


# ---- self_instruct ------------------------------------------------------------------------------------------------

# Self-Instruct (Wang et al. 2022, section 2.2 / its code): tasks a text-only model cannot do, and program-writing
BLOCKED_WORDS = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
                 "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
# the same in Chinese (no word boundaries there: matched as substrings)
BLOCKED_ZH = ("图片", "图像", "图表", "画一", "画出", "绘制", "视频", "音频", "音乐", "流程图", "地图", "文件", "编写程序",
              "写一个程序")


def parse_instructions(reply: str, first_number: int) -> list[str]:
    """Numbered tasks from a reply that continues a list at `first_number` ("9. ..." or "Task 9: ...")."""
    text = f"{first_number}. {reply.lstrip()}" if not re.match(r"\s*(task\s*)?\d+\s*[.:)]", reply, re.I) else reply
    items = re.split(r"(?:^|\n)\s*(?:task\s*)?\d+\s*[.:)]\s*", text, flags=re.I)
    out = []
    for item in items:
        item = re.sub(r"^\s*instruction\s*:\s*", "", item.strip(), flags=re.I).strip()
        if item:
            out.append(re.sub(r"\s+", " ", item))
    return out


def instruction_problem(text: str) -> str | None:
    """Why Self-Instruct would drop this instruction (its rule name), or None to keep it. Words are text.units
    (a CJK character counts as one). The paper's non-ASCII rule keeps English tasks English; a task starting with
    a CJK character is a Chinese/Japanese/Korean task, kept, so a bilingual seed set can grow in both languages."""
    n_words = len(units(text))
    if n_words < 3:
        return "too_short"
    if n_words > 150:
        return "too_long"
    lowered = text.lower()
    if any(re.search(rf"\b{re.escape(w)}\b", lowered) for w in BLOCKED_WORDS) or any(w in text for w in BLOCKED_ZH):
        return "blocked_keyword"
    if lowered.startswith("write a program"):
        return "blocked_keyword"
    if not text[0].isalnum():
        return "starts_with_punctuation"
    if not text[0].isascii() and not is_cjk(text[0]):
        return "non_ascii_start"
    return None


def parse_instance(reply: str) -> tuple[str, str] | None:
    """(input, output) from "Input: ...\\nOutput: ..." (input may be empty or "None"); None when there is no output."""
    m = re.search(r"output\s*:\s*(.*)", reply, re.I | re.S)
    if not m or not m.group(1).strip():
        return None
    head = reply[:m.start()]
    i = re.search(r"input\s*:\s*(.*)", head, re.I | re.S)
    given = i.group(1).strip() if i else ""
    if given.lower().strip(" .<>") in ("none", "noinput", "no input", "n/a", ""):
        given = ""
    return given, m.group(1).strip()


# ---- evol_instruct ------------------------------------------------------------------------------------------------

EVOL_ECHOES = ("#given prompt#", "#rewritten prompt#", "#created prompt#", "given prompt", "rewritten prompt",
               "created prompt")


def clean_evolved(reply: str) -> str:
    """The evolved instruction from a reply (a leading "#Rewritten Prompt#:" label removed)."""
    text = reply.strip()
    text = re.sub(r"^\s*#?\s*(rewritten|created)\s+prompt\s*#?\s*:?\s*", "", text, flags=re.I)
    return text.strip()


def evolution_problem(original: str, evolved: str, answer: str | None) -> str | None:
    """WizardLM's elimination rules (Xu et al. 2023, section 3.3), or None when the evolution succeeded:
    no_information_gain   the evolved instruction is (nearly) the original (ROUGE-L >= 0.95: the paper asks
                          ChatGPT to judge this; a near-copy is the case a string test catches)
    sorry_answer          the teacher cannot answer it: a short answer (< 80 words, a CJK character counting as a
                          word) containing "sorry" or a Chinese refusal (SORRY_ZH)
    empty_answer          the answer is empty or only punctuation/stop words
    copied_prompt_words   the evolved instruction copies words of the evolving prompt (#Rewritten Prompt# ...)"""
    if not evolved or rouge_l(original, evolved) >= 0.95:
        return "no_information_gain"
    if any(e in evolved.lower() for e in EVOL_ECHOES):
        return "copied_prompt_words"
    if answer is None:
        return "no_answer"
    if is_sorry(answer):
        return "sorry_answer"
    if not re.search(r"\w", answer) or all(w.lower() in STOP_WORDS for w in re.findall(r"\w+", answer)):
        return "empty_answer"
    return None


STOP_WORDS = frozenset("a an the and or of to in on is are was be it this that i you ok okay yes no".split())
# Chinese refusals: "sorry", "I cannot/am unable to", "as an AI (language model)"
SORRY_ZH = ("抱歉", "对不起", "很遗憾", "我无法", "我不能", "作为一个ai", "作为ai", "作为一个人工智能", "作为人工智能",
            "作为一个语言模型", "作为一个ai语言模型")


def is_sorry(answer: str) -> bool:
    text = answer.lower().replace(" ", "")
    return len(units(answer)) < 80 and ("sorry" in answer.lower() or any(p in text for p in SORRY_ZH))


# ---- backtranslate ------------------------------------------------------------------------------------------------

_LABEL = r"(?:score|rating|评分|分数|得分|打分)"
SCORE_FORMS = (  # strongest first: a form found in the reply wins over the weaker ones
    # a line that states the rating, as the prompt asks ("Score: 4", "**Final score:** 5", "评分：4")
    re.compile(rf"^[\s*#>-]*(?:final\s+|overall\s+|最终)?{_LABEL}\s*\**\s*[:：]\s*\**\s*([1-5])(?!\d)", re.I | re.M),
    # the same label inside a sentence ("... Score: 3")
    re.compile(rf"{_LABEL}\s*\**\s*[:：]\s*\**\s*([1-5])(?!\d)", re.I),
    # loose phrasings: "a score of 5", "4/5", "5 out of 5", a reply that is a lone digit
    re.compile(r"score\s*(?:is|of)?\s*\**\s*([1-5])\b|\b([1-5])\s*(?:/|out\s+of)\s*5\b|^\s*\**([1-5])\**\s*\.?\s*$",
               re.I | re.M),
)


def parse_score(reply: str) -> int | None:
    """A 1-5 score. A stated rating ("Score: 4" on its own line, "评分：4") wins over a number in the notes ("a score
    of 1 would mean..."); within the strongest form found, the last one wins (judges reason first and conclude
    with the score). None when no score is given."""
    for form in SCORE_FORMS:
        found = form.findall(reply)
        if found:
            last = found[-1]
            return int(next(g for g in last if g) if isinstance(last, tuple) else last)
    return None


def clean_instruction(reply: str) -> str:
    text = re.sub(r"^\s*(instruction|question|prompt)\s*:\s*", "", reply.strip(), flags=re.I)
    return text.strip().strip('"').strip()


# ---- qa_from_docs -------------------------------------------------------------------------------------------------

def parse_qa(reply: str) -> list[tuple[str, str]]:
    """(question, answer) pairs from "Q: ...\\nA: ..." blocks (also "Question:"/"Answer:", numbered or not)."""
    pairs = []
    pattern = r"(?:^|\n)\s*(?:\d+\s*[.)]\s*)?(?:q|question)\s*\d*\s*[:：]\s*(.*?)\n\s*(?:a|answer)\s*\d*\s*[:：]\s*(.*?)" \
              r"(?=\n\s*(?:\d+\s*[.)]\s*)?(?:q|question)\s*\d*\s*[:：]|\Z)"
    for q, a in re.findall(pattern, reply, re.I | re.S):
        q, a = q.strip(), a.strip()
        if q and a:
            pairs.append((q, a))
    return pairs


def grounded_share(answer: str, chunk: str) -> float:
    """Share of the answer's content terms found in the chunk: an answer taken from the text scores high, one the
    teacher made up from its own knowledge low. Terms: words of 4+ letters (any length outside ASCII) and, for
    CJK text, pairs of adjacent characters (single characters such as 的 or 是 are in any Chinese text, so they
    would make any answer look grounded)."""
    terms = _content_terms(answer)
    if not terms:
        return 1.0
    seen = set(_content_terms(chunk))
    return sum(t in seen for t in terms) / len(terms)


def _content_terms(text: str) -> list[str]:
    terms, run = [], []
    for unit in (*units(text), ""):  # "" ends the last CJK run
        if unit and is_cjk(unit):
            run.append(unit)
            continue
        terms += ["".join(run[k:k + 2]) for k in range(max(len(run) - 1, 1 if run else 0))]
        run = []
        if len(unit) >= 4 or (unit and not unit.isascii()):
            terms.append(unit)
    return terms


class _Text(HTMLParser):
    BLOCKS = {"p", "div", "br", "li", "tr", "section", "article", "h1", "h2", "h3", "h4", "h5", "h6", "pre",
              "blockquote", "table", "ul", "ol", "header", "footer"}
    SKIP = {"script", "style", "head", "noscript", "template"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skipping = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n\n" + ("#" * int(tag[1]) + " " if tag in ("h1", "h2", "h3", "h4", "h5", "h6")
                                        else ""))

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def html_text(html: str) -> str:
    """The visible text of an HTML page (scripts and styles dropped; headings as markdown `#` lines, blocks as
    paragraphs), with the standard library's parser."""
    parser = _Text()
    parser.feed(html)
    parser.close()
    text = "".join(parser.parts)
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def blocks(text: str) -> list[tuple[int, int]]:
    """(start, end) spans of paragraphs: split at blank lines and before markdown headings."""
    spans, start = [], None
    for m in re.finditer(r"[^\n]*(?:\n|$)", text):
        line = m.group()
        if not line:
            break
        if not line.strip() or re.match(r"\s{0,3}#{1,6}\s", line):
            if start is not None:
                spans.append((start, m.start()))
            start = None if not line.strip() else m.start()
        elif start is None:
            start = m.start()
    if start is not None and start < len(text):
        spans.append((start, len(text)))
    return [(a, b) for a, b in spans if text[a:b].strip()]


def chunks(text: str, max_chars: int = 2000, overlap: int = 200) -> list[tuple[int, int]]:
    """(start, end) character spans of chunks of at most `max_chars`: whole paragraphs packed together (a heading
    starts a new paragraph; a paragraph longer than max_chars - overlap is cut in pieces of that size), and every
    chunk after the first starts `overlap` characters before its first paragraph, repeating the end of the one
    before (context for questions on the boundary)."""
    limit = max_chars - overlap
    pieces = []
    for a, b in blocks(text):
        pieces += [(s, min(s + limit, b)) for s in range(a, b, limit)]
    out: list[tuple[int, int]] = []
    start = end = None
    for a, b in pieces:
        if start is not None and b - start <= max_chars:
            end = b
            continue
        if start is not None:
            out.append((start, end))
        start, end = (max(a - overlap, 0) if out else a), b
    if start is not None:
        out.append((start, end))
    return out
