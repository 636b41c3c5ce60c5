"""The teacher: any OpenAI-compatible chat endpoint (a hosted model, vLLM, `tuneforge serve`), called concurrently.

Requests run at most `--concurrency` at a time, start at most `--rate` per second, and are retried on 408, 409,
429, 5xx and connection errors with exponential backoff (`--backoff` seconds, doubled per attempt; a Retry-After
header wins). HTTP 401/403/404 (a wrong key or model name: every request would fail alike) abort the run; any other
refusal (e.g. 400 for a request longer than the server's context) fails that request alone, as `teacher_rejected`,
and a reply without text (content null: a refusal or a tool call) as `no_content`; neither is retried, as asking
again gets the same answer. Every finished request is appended to `progress.jsonl` in the output folder, keyed by a
hash of what was asked (model, messages, sampling settings): a rerun into the same folder reuses those replies
instead of asking again, so an interrupted run resumes where it stopped. A request that fails is counted (its
first errors are kept) and left out (its key is not saved, so the next run asks again). When the endpoint stops
accepting connections (DOWN_AFTER requests in a row fail to connect through all their retries, with no answer of
any kind between them), the run stops with an error: a dead server would otherwise cost every remaining request its
full back-off (31 s each with the defaults).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tuneforge.configs.typed import opt
from tuneforge.errors import UserError, counted

RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)
ABORT_STATUS = (401, 403, 404)  # a wrong key or model name: every other request would fail the same way
# Requests in a row that could not reach the server after all their retries before the run stops (see the module
# docstring). More than one, so a single unlucky request during a server restart does not end a long run.
DOWN_AFTER = 3


@dataclass(kw_only=True)
class TeacherArgs:
    """Options of the teacher endpoint (shared by `data synth` and `data safety --distill`)."""

    base_url: str | None = opt(None, "OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (env "
                                     "TUNEFORGE_TEACHER_BASE_URL or OPENAI_BASE_URL).")
    model: str | None = opt(None, "Teacher model name as the endpoint knows it (env TUNEFORGE_TEACHER_MODEL).")
    api_key: str | None = opt(None, "API key (env TUNEFORGE_TEACHER_API_KEY or OPENAI_API_KEY; none for a "
                                    "local server).")
    concurrency: int = opt(8, "Requests in flight at once.")
    rate: float = opt(0.0, "At most this many requests started per second (0: no limit).")
    retries: int = opt(5, "Retries of a request on 429/5xx/connection errors.")
    backoff: float = opt(1.0, "First retry wait in seconds, doubled per retry.")
    timeout: float = opt(120.0, "Seconds to wait for one reply.")
    temperature: float = opt(0.7, "Sampling temperature of the teacher.")
    max_tokens: int = opt(1024, "Most tokens per teacher reply.")
    seed: int = opt(0, "Seed for sampling, here and in every teacher request (OpenAI's `seed`): the same seed "
                       "gives the same result from a server that honours it (vLLM, `tuneforge serve`).")


@dataclass(frozen=True)
class Failed:
    """A request that gave no reply text: `rule` is how the item is counted (teacher_failed: still failing after
    its retries; teacher_rejected: refused by the server, e.g. HTTP 400; no_content: answered without text), `error`
    what went wrong. False in a boolean test, like a missing reply."""

    rule: str
    error: str
    unreachable: bool = False  # the last attempt could not connect to the server (see Teacher._check_reachable)

    def __bool__(self) -> bool:
        return False


@dataclass
class Stats:
    sent: int = 0  # HTTP requests made (retries included)
    answered: int = 0  # requests answered in this run
    reused: int = 0  # requests answered by progress.jsonl from an earlier run
    repeated: int = 0  # requests identical to one already answered in this run: its reply, asked once
    retried: int = 0
    failed: int = 0
    errors: list = field(default_factory=list)  # the first 5 distinct errors of failed requests

    def as_dict(self) -> dict:
        return {"sent": self.sent, "answered": self.answered, "reused": self.reused, "repeated": self.repeated,
                "retried": self.retried, "failed": self.failed, "first_errors": self.errors[:5]}


def endpoint(args: TeacherArgs) -> tuple[str, str, str | None]:
    env = os.environ.get
    base = args.base_url or env("TUNEFORGE_TEACHER_BASE_URL") or env("OPENAI_BASE_URL")
    model = args.model or env("TUNEFORGE_TEACHER_MODEL")
    key = args.api_key or env("TUNEFORGE_TEACHER_API_KEY") or env("OPENAI_API_KEY")
    if not base or not model:
        raise UserError("No teacher endpoint: give `--base-url URL --model NAME` (any OpenAI-compatible server, "
                        "e.g. `tuneforge serve` at http://127.0.0.1:8000/v1) or set TUNEFORGE_TEACHER_BASE_URL and "
                        "TUNEFORGE_TEACHER_MODEL.")
    check_teacher_args(args)
    return base.rstrip("/"), model, key


def at_least(flag: str, value: float, low: float) -> None:
    if value < low:
        raise UserError(f"`--{flag}` must be at least {low}, got {value}.")


def check_teacher_args(args: TeacherArgs) -> None:
    """Refuse settings no request can run with, naming the flag (before any file is read or written)."""
    for flag, low in (("concurrency", 1), ("retries", 0), ("rate", 0), ("backoff", 0), ("max_tokens", 1),
                      ("temperature", 0)):
        at_least(flag.replace("_", "-"), getattr(args, flag), low)
    if args.timeout <= 0:
        raise UserError(f"`--timeout` must be more than 0 seconds, got {args.timeout}.")


class Teacher:
    """Chat completions for batches of prompts, with the saved progress of `progress_path` (see the module doc)."""

    def __init__(self, args: TeacherArgs, progress_path: Path):
        self.args = args
        self.base_url, self.model, self.api_key = endpoint(args)
        self.path = Path(progress_path)
        self.done = load_progress(self.path)
        end_last_line(self.path)
        self.earlier = set(self.done)  # keys answered by an earlier run (the rest of `done` is this run's)
        self.stats = Stats()
        self.unreachable = 0  # requests in a row that failed to connect (reset by any HTTP answer)

    def key(self, messages: list[dict], params: dict) -> str:
        blob = json.dumps({"model": self.model, "messages": messages, **params}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()

    def complete(self, batch: list[list[dict]], **params) -> list[str | Failed]:
        """The reply text for each conversation of `batch` (a Failed where there is none), in order.
        `params` (e.g. a per-candidate `seed`) are part of the request and of its key. Every request carries a
        `seed` (`--seed` unless `params` sets one): without it a sampling teacher answers differently on each run,
        and a rerun into a fresh `--out` could not reproduce a result."""
        params = {"temperature": self.args.temperature, "max_tokens": self.args.max_tokens,
                  "seed": self.args.seed, **params}
        return asyncio.run(self._all(batch, params))

    async def _all(self, batch, params) -> list[str | Failed]:
        import httpx

        self._gate = asyncio.Semaphore(self.args.concurrency)
        self._lock, self._next_start = asyncio.Lock(), 0.0
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        async with httpx.AsyncClient(timeout=self.args.timeout, headers=headers) as client:
            first: dict[str, asyncio.Task] = {}  # identical requests in one batch: asked once, the reply shared
            tasks = []
            for messages in batch:
                key = self.key(messages, params)
                if key in first:
                    self.stats.repeated += 1
                else:
                    first[key] = asyncio.ensure_future(self._one(client, key, messages, params))
                tasks.append(first[key])
            return list(await asyncio.gather(*tasks))

    async def _one(self, client, key: str, messages: list[dict], params: dict) -> str | Failed:
        if key in self.done:
            if key in self.earlier:
                self.stats.reused += 1
            else:
                self.stats.repeated += 1
            return self.done[key]
        async with self._gate:
            reply = await self._ask(client, messages, params)
        if isinstance(reply, Failed):
            self.stats.failed += 1
            self._check_reachable(reply)
            if reply.error not in self.stats.errors and len(self.stats.errors) < 5:  # the first distinct ones
                self.stats.errors.append(reply.error)
        else:
            self.done[key] = reply
            self.stats.answered += 1
            with self.path.open("a", encoding="utf-8") as f:  # one line per finished request: resumable
                f.write(json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n")
        return reply

    async def _ask(self, client, messages, params) -> str | Failed:
        body = {"model": self.model, "messages": messages, **params}
        for attempt in range(self.args.retries + 1):
            await self._throttle()
            wait, error, unreachable = self.args.backoff * 2 ** attempt, None, False
            try:
                self.stats.sent += 1
                resp = await client.post(f"{self.base_url}/chat/completions", json=body)
                self.unreachable = 0  # the server answered: whatever the status, it is up
                if resp.status_code == 200:
                    return parse_reply(resp.json())
                error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                if resp.status_code in ABORT_STATUS:
                    raise UserError(f"The teacher at {self.base_url} refused a request ({error}). Check "
                                    f"`--model` and `--api-key`.")
                if resp.status_code not in RETRY_STATUS:  # this request's own problem: asking again cannot help
                    return Failed("teacher_rejected", error)
                wait = _retry_after(resp.headers.get("retry-after"), wait)
            except (OSError, ValueError, KeyError, IndexError, TypeError) as e:  # connection, bad JSON, bad shape
                error = f"{type(e).__name__}: {e}"
            except Exception as e:  # noqa: BLE001 - httpx transport errors (timeouts, disconnects) are retried
                if type(e).__module__.split(".")[0] != "httpx":
                    raise
                error, unreachable = f"{type(e).__name__}: {e}", is_connection_error(e)
            if attempt < self.args.retries:
                self.stats.retried += 1
                await asyncio.sleep(wait)
        return Failed("teacher_failed", error, unreachable)

    def _check_reachable(self, reply: Failed) -> None:
        """Stop the run when DOWN_AFTER requests in a row could not reach the server (see the module docstring)."""
        if not reply.unreachable:
            return
        self.unreachable += 1
        if self.unreachable < DOWN_AFTER:
            return
        this_run = len(self.done) - len(self.earlier)
        saved = (f"Saved in {self.path}: {counted(len(self.done), 'finished request')} ({this_run} from this run); "
                 f"the rows file is written only when a run completes, so none was written now" if self.done else
                 "No request had finished, so nothing was saved")
        raise UserError(f"The teacher at {self.base_url} is unreachable: {DOWN_AFTER} requests in a row could not "
                        f"connect after {counted(self.args.retries, 'retry', 'retries')} each (last error: "
                        f"{reply.error}), so the run stops instead of waiting out the back-off of every remaining "
                        f"request. {saved}. Start the server again (or fix `--base-url`) and rerun the same command "
                        f"with the same `--out`: saved replies are reused, only the rest is asked.")

    async def _throttle(self) -> None:
        if self.args.rate <= 0:
            return
        async with self._lock:  # request starts at least 1/rate seconds apart
            now = time.monotonic()
            start = max(now, self._next_start)
            self._next_start = start + 1.0 / self.args.rate
        await asyncio.sleep(start - now)


def is_connection_error(error: Exception) -> bool:
    """Whether an httpx error means the server cannot be reached (refused, reset, gone mid-request), as opposed to
    a slow reply (a read timeout: the server is up, the model is slow) or a bad answer."""
    import httpx

    return isinstance(error, (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.WriteError,
                              httpx.RemoteProtocolError))


def parse_reply(data: dict) -> str | Failed:
    """The reply text; a Failed when the message has none (content null: the model refused through the API or
    called a tool). A reply of the wrong shape raises (KeyError, TypeError...) and is retried: a proxy's error page
    can be transient."""
    choice = data["choices"][0]
    content = choice["message"]["content"]
    if content is None:
        return Failed("no_content", f"the reply has no text (content null, finish_reason "
                                    f"{choice.get('finish_reason')!r})")
    if not isinstance(content, str):
        raise TypeError(f"reply content is {type(content).__name__}, not text")
    return content


def failure_summary(teacher: dict) -> str:
    """The failed requests' first errors (of a report's `teacher` entry), with the likely fix of an HTTP 400: one
    sentence for the console and for errors."""
    errors = teacher["first_errors"]
    hint = (" An HTTP 400 usually means the request is longer than the server's context length (lower "
            "`--max-tokens`, or `--max-chars` for qa_from_docs) or a setting the server does not accept."
            if any(e.startswith("HTTP 400") for e in errors) else "")
    return (f"{counted(teacher['failed'], 'request')} to the teacher at {teacher['base_url']} failed; first "
            f"{'errors' if len(errors[:3]) > 1 else 'error'}: {'; '.join(errors[:3])}.{hint}")


def check_answered(teacher: Teacher) -> None:
    """Refuse a run where every request failed: its output would be an empty "train-ready" file."""
    stats = teacher.stats
    if stats.failed and not (stats.answered or stats.reused or stats.repeated):
        summary = failure_summary({"base_url": teacher.base_url, **stats.as_dict()})
        raise UserError(f"Every request failed: {summary} Check that the server runs at `--base-url` and serves "
                        f"`--model`, then rerun the same command (finished requests are kept in progress.jsonl).")


def _retry_after(header: str | None, default: float) -> float:
    try:
        return min(float(header), 60.0) if header else default
    except ValueError:
        return default


@contextlib.contextmanager
def resume_hint(out: str):
    """On Ctrl-C, say where the finished requests are and how to go on (the CLI itself prints only `interrupted`)."""
    try:
        yield
    except KeyboardInterrupt:
        progress = Path(out).expanduser() / "progress.jsonl"
        done = len(load_progress(progress)) if progress.is_file() else 0
        print(f"{counted(done, 'finished request')} saved in {progress}; rerun the same command with the same "
              f"`--out` to resume (saved replies are reused)." if done else
              "No teacher request had finished: nothing to resume.", file=sys.stderr)
        raise


def end_last_line(path: Path) -> None:
    """End a last line cut short by an interruption, so this run's first record starts a line of its own (glued
    to the cut line it would be unreadable, and its reply asked again on the next resume)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        cut = f.read(1) != b"\n"
    if cut:
        with path.open("a", encoding="utf-8") as f:
            f.write("\n")


def load_progress(path: Path) -> dict[str, str]:
    """{request key: reply} of earlier runs; a last line cut short by an interruption is ignored."""
    done = {}
    if path.exists():
        with path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    item = json.loads(line)
                    done[item["key"]] = item["reply"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
    return done
