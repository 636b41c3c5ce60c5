"""The method matrix for the PEFT-backed methods (LoRA variants, prompt methods, IA3, LLaMA-Adapter) and QLoRA.

For every case x {tiny llama, tiny qwen2}: the loss falls, exactly the intended parameters change (the rest is
bit-identical), the trainable count equals one computed here from the shapes, merge matches the adapter (or is
refused), and, in ONE fresh subprocess for all cases, the saved folder loads through the method's `load` and through
`peft.PeftModel.from_pretrained` with the same logits and the same greedy generation.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tests.methods.harness import (
    KINDS,
    changed_params,
    fixed_batch,
    greedy_new_tokens,
    logits,
    save_tiny_model,
    snapshot,
    tiny_model,
    train_steps,
    trainable_names,
)
from tuneforge.configs.schema import load_train_config
from tuneforge.errors import ConfigError, UserError
from tuneforge.methods import METHODS
from tuneforge.methods.base import count_parameters

REPO = Path(__file__).resolve().parents[2]
RANK = 4
STEPS = 5
LR = 1e-2


# ---------------------------------------------------------------------------------------------------------------
# Independent trainable-parameter counts, from the model config alone


def linear_shapes(c) -> dict[str, tuple[int, int]]:
    """(in, out) of each decoder-block linear of a Llama/Qwen2 config."""
    hd = c.hidden_size // c.num_attention_heads
    h, i = c.hidden_size, c.intermediate_size
    return {"q_proj": (h, c.num_attention_heads * hd), "k_proj": (h, c.num_key_value_heads * hd),
            "v_proj": (h, c.num_key_value_heads * hd), "o_proj": (c.num_attention_heads * hd, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def kv_dim(c) -> int:
    return c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)


def lora_count(c, dora=False):
    per_layer = sum(RANK * (i + o) + (o if dora else 0) for i, o in linear_shapes(c).values())
    return c.num_hidden_layers * per_layer


def p_tuning_count(c, n, enc, eh, layers=2):
    h = c.hidden_size
    if enc == "mlp":
        return n * h + (h * eh + eh) + (eh * eh + eh) + (eh * h + h)
    lstm = 0
    for layer in range(layers):  # bidirectional: two directions, each 4 gates with W_ih, W_hh, b_ih, b_hh
        inp = h if layer == 0 else 2 * eh
        lstm += 2 * (4 * eh * inp + 4 * eh * eh + 8 * eh)
    return n * h + lstm + (2 * eh * 2 * eh + 2 * eh) + (2 * eh * h + h)


def prefix_count(c, n, projection, eh):
    table = c.num_hidden_layers * 2 * kv_dim(c)  # per virtual token: a key and a value for every layer
    if not projection:
        return n * table
    return n * kv_dim(c) + (kv_dim(c) * eh + eh) + (eh * table + table)


# ---------------------------------------------------------------------------------------------------------------
# The cases


@dataclass
class Case:
    id: str
    method: str
    sections: dict
    trains: str  # regex over parameter names: exactly these train and change
    count: object  # config -> expected trainable count
    kinds: tuple = KINDS
    steps: int = STEPS
    lr: float = LR
    extra: dict = field(default_factory=dict)


LORA = {"lora": {"rank": RANK, "alpha": 8.0}}
CASES = [
    Case("lora", "lora", LORA, r"\.lora_[AB]\.", lora_count),
    Case("rslora", "rslora", LORA, r"\.lora_[AB]\.", lora_count),
    Case("dora", "dora", LORA, r"\.lora_[AB]\.|lora_magnitude_vector", lambda c: lora_count(c, dora=True)),
    Case("pissa", "pissa", LORA, r"\.lora_[AB]\.", lora_count, lr=2e-3),
    Case("olora", "olora", LORA, r"\.lora_[AB]\.", lora_count, lr=2e-3),
    Case("lora_plus", "lora_plus", {**LORA, "lora_plus": {"ratio": 16.0}}, r"\.lora_[AB]\.", lora_count, lr=1e-3),
    Case("prompt_tuning", "prompt_tuning", {"prompt_tuning": {"num_virtual_tokens": 8}},
         r"^prompt_encoder\.default\.embedding\.", lambda c: 8 * c.hidden_size, lr=3e-1),
    Case("prompt_tuning_text", "prompt_tuning",
         {"prompt_tuning": {"num_virtual_tokens": 6, "init": "text", "init_text": "t5 t6 t7 t8"}},
         r"^prompt_encoder\.default\.embedding\.", lambda c: 6 * c.hidden_size, lr=3e-1,
         kinds=("llama",)),  # our word-level test tokenizer loads as Qwen2Tokenizer for qwen2 folders
    Case("p_tuning_mlp", "p_tuning", {"p_tuning": {"num_virtual_tokens": 8, "encoder_hidden_size": 32}},
         r"^prompt_encoder\.default\.", lambda c: p_tuning_count(c, 8, "mlp", 32), lr=3e-2),
    Case("p_tuning_lstm", "p_tuning",
         {"p_tuning": {"num_virtual_tokens": 8, "encoder": "lstm", "encoder_hidden_size": 16}},
         r"^prompt_encoder\.default\.", lambda c: p_tuning_count(c, 8, "lstm", 16), lr=3e-2),
    Case("prefix_tuning", "prefix_tuning", {"prefix_tuning": {"num_virtual_tokens": 8, "encoder_hidden_size": 32}},
         r"^prompt_encoder\.default\.", lambda c: prefix_count(c, 8, True, 32), lr=1e-2),
    Case("prefix_tuning_noproj", "prefix_tuning", {"prefix_tuning": {"num_virtual_tokens": 8, "projection": False}},
         r"^prompt_encoder\.default\.embedding\.", lambda c: prefix_count(c, 8, False, 0), lr=1e-1),
    Case("ia3", "ia3", {"ia3": {"target_modules": ["k_proj", "v_proj", "down_proj"],
                                "feedforward_modules": ["down_proj"]}}, r"\.ia3_l\.",
         lambda c: c.num_hidden_layers * (2 * kv_dim(c) + c.intermediate_size), lr=3e-1),
    Case("llama_adapter", "llama_adapter", {"llama_adapter": {"adapter_len": 4}}, r"adaption_(prompt|gate)",
         lambda c: c.num_hidden_layers * (4 * c.hidden_size + 1), kinds=("llama",), steps=8, lr=1e-1),
]
MATRIX = [pytest.param(case, kind, id=f"{case.id}-{kind}") for case in CASES for kind in case.kinds]


def make_cfg(method: str, sections: dict, device: str = "cpu"):
    base = {"method": method, "data": {"train": ["unused.jsonl"]}, "training": {"device": device}, **sections}
    return load_train_config(None, base=base)


def add_word_tokenizer(folder: Path, vocab: int) -> None:
    """A whitespace word-level tokenizer ('t0' ... 't<vocab-1>') so text init can tokenize its text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0").save_pretrained(str(folder))


