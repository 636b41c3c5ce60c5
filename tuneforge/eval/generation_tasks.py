"""Generation tasks: GSM8K-style math, any dataset in a training format (BLEU/ROUGE/exact match), perplexity.

    run_gsm8k(model, tokenizer, "../shared/assets/eval/gsm8k", out_dir, shots=4, limit=50)
    run_dataset(model, tokenizer, "data/heldout.jsonl", out_dir)     # last assistant turn is the reference
    run_perplexity(model, tokenizer, "data/heldout.jsonl", out_dir)

Replies come from the one generation engine (`tuneforge.inference`), greedy; every prediction is saved next to its
reference and finish reason in the task's predictions.jsonl, which is also the resume cache. `truncated_replies`
counts the replies cut at max_new_tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from tuneforge.errors import DataError, UserError
from tuneforge.eval.metrics import extract_number, text_metrics
from tuneforge.eval.store import ItemStore, input_key

# No placeholder or example after "####": SmolLM2-135M-Instruct copied them ("#### N" for "a line '#### N'", "#### 42"
# for "for example '#### 42'"); spelled out, 7 of 10 test questions (4-shot) end in a real "#### <number>" line, 3 before.
COT_INSTRUCTION = "Solve the problem step by step. On the last line, write '####' followed by the final answer as a number."


def generate_replies(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 256,
                     batch_size: int = 16) -> list[tuple[str, str]]:
    """Greedy (reply, finish reason) pairs through the one generation engine (same prompt rendering as training
    and serving). The reason is the engine's: "stop" (end of turn) or "length" (cut at max_new_tokens or the
    model's context)."""
    from tuneforge.inference import Engine, SamplingParams
    from tuneforge.inference.adapters import active_adapter

    # the engine runs the bare base unless told which adapter is the default: the model under test is base+adapter
    engine = Engine(model, tokenizer, max_batch_size=batch_size, default_adapter=active_adapter(model))
    done = engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    return [(c.text.strip(), c.finish_reason) for c in done]


def truncated_replies(records: list[dict]) -> int:
    """Replies cut at max_new_tokens: such a reply usually lacks its final answer and scores 0, so the report
    shows the count (raise max_new_tokens when it is not 0). Records saved before the reason was kept count 0."""
    return sum(r.get("finish_reason") == "length" for r in records)


def _generate_pending(model, tokenizer, items: list[dict], store: ItemStore, score, max_new_tokens: int,
                      desc: str, progress: bool) -> list[dict]:
    """Generate for every item not in the store (in batches, saving each), return all records in item order.
    A saved record is reused only if its item's input is unchanged (same messages and reference)."""
    keys = {it["id"]: input_key(it) for it in items}
    done = store.done()
    todo = [it for it in items if done.get(it["id"], {}).get("input_key") != keys[it["id"]]]
    step = 16
    for start in tqdm(range(0, len(todo), step), desc=desc, disable=not progress, unit="batch"):
        chunk = todo[start: start + step]
        replies = generate_replies(model, tokenizer, [it["messages"] for it in chunk], max_new_tokens)
        for it, (reply, finish) in zip(chunk, replies):
            fields = {k: v for k, v in it.items() if k != "messages"}
            record = fields | {"prompt": it["messages"][-1]["content"], "prediction": reply, "finish_reason": finish,
                               "input_key": keys[it["id"]]} | score(it, reply)
            store.add(record)
            done[it["id"]] = record
    return [done[it["id"]] for it in items]


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"{path} does not exist: point the task at a folder with GSM8K's test.jsonl (and "
                        f"train.jsonl for few-shot examples).")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg}).") from e
    return rows


def gsm8k_messages(question: str, shots: list[dict], cot: bool) -> list[dict]:
    """Few-shot examples as earlier turns (their answers show the reasoning and end in '#### N')."""
    messages = []
    for s in shots:
        messages += [{"role": "user", "content": s["question"]}, {"role": "assistant", "content": s["answer"]}]
    content = f"{question}\n{COT_INSTRUCTION}" if cot else question
    return messages + [{"role": "user", "content": content}]


