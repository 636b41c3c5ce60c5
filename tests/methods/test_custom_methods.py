"""The method matrix for the hand-written methods (bitfit, adapter) and the P-tuning v2 wrapper, on tiny Llama
(no biases) and tiny Qwen2 (q/k/v biases): learning, exactly-which-parameters, counts, fresh-process save/load,
merge, generation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.methods.harness import (
    changed_params,
    fixed_batch,
    greedy_new_tokens,
    logits,
    save_tiny_model,
    snapshot,
    tiny_config,
    tiny_model,
    train_steps,
    trainable_names,
)
from tuneforge.configs.schema import load_train_config
from tuneforge.errors import ConfigError, UserError
from tuneforge.methods import METHODS
from tuneforge.methods.adapters import (
    AdapterOptions,
    BottleneckAdapter,
    load_adapter_folder,
    tuneforge_adapter_method,
)
from tuneforge.methods.base import NoOptions, count_parameters
from tuneforge.methods.bitfit import BitFitOptions
from tuneforge.methods.full import FreezeOptions
from tuneforge.methods.prompts_v2 import PTuningV2Options, fit_ids

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6
BOTTLENECK = 8
VIRTUAL = 4
LR = {"bitfit": 5e-2, "adapter": 1e-2, "p_tuning_v2": 5e-2, "full": 1e-3, "freeze": 1e-2}


@dataclass
class Case:
    method: str
    kind: str
    opts: object


CASES = {
    "bitfit-qwen2": Case("bitfit", "qwen2", BitFitOptions(include_norms=False)),
    "bitfit-llama-norms": Case("bitfit", "llama", BitFitOptions(include_norms=True)),
    "adapter-seq-llama": Case("adapter", "llama", AdapterOptions(BOTTLENECK, "relu", "sequential", 1.0)),
    "adapter-seq-qwen2": Case("adapter", "qwen2", AdapterOptions(BOTTLENECK, "gelu", "sequential", 1.0)),
    "adapter-par-llama": Case("adapter", "llama", AdapterOptions(BOTTLENECK, "silu", "parallel", 4.0)),
    "adapter-par-qwen2": Case("adapter", "qwen2", AdapterOptions(BOTTLENECK, "tanh", "parallel", 2.0)),
    "p_tuning_v2-llama": Case("p_tuning_v2", "llama", PTuningV2Options(num_virtual_tokens=VIRTUAL)),
    "p_tuning_v2-qwen2": Case("p_tuning_v2", "qwen2", PTuningV2Options(num_virtual_tokens=VIRTUAL)),
    "full-llama": Case("full", "llama", NoOptions()),
    "full-qwen2": Case("full", "qwen2", NoOptions()),
    "freeze-llama": Case("freeze", "llama", FreezeOptions(trainable_layers=1)),
    "freeze-qwen2-modules": Case("freeze", "qwen2", FreezeOptions(trainable_layers=0, trainable_modules=["*.mlp.*"])),
}
FULL_MODEL_METHODS = ("bitfit", "full", "freeze")  # their result is a whole model folder, not an adapter


def expected_trainable(case: Case, base_names: list[str]) -> tuple[set[str], int]:
    """The parameter names that must train (in the adapted model) and their count, from the config alone."""
    c = tiny_config(case.kind)
    h, n_layers, kv = c.hidden_size, c.num_hidden_layers, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    if case.method == "bitfit" and not case.opts.include_norms:  # Qwen2: q/k/v biases
        names = {n for n in base_names if n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))}
        return names, n_layers * (h + 2 * kv)
    if case.method == "bitfit":  # Llama: two RMSNorms per block + the final norm
        names = {n for n in base_names if n.endswith("layernorm.weight")} | {"model.norm.weight"}
        return names, (2 * n_layers + 1) * h
    if case.method == "adapter":
        names = {f"model.layers.{i}.{sub}.tuneforge_adapter.{lin}.{w}" for i in range(n_layers)
                 for sub in ("self_attn", "mlp") for lin in ("down", "up") for w in ("weight", "bias")}
        b = case.opts.bottleneck_size
        return names, n_layers * 2 * (2 * h * b + b + h)
    if case.method == "p_tuning_v2":
        return {"prompt_encoder.default.embedding.weight"}, case.opts.num_virtual_tokens * n_layers * 2 * kv
    mlp = 3 * h * c.intermediate_size  # gate, up, down (no biases)
    if case.method == "full":  # every parameter; a tied lm_head is the embedding, counted once
        lm_head = 0 if c.tie_word_embeddings else c.vocab_size * h
        attn = 2 * h * h + 2 * h * kv + (h + 2 * kv if case.kind == "qwen2" else 0)
        return {n for n in base_names if not n.startswith("buffer:")}, c.vocab_size * h + lm_head + n_layers * (attn + mlp + 2 * h) + h
    if case.method == "freeze" and case.opts.trainable_layers:
        top = f"model.layers.{n_layers - 1}."
        attn = 2 * h * h + 2 * h * kv + (h + 2 * kv if case.kind == "qwen2" else 0)
        return {n for n in base_names if n.startswith(top)}, attn + mlp + 2 * h
    if case.method == "freeze":  # modules matching *.mlp.*
        return {n for n in base_names if ".mlp." in n}, n_layers * mlp
    raise AssertionError(case.method)


def base_of(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# The fresh process: load every saved result the way a user would and record its logits and greedy tokens.
LOADER = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
from tests.methods.harness import fixed_batch, greedy_new_tokens, logits
from tuneforge.methods import METHODS
jobs, out = json.loads(sys.argv[1]), sys.argv[2]
results = {}
for job in jobs:
    if job["method"] in ("bitfit", "full", "freeze"):  # a full model folder
        model = AutoModelForCausalLM.from_pretrained(job["saved"], dtype=torch.float32)
    elif job["method"] == "p_tuning_v2":  # a PEFT folder: PEFT itself must load it
        from peft import PeftModel
        base = AutoModelForCausalLM.from_pretrained(job["base"], dtype=torch.float32)
        model = PeftModel.from_pretrained(base, job["saved"])
    else:  # a TuneForge adapter folder, through the loader chat/eval use
        from tuneforge.methods.adapters import load_adapter_folder
        base = AutoModelForCausalLM.from_pretrained(job["base"], dtype=torch.float32)
        model = load_adapter_folder(base, job["saved"])
    batch = fixed_batch()
    results[job["id"]] = {"logits": logits(model, batch), "greedy": greedy_new_tokens(model, batch),
                          "last": logits(model, {k: v[:1, :8] for k, v in batch.items()})[0, -1]}
torch.save(results, out)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Train every case once, save it, then load all of them in ONE fresh Python process."""
    root = tmp_path_factory.mktemp("custom_methods")
    base_dirs = {kind: save_tiny_model(kind, root / f"base-{kind}") for kind in ("llama", "qwen2")}
    batch = fixed_batch()
    results, jobs = {}, []
    for case_id, case in CASES.items():
        torch.manual_seed(0)
        model = tiny_model(path=base_dirs[case.kind])
        before = snapshot(model)
        base_logits = logits(model, batch)
        model = METHODS[case.method].apply(model, case.opts, None)
        applied = snapshot(model)
        r = {"before": before, "base_logits": base_logits, "applied_logits": logits(model, batch),
             "trainable": trainable_names(model), "count": count_parameters(model)[0]}
        r["losses"] = train_steps(model, batch, steps=STEPS, lr=LR[case.method])
        r["changed"] = changed_params(applied, snapshot(model))
        r["base_after"] = snapshot(base_of(model))
        r["logits"], r["greedy"] = logits(model, batch), greedy_new_tokens(model, batch)
        r["model"] = model
        saved = root / case_id
        METHODS[case.method].save(model, saved)
        r["saved"], r["base_dir"] = saved, base_dirs[case.kind]
        results[case_id] = r
        jobs.append({"id": case_id, "method": case.method, "base": base_dirs[case.kind], "saved": str(saved)})
    out = root / "loaded.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", LOADER, json.dumps(jobs), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case_id, loaded in torch.load(out).items():
        results[case_id]["loaded"] = loaded
    return results