@pytest.fixture(scope="module")
def base_dirs(request, tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama / Qwen2 HF folders: the shared `tiny_llama_dir` / `tiny_qwen2_dir` fixtures (tuneforge
    init-model presets) when conftest provides them, else the harness models saved once with a word tokenizer."""
    from tests.methods.harness import VOCAB

    try:
        return {kind: Path(request.getfixturevalue(f"tiny_{kind}_dir")) for kind in KINDS}
    except pytest.FixtureLookupError:
        pass
    root = tmp_path_factory.mktemp("bases")
    dirs = {}
    for kind in KINDS:
        dirs[kind] = Path(save_tiny_model(kind, root / kind))
        add_word_tokenizer(dirs[kind], VOCAB)
    return dirs


@pytest.fixture(scope="module")
def batch():
    return fixed_batch()


@pytest.fixture(scope="module")
def saved_runs():
    """(case id, kind) -> what the fresh-process check needs; filled by test_matrix, read by test_fresh_process."""
    return {}


def _train_case(case: Case, kind: str, base_dir: Path, batch, out_dir: Path) -> dict:
    method = METHODS[case.method]
    cfg = make_cfg(case.method, case.sections)
    torch.manual_seed(0)  # adapter init does not depend on which tests ran before
    model = method.apply(tiny_model(path=base_dir), cfg.options(method.section), cfg)

    trainable, _ = count_parameters(model)
    assert trainable == case.count(model.config), f"{case.id}: trainable count {trainable}"
    expected = {n for n, _ in model.named_parameters() if re.search(case.trains, n)}
    assert expected and trainable_names(model) == expected

    before = snapshot(model)
    groups = method.param_groups(model, cfg.options(method.section), case.lr, 0.0)
    losses = train_steps(model, batch, steps=case.steps, lr=case.lr, param_groups=groups)
    assert losses[-1] < losses[0] - 0.05, f"{case.id}: loss did not fall: {losses}"
    assert changed_params(before, snapshot(model)) == expected  # all trainable moved, the rest is bit-identical

    method.save(model, out_dir)
    assert (out_dir / "adapter_config.json").is_file() and (out_dir / "adapter_model.safetensors").is_file()
    assert trainable_names(model) == expected  # saving (PiSSA/OLoRA conversion) leaves training state alone

    ref_logits = logits(model, batch)
    new_tokens = greedy_new_tokens(model, batch)
    assert len(new_tokens) == 4
    _check_generate_uses_adapter(model, tiny_model(path=base_dir), batch)

    _check_merge(method, model, batch, ref_logits)
    torch.save({"logits": ref_logits, "tokens": new_tokens}, out_dir / "expected.pt")
    return {"method": case.method, "base": str(base_dir), "adapter": str(out_dir)}


def _check_generate_uses_adapter(model, base, batch):
    """`generate` scores its first token with the adapter (virtual tokens included), not with the bare base."""
    prompt = {"input_ids": batch["input_ids"][:1, :8], "attention_mask": batch["attention_mask"][:1, :8]}
    model.eval()
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=1, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
    first = out.logits[0][0].float()
    torch.testing.assert_close(first, logits(model, prompt)[0, -1], atol=1e-4, rtol=0)
    assert (first - logits(base, prompt)[0, -1]).abs().max() > 1e-2


def _check_merge(method, model, batch, ref_logits):
    if not method.mergeable:
        with pytest.raises(UserError, match="cannot be merged"):
            method.merge(model)
        return
    merged = method.merge(model)
    assert not any("lora" in n or "ia3" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, batch), ref_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case,kind", MATRIX)
def test_matrix(case, kind, base_dirs, batch, saved_runs, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp(f"{case.id}-{kind}")
    saved_runs[(case.id, kind)] = _train_case(case, kind, base_dirs[kind], batch, out_dir)


FRESH_SCRIPT = r"""
import json, sys
import torch
from peft import PeftModel
from tests.methods.harness import fixed_batch, greedy_new_tokens, logits, tiny_model
from tuneforge.methods import METHODS
jobs, results = json.loads(sys.argv[1]), {}
batch = fixed_batch()
for key, job in jobs.items():
    method = METHODS[job["method"]]
    load_kwargs = {}
    if job.get("quantize"):
        opts = method.Options(**job["quantize"])
        load_kwargs["quantization_config"] = method.quantization_config(opts)
    expected = torch.load(job["adapter"] + "/expected.pt")
    via_method = method.load(tiny_model(path=job["base"], **load_kwargs), job["adapter"])
    via_peft = PeftModel.from_pretrained(tiny_model(path=job["base"], **load_kwargs), job["adapter"])
    results[key] = {
        "is_peft": isinstance(via_method, PeftModel),
        "method_diff": (logits(via_method, batch) - expected["logits"]).abs().max().item(),
        "peft_diff": (logits(via_peft, batch) - expected["logits"]).abs().max().item(),
        "tokens": greedy_new_tokens(via_method, batch).tolist(),
        "expected_tokens": expected["tokens"].tolist(),
    }
print("RESULTS" + json.dumps(results))
"""


def run_fresh(jobs: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", FRESH_SCRIPT, json.dumps(jobs)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS"))
    return json.loads(line[len("RESULTS"):])


def test_fresh_process_load(base_dirs, batch, saved_runs, qlora_run, tmp_path_factory):
    """Every saved folder (all cases and QLoRA) loads in ONE fresh process with the same logits and generation."""
    for case in CASES:
        for kind in case.kinds:
            if (case.id, kind) not in saved_runs:  # this test run alone: train what it needs
                out_dir = tmp_path_factory.mktemp(f"{case.id}-{kind}")
                saved_runs[(case.id, kind)] = _train_case(case, kind, base_dirs[kind], batch, out_dir)
    jobs = {f"{cid}-{kind}": job for (cid, kind), job in saved_runs.items()}
    jobs["qlora"] = qlora_run
    results = run_fresh(jobs)
    assert set(results) == set(jobs)
    for key, r in results.items():
        # pissa/olora reload as a converted rank-2r LoRA on the original base: same function, other rounding
        tol = 1e-4 if key.startswith(("pissa", "olora")) else 1e-5
        # plain PEFT loading of the 4-bit base lets bitsandbytes use its bf16 CPU inference kernel for eval
        peft_tol = 1e-2 if key == "qlora" else tol
        assert r["is_peft"], key
        assert r["method_diff"] <= tol and r["peft_diff"] <= peft_tol, (key, r)
        assert r["tokens"] == r["expected_tokens"], (key, r)


# ---------------------------------------------------------------------------------------------------------------
# Method-specific checks


def test_lora_plus_groups_put_b_at_ratio_times_lr():
    model = tiny_model("llama")
    cfg = make_cfg("lora_plus", {**LORA, "lora_plus": {"ratio": 8.0}})
    method = METHODS["lora_plus"]
    model = method.apply(model, cfg.options("lora_plus"), cfg)
    groups = method.param_groups(model, cfg.options("lora_plus"), 1e-3, 0.1)
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = [{by_id[id(p)] for p in g["params"]} for g in groups]
    assert [g["lr"] for g in groups] == [1e-3, 8e-3] and all(g["weight_decay"] == 0.1 for g in groups)
    assert all(".lora_A." in n for n in names[0]) and all(".lora_B." in n for n in names[1])
    assert names[0] | names[1] == trainable_names(model) and not names[0] & names[1]


def test_pissa_saves_a_plain_lora_for_the_original_base(base_dirs, batch, tmp_path):
    """The saved PiSSA adapter is a rank-2r LoRA for the UNMODIFIED base (the in-memory base holds the residual)."""
    cfg = make_cfg("pissa", LORA)
    model = METHODS["pissa"].apply(tiny_model(path=base_dirs["llama"]), cfg.options("lora"), cfg)
    original = tiny_model(path=base_dirs["llama"]).model.layers[0].self_attn.q_proj.weight
    residual = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.equal(original, residual)  # PiSSA moved the principal part into the adapter
    with warnings.catch_warnings():  # PEFT's "consider converting the PiSSA adapter" is not shown: this converts it
        warnings.filterwarnings("error", message=".*changes the base weights")
        METHODS["pissa"].save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 2 * RANK and config["init_lora_weights"] is True


def test_pissa_starts_exactly_at_the_base_for_any_alpha(base_dirs, batch):
    """PEFT divides the singular values by alpha/rank and subtracts the scaled principal part from the residual, so
    the model before training is the base whatever `lora.alpha` is (what examples/pissa.yaml tells users)."""
    base_logits = logits(tiny_model(path=base_dirs["llama"]), batch)
    for alpha in (1.0, float(RANK), 32.0):
        cfg = make_cfg("pissa", {"lora": {"rank": RANK, "alpha": alpha}})
        model = METHODS["pissa"].apply(tiny_model(path=base_dirs["llama"]), cfg.options("lora"), cfg)
        torch.testing.assert_close(logits(model, batch), base_logits, atol=1e-5, rtol=0)


def test_a_target_name_or_pattern_that_matches_nothing_is_named(base_dirs):
    """PEFT refuses a target list only when no name matches, and freeze skipped a pattern that matched nothing: a
    typo trained less than asked, without a word."""
    cfg = make_cfg("lora", {"lora": {"rank": RANK, "target_modules": ["q_proj", "vv_proj"]}})
    with pytest.raises(ConfigError, match="`lora.target_modules`: `vv_proj` names no module.*v_proj"):
        METHODS["lora"].apply(tiny_model(path=base_dirs["llama"]), cfg.options("lora"), cfg)
    cfg = make_cfg("lora", {"lora": {"rank": RANK, "modules_to_save": ["lm-head"]}})  # saved nothing, silently
    with pytest.raises(ConfigError, match="`lora.modules_to_save`: `lm-head` names no module.*lm_head"):
        METHODS["lora"].apply(tiny_model(path=base_dirs["llama"]), cfg.options("lora"), cfg)
    cfg = make_cfg("freeze", {"freeze": {"trainable_layers": 1, "trainable_modules": ["embed_tokens", "nosuch"]}})
    with pytest.raises(ConfigError, match="`freeze.trainable_modules`: `nosuch` matched no parameter"):
        METHODS["freeze"].apply(tiny_model(path=base_dirs["llama"]), cfg.options("freeze"), cfg)


def test_ia3_target_that_matches_nothing_lists_the_linear_layers(base_dirs):
    """PEFT's own sentence ("Target modules {'foo'} not found in the base model") names no valid choice; one unknown
    name among known ones was even trained without a word."""
    for targets in (["foo"], ["k_proj", "foo"]):
        cfg = make_cfg("ia3", {"ia3": {"target_modules": targets, "feedforward_modules": []}})
        with pytest.raises(ConfigError, match=r"^`ia3.target_modules`: `foo` names no module of this model\. Its "
                                              r"linear layers are .*down_proj.*k_proj.*v_proj") as err:
            METHODS["ia3"].apply(tiny_model(path=base_dirs["llama"]), cfg.options("ia3"), cfg)
        assert "not found in the base model" not in str(err.value)
    cfg = make_cfg("ia3", {"ia3": {"target_modules": ["all-linear"]}})  # what the error offers works
    model = METHODS["ia3"].apply(tiny_model(path=base_dirs["llama"]), cfg.options("ia3"), cfg)
    rescaled = {n.split(".ia3_l")[0].rsplit(".", 1)[-1] for n in trainable_names(model)}
    assert rescaled == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert model.peft_config["default"].feedforward_modules == {"down_proj"}


def test_config_errors():
    with pytest.raises(ConfigError, match="prompt_tuning.init_text"):
        make_cfg("prompt_tuning", {"prompt_tuning": {"init": "text"}})
    with pytest.raises(ConfigError, match="lora_plus.ratio"):
        make_cfg("lora_plus", {"lora_plus": {"ratio": 0}})
    with pytest.raises(ConfigError, match="lora.rank"):
        make_cfg("dora", {"lora": {"rank": 0}})
    with pytest.raises(ConfigError, match="ia3.feedforward_modules"):
        make_cfg("ia3", {"ia3": {"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}})
    with pytest.raises(ConfigError, match="p_tuning.num_virtual_tokens"):
        make_cfg("p_tuning", {"p_tuning": {"num_virtual_tokens": 0}})


def test_prompt_tuning_init_text_without_text_init_is_refused():
    """PEFT ignores `prompt_tuning.init_text` under the default random init, so a user who set only the text got a
    random soft prompt without a word (p_tuning_v2 already refused the same combination)."""
    with pytest.raises(ConfigError, match=r"`prompt_tuning.init_text` is set but `prompt_tuning.init` is `random`"):
        make_cfg("prompt_tuning", {"prompt_tuning": {"init_text": "Answer briefly:"}})
    make_cfg("prompt_tuning", {"prompt_tuning": {"init": "text", "init_text": "Answer briefly:"}})


def test_llama_adapter_refuses_unsupported_architecture():
    cfg = make_cfg("llama_adapter", {})
    with pytest.raises(ConfigError, match=r"supports model types gpt2, llama, mistral .*this model is `qwen2`"):
        METHODS["llama_adapter"].apply(tiny_model("qwen2"), cfg.options("llama_adapter"), cfg)


def test_llama_adapter_texts_name_the_model_types_peft_supports_and_each_trains(batch):
    """The summary (README methods table) and guide name exactly PEFT's AdaptionPrompt model types, and each of them
    starts at the base model (zero-init gate) and learns."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.methods.harness import VOCAB
    from tuneforge.methods.llama_adapter import supported_model_types

    method, types = METHODS["llama_adapter"], supported_model_types()
    named = set(re.search(r"model types ([\w, ]+)\)", method.summary).group(1).split(", "))
    assert named == set(types)
    assert all(t in method.guide.lower().replace("-", "") for t in types)
    cfg = make_cfg("llama_adapter", {"llama_adapter": {"adapter_len": 4}})
    for model_type in types:
        config = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                      bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config)
        base_logits = logits(base, batch)
        model = method.apply(base, cfg.options("llama_adapter"), cfg)
        torch.testing.assert_close(logits(model, batch), base_logits, atol=1e-6, rtol=0)
        losses = train_steps(model, batch, steps=8, lr=1e-1)
        assert losses[-1] < losses[0] - 0.05, (model_type, losses)