def _gsm8k_rows(path: Path) -> list[dict]:
    rows = _jsonl(path)
    if not rows:
        raise DataError(f"{path} holds no rows: GSM8K files hold one {{question, answer}} object per line.")
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not {"question", "answer"} <= set(row):
            found = ", ".join(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{path}: row {i} lacks GSM8K's `question` and `answer` fields (found {found}).")
    return rows


def gsm8k_examples(folder: Path, shots: int) -> list[dict]:
    """The first `shots` solved examples of train.jsonl. Fewer than asked would silently ask with fewer, under the
    report's "K-shot" label, so it is an error."""
    if not shots:
        return []
    examples = _gsm8k_rows(folder / "train.jsonl")
    if len(examples) < shots:
        raise UserError(f"gsm8k_shots={shots}, but {folder / 'train.jsonl'} holds {len(examples)} example(s). Set "
                        f"`gsm8k_shots` to {len(examples)} or less.")
    return examples[:shots]


def check_gsm8k(data_dir, shots: int) -> None:
    """The task's test questions and its few-shot examples read as run_gsm8k reads them (before any model loads)."""
    folder = Path(data_dir)
    _gsm8k_rows(folder / "test.jsonl")
    gsm8k_examples(folder, shots)


def run_gsm8k(model, tokenizer, data_dir, out_dir, shots: int = 4, limit: int | None = None, cot: bool = True,
              max_new_tokens: int = 256, progress: bool = True) -> dict:
    folder = Path(data_dir)
    tests = _gsm8k_rows(folder / "test.jsonl")[:limit]
    examples = gsm8k_examples(folder, shots)
    items = [{"id": str(i), "messages": gsm8k_messages(row["question"], examples, cot),
              "answer": extract_number(row["answer"])} for i, row in enumerate(tests)]
    store = ItemStore(Path(out_dir) / "predictions.jsonl", {"task": "gsm8k", "shots": shots, "cot": cot,
                                                             "max_new_tokens": max_new_tokens})

    def score(item, reply):
        got = extract_number(reply)
        return {"extracted": got, "correct": got is not None and got == item["answer"]}

    records = _generate_pending(model, tokenizer, items, store, score, max_new_tokens, "gsm8k", progress)
    return {"accuracy": sum(r["correct"] for r in records) / max(1, len(records)), "questions": len(records),
            "truncated_replies": truncated_replies(records)}


def _dataset_examples(path: str, fmt: str = "auto", stage: str | None = None) -> list:
    """The file's examples (`stage` "prompt": chat rows ending on the user's turn are prompts, as for grpo)."""
    from tuneforge.configs.schema import DatasetSpec
    from tuneforge.data.build import read_spec
    from tuneforge.data.types import BadRow

    rows = read_spec(DatasetSpec(path=path, format=fmt), None, None, stage)
    bad = [r for r in rows if isinstance(r, BadRow)]
    if bad:
        raise DataError(f"{path}: {len(bad)} row(s) could not be read, first: {bad[0]}. Fix them or drop them "
                        f"(`tuneforge data clean`).")
    return rows


def task_items(path: str, limit: int | None = None, fmt: str = "auto", need_reference: bool = True) -> list[dict]:
    """Each row's conversation up to the reply to generate, and its reference when the row has one: the last
    assistant turn of a chat row, the `reference`/`answer` column of a prompt row, the chosen reply of a preference
    pair, the reply of a desirable KTO row."""
    from tuneforge.data.types import PairExample

    items = []
    # judged prompts: every chat row is a prompt (one ending on the user's turn too); scored rows keep their reply
    for ex in _dataset_examples(path, fmt, None if need_reference else "prompt")[:limit]:
        reference = None
        if isinstance(ex, PairExample):
            messages = ex.prompt
            reference = next((m.get("content") for m in ex.chosen if m.get("role") == "assistant"), None)
        elif ex.messages and ex.messages[-1].get("tool_calls"):
            raise DataError(f"{ex.source}: the conversation ends on a tool call, and data:{path} scores text replies "
                            f"against a reference. Give rows that end with the assistant's text reply (a tool call "
                            f"trains, but there is no text to score).")
        elif ex.messages and ex.messages[-1]["role"] == "assistant":
            messages = ex.messages[:-1]
            reference = ex.messages[-1]["content"] if ex.label is not False else None  # not an undesirable reply
        elif ex.messages and ex.messages[-1]["role"] == "user":
            messages, reference = ex.messages, ex.reference
        else:
            raise DataError(f"{ex.source}: a generation task needs conversations (or prompts); this row is plain "
                            f"text. For text, use ppl:{path} (perplexity).")
        if need_reference and reference is None:
            raise DataError(f"{ex.source}: data:{path} scores each reply against a reference, and this row has none. "
                            f"Give rows that end with an assistant turn, a `reference` (or `answer`) column beside a "
                            f"prompt, or preference pairs (scored against `chosen`); to judge replies to prompts "
                            f"alone use judge:{path} or grade:{path}.")
        items.append({"id": ex.source, "messages": messages, "reference": reference})
    return items


def check_dataset(path: str, limit: int | None, need_reference: bool, text: bool = False) -> None:
    """A data:/judge:/grade: (or, `text`, ppl:) task's file read as its task reads it, before any model loads. A hub
    dataset is left to its task (reading it here would download it)."""
    from tuneforge.data.build import find_local
    from tuneforge.data.readers import looks_like_local_path
    from tuneforge.models.loading import looks_local

    if find_local(path, None) is None:
        if looks_like_local_path(path) or path.startswith("builtin:") or looks_local(path):
            raise DataError(f"{path}: no such file or folder (a relative path counts from the current folder, "
                            f"{Path.cwd()}).")
        return
    if text:
        _dataset_examples(path)
    else:
        task_items(path, limit, need_reference=need_reference)


def run_dataset(model, tokenizer, path: str, out_dir, limit: int | None = None, fmt: str = "auto",
                max_new_tokens: int = 256, progress: bool = True, scored: bool = True) -> dict:
    """Generate for each row's conversation up to its reply; score against its reference (`scored`: BLEU, ROUGE,
    exact match), or only keep the replies for a judge (`scored=False`: rows may be prompts alone)."""
    items = task_items(path, limit, fmt, need_reference=scored)
    store = ItemStore(Path(out_dir) / "predictions.jsonl", {"task": "dataset", "path": str(path),
                                                             "max_new_tokens": max_new_tokens})
    records = _generate_pending(model, tokenizer, items, store, lambda it, reply: {}, max_new_tokens, Path(path).name,
                                progress)
    counts = {"examples": len(records), "truncated_replies": truncated_replies(records)}
    if not scored:
        return counts
    return text_metrics([r["prediction"] for r in records], [r["reference"] for r in records]) | counts


def _plain_text(example) -> str:
    """A row as held-out text: a text row as it is, a conversation's contents joined by newlines, a preference pair
    as its prompt and chosen reply (the text the data prefers, as `data:` takes it for the reference)."""
    from tuneforge.data.types import PairExample

    if isinstance(example, PairExample):
        messages = example.prompt + example.chosen
    elif example.text is not None:
        return example.text
    else:
        messages = example.messages
    return "\n".join(m.get("content") or "" for m in messages)


def run_perplexity(model, tokenizer, path: str, out_dir, limit: int | None = None, max_length: int = 1024) -> dict:
    """Perplexity of held-out text: `text` rows as they are, chat rows as their contents joined by newlines,
    preference pairs as prompt and chosen reply."""
    from tuneforge.eval.loglik import perplexity_of, text_nll

    store = ItemStore(Path(out_dir) / "predictions.jsonl", {"task": "ppl", "max_length": max_length})
    done, nlls = store.done(), []
    for ex in _dataset_examples(path)[:limit]:  # each text's NLL is saved: a re-run scores only new or edited rows
        text = _plain_text(ex)
        record = done.get(ex.source)
        if record is None or record.get("input_key") != input_key(text):
            nll, tokens = text_nll(model, tokenizer, text, max_length)
            record = {"id": ex.source, "nll": nll, "tokens": tokens, "input_key": input_key(text)}
            store.add(record)
        nlls.append((record["nll"], record["tokens"]))
    return perplexity_of(nlls)
