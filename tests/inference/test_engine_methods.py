"""Every method of the registry generates through the engine exactly what transformers/PEFT `generate` gives.

Each method is applied to the tiny model with its trainable parameters moved off their identity initialisation
(so the adapter really changes the output), then the engine's batched greedy tokens (left padding, KV cache,
prompt-learning prefixes in the cache) are compared with `model.generate` run on one prompt at a time.
"""

from __future__ import annotations

import pytest
import torch

from tests.methods.test_peft_methods import make_cfg
from tuneforge.configs.schema import ModelConfig
from tuneforge.inference import Engine, SamplingParams
from tuneforge.inference.adapters import active_adapter
from tuneforge.methods import METHODS
from tuneforge.models.loading import load_model_and_tokenizer

PROMPTS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Convert 3 km to meters."}],
    [{"role": "user", "content": "把字符串“hello”反转。这是一个比较长的问题。"}],
]
SMALL = {"prompt_tuning": {"num_virtual_tokens": 5}, "p_tuning": {"num_virtual_tokens": 5},
         "prefix_tuning": {"num_virtual_tokens": 5}, "p_tuning_v2": {"num_virtual_tokens": 5},
         "llama_adapter": {"llama_adapter": {"adapter_len": 4}}}
SKIP = {"loftq": "PEFT computes the LoftQ initialisation on CUDA only"}
NEW_TOKENS = 8


def _sections(method: str) -> dict:
    options = SMALL.get(method, {})
    return options if method == "llama_adapter" else ({method: options} if options else {})


def _adapted(method: str, folder):
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(folder)))
    cfg = make_cfg(method, {**_sections(method), **({"qlora": {"compute_dtype": "fp32"}} if method == "qlora" else {})})
    if method == "qlora":  # a 4-bit base, loaded as the training loader does
        from tests.methods.harness import tiny_model

        model = tiny_model(path=folder, quantization_config=METHODS[method].quantization_config(cfg.options("qlora")))
    torch.manual_seed(0)
    section = METHODS[method].section
    model = METHODS[method].apply(model, cfg.options(section) if section else None, cfg)
    with torch.no_grad():  # off the identity init, so the method changes what the model says
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    return model.eval(), tok


def _hf_greedy(model, ids: list[int], stop_ids: list[int]) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=stop_ids, pad_token_id=stop_ids[0])
    new = out[0, len(ids):].tolist()
    return new[:next((i for i, t in enumerate(new) if t in stop_ids), len(new))]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_engine_matches_generate_for_every_method(method, tiny_llama_dir, tiny_qwen2_dir):
    if method in SKIP:
        pytest.skip(f"{method}: {SKIP[method]}")
    folder = tiny_qwen2_dir if METHODS[method].supports("qwen2") else tiny_llama_dir
    model, tok = _adapted(method, folder)
    engine = Engine(model, tok, max_batch_size=3, default_adapter=active_adapter(model))
    got = engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW_TOKENS))
    stop = sorted(engine.stop_ids)
    with torch.no_grad():
        expected = [_hf_greedy(model, engine.encode_chat(p), stop) for p in PROMPTS]
    assert [c.token_ids for c in got] == expected
    assert all(c.token_ids for c in got)