def _no_special_tokens_base(folder: Path) -> Path:
    """The tiny Llama with a word tokenizer that has no pad/eos/unk/bos: the loader adds <|pad|> and resizes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.methods.harness import VOCAB

    save_tiny_model("llama", folder)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))  # not declared as unk
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(str(folder))
    return folder


def test_adapter_saves_decide_the_embeddings_without_peft_warnings(batch, tmp_path):
    """PEFT's save_embedding_layers="auto" re-reads the base config to guess whether the vocabulary was resized and
    says so in a raw warning (offline with a hub-id base: "Could not find a config file"; after a resize: "Setting
    `save_embedding_layers` to `True`"). The loader knows: the embeddings are saved exactly when it resized them,
    such an adapter reloads onto a freshly resized base as the same function, and no PEFT warning is shown."""
    from safetensors import safe_open

    from tuneforge.models.loading import load_model_and_tokenizer

    method = METHODS["prompt_tuning"]
    cfg = make_cfg("prompt_tuning", {"prompt_tuning": {"num_virtual_tokens": 4},
                                     "model": {"name_or_path": str(_no_special_tokens_base(tmp_path / "base"))}})
    resized, _ = load_model_and_tokenizer(cfg.model)
    plain = tiny_model("llama")
    plain.name_or_path = "someorg/tiny-model"  # what from_pretrained records for a hub id (not reachable here)
    saved = {}
    for name, base in (("resized", resized), ("hub", plain)):
        model = method.apply(base, cfg.options(method.section), cfg)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*(save_embedding_layers|Could not find a config file)")
            method.save(model, tmp_path / name)
        with safe_open(str(tmp_path / name / "adapter_model.safetensors"), "pt") as f:
            saved[name] = {k for k in f.keys() if "embed_tokens" in k or "lm_head" in k}
        if name == "resized":
            expected = logits(model, batch)
    assert saved["resized"] and not saved["hub"]
    reloaded = method.load(load_model_and_tokenizer(cfg.model)[0], tmp_path / "resized")  # new random pad row
    torch.testing.assert_close(logits(reloaded, batch), expected, atol=1e-6, rtol=0)


def test_prompt_tuning_says_when_init_text_is_cut(base_dirs, monkeypatch):
    """PEFT cuts an init_text longer than num_virtual_tokens without a word; the method's note says how many tokens
    it has, which start the prompt and what is dropped, and the soft prompt is indeed the first ones' embeddings. The
    note counts with the run's tokenizer: it loads none of its own."""
    from transformers import AutoTokenizer

    method, text = METHODS["prompt_tuning"], "t1 t2 t3 t4 t5 t6 t7 t8 t9 t10 t11 t12"
    tokenizer = AutoTokenizer.from_pretrained(str(base_dirs["llama"]))
    ids = tokenizer(text)["input_ids"]  # PEFT counts special tokens
    n = len(ids) - 2
    cfg = make_cfg("prompt_tuning", {"prompt_tuning": {"num_virtual_tokens": n, "init": "text", "init_text": text}})
    model = method.apply(tiny_model(path=base_dirs["llama"]), cfg.options(method.section), cfg)
    loads = []
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: loads.append(a))
    (note,) = method.notes(model, tokenizer, cfg)
    assert loads == []
    assert f"`prompt_tuning.init_text` is {len(ids)} tokens" in note
    assert f"`prompt_tuning.num_virtual_tokens` is {n}:" in note
    assert "t12" in note.split("the rest")[1] and f"`prompt_tuning.num_virtual_tokens: {len(ids)}`" in note
    embed = model.get_input_embeddings().weight
    torch.testing.assert_close(model.prompt_encoder.default.embedding.weight, embed[ids[:n]].float())
    monkeypatch.undo()
    cfg = make_cfg("prompt_tuning", {"prompt_tuning": {"num_virtual_tokens": len(ids), "init": "text",
                                                       "init_text": text}})
    model = method.apply(tiny_model(path=base_dirs["llama"]), cfg.options(method.section), cfg)
    assert method.notes(model, tokenizer, cfg) == []


