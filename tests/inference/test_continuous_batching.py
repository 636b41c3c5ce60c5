"""Continuous batching: requests that join a running batch, or share it with other adapters, get exactly what they
get alone (greedy and seeded sampling); finished rows leave the batch at once; the batch never exceeds its size."""

from __future__ import annotations

import time

import pytest
import torch

from tuneforge.configs.schema import ModelConfig
from tuneforge.inference import Engine, SamplingParams
from tuneforge.models.loading import load_model_and_tokenizer

QUESTIONS = ["Hi", "Convert 3 km to meters.", "把字符串“hello”反转。这是一个比较长的问题。", "What is 12 + 30?",
             "Reverse 'forge'.", "Name three colours, please, in a list.", "ok", "Say it twice.", "Go on."]
PARAMS = [
    SamplingParams(max_new_tokens=12),
    SamplingParams(max_new_tokens=20, temperature=0.9, seed=1),
    SamplingParams(max_new_tokens=7, temperature=1.2, top_k=20, seed=2, repetition_penalty=1.3),
    SamplingParams(max_new_tokens=25, repetition_penalty=1.5),
    SamplingParams(max_new_tokens=16, temperature=0.7, top_p=0.8, min_p=0.05, seed=3),
    SamplingParams(max_new_tokens=3),
    SamplingParams(max_new_tokens=18, temperature=1.0, seed=4, logprobs=True),
    SamplingParams(max_new_tokens=14, presence_penalty=-1.5, frequency_penalty=-0.5),  # reply counts join a batch
    SamplingParams(max_new_tokens=40, temperature=0.8, seed=5, frequency_penalty=1.0, logit_bias={11: 4.0}),
]


def _prompts(engine) -> list[list[int]]:
    return [engine.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def loaded(tiny_qwen2_dir):
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_qwen2_dir)))
    return model.eval(), tok


def _alone(engine, prompts, params, adapters=None):
    adapters = adapters or [None] * len(prompts)
    return [engine.generate([p], [sp], adapter=a)[0] for p, sp, a in zip(prompts, params, adapters)]


class Recorder:
    """Wraps a scheduler's prefill/decode to see who joined while others were decoding, and the batch sizes."""

    def __init__(self, scheduler):
        self.joins_while_decoding, self.sizes = 0, []
        prefill, decode = scheduler._prefill, scheduler._decode

        def recording_prefill(rows):
            self.joins_while_decoding += scheduler.batch is not None
            return prefill(rows)

        def recording_decode():
            assert not any(r.finished for r in scheduler.batch.rows)  # finished rows left at once
            self.sizes.append(len(scheduler.batch))
            return decode()

        scheduler._prefill, scheduler._decode = recording_prefill, recording_decode


def test_requests_joining_between_steps_get_what_they_get_alone(loaded):
    engine = Engine(*loaded, max_batch_size=3)
    prompts = _prompts(engine)
    alone = _alone(engine, prompts, PARAMS)
    recorder = Recorder(engine.scheduler)
    handles = []
    for i, (p, sp) in enumerate(zip(prompts, PARAMS)):  # a newcomer every other step, stepped by hand
        handles.append(engine.submit(p, sp))
        for _ in range(i % 3):
            engine._step()
    while not all(h.finished for h in handles):
        engine._step()
    together = [h.result() for h in handles]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.text for c in together] == [c.text for c in alone]
    assert together[6].logprobs == pytest.approx(alone[6].logprobs, abs=1e-4)
    assert recorder.joins_while_decoding >= 3 and max(recorder.sizes) == 3 and 1 in recorder.sizes


def test_background_thread_with_staggered_clients(loaded):
    engine = Engine(*loaded, max_batch_size=4)
    prompts = _prompts(engine)
    alone = _alone(engine, prompts, PARAMS)
    recorder = Recorder(engine.scheduler)
    engine.start()
    try:
        handles = []
        for p, sp in zip(prompts, PARAMS):
            handles.append(engine.submit(p, sp))
            time.sleep(0.01)
        together = [h.result() for h in handles]
    finally:
        engine.stop()
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert max(recorder.sizes) <= 4 and recorder.joins_while_decoding >= 1


# ---- adapters sharing a batch ------------------------------------------------------------------------------------

def _two_adapters(model, kind: str):
    from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model

    configs = {"lora": (LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
                        LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)),
               "prompt": (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
                          PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7)),
               "ia3": (IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False),
                       IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False))}[kind]
    torch.manual_seed(0)
    peft_model = get_peft_model(model, configs[0], adapter_name="a")
    peft_model.add_adapter("b", configs[1])
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".a." in name or ".b." in name or "prompt_encoder" in name or "ia3" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return peft_model.eval()


@pytest.mark.parametrize("kind", ["lora", "prompt", "ia3"])
def test_requests_for_different_adapters_share_the_engine(tiny_qwen2_dir, kind):
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_qwen2_dir)))
    plain = Engine(model.eval(), tok).generate(QUESTIONS and [[{"role": "user", "content": q}] for q in QUESTIONS[:3]],
                                               SamplingParams(max_new_tokens=10))
    peft_model = _two_adapters(model, kind)
    engine = Engine(peft_model, tok, max_batch_size=6)
    prompts = _prompts(engine)[:3] * 2
    adapters = [None, "a", "b", "b", None, "a"]
    params = [SamplingParams(max_new_tokens=10)] * 3 + [SamplingParams(max_new_tokens=10, temperature=1, seed=7)] * 3
    alone = _alone(engine, prompts, params, adapters)
    handles = [engine.submit(p, sp, adapter=a) for p, sp, a in zip(prompts, params, adapters)]
    while not all(h.finished for h in handles):
        engine._step()
    together = [h.result() for h in handles]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert alone[0].token_ids == plain[0].token_ids  # adapter None is the base model
    assert len({tuple(c.token_ids) for c in alone[:3]}) == 3  # the adapters really differ
    with torch.no_grad():  # and each adapter's greedy output is what PEFT generates with it
        for adapter, prompt, got in zip(["a", "b"], prompts[1:3], alone[1:3]):
            peft_model.set_adapter(adapter)
            x = torch.tensor([prompt])
            out = peft_model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=10,
                                      do_sample=False, eos_token_id=sorted(engine.stop_ids), pad_token_id=0)
            new = out[0, len(prompt):].tolist()
            assert got.token_ids == new[:len(got.token_ids)] and len(got.token_ids) in (len(new), len(new) - 1)
