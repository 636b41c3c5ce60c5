"""LLM-as-judge through any OpenAI-compatible endpoint (`tuneforge serve`, vLLM, OpenAI, ...).

    judge = JudgeClient("http://127.0.0.1:8000/v1", model="judge", cache_path=out / "judge_cache.jsonl")
    outcome = pairwise(judge, question, answer_1, answer_2)     # "win" | "tie" | "loss" for answer_1 (or None)
    rates = pairwise_rates(outcomes)                            # win/tie/loss rates + counts + bootstrap 95% CI
    score = grade(judge, question, answer)                      # 1..10 (or None)

Pairwise judging asks twice, with the answers in both orders, to cancel position bias (MT-Bench's practice); the
two verdicts for answer 1 are summed (+1 win, 0 tie, -1 loss): a win in one order and a loss in the other is a
tie. Requests run concurrently with retries and backoff; every reply is cached on disk by its request, so an
interrupted run resumes without asking again.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tuneforge.errors import UserError
from tuneforge.eval.store import end_torn_line

PAIRWISE_RUBRIC = ("Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
                   "assistants to the user question below. Consider helpfulness, relevance, accuracy, depth and "
                   "level of detail. Do not let the order of the responses, their length, or the assistants' names "
                   "influence you. After a short explanation, output your final verdict strictly in this format: "
                   "\"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie.")
GRADE_RUBRIC = ("Please act as an impartial judge and evaluate the quality of the response provided by an AI "
                "assistant to the user question below. Consider helpfulness, relevance, accuracy, depth and level "
                "of detail. After a short explanation, rate the response on a scale of 1 to 10 strictly in this "
                "format: \"Rating: [[5]]\".")


class JudgeClient:
    def __init__(self, base_url: str, model: str, api_key: str | None = None, cache_path: Path | None = None,
                 concurrency: int = 8, retries: int = 3, timeout: float = 120.0, max_tokens: int = 512):
        import httpx

        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.retries, self.concurrency, self.max_tokens = model, retries, concurrency, max_tokens
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(timeout=timeout, headers=headers)
        self.cache_path = Path(cache_path) if cache_path else None
        self.cache: dict[str, str] = {}
        self.lock = threading.Lock()
        if self.cache_path and self.cache_path.is_file():
            end_torn_line(self.cache_path)
            for line in self.cache_path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    self.cache[record["key"]] = record["reply"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a torn last line from an interrupted run

    def _key(self, messages: list[dict]) -> str:
        """A reply is reused only for the same endpoint, model, reply length and messages (rubric included): a
        bigger judge behind the same served name, or a longer max_tokens to stop cut verdicts, asks again."""
        request = [self.url, self.model, self.max_tokens, messages]
        return hashlib.sha1(json.dumps(request, ensure_ascii=False).encode()).hexdigest()

    def _post(self, messages: list[dict]) -> str:
        import httpx

        body = {"model": self.model, "messages": messages, "temperature": 0.0, "max_tokens": self.max_tokens}
        error, tries = None, 0
        for attempt in range(self.retries + 1):
            tries += 1
            try:
                r = self.http.post(self.url, json=body)
                if r.status_code in (429, 500, 502, 503, 504):
                    error = f"HTTP {r.status_code}"
                else:
                    r.raise_for_status()
                    return _reply_text(r.json())
            except (httpx.TransportError, httpx.HTTPStatusError, KeyError, IndexError, TypeError, ValueError) as e:
                error = f"{type(e).__name__}: {e}"
                if isinstance(e, httpx.HTTPStatusError) and e.response.status_code < 500:
                    # a client error (bad model name, bad key) will not go away on retry; its body says why
                    error = f"HTTP {e.response.status_code}: {e.response.text[:300]}"
                    break
            time.sleep(min(8.0, 0.5 * 2 ** attempt))
        raise UserError(f"The judge endpoint {self.url} failed after {tries} {'try' if tries == 1 else 'tries'} "
                        f"({error}). Check that the server is up, speaks OpenAI's chat-completions API and serves "
                        f"model `{self.model}`; finished judgements are cached, so a re-run continues from here.")

    def chat(self, messages: list[dict]) -> str:
        key = self._key(messages)
        with self.lock:
            if key in self.cache:
                return self.cache[key]
        reply = self._post(messages)
        with self.lock:
            self.cache[key] = reply
            if self.cache_path:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.cache_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n")
        return reply

    def chat_many(self, conversations: list[list[dict]]) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self.chat, conversations))


def _reply_text(body) -> str:
    """The assistant text of a chat-completions response; a body of another shape raises (and is retried)."""
    content = body["choices"][0]["message"]["content"]
    if content is not None and not isinstance(content, str):
        raise TypeError(f"`choices[0].message.content` is {type(content).__name__}, not text")
    return content or ""


_VERDICT = re.compile(r"\[\[\s*(A|B|C|TIE)\s*\]\]", re.IGNORECASE)
# The loose form ("My final verdict: Assistant B") takes the letters in capitals only: "my verdict is a tie" must
# not read the article "a" as assistant A.
_LOOSE = re.compile(r"(?:verdict|winner|better)\s*(?:is|:)?\s*\**\s*(?:(?:assistant|answer|response)\s*)?\(?\s*"
                    r"(?:\b(?-i:([ABC]))\b|(?:an?\s+)?\b(tie|draw)\b)", re.IGNORECASE)


def parse_verdict(reply: str) -> str | None:
    """'A', 'B' or 'tie' from a judge reply ([[A]] preferred; the last one wins), None when there is none."""
    found = _VERDICT.findall(reply) or ["".join(groups) for groups in _LOOSE.findall(reply)]
    if not found:
        return None
    v = found[-1].upper()
    return "tie" if v in ("C", "TIE", "DRAW") else v


def parse_rating(reply: str) -> float | None:
    """A 1-10 rating: [[7]] or [[7.5]], else 'Rating: 7', else '7/10'; None when absent or out of range."""
    for pattern in (r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]", r"rating\s*[:：]?\s*(\d+(?:\.\d+)?)", r"(\d+(?:\.\d+)?)\s*/\s*10"):
        found = re.findall(pattern, reply, re.IGNORECASE)
        if found:
            value = float(found[-1])
            return value if 1 <= value <= 10 else None
    return None


def _pair_prompt(rubric: str, question: str, a: str, b: str) -> list[dict]:
    user = (f"[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{a}\n[The End of Assistant A's "
            f"Answer]\n\n[The Start of Assistant B's Answer]\n{b}\n[The End of Assistant B's Answer]")
    return [{"role": "system", "content": rubric}, {"role": "user", "content": user}]


def combine(first: str | None, swapped: str | None) -> str | None:
    """Outcome for answer 1 from the verdict with it as A (`first`) and as B (`swapped`)."""
    if first is None or swapped is None:
        return None
    score = {"A": 1, "tie": 0, "B": -1}[first] + {"B": 1, "tie": 0, "A": -1}[swapped]
    return "win" if score > 0 else "loss" if score < 0 else "tie"


def pairwise_many(judge: JudgeClient, items: list[tuple[str, str, str]], rubric: str = PAIRWISE_RUBRIC) -> list[dict]:
    """items: (question, answer 1, answer 2). Both orders per item, all requests concurrent."""
    convs = []
    for q, a1, a2 in items:
        convs += [_pair_prompt(rubric, q, a1, a2), _pair_prompt(rubric, q, a2, a1)]
    replies = judge.chat_many(convs)
    out = []
    for i in range(len(items)):
        first, swapped = parse_verdict(replies[2 * i]), parse_verdict(replies[2 * i + 1])
        out.append({"verdict_first": first, "verdict_swapped": swapped, "outcome": combine(first, swapped),
                    "reply_first": replies[2 * i], "reply_swapped": replies[2 * i + 1]})
    return out


def pairwise(judge: JudgeClient, question: str, answer_1: str, answer_2: str, rubric: str = PAIRWISE_RUBRIC):
    return pairwise_many(judge, [(question, answer_1, answer_2)], rubric)[0]["outcome"]


def grade_many(judge: JudgeClient, items: list[tuple[str, str]], rubric: str = GRADE_RUBRIC) -> list[float | None]:
    convs = [[{"role": "system", "content": rubric},
              {"role": "user", "content": f"[Question]\n{q}\n\n[The Start of Assistant's Answer]\n{a}\n"
                                          f"[The End of Assistant's Answer]"}] for q, a in items]
    return [parse_rating(r) for r in judge.chat_many(convs)]


def grade(judge: JudgeClient, question: str, answer: str, rubric: str = GRADE_RUBRIC) -> float | None:
    return grade_many(judge, [(question, answer)], rubric)[0]


def pairwise_rates(outcomes: list[str | None], samples: int = 1000, seed: int = 0) -> dict[str, float]:
    """win/tie/loss rates over judged pairs (unparseable ones counted apart), with a bootstrap 95% CI of the win
    rate and of the score (win + tie/2)."""
    valid = [o for o in outcomes if o is not None]
    n = len(valid)
    counts = {"wins": valid.count("win"), "ties": valid.count("tie"), "losses": valid.count("loss")}
    if n == 0:  # no rate at all rather than a made-up 0 or tie: the report shows "-" and the invalid count
        return {"pairs": 0, "invalid": len(outcomes)} | counts
    rates = {k: valid.count(k) / n for k in ("win", "tie", "loss")}
    points = [1.0 if o == "win" else 0.5 if o == "tie" else 0.0 for o in valid]
    rng = random.Random(seed)
    wins, scores = [], []
    for _ in range(samples):
        draw = [rng.randrange(n) for _ in range(n)]
        wins.append(sum(valid[i] == "win" for i in draw) / n)
        scores.append(sum(points[i] for i in draw) / n)
    wins.sort()
    scores.sort()
    lo, hi = int(0.025 * samples), min(samples - 1, int(0.975 * samples))
    return {"win_rate": rates["win"], "tie_rate": rates["tie"], "loss_rate": rates["loss"],
            "win_rate_ci_low": wins[lo], "win_rate_ci_high": wins[hi], "score": sum(points) / n,
            "score_ci_low": scores[lo], "score_ci_high": scores[hi], "pairs": n, "invalid": len(outcomes) - n} | counts