def test_ia3_default_targets_train():
    cfg = make_cfg("ia3", {})
    model = METHODS["ia3"].apply(tiny_model("llama"), cfg.options("ia3"), cfg)
    assert trainable_names(model) and all(".ia3_l." in n for n in trainable_names(model))


# ---------------------------------------------------------------------------------------------------------------
# QLoRA


def qlora_model(base_dir: Path, compute_dtype="fp32", seed=0, **qopts):
    method = METHODS["qlora"]
    cfg = make_cfg("qlora", {**LORA, "qlora": {"compute_dtype": compute_dtype, **qopts}})
    opts = cfg.options("qlora")
    torch.manual_seed(seed)
    base = tiny_model(path=base_dir, quantization_config=method.quantization_config(opts))
    return method.apply(base, opts, cfg), cfg


def bits_per_param(model) -> float:
    import bitsandbytes as bnb

    bits = params = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            n = qs.shape[0] * qs.shape[1]
            extra = qs.absmax.numel() * qs.absmax.element_size()
            if qs.nested:
                extra += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
            bits += 8 * (m.weight.numel() * m.weight.element_size() + extra)
            params += n
    return bits / params


@pytest.fixture(scope="module")
def qlora_run(base_dirs, batch, tmp_path_factory) -> dict:
    """QLoRA trained a few steps on the tiny Llama and saved; its fresh-process reload is in test_fresh_process_load."""
    model, _ = qlora_model(base_dirs["llama"])
    train_steps(model, batch, steps=3, lr=LR)
    out = tmp_path_factory.mktemp("qlora")
    METHODS["qlora"].save(model, out)
    torch.save({"logits": logits(model, batch), "tokens": greedy_new_tokens(model, batch)}, out / "expected.pt")
    return {"method": "qlora", "base": str(base_dirs["llama"]), "adapter": str(out),
            "quantize": {"compute_dtype": "fp32"}}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("compute_dtype", ["bf16", "fp32"])