@pytest.mark.parametrize("case_id", CASES)
def test_loss_goes_down(runs, case_id):
    losses = runs[case_id]["losses"]
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("case_id", CASES)
def test_exactly_the_intended_parameters_train(runs, case_id):
    r, case = runs[case_id], CASES[case_id]
    names, count = expected_trainable(case, list(r["before"]))
    assert names, "the expectation itself must not be empty"
    assert r["trainable"] == names
    assert r["changed"] == names  # every trainable tensor moved, nothing else did
    assert r["count"] == count  # the reported trainable count equals the one computed from the config
    # the base model's own tensors: bit-identical to before `apply`, except those BitFit trains
    base_after = {k: v for k, v in r["base_after"].items() if k in r["before"]}
    assert base_after.keys() == r["before"].keys()
    expected_base_changes = names if case.method in FULL_MODEL_METHODS else set()
    assert changed_params(r["before"], base_after) == expected_base_changes


@pytest.mark.parametrize("case_id", [c for c in CASES if c.startswith("adapter")])
def test_adapters_start_as_the_identity(runs, case_id):
    assert torch.equal(runs[case_id]["applied_logits"], runs[case_id]["base_logits"])


@pytest.mark.parametrize("case_id", CASES)
def test_save_load_in_a_fresh_process_gives_identical_logits(runs, case_id):
    r = runs[case_id]
    loaded = r["loaded"]
    torch.testing.assert_close(loaded["logits"], r["logits"], atol=1e-5, rtol=0)
    assert not torch.allclose(r["logits"], r["base_logits"], atol=1e-3)  # the trained result was really saved
    assert torch.equal(loaded["greedy"], r["greedy"])  # generation works after loading, same tokens
    assert loaded["greedy"][0] == loaded["last"].argmax()  # and the first token agrees with the forward pass


