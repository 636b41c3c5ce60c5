"""LLM-as-judge against a local stub OpenAI server: messy replies, order swapping, retries, cache, rate arithmetic."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.eval.openai_stub import send_chat_reply
from tuneforge.eval.judge import (
    JudgeClient,
    combine,
    grade_many,
    pairwise_many,
    pairwise_rates,
    parse_rating,
    parse_verdict,
)


class _Judge(BaseHTTPRequestHandler):
    """Prefers the answer containing GOOD; with POSITION_BIAS always says A. The first request fails with 503."""

    calls: list = []
    position_bias = False

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append(body)
        if len(type(self).calls) == 1:
            self.send_response(503)
            self.end_headers()
            return
        user = body["messages"][-1]["content"]
        if "Rating" in body["messages"][0]["content"]:
            reply = "Decent answer. Rating: [[8]]" if "GOOD" in user else "weak... 3/10"
        else:
            a = re.search(r"Assistant A's Answer\]\n(.*?)\n\[The End", user, re.S).group(1)
            b = re.search(r"Assistant B's Answer\]\n(.*?)\n\[The End", user, re.S).group(1)
            verdict = "A" if self.position_bias else "A" if "GOOD" in a else "B" if "GOOD" in b else "C"
            reply = f"**Explanation**: both try.\n\nFinal verdict: [[{verdict}]]"
        send_chat_reply(self, reply)


@pytest.fixture
def stub():
    _Judge.calls, _Judge.position_bias = [], False
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_pairwise_both_orders_retries_and_cache(stub, tmp_path):
    judge = JudgeClient(stub, "judge", cache_path=tmp_path / "cache.jsonl", concurrency=4)
    items = [("q1", "GOOD answer", "bad"), ("q2", "bad", "GOOD one"), ("q3", "meh", "meh too")]
    results = pairwise_many(judge, items)
    assert [r["outcome"] for r in results] == ["win", "loss", "tie"]
    assert results[0]["verdict_first"] == "A" and results[0]["verdict_swapped"] == "B"
    assert len(_Judge.calls) == 7  # 6 judgements + the 503 that was retried
    again = JudgeClient(stub, "judge", cache_path=tmp_path / "cache.jsonl")
    assert pairwise_many(again, items) == results and len(_Judge.calls) == 7  # all from the cache
    longer = JudgeClient(stub, "judge", cache_path=tmp_path / "cache.jsonl", max_tokens=1024)
    pairwise_many(longer, items[:1])
    assert len(_Judge.calls) == 9  # another reply length (the documented fix for cut verdicts) asks again
    elsewhere = JudgeClient(stub + "/", "judge", cache_path=tmp_path / "cache.jsonl")
    pairwise_many(elsewhere, items[:1])
    assert len(_Judge.calls) == 9  # the same endpoint spelled with a trailing slash is the same judge


def test_position_bias_cancels_to_ties(stub):
    _Judge.position_bias = True
    results = pairwise_many(JudgeClient(stub, "judge"), [("q", "GOOD", "bad"), ("q", "bad", "GOOD")])
    assert [r["outcome"] for r in results] == ["tie", "tie"]


def test_single_answer_grades(stub):
    assert grade_many(JudgeClient(stub, "judge"), [("q", "GOOD"), ("q", "poor")]) == [8.0, 3.0]


@pytest.mark.parametrize("reply,want", [("[[A]]", "A"), ("blah [[ b ]] blah", "B"), ("It's a tie: [[C]]", "tie"),
                                        ("I first thought [[A]] but the final verdict is [[B]]", "B"),
                                        ("Verdict: **Assistant B**", "B"), ("[[tie]]", "tie"), ("no idea", None),
                                        ("My final verdict is a tie.", "tie"), ("Verdict: a draw", "tie"),
                                        ("The verdict is a close one.", None), ("winner is (B)", "B")])
def test_messy_verdicts(reply, want):
    assert parse_verdict(reply) == want


@pytest.mark.parametrize("reply,want", [("Rating: [[7]]", 7.0), ("rating: 6.5", 6.5), ("I give it 9/10.", 9.0),
                                        ("[[11]]", None), ("great", None)])
def test_messy_ratings(reply, want):
    assert parse_rating(reply) == want


def test_combine_and_rates():
    assert combine("A", "B") == "win" and combine("A", "A") == "tie" and combine("tie", "A") == "loss"
    assert combine(None, "A") is None
    rates = pairwise_rates(["win"] * 6 + ["tie"] * 2 + ["loss"] * 2 + [None])
    assert (rates["win_rate"], rates["tie_rate"], rates["loss_rate"]) == (0.6, 0.2, 0.2)
    assert rates["score"] == pytest.approx(0.7) and rates["invalid"] == 1 and rates["pairs"] == 10
    assert rates["win_rate_ci_low"] <= 0.6 <= rates["win_rate_ci_high"] and rates["win_rate_ci_high"] <= 1.0
    assert rates["win_rate_ci_low"] < rates["win_rate_ci_high"]


class _OddServer(BaseHTTPRequestHandler):
    """Answers 200 with a JSON list (not a chat completion), or 404 with the server's reason."""

    status = 200

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        data = b"[1, 2]" if self.status == 200 else b'{"error": "model `gpt-judge` not found"}'
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.mark.parametrize("status, found", [(200, r"failed after 2 tries \(TypeError"),
                                           (404, r"failed after 1 try \(HTTP 404: .*gpt-judge` not found")])
def test_a_judge_that_answers_in_another_shape_is_a_clear_error(status, found):
    """A 200 whose body is not a chat completion was a raw TypeError traceback; a 404 said '2 tries' after one and
    hid the server's reason (usually a wrong judge.model)."""
    from tuneforge.errors import UserError

    _OddServer.status = status
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OddServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = JudgeClient(f"http://127.0.0.1:{server.server_address[1]}/v1", "gpt-judge", retries=1)
        with pytest.raises(UserError, match=found):
            client.chat([{"role": "user", "content": "hi"}])
    finally:
        server.shutdown()


def test_a_torn_cache_line_does_not_swallow_the_next_reply(stub, tmp_path):
    """A judge cache torn by an interrupted run glued the next reply to its last line, so that reply was asked again
    on every later run."""
    cache = tmp_path / "judge_cache.jsonl"
    cache.write_text('{"key": "x", "rep')
    ask = [{"role": "system", "content": "Rating"}, {"role": "user", "content": "GOOD"}]  # a grade request
    JudgeClient(stub, "judge", cache_path=cache).chat(ask)
    calls = len(_Judge.calls)
    JudgeClient(stub, "judge", cache_path=cache).chat(ask)
    assert len(_Judge.calls) == calls