def test_qlora_4bit_trains(kind, compute_dtype, base_dirs, batch):
    import bitsandbytes as bnb

    model, _ = qlora_model(base_dirs[kind], compute_dtype)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 7 * model.config.num_hidden_layers
    assert all(m.compute_dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[compute_dtype] for m in quantized)
    assert 4.1 < bits_per_param(model) < 4.2  # NF4 + double quant: 4 + 8/64 + 32/(64*256) = 4.127 bits
    assert count_parameters(model)[0] == lora_count(model.config)
    before = snapshot(model)
    losses = train_steps(model, batch, steps=STEPS, lr=LR)
    assert losses[-1] < losses[0] - 0.05, losses
    assert changed_params(before, snapshot(model)) == trainable_names(model)
    assert all(".lora_" in n for n in trainable_names(model))


def lora_grads(model, batch) -> dict[str, torch.Tensor]:
    from tests.methods.harness import loss_of

    model.train()
    model.zero_grad(set_to_none=True)
    loss_of(model, batch).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def test_qlora_eval_during_training_keeps_learning(base_dirs, batch):
    """The bnb trap: on AVX512-BF16 CPUs an eval/no_grad forward repacks 4-bit weights in place into a layout with
    no autograd (and rounds their scales). After an eval and a generate, the gradients must equal those of an
    identical model that never evaluated, the base must be untouched, and the loss must keep falling."""
    import bitsandbytes as bnb

    evaluated, _ = qlora_model(base_dirs["llama"])
    control, _ = qlora_model(base_dirs["llama"])
    train_steps(evaluated, batch, steps=2, lr=LR)
    train_steps(control, batch, steps=2, lr=LR)
    before = snapshot(evaluated)

    eval_logits = logits(evaluated, batch)  # eval mode + no_grad: where bitsandbytes would repack
    greedy_new_tokens(evaluated, batch)
    layers = [m for m in evaluated.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert changed_params(before, snapshot(evaluated)) == set()
    control.eval()
    with torch.no_grad():  # eval logits are the training-path function (same kernels as the control)
        torch.testing.assert_close(eval_logits, loss_free_logits(control, batch), atol=0, rtol=0)

    reference = lora_grads(control, batch)
    after_eval = lora_grads(evaluated, batch)
    for name, grad in reference.items():
        assert torch.equal(after_eval[name], grad), name
    losses = train_steps(evaluated, batch, steps=4, lr=LR)
    assert losses[-1] < losses[0] - 0.05, losses

    if bnb.nn.modules.has_avx512bf16():  # the check above is meaningful: without the guard, the same eval breaks it
        broken, _ = qlora_model(base_dirs["llama"])
        for m in broken.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = True
        train_steps(broken, batch, steps=2, lr=LR)
        logits(broken, batch)
        bad = lora_grads(broken, batch)
        assert any(not torch.allclose(bad[n], g, atol=1e-6, rtol=1e-5) for n, g in reference.items())


def loss_free_logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def test_qlora_8bit_loads_and_trains(base_dirs, batch):
    import bitsandbytes as bnb

    model, _ = qlora_model(base_dirs["qwen2"], load_in_8bit=True)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(layers) == 7 * model.config.num_hidden_layers and all(m.weight.dtype == torch.int8 for m in layers)
    losses = train_steps(model, batch, steps=3, lr=LR)
    logits(model, batch)  # an eval in between must not stop learning either
    losses += train_steps(model, batch, steps=3, lr=LR)
    assert losses[-1] < losses[0] - 0.05 and losses[-1] < losses[3], losses


def test_qlora_8bit_optimizer_hook(base_dirs, batch):
    import bitsandbytes as bnb

    method = METHODS["qlora"]
    model, cfg = qlora_model(base_dirs["llama"], optimizer="adamw_8bit")
    assert method.optimizer_class(cfg.options("qlora")) is bnb.optim.AdamW8bit
    assert method.optimizer_class(make_cfg("qlora", {}).options("qlora")) is None
    losses = train_steps(model, batch, steps=4, lr=LR, optimizer_class=method.optimizer_class(cfg.options("qlora")))
    assert losses[-1] < losses[0] - 0.05, losses
    with pytest.raises(ConfigError, match="needs CUDA"):
        make_cfg("qlora", {"qlora": {"optimizer": "paged_adamw_8bit"}})


def test_qlora_adapter_onto_full_precision_base_and_merge(base_dirs, batch, qlora_run):
    """The QLoRA adapter is a plain LoRA: it loads onto the fp32 base, where merge matches; merging into the
    quantized model is refused."""
    method = METHODS["qlora"]
    base_logits = logits(tiny_model(path=base_dirs["llama"]), batch)
    model = method.load(tiny_model(path=base_dirs["llama"]), qlora_run["adapter"])
    adapter_logits = logits(model, batch)
    assert (adapter_logits - base_logits).abs().max() > 1e-3  # the adapter does something
    quantized = torch.load(Path(qlora_run["adapter"]) / "expected.pt")["logits"]
    assert (adapter_logits - quantized).abs().max() < 0.5  # same function up to the 4-bit rounding of the base
    torch.testing.assert_close(logits(method.merge(model), batch), adapter_logits, atol=1e-4, rtol=0)
    quantized_model, _ = qlora_model(base_dirs["llama"])
    with pytest.raises(UserError, match="unquantized base"):
        method.merge(quantized_model)


def test_qlora_fp16_compute_dtype_needs_fp16_precision_with_its_reason_and_the_fix():
    with pytest.raises(ConfigError) as err:
        make_cfg("qlora", {"qlora": {"compute_dtype": "fp16"}})
    text = str(err.value)
    assert text.startswith("`qlora.compute_dtype: fp16` needs `training.precision: fp16` (this run has `fp32`)")
    assert "\n" not in text and "flush to zero" in text  # why
    assert "Set `training.precision: fp16` too" in text and "`qlora.compute_dtype: bf16` on GPUs" in text  # the fix
    # with fp16 precision the loop scales the loss, so only the CPU refusal of fp16 itself remains
    with pytest.raises(ConfigError) as err:
        make_cfg("qlora", {"qlora": {"compute_dtype": "fp16"}, "training": {"precision": "fp16", "device": "cpu"}})
    assert "compute_dtype" not in str(err.value) and "`training.precision: fp16` needs a GPU" in str(err.value)


def test_qlora_refuses_unquantized_model_and_loftq_on_cpu():
    cfg = make_cfg("qlora", {})
    with pytest.raises(ConfigError, match="loaded quantized"):
        METHODS["qlora"].apply(tiny_model("llama"), cfg.options("qlora"), cfg)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="loftq` needs a CUDA GPU"):
            make_cfg("loftq", {})