def test_adapter_folder_is_not_a_peft_folder(runs):
    saved = runs["adapter-seq-llama"]["saved"]
    assert sorted(p.name for p in saved.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert tuneforge_adapter_method(saved) == "adapter"
    assert "peft_type" not in json.loads((saved / "adapter_config.json").read_text())
    assert tuneforge_adapter_method(runs["p_tuning_v2-llama"]["saved"]) is None  # PEFT's folder: no key
    from safetensors.torch import load_file

    _, count = expected_trainable(CASES["adapter-seq-llama"], [])
    assert sum(t.numel() for t in load_file(str(saved / "adapter_model.safetensors")).values()) == count


@pytest.mark.parametrize("case_id", [c for c in CASES if CASES[c].method in FULL_MODEL_METHODS])
def test_full_model_methods_merge_to_the_trained_logits(runs, case_id):
    r = runs[case_id]
    merged = METHODS[CASES[case_id].method].merge(r["model"])
    assert type(merged).__module__.startswith("transformers.")
    torch.testing.assert_close(logits(merged, fixed_batch()), r["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("case_id", ["adapter-seq-qwen2", "p_tuning_v2-llama"])
def test_unmergeable_methods_say_so(runs, case_id):
    method = METHODS[CASES[case_id].method]
    assert not method.mergeable
    with pytest.raises(UserError, match="cannot be merged"):
        method.merge(runs[case_id]["model"])


def test_load_adapter_folder_dispatches_peft_folders_to_peft(runs, tmp_path):
    r = runs["p_tuning_v2-qwen2"]
    model = load_adapter_folder(tiny_model(path=r["base_dir"]), r["saved"])
    assert type(model).__name__ == "PeftModelForCausalLM"
    torch.testing.assert_close(logits(model, fixed_batch()), r["logits"], atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="not an adapter folder"):
        load_adapter_folder(tiny_model("llama"), tmp_path)


def test_adapter_load_refuses_a_peft_folder(runs):
    with pytest.raises(UserError, match="not a TuneForge `adapter` folder"):
        METHODS["adapter"].load(tiny_model("llama"), runs["p_tuning_v2-llama"]["saved"])


def test_bitfit_on_a_model_without_biases_says_so():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="no bias terms.*include_norms"):
        METHODS["bitfit"].apply(model, BitFitOptions(include_norms=False), None)


@pytest.mark.parametrize("placement", ["sequential", "parallel"])
def test_adapter_hook_formula(placement):
    """Sequential adapts the sub-layer output; parallel feeds the sub-layer input and adds to the output."""
    torch.manual_seed(0)
    f = torch.nn.Linear(6, 6)
    adapter = BottleneckAdapter(6, AdapterOptions(3, "tanh", placement, 0.5), torch.float32, torch.device("cpu"))
    torch.nn.init.normal_(adapter.up.weight)
    f.register_forward_hook(adapter.hook, with_kwargs=True)
    x = torch.randn(2, 6)
    with torch.no_grad():
        h = torch.nn.functional.linear(x, f.weight, f.bias)
        source = h if placement == "sequential" else x
        expected = h + 0.5 * adapter.up(torch.tanh(adapter.down(source)))
        torch.testing.assert_close(f(x), expected)


def _save_byte_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer with no merges (256 ids, one per byte): the test models have no tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(folder))


def test_p_tuning_v2_text_init_equals_prepending_the_text(tmp_path):
    """init: text makes the prefix the model's own keys/values of the text: forward and generation then equal the
    base model run on text + input. This pins PEFT's prefix layout and shows the prefix is used at inference."""
    folder = save_tiny_model("qwen2", tmp_path / "base")
    _save_byte_tokenizer(Path(folder))
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)("abc", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3
    text_ids = fit_ids(ids, 5)  # repeated to the prefix length
    assert text_ids == ids + ids[:2]
    base = tiny_model(path=folder)
    batch = fixed_batch()
    prefixed = torch.cat([torch.tensor([text_ids] * 2), batch["input_ids"]], dim=1)
    want_logits = logits(base, {"input_ids": prefixed, "attention_mask": torch.ones_like(prefixed)})[:, 5:]
    prompt = prefixed[:1, :5 + 8]  # the text + the 8 prompt tokens greedy_new_tokens uses
    want_tokens = base.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                                do_sample=False, pad_token_id=0)[0, prompt.shape[1]:]
    opts = PTuningV2Options(num_virtual_tokens=5, init="text", init_text="abc")
    model = METHODS["p_tuning_v2"].apply(tiny_model(path=folder), opts, None)
    torch.testing.assert_close(logits(model, batch), want_logits, atol=1e-5, rtol=0)
    assert torch.equal(greedy_new_tokens(model, batch), want_tokens)


