"""The engine's contract: training and serving render prompts the same way; sampling options, seeds, stop strings
and stop tokens, logprobs, limits, streaming, cancelling and errors behave as documented."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from tuneforge.configs.schema import ModelConfig
from tuneforge.data.encode import encode_chat as training_encode
from tuneforge.data.types import IGNORE_INDEX
from tuneforge.errors import UserError
from tuneforge.inference import Engine, SamplingParams
from tuneforge.models.loading import load_model_and_tokenizer

HI = [{"role": "user", "content": "Hi"}]
PROMPTS = [
    HI,
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Convert 3 km to meters."}],
    [{"role": "user", "content": "把字符串“hello”反转。这是一个比较长的问题，用来让左填充更明显。"}],
    [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"},
     {"role": "user", "content": "And 42 + 1?"}],
]


@pytest.fixture(scope="module")
def loaded(tiny_qwen2_dir):
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_qwen2_dir)))
    return model.eval(), tok


@pytest.fixture
def engine(loaded):
    return Engine(*loaded, max_batch_size=4)


# ---- prompts: the training encoder's ids ----------------------------------------------------------------------

def _training_prompt_ids(tok, messages) -> list[int]:
    enc = training_encode(tok, [*messages, {"role": "assistant", "content": "Sure, 42."}], loss_on="last")
    start = next(i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX)
    return enc.input_ids[:start]


def test_prompt_ids_equal_the_training_encoders(loaded):
    engine = Engine(*loaded)
    for messages in PROMPTS:
        assert engine.encode_chat(messages) == _training_prompt_ids(loaded[1], messages)


# Templates whose generation prompt is not how they render the start of a finished assistant turn, by their
# authors' design: Baichuan2 writes "\n\n" after a user turn only when a reply follows; DeepSeek-R1 distills open
# "<think>\n" in the generation prompt but drop reasoning from finished turns.
GENERATION_PROMPT_DIFFERS = {"baichuan2-chat.jinja", "deepseek-r1-distill-qwen.jinja"}


def test_prompt_ids_start_the_training_ids_for_real_templates(loaded, shared_assets):
    """Every real template in the shared assets (system prompts merged, tool formats, reasoning tags, ...): the
    served prompt is exactly the start of the token ids the model was trained on for that conversation."""
    from tuneforge.errors import DataError

    compared = 0
    for path in sorted((shared_assets / "templates").glob("*.jinja")):
        if path.name in GENERATION_PROMPT_DIFFERS:
            continue
        tok = _with_template(loaded[1], path.read_text(encoding="utf-8"))
        engine = Engine(loaded[0], tok)
        for messages in PROMPTS:
            try:
                trained = training_encode(tok, [*messages, {"role": "assistant", "content": "Sure, 42."}]).input_ids
            except DataError:  # a conversation this template cannot express at all
                continue
            served = engine.encode_chat(messages)
            assert trained[:len(served)] == served, f"{path.name}: {messages}"
            compared += 1
    assert compared > 80


def _with_template(tok, template: str):
    import copy

    tok = copy.deepcopy(tok)
    tok.chat_template = template
    return tok


def test_system_prompt_goes_where_training_puts_it(loaded, shared_assets):
    """A template that refuses system messages: both sides merge the system prompt into the first user turn."""
    path = shared_assets / "templates" / "gemma-2-it.jinja"
    if not path.is_file():
        pytest.skip("gemma-2-it.jinja is absent")
    tok = _with_template(loaded[1], path.read_text(encoding="utf-8"))
    ids = Engine(loaded[0], tok).encode_chat(PROMPTS[1])
    assert "Answer briefly.\n\nConvert 3 km" in tok.decode(ids)


# ---- sampling, seeds, stops -------------------------------------------------------------------------------------

def test_same_seed_same_text_different_seed_different_text(engine):
    params = [SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=s) for s in (1, 1, 2)]
    a, b, c = engine.generate([HI, HI, HI], params)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids
    again = engine.generate([PROMPTS[2], HI], [SamplingParams(max_new_tokens=16), params[0]])[1]
    assert again.token_ids == a.token_ids  # other rows in the batch do not change a seeded request


def test_greedy_ignores_seed_and_top_p(engine):
    plain = engine.generate([HI], SamplingParams(max_new_tokens=10))[0]
    other = engine.generate([HI], SamplingParams(max_new_tokens=10, seed=5, top_p=0.1, top_k=3))[0]
    assert plain.token_ids == other.token_ids


def test_top_k_1_is_greedy(engine):
    greedy = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=12))[0]
    sampled = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=12, temperature=1.5, top_k=1, seed=3))[0]
    assert sampled.token_ids == greedy.token_ids


def test_stop_string_cuts_the_text(engine):
    full = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=20))[0]
    stop = full.text[5:8]
    assert stop.strip() and full.text.find(stop) >= 5
    cut = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=20, stop=[stop, "never-there"]))[0]
    assert cut.text == full.text[:full.text.find(stop)] and cut.finish_reason == "stop"
    assert cut.completion_tokens < full.completion_tokens


def test_stop_token_ids(engine):
    full = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12))[0]
    token = full.token_ids[3]
    first = full.token_ids.index(token)
    cut = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12, stop_token_ids=[token]))[0]
    assert cut.token_ids == full.token_ids[:first] and cut.finish_reason == "stop"
    assert cut.completion_tokens == first + 1  # the stop token was generated, but is not part of the reply


def test_length_limit(engine):
    out = engine.generate([PROMPTS[2]], SamplingParams(max_new_tokens=5, ignore_eos=True))[0]
    assert out.finish_reason == "length" and out.completion_tokens == len(out.token_ids) == 5


def test_context_limit(loaded, monkeypatch):
    engine = Engine(*loaded)
    prompt = engine.encode_chat(HI)
    engine.context_length = len(prompt) + 3
    out = engine.generate([prompt], SamplingParams(max_new_tokens=50, ignore_eos=True))[0]
    assert out.finish_reason == "length" and out.completion_tokens == 3
    engine.context_length = len(prompt)
    with pytest.raises(UserError, match="leaves no room for a reply in the model's context of .*; shorten the prompt"):
        engine.generate([prompt])  # said "shorten the conversation" to every caller (eval, RL: no conversation)


def test_logprobs_are_the_models(engine, loaded):
    model, _ = loaded
    ids = engine.encode_chat(PROMPTS[1])
    out = engine.generate([ids], SamplingParams(max_new_tokens=8, temperature=0.8, seed=0, logprobs=True,
                                                top_logprobs=3))[0]
    with torch.no_grad():
        logits = model(torch.tensor([ids + out.token_ids])).logits[0, len(ids) - 1:-1]
    ref = torch.log_softmax(logits.float(), dim=-1)
    expected = ref.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out.logprobs), expected, atol=1e-4, rtol=0)
    assert len(out.top_logprobs) == len(out.token_ids) and all(len(t) <= 3 for t in out.top_logprobs)
    best = ref.max(dim=-1).values
    assert [max(t.values()) for t in out.top_logprobs] == pytest.approx(best.tolist(), abs=1e-4)


def test_repetition_penalty_changes_greedy_output(engine):
    plain = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16))
    penalised = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, repetition_penalty=5.0))
    assert [c.token_ids for c in plain] != [c.token_ids for c in penalised]
    for c in penalised:  # a strong penalty on a random model: no token twice in a row
        assert all(a != b for a, b in zip(c.token_ids, c.token_ids[1:]))


def test_presence_and_frequency_penalties_equal_a_step_by_step_reference(engine, loaded):
    """Greedy decoding with OpenAI's penalties, in a batch with rows that use none, equals decoding one token at a
    time with the full model and the formula applied by hand (the counts are the reply's tokens, not the prompt's).
    Negative penalties, as this random model's greedy replies repeat no token: they pull the reply to its tokens."""
    model, _ = loaded
    params = SamplingParams(max_new_tokens=12, presence_penalty=-1.5, frequency_penalty=-0.7)
    plain, penalised, _ = engine.generate(PROMPTS[:3], [SamplingParams(max_new_tokens=12), params,
                                                        SamplingParams(max_new_tokens=12, logit_bias={5: 3.0})])
    ids = engine.encode(PROMPTS[1])
    reply: list[int] = []
    for _ in range(len(penalised.token_ids)):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + reply])).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(reply, dtype=torch.long), minlength=logits.shape[0]).float()
        reply.append(int((logits + 0.7 * counts + 1.5 * (counts > 0)).argmax()))
    assert penalised.token_ids == reply[:len(penalised.token_ids)]
    assert penalised.token_ids != engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=12))[0].token_ids
    assert plain.token_ids == engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12))[0].token_ids