def quantization_error(model, full) -> float:
    """Sum over LoRA-wrapped 4-bit layers of ||W - (dequant(W_4bit) + delta_W_lora)||^2 against the fp32 weights."""
    import bitsandbytes as bnb

    originals = dict(full.named_modules())
    total = 0.0
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") and isinstance(module.base_layer, bnb.nn.Linear4bit):
            w = module.base_layer.weight
            effective = bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
            effective = effective + module.get_delta_weight("default").float()
            original = originals[name.removeprefix("base_model.model.")].weight.float()
            total += (original - effective).pow(2).sum().item()
    return total


@pytest.mark.gpu
def test_loftq_and_paged_optimizer_on_cuda(base_dirs, batch, tmp_path):
    """LoftQ (CUDA only in PEFT): its init cancels part of the 4-bit quantization error that plain QLoRA keeps;
    it trains with the paged 8-bit AdamW, and the adapter reloads onto the 4-bit base with the same logits."""
    batch = {k: v.cuda() for k, v in batch.items()}
    full = tiny_model(path=base_dirs["llama"]).cuda()
    errors, models = {}, {}
    for name in ("qlora", "loftq"):
        method = METHODS[name]
        cfg = make_cfg(name, {**LORA, "qlora": {"compute_dtype": "fp32", "optimizer": "paged_adamw_8bit"}}, "cuda")
        opts = cfg.options("qlora")
        torch.manual_seed(0)
        base = tiny_model(path=base_dirs["llama"], **method.load_kwargs(opts, cfg))
        models[name] = method.apply(base, opts, cfg)
        errors[name] = quantization_error(models[name], full)
    assert errors["loftq"] < 0.95 * errors["qlora"], errors
    method, model = METHODS["loftq"], models["loftq"]
    optimizer_class = method.optimizer_class(cfg.options("qlora"))
    assert optimizer_class.__name__ == "PagedAdamW8bit"
    losses = train_steps(model, batch, steps=STEPS, lr=LR, optimizer_class=optimizer_class)
    assert losses[-1] < losses[0] - 0.05, losses
    method.save(model, tmp_path)
    reloaded = method.load(tiny_model(path=base_dirs["llama"], **method.load_kwargs(cfg.options("qlora"), cfg)),
                           tmp_path)
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), atol=1e-5, rtol=0)