def test_p_tuning_v2_says_when_init_text_is_cut(tmp_path):
    """A text of more tokens than the prefix is cut to its first ones (`fit_ids`); the run says so and what is left
    out, as prompt_tuning does; a text that fits (repeated to fill the prefix) gets no note."""
    from transformers import AutoTokenizer

    folder = save_tiny_model("qwen2", tmp_path / "base")
    _save_byte_tokenizer(Path(folder))
    tokenizer, method = AutoTokenizer.from_pretrained(folder), METHODS["p_tuning_v2"]
    said = {}
    for text in ("abcdefg", "abc"):  # one byte-level token per letter
        cfg = load_train_config(None, ["method=p_tuning_v2", "data.train=[unused.jsonl]", "p_tuning_v2.init=text",
                                       f"p_tuning_v2.init_text={text}", "p_tuning_v2.num_virtual_tokens=5"])
        model = method.apply(tiny_model(path=folder), cfg.options(method.section), cfg)
        said[text] = method.notes(model, tokenizer, cfg)
    assert said["abc"] == []
    (note,) = said["abcdefg"]
    assert "`p_tuning_v2.init_text` is 7 tokens but `p_tuning_v2.num_virtual_tokens` is 5" in note
    assert "'abcde'" in note and "'fg'" in note and "`p_tuning_v2.num_virtual_tokens: 7`" in note