def test_logit_bias_forces_and_bans_tokens(engine):
    forced = engine.generate([HI], SamplingParams(max_new_tokens=4, ignore_eos=True, logit_bias={7: 100.0}))[0]
    assert forced.token_ids == [7, 7, 7, 7]
    plain = engine.generate([HI], SamplingParams(max_new_tokens=6))[0]
    banned = engine.generate([HI], SamplingParams(max_new_tokens=6, logit_bias={plain.token_ids[0]: -100.0}))[0]
    assert banned.token_ids[0] != plain.token_ids[0]
    with pytest.raises(UserError, match=r"`logit_bias` names token id\(s\) \[999999\], outside this model's vocab"):
        engine.submit([1, 2, 3], SamplingParams(logit_bias={999999: 1.0}))


def test_a_completion_names_the_stop_token_that_ended_it(engine):
    """A model stops on several ids (Qwen: <|im_end|> and <|endoftext|>); RL rollouts train on the stop token, so
    the completion says which one was sampled (rl.sample appended the tokenizer's eos whichever it was)."""
    assert len(engine.stop_ids) >= 2
    for stop in sorted(engine.stop_ids):
        done = engine.generate([HI], SamplingParams(max_new_tokens=4, logit_bias={stop: 100.0}))[0]
        assert (done.token_ids, done.finish_reason, done.stop_token_id) == ([], "stop", stop)
    cut = engine.generate([HI], SamplingParams(max_new_tokens=2, ignore_eos=True))[0]
    assert cut.finish_reason == "length" and cut.stop_token_id is None