def test_prompt_tuning_text_init_loads_the_tokenizer_once(base_dirs, monkeypatch):
    """`apply` loaded the tokenizer to check the text had tokens, then PEFT loaded it again (it takes no tokenizer
    or ids): PEFT's load is now the only one."""
    from transformers import AutoTokenizer

    method = METHODS["prompt_tuning"]
    cfg = make_cfg("prompt_tuning", {"prompt_tuning": {"num_virtual_tokens": 4, "init": "text", "init_text": "t1 t2"}})
    loads, load = [], AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: loads.append(a) or load(*a, **k))
    method.apply(tiny_model(path=base_dirs["llama"]), cfg.options(method.section), cfg)
    assert len(loads) == 1


def _stripping_tokenizer(folder: Path, bos: bool) -> None:
    """A word tokenizer whose normaliser deletes every 'x' (so 'xx' has no tokens), with or without a bos token."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"t0": 0, "<s>": 1, "t2": 2}, unk_token="t0"))
    tok.normalizer = normalizers.Replace("x", "")
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0",
                            bos_token="<s>" if bos else None).save_pretrained(str(folder))


@pytest.mark.parametrize("bos", [False, True])
def test_prompt_tuning_init_text_of_no_tokens(bos, tmp_path):
    """No tokens at all: a config error naming the key (PEFT divides by zero). Only a bos token: PEFT starts the
    prompt from it, and the note says so (it was an error, from a second tokenizer load of TuneForge's own)."""
    from transformers import AutoTokenizer

    tiny_model("llama").save_pretrained(str(tmp_path))
    _stripping_tokenizer(tmp_path, bos)
    method = METHODS["prompt_tuning"]
    cfg = make_cfg("prompt_tuning", {"prompt_tuning": {"num_virtual_tokens": 3, "init": "text", "init_text": "xx"}})
    if not bos:
        with pytest.raises(ConfigError, match=r"`prompt_tuning.init_text` 'xx' gives no tokens with the tokenizer in"):
            method.apply(tiny_model(path=tmp_path), cfg.options(method.section), cfg)
        return
    model = method.apply(tiny_model(path=tmp_path), cfg.options(method.section), cfg)
    (note,) = method.notes(model, AutoTokenizer.from_pretrained(str(tmp_path)), cfg)
    assert "`prompt_tuning.init_text` 'xx' gives no tokens of its own" in note and "'<s>'" in note


@pytest.mark.parametrize("modules", [["embed_tokens", "lm_head"], ["lm_head"]])
def test_lora_modules_to_save_on_tied_embeddings_stay_one_tensor(modules, batch, tmp_path):
    """Qwen2.5-0.5B, SmolLM2 and Llama-3.2-1B tie lm_head to embed_tokens. Training either through
    `lora.modules_to_save` gave each its own copy (PEFT warned; twice the trainable weights), so they drifted apart,
    and a merged export, whose config still ties them, kept only one: the exported model was not the trained one."""
    from transformers import AutoModelForCausalLM

    method = METHODS["lora"]
    cfg = make_cfg("lora", {"lora": {"rank": RANK, "target_modules": ["q_proj"], "modules_to_save": modules}})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*ensure_weight_tying")
        model = method.apply(tiny_model("qwen2"), cfg.options(method.section), cfg)
    base = model.get_base_model()
    embedding_copy = base.model.embed_tokens.modules_to_save["default"].weight
    assert embedding_copy is base.lm_head.modules_to_save["default"].weight
    vocab, hidden = embedding_copy.shape
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert count_parameters(model)[0] == lora + vocab * hidden  # one trained copy, not two
    train_steps(model, batch, steps=3, lr=1e-2)
    expected = logits(model, batch)
    merged = method.merge(model)
    merged.save_pretrained(str(tmp_path / "merged"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    torch.testing.assert_close(logits(reloaded, batch), expected, atol=1e-4, rtol=0)