EXAMPLES = {"bitfit": "bitfit", "adapter": "adapter", "p_tuning_v2": "p_tuning_v2"}


@pytest.mark.parametrize("method", EXAMPLES)
def test_example_configs_load(method):
    path = ROOT / "examples" / f"{method}.yaml"
    assert path.read_text().startswith(f"# tuneforge train examples/{method}.yaml")
    cfg = load_train_config(str(path))
    assert cfg.method == method and cfg.stage == "sft"


@pytest.mark.parametrize("override, match", [
    (["adapter.bottleneck_size=0"], "adapter.bottleneck_size"),
    (["adapter.non_linearity=swish"], "adapter.non_linearity"),
    (["adapter.placement=inside"], "adapter.placement"),
    (["method=p_tuning_v2", "p_tuning_v2.init=text"], "p_tuning_v2.init_text"),
    (["method=p_tuning_v2", "p_tuning_v2.num_virtual_tokens=0"], "p_tuning_v2.num_virtual_tokens"),
    (["method=p_tuning_v2", "training.gradient_checkpointing=true"], "training.gradient_checkpointing"),
])
def test_bad_options_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match.replace(".", r"\.")):
        load_train_config(str(ROOT / "examples" / "adapter.yaml"), override)


def test_freeze_modules_list_that_was_not_parsed_is_refused_not_trained_in_full():
    """`freeze.trainable_modules=[*.mlp.*]` unquoted on the command line is not YAML, so it arrived as the pattern
    '[*.mlp.*]', a glob character class that matched every parameter: the run trained 100% of the model."""
    said = r"`freeze.trainable_modules` is the text `\[\*\.mlp\.\*\]`, not a list.*\"freeze\.trainable_modules=\['\*\.mlp\.\*'\]\""
    with pytest.raises(ConfigError, match=said):
        load_train_config(str(ROOT / "examples" / "sft_freeze_tiny.yaml"),
                          ["freeze.trainable_layers=0", "freeze.trainable_modules=[*.mlp.*]"])
    cfg = load_train_config(str(ROOT / "examples" / "sft_freeze_tiny.yaml"),
                            ["freeze.trainable_layers=0", "freeze.trainable_modules=['*.mlp.*']"])
    model = METHODS["freeze"].apply(tiny_model("llama"), cfg.options("freeze"), cfg)
    assert trainable_names(model) and all(".mlp." in name for name in trainable_names(model))


def test_more_layers_than_the_model_has_says_the_most_it_may_be():
    """It said only "is 99 but the model has only 2 blocks"; now also what to set (or which method trains it all)."""
    model = tiny_model("llama")
    n = model.config.num_hidden_layers
    with pytest.raises(ConfigError, match=rf"has only {n} blocks: set it to at most {n} .* or use `method: full`"):
        METHODS["freeze"].apply(model, FreezeOptions(trainable_layers=99), None)


def test_freeze_layer_lr_decay_gives_each_block_its_own_rate():
    """`freeze.layer_lr_decay`: block k below the top trains at lr * decay**k; modules outside the blocks at lr."""
    model = METHODS["freeze"].apply(tiny_model("llama"), FreezeOptions(trainable_layers=2, trainable_modules=[
        "model.norm.weight"], layer_lr_decay=0.5), None)
    groups = METHODS["freeze"].param_groups(model, FreezeOptions(trainable_layers=2, layer_lr_decay=0.5), 1e-3, 0.0)
    n = model.config.num_hidden_layers
    by_id = {id(p): name for name, p in model.named_parameters()}
    rates = {by_id[id(p)]: g["lr"] for g in groups for p in g["params"]}
    assert rates["model.norm.weight"] == 1e-3
    assert all(lr == 1e-3 for name, lr in rates.items() if name.startswith(f"model.layers.{n - 1}."))
    assert all(lr == 5e-4 for name, lr in rates.items() if name.startswith(f"model.layers.{n - 2}."))
    assert set(rates) == {name for name, p in model.named_parameters() if p.requires_grad}