def test_rollouts_train_on_the_stop_token_sampled(loaded):
    """rl.sample puts the sampled stop id after the completion's tokens, in input_ids and labels alike."""
    from types import SimpleNamespace

    from tuneforge.data.types import EncodedPrompt
    from tuneforge.training.rl import sample

    model, tok = loaded
    engine = Engine(model, tok)
    other = max(engine.stop_ids - {tok.eos_token_id})  # a stop id that is not the tokenizer's eos
    ids = _training_prompt_ids(tok, HI)
    prompt = EncodedPrompt(list(ids), HI, None, "test:1")
    section = SimpleNamespace(max_new_tokens=3, temperature=1.0, top_p=1.0, top_k=0)
    real_generate = engine.generate
    engine.generate = lambda prompts, params: real_generate(prompts, [
        SamplingParams(**{**vars(p), "logit_bias": {other: 100.0}}) for p in params])
    roll = sample(engine, [prompt], section, [1], "cpu")
    assert roll.completion_ids == [[other]]
    assert roll.labels[0, len(ids)].item() == other and roll.input_ids[0, len(ids)].item() == other


@pytest.mark.parametrize("bad, match", [
    (dict(temperature=-1), "temperature"), (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"), (dict(logit_bias={3: 101.0}), "logit_bias"), (dict(top_p=0), "top_p"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(top_k=-2), "top_k"), (dict(min_p=2), "min_p"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(stop=[""]), "stop"), (dict(top_logprobs=50), "top_logprobs"),
])
def test_bad_parameters_are_user_errors(engine, bad, match):
    with pytest.raises(UserError, match=match):
        engine.submit([1, 2, 3], SamplingParams(**bad))


def test_bad_parameters_are_named_as_the_caller_spells_them():
    """The server's JSON fields are the field names; the chat CLI's flags are not (`temperature` for --temperature)."""
    with pytest.raises(UserError, match=r"^Sampling parameter `top_p` is 2; it must be in \(0, 1\]\.$"):
        SamplingParams(top_p=2).validate()
    with pytest.raises(UserError, match=r"^Sampling parameter `--top-p` is 2; "):
        SamplingParams(top_p=2).validate(spell=lambda name: "--" + name.replace("_", "-"))


def test_bad_requests(engine):
    with pytest.raises(UserError, match="adapter"):
        engine.submit([1, 2], adapter="nope")
    with pytest.raises(UserError, match="empty"):
        engine.submit([])
    with pytest.raises(UserError, match="prompt"):
        engine.generate([[{"no": "role"}, 3]])


# ---- streaming ---------------------------------------------------------------------------------------------------

def test_stream_adds_up_to_generate(engine):
    params = SamplingParams(max_new_tokens=24, temperature=0.9, seed=4, logprobs=True)
    whole = engine.generate([PROMPTS[2]], params)[0]
    deltas = list(engine.stream(PROMPTS[2], params))
    assert len(deltas) > 3 and all(d.finish_reason is None for d in deltas[:-1])
    assert "".join(d.text for d in deltas) == whole.text
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids
    assert [x for d in deltas for x in d.logprobs] == pytest.approx(whole.logprobs)
    assert deltas[-1].finish_reason == whole.finish_reason


def test_stopping_a_stream_early_frees_its_slot(engine):
    stream = engine.stream(HI, SamplingParams(max_new_tokens=200, ignore_eos=True))
    next(stream)
    assert engine.in_flight == 1
    stream.close()
    engine.generate([HI], SamplingParams(max_new_tokens=2))  # the next step retires the abandoned request
    assert engine.in_flight == 0


def test_model_mode_is_restored(loaded):
    model, tok = loaded
    model.train()
    try:
        Engine(model, tok).generate([HI], SamplingParams(max_new_tokens=2))
        assert model.training
    finally:
        model.eval()


# ---- the background thread ---------------------------------------------------------------------------------------

def test_cancel_frees_the_slot_at_once(engine):
    engine.start()
    try:
        handle = engine.submit(engine.encode_chat(HI), SamplingParams(max_new_tokens=10_000, ignore_eos=True))
        it = iter(handle)
        next(it)
        handle.cancel()
        rest = list(it)
        assert rest[-1].finish_reason == "cancelled"
        other = engine.submit(engine.encode_chat(HI), SamplingParams(max_new_tokens=3)).result()
        assert other.completion_tokens <= 3
        assert engine.scheduler.batch is None or handle not in [r.handle for r in engine.scheduler.batch.rows]
    finally:
        engine.stop()


def test_async_iteration_equals_blocking(engine):
    params = SamplingParams(max_new_tokens=12, temperature=0.7, seed=9)
    blocking = engine.generate([PROMPTS[1]], params)[0]

    async def collect():
        handle = engine.submit(engine.encode_chat(PROMPTS[1]), params)
        return [d async for d in handle.aiter()]

    engine.start()
    try:
        deltas = asyncio.run(collect())
    finally:
        engine.stop()
    assert "".join(d.text for d in deltas) == blocking.text and deltas[-1].finish_reason == blocking.finish_reason


def test_an_error_fails_its_requests_and_the_engine_goes_on(engine, monkeypatch):
    real = engine.runner.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "forward", flaky)
    engine.start()
    try:
        handle = engine.submit(engine.encode_chat(HI), SamplingParams(max_new_tokens=20, ignore_eos=True))
        with pytest.raises(RuntimeError, match="simulated"):
            handle.result()
        again = engine.submit(engine.encode_chat(HI), SamplingParams(max_new_tokens=4, ignore_eos=True)).result()
        assert again.completion_tokens == 4
    finally:
        engine.stop()


def test_a_closed_event_loop_cancels_only_its_request(engine):
    """An asyncio caller that went away (its loop closed mid-stream) must not break the engine for the others."""
    async def first_delta(handle):
        async for delta in handle.aiter():
            return delta

    engine.start()
    try:
        ids = engine.encode_chat(HI)
        gone = engine.submit(ids, SamplingParams(max_new_tokens=10_000, ignore_eos=True))
        other = engine.submit(ids, SamplingParams(max_new_tokens=30, ignore_eos=True))
        assert asyncio.run(first_delta(gone)).token_ids  # the loop is closed after this
        assert other.result().completion_tokens == 30
        deadline = time.monotonic() + 60
        while not gone.finished and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone.finished and gone.cancelled
    finally:
        engine.stop()
