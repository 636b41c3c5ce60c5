"""`tuneforge export` to Hugging Face folders: merged logits equal the adapter model's, plain transformers / PEFT
load the result in a fresh process without TuneForge, sharding, dtypes, stop tokens, and the output folder rules.

Adapters are made with the registry's own `apply`/`save` on the tiny fixtures, with their zero-initialised parts
randomised so that a merge that forgot them would change the logits.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tuneforge.cli import main
from tuneforge.errors import UserError
from tuneforge.inference.export import source
from tuneforge.inference.export.cli import ExportArgs, export_cli
from tuneforge.inference.export.hf import parse_shard_size
from tuneforge.methods import METHODS

REPO = Path(__file__).resolve().parents[2]
IDS = torch.tensor([[5, 17, 300, 42, 9, 1000, 77, 8, 250, 3]])


def make_adapter(method: str, base: Path, out: Path, scale: float = 0.05, **options) -> Path:
    """Apply `method` to the base through the registry, perturb what starts at identity, save it like training."""
    from transformers import AutoModelForCausalLM

    m = METHODS[method]
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    opts = m.Options(**options)
    model = m.apply(model, opts, None)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)
            elif "ia3_l" in name:
                p.add_(torch.randn_like(p) * 4 * scale)
    m.save(model, out)
    return out


def adapter_logits(base: Path, adapter: Path) -> torch.Tensor:
    """Reference: the base with the adapter applied (not merged), as chat and eval run it."""
    from tuneforge.configs.schema import ModelConfig

    model, _ = source.load_with_adapter(str(base), adapter, ModelConfig(name_or_path=str(base)), torch.float32)
    with torch.no_grad():
        return model(input_ids=IDS).logits


FRESH_LOADER = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
jobs, out = json.loads(sys.argv[1]), sys.argv[2]
ids = torch.tensor(json.loads(sys.argv[3]))
results = {}
for job in jobs:
    model = AutoModelForCausalLM.from_pretrained(job["folder"], dtype=torch.float32).eval()
    if job.get("adapter"):
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, job["adapter"]).eval()
    with torch.no_grad():
        results[job["id"]] = model(input_ids=ids).logits
assert not any(name.startswith("tuneforge") for name in sys.modules), "TuneForge was imported"
torch.save(results, out)
"""


def load_fresh(jobs: list[dict], tmp_path: Path) -> dict:
    """Logits from a fresh Python that imports only transformers/PEFT (TuneForge is not on its path)."""
    out = tmp_path / "fresh.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", FRESH_LOADER, json.dumps(jobs), str(out), json.dumps(IDS.tolist())],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tiny_qwen2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "lora-llama": (tiny_llama_dir, make_adapter("lora", tiny_llama_dir, root / "lora-llama", rank=4)),
        "dora-qwen2": (tiny_qwen2_dir, make_adapter("dora", tiny_qwen2_dir, root / "dora-qwen2", rank=4)),
        "ia3-llama": (tiny_llama_dir, make_adapter("ia3", tiny_llama_dir, root / "ia3-llama")),
        "prompt-llama": (tiny_llama_dir, make_adapter("prompt_tuning", tiny_llama_dir, root / "prompt-llama",
                                                      num_virtual_tokens=4)),
    }


MERGED_BY = {"lora-llama": "lora", "dora-qwen2": "lora", "ia3-llama": "ia3"}  # DoRA is a PEFT LoRA (use_dora)


@pytest.fixture(scope="module")
def exported(adapters, tmp_path_factory):
    """Each adapter exported with the CLI (no --model: the base comes from the adapter's own record), then ALL the
    folders loaded in ONE fresh process with plain transformers/PEFT: {case: (printed text, folder, fresh logits)}."""
    root = tmp_path_factory.mktemp("exported")
    jobs, printed = [{"id": "base-llama", "folder": str(adapters["lora-llama"][0])}], {}
    for case, (base, adapter) in adapters.items():
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            assert main(["export", "--adapter", str(adapter), "--out", str(root / case), "--dtype", "fp32"]) == 0
        printed[case] = buffer.getvalue()
        merged = case in MERGED_BY
        jobs.append({"id": case, "folder": str(root / case) if merged else str(base),
                     "adapter": None if merged else str(root / case)})
    fresh = load_fresh(jobs, root)
    return {case: (printed.get(case), root / case, fresh[case]) for case in fresh}


def test_merged_folders_match_the_adapter_and_load_without_tuneforge(adapters, exported):
    for case, merged_by in MERGED_BY.items():
        printed, folder, logits = exported[case]
        assert f"Merged the `{merged_by}` adapter" in printed
        assert not (folder / "adapter_config.json").exists()
        card = (folder / "README.md").read_text(encoding="utf-8")  # what the folder is and how to load it
        assert "## Export" in card and "AutoModelForCausalLM.from_pretrained(" in card, card
        torch.testing.assert_close(logits, adapter_logits(*adapters[case]), atol=1e-4, rtol=0)
    # the adapter really changes the model, so the equality above means something
    assert (exported["base-llama"][2] - exported["lora-llama"][2]).abs().max() > 1e-2


def test_folder_is_sharded_with_chat_template_and_stop_tokens(adapters, tmp_path):
    base, adapter = adapters["lora-llama"]
    out = tmp_path / "sharded"
    assert main(["export", "--model", str(base), "--adapter", str(adapter), "--out", str(out),
                 "--max-shard-size", "300KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and set(index["weight_map"].values()) == {p.name for p in shards}
    for shard in shards:  # a shard may pass the limit only when it holds one tensor larger than the limit
        from safetensors import safe_open

        with safe_open(str(shard), "pt") as f:
            assert shard.stat().st_size <= 300_000 + 1024 or len(list(f.keys())) == 1
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(str(base)).chat_template
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert set(tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])) <= set(eos)
    assert json.loads((out / "config.json").read_text())["use_cache"] is True


def test_full_model_folder_rewritten_in_bf16(tiny_qwen2_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "bf16"
    assert main(["export", "--model", str(tiny_qwen2_dir), "--out", str(out), "--dtype", "bf16"]) == 0
    original, written = load_file(str(tiny_qwen2_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert original.keys() == written.keys()
    for name, tensor in written.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, original[name].to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_non_mergeable_method_exports_an_adapter_folder_that_plain_peft_loads(adapters, exported, tmp_path, capsys):
    printed, out, logits = exported["prompt-llama"]
    assert "`prompt_tuning` cannot be merged" in printed and "PeftModel.from_pretrained" in printed
    assert (out / "adapter_config.json").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "config.json").exists()
    card = (out / "README.md").read_text(encoding="utf-8")  # the note is in the folder, not only on the screen
    assert "## Export" in card and "cannot be merged" in card and "PeftModel.from_pretrained" in card
    torch.testing.assert_close(logits, adapter_logits(*adapters["prompt-llama"]), atol=1e-5, rtol=0)
    adapter = adapters["prompt-llama"][1]
    assert main(["export", "--adapter", str(adapter), "--out", str(tmp_path / "g"), "--format", "gguf"]) == 2
    assert "cannot be merged" in capsys.readouterr().err and not (tmp_path / "g").exists()
    # an adapter folder given as --model is taken as the adapter (its base from its own record)
    assert main(["export", "--model", str(adapter), "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "adapter_config.json").is_file()


def test_the_peft_loading_line_for_a_builtin_base_names_a_folder_transformers_loads(tiny_llama_dir, tmp_path,
                                                                                    monkeypatch):
    """An adapter trained on builtin:smollm2-135m-instruct was exported with the line
    `AutoModelForCausalLM.from_pretrained('builtin:smollm2-135m-instruct')`, which plain transformers cannot load;
    the line names the built-in's cached folder instead, and it runs."""
    import tuneforge.models.builtin as builtin
    from tuneforge.inference.export.cli import adapter_load_hint

    adapter = make_adapter("prompt_tuning", tiny_llama_dir, tmp_path / "prompt", num_virtual_tokens=3)
    monkeypatch.setattr(builtin, "resolve_builtin", lambda name: tiny_llama_dir)
    hint = adapter_load_hint(METHODS["prompt_tuning"], "builtin:smollm2-135m-instruct", adapter)
    assert "builtin:" not in hint and repr(str(tiny_llama_dir)) in hint
    import peft  # noqa: F401 - the names the line uses
    from transformers import AutoModelForCausalLM  # noqa: F401

    assert eval(hint).peft_config["default"].num_virtual_tokens == 3


def test_bottleneck_adapter_exports_as_a_tuneforge_adapter_folder(tiny_qwen2_dir, tmp_path, capsys):
    from tuneforge.configs.schema import ModelConfig

    adapter = make_adapter("adapter", tiny_qwen2_dir, tmp_path / "bottleneck", bottleneck_size=8)
    with torch.no_grad():  # `up` starts at zero; give it weights so the comparison below means something
        from safetensors.torch import load_file, save_file

        tensors = {k: (v + 0.05 * torch.randn_like(v)) for k, v in
                   load_file(str(adapter / "adapter_model.safetensors")).items()}
        save_file(tensors, str(adapter / "adapter_model.safetensors"))
    out = tmp_path / "out"
    assert main(["export", "--model", str(tiny_qwen2_dir), "--adapter", str(adapter), "--out", str(out)]) == 0
    assert f"tuneforge chat --model {tiny_qwen2_dir} --adapter {out}" in capsys.readouterr().out
    model, _ = source.load_with_adapter(str(tiny_qwen2_dir), out, ModelConfig(name_or_path="x"), torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, adapter_logits(tiny_qwen2_dir, adapter))


def test_refuses_non_empty_out_unless_overwrite(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", "--model", str(tiny_llama_dir), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert main(["export", "--model", str(tiny_llama_dir), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert main(["export", "--model", str(tiny_llama_dir), "--out", str(tiny_llama_dir), "--overwrite"]) == 2
    assert "being exported" in capsys.readouterr().err


def test_an_out_folder_that_cannot_be_written_is_refused_before_the_load(tiny_llama_dir, tmp_path, monkeypatch):
    """A file on the way (or a read-only place) used to surface as a traceback after loading and merging."""
    from tuneforge.inference.export import source

    monkeypatch.setattr(source, "load_merged", lambda *a, **k: pytest.fail("loaded before checking --out"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="Cannot write --out .*afile is a file, not a folder"):
        export_cli(ExportArgs(out=str(tmp_path / "afile" / "sub"), model=str(tiny_llama_dir)))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if not os.access(locked, os.W_OK):  # root writes anywhere: the check is only meaningful for other users
        with pytest.raises(UserError, match="Cannot write --out .*locked.*permission denied"):
            export_cli(ExportArgs(out=str(locked / "x"), model=str(tiny_llama_dir)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "locked"]


def test_a_failed_export_leaves_no_folder(tiny_llama_dir, tmp_path, monkeypatch):
    from tuneforge.inference.export import hf

    def write_then_die(model, tokenizer, folder, dtype, shard):
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt  # as if killed mid-write

    monkeypatch.setattr(hf, "write_hf_folder", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        export_cli(ExportArgs(out=str(tmp_path / "half"), model=str(tiny_llama_dir)))
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temp sibling


def test_argument_errors_before_any_load(tmp_path):
    cases = [(dict(quant="q8_0"), "--format gguf"), (dict(quant="nf4", format="gguf"), "--format hf"),
             (dict(max_shard_size="2 gigs"), "not a size"), (dict(model=None), "Nothing to export")]
    for kwargs, message in cases:
        args = ExportArgs(out=str(tmp_path / "x"), **{"model": "/nonexistent", **kwargs})
        with pytest.raises(UserError, match=message):
            export_cli(args)
    assert parse_shard_size("2GB") == 2 * 10**9 and parse_shard_size("1GiB") == 2**30


def test_adapter_that_is_not_an_adapter_folder_says_what_it_is(tiny_llama_dir, tmp_path):
    """A full model passed as --adapter is told to go through --model; a missing folder and an empty one are named."""
    (tmp_path / "run.yaml").write_text("method: lora\n", encoding="utf-8")
    cases = [(tiny_llama_dir, "holds a full model.*tuneforge export --model"), (tmp_path / "gone", "does not exist"),
             (tmp_path, "no adapter_config.json"), (tmp_path / "run.yaml", "run.yaml is a file, not an adapter folder")]
    for adapter, message in cases:
        with pytest.raises(UserError, match=message):
            export_cli(ExportArgs(out=str(tmp_path / "x"), model=str(tiny_llama_dir), adapter=str(adapter)))


def test_adapter_of_another_base_is_refused_before_loading_as_chat_says_it(tiny_qwen2_dir, tiny_llama_dir, tmp_path,
                                                                          monkeypatch, capsys):
    """The shapes in both config.json files are compared first: no model is loaded, no PEFT size-mismatch list."""
    from tuneforge.models import loading

    adapter = make_adapter("lora", tiny_qwen2_dir, tmp_path / "lora")
    monkeypatch.setattr(loading, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("loaded the base"))
    capsys.readouterr()  # the fixture's own loading progress
    assert main(["export", "--model", str(tiny_llama_dir), "--adapter", str(adapter), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"The adapter {adapter} does not fit the base model `{tiny_llama_dir}` (model_type qwen2 vs llama" in err
    assert "size mismatch" not in err and len(err.strip().splitlines()) == 1


def test_peft_failure_on_another_base_is_one_line(tiny_llama_dir, tmp_path, capsys):
    """The recorded base is not on disk, so only the load can tell: PEFT's list becomes chat's one-line error."""
    from tuneforge.models.presets import init_model

    wide = init_model("tiny-qwen2", tmp_path / "wide", hidden_size=128)  # every LoRA tensor of another shape
    adapter = make_adapter("lora", wide, tmp_path / "lora")
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "someone/gone"}))
    capsys.readouterr()
    assert main(["export", "--model", str(tiny_llama_dir), "--adapter", str(adapter), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]  # base loaded
    assert len(errors) == 1 and "does not fit the base model" in errors[0] and "trained on `someone/gone`" in err
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal is for machines without CUDA")
def test_bitsandbytes_export_on_cpu_says_why(tiny_llama_dir, tmp_path):
    with pytest.raises(UserError, match="needs a CUDA GPU|needs bitsandbytes"):
        export_cli(ExportArgs(out=str(tmp_path / "q"), model=str(tiny_llama_dir), quant="nf4"))
    assert not (tmp_path / "q").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_bitsandbytes_export_loads_quantized(adapters, tmp_path, quant):
    from transformers import AutoModelForCausalLM

    base, adapter = adapters["lora-llama"]
    out = tmp_path / quant
    export_cli(ExportArgs(out=str(out), adapter=str(adapter), quant=quant))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["load_in_4bit" if quant == "nf4" else "load_in_8bit"] is True
    model = AutoModelForCausalLM.from_pretrained(str(out), device_map={"": 0}).eval()
    with torch.no_grad():
        got = model(input_ids=IDS.cuda()).logits.float().cpu()
    want = adapter_logits(base, adapter)
    assert (got - want).abs().max() < 0.5 and torch.equal(got.argmax(-1), want.argmax(-1))


def test_adapter_identification_and_base_reference(adapters, tmp_path):
    _, lora = adapters["lora-llama"]
    assert source.adapter_method(lora).name == "lora"
    run = tmp_path / "run"
    run.mkdir()
    config = json.loads((lora / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "/gone/elsewhere"}))
    (run / "tuneforge_config.yaml").write_text("method: pissa\nmodel:\n  name_or_path: builtin:smollm2-135m-instruct\n")
    assert source.adapter_method(run).name == "pissa"  # the training run's config tells LoRA variants apart
    assert source.base_reference(run) == "builtin:smollm2-135m-instruct"  # the recorded path no longer exists
    (run / "tuneforge_config.yaml").unlink()
    with pytest.raises(UserError, match="--model"):
        source.base_reference(run)


def as_training_run(adapter: Path, base: Path, run: Path, method: str, *overrides: str) -> Path:
    """A copy of `adapter` finished like `tuneforge train` finishes its output_dir: the training model card (with its
    "Use it" section and PEFT library name) and the resolved tuneforge_config.yaml."""
    import shutil

    from tuneforge.configs.schema import dump_config, load_train_config
    from tuneforge.training.model_card import finish_output_folder

    shutil.copytree(adapter, run)
    cfg = load_train_config(str(REPO / "examples" / "sft_lora_tiny.yaml"),
                            [f"method={method}", f"model.name_or_path={base}", f"output_dir={run}", *overrides])
    (run / "tuneforge_config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    finish_output_folder(cfg, METHODS[method], run, run / "metrics.jsonl")
    return run


def test_merged_export_card_describes_the_export_and_keeps_the_trained_template(adapters, tmp_path):
    """The merged folder's README.md used to repeat the training card's "Use it: tuneforge chat --adapter RUN ... a
    plain PEFT adapter" with library_name peft, and the folder got the base's chat template instead of the one the
    run trained with (model.chat_template); the GGUF file was named after the base."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    base, adapter = adapters["lora-llama"]
    run = as_training_run(adapter, base, tmp_path / "my-finetune", "lora", "model.chat_template=chatml")
    assert "## Use it" in (run / "README.md").read_text(encoding="utf-8")  # what the export must not repeat
    for fmt, library in (("hf", "transformers"), ("gguf", "gguf")):
        out = tmp_path / fmt
        assert main(["export", "--adapter", str(run), "--out", str(out), "--format", fmt]) == 0
        card = (out / "README.md").read_text(encoding="utf-8")
        assert f"library_name: {library}\n" in card and "| optimizer steps |" in card and "## Export" in card, card
        assert "## Use it" not in card and "PEFT adapter" not in card and f"--adapter {run}" not in card, card
        assert (out / "tuneforge_config.yaml").read_text() == (run / "tuneforge_config.yaml").read_text()  # card names it
    template = AutoTokenizer.from_pretrained(str(tmp_path / "hf")).chat_template
    assert "<|im_start|>" in template and template != AutoTokenizer.from_pretrained(str(base)).chat_template
    gguf_path = next((tmp_path / "gguf").glob("*.gguf"))
    assert gguf_path.name == "my-finetune-f32.gguf"
    fields = GGUFReader(str(gguf_path)).fields
    assert fields["general.name"].contents() == "my-finetune"
    assert "<|im_start|>" in fields["tokenizer.chat_template"].contents()


def test_adapter_folder_export_keeps_the_trained_template_for_chat(adapters, tmp_path):
    """A method that cannot merge is exported as an adapter folder: its tokenizer and run config carry the chat
    template the run trained with, so `tuneforge chat --adapter EXPORT` renders prompts as training did."""
    from tuneforge.inference.chat import ChatArgs, load_for_chat

    base, adapter = adapters["prompt-llama"]
    run = as_training_run(adapter, base, tmp_path / "run", "prompt_tuning", "model.chat_template=chatml",
                          "prompt_tuning.num_virtual_tokens=4")
    out = tmp_path / "out"
    assert main(["export", "--adapter", str(run), "--out", str(out)]) == 0
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "library_name: peft\n" in card and "## Use it" not in card and "cannot be merged" in card
    _, tokenizer = load_for_chat(ChatArgs(model=str(base), adapter=str(out), device="cpu"))
    assert "<|im_start|>" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_a_bare_shard_size_is_refused_not_read_as_bytes(tiny_llama_dir, tmp_path):
    """LLaMA-Factory's `export_size: 5` means 5 GB; `--max-shard-size 5` was read as 5 bytes and wrote one file per
    tensor (27 shards for the tiny model, hundreds for a 7B one)."""
    with pytest.raises(UserError, match="'5' has no unit; write 5GB"):
        export_cli(ExportArgs(out=str(tmp_path / "x"), model=str(tiny_llama_dir), max_shard_size="5"))
    assert not (tmp_path / "x").exists()
    assert parse_shard_size("2G") == 2 * 10**9 and parse_shard_size("500M") == 500 * 10**6
    assert parse_shard_size("1000B") == 1000


def test_overwrite_never_deletes_a_folder_that_holds_folders(tiny_llama_dir, tmp_path, monkeypatch):
    """--overwrite replaces the whole --out folder; a project folder given by mistake (it has subfolders, which no
    export writes) used to be deleted with everything in it."""
    from tuneforge.inference.export import source

    monkeypatch.setattr(source, "load_merged", lambda *a, **k: pytest.fail("loaded before checking --out"))
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds folders \(src\).*would delete all of it"):
        export_cli(ExportArgs(out=str(project), model=str(tiny_llama_dir), overwrite=True))
    assert (project / "notes.txt").read_text() == "mine" and (project / "src").is_dir()


def test_options_an_export_cannot_use_are_said_not_dropped(adapters, tmp_path, capsys):
    """--dtype on an adapter folder (its weights are copied as trained) and --max-shard-size on GGUF or adapter
    folders did nothing, silently."""
    adapter = adapters["prompt-llama"][1]
    assert main(["export", "--adapter", str(adapter), "--out", str(tmp_path / "a"), "--dtype", "bf16",
                 "--max-shard-size", "1GB"]) == 0
    err = capsys.readouterr().err
    assert "--dtype bf16 does not apply to an adapter folder" in err
    assert "--max-shard-size 1GB does not apply" in err
    base, lora = adapters["lora-llama"]
    assert main(["export", "--adapter", str(lora), "--out", str(tmp_path / "g"), "--format", "gguf",
                 "--max-shard-size", "1GB"]) == 0
    assert "--max-shard-size 1GB does not apply: a GGUF export is one file" in capsys.readouterr().err
    assert main(["export", "--adapter", str(lora), "--out", str(tmp_path / "h"), "--dtype", "bf16"]) == 0
    assert "does not apply" not in capsys.readouterr().err  # a merged folder uses both


SIGTERM_MID_WRITE = r"""
import os, signal, sys
from tuneforge.cli import main
from tuneforge.inference.export import hf
real = hf.write_hf_folder
def write_then_terminated(model, tokenizer, folder, dtype, shard):
    (folder / "config.json").write_text("{}")
    os.kill(os.getpid(), signal.SIGTERM)  # `kill PID` or a scheduler's time limit, mid-write
    return real(model, tokenizer, folder, dtype, shard)
hf.write_hf_folder = write_then_terminated
sys.exit(main(["export", "--model", sys.argv[1], "--out", sys.argv[2]]))
"""


def test_sigterm_mid_export_leaves_nothing_half_written(tiny_llama_dir, tmp_path):
    """SIGTERM ended Python without unwinding, so the temp folder next to --out (a whole model's worth of
    shards) stayed behind; Ctrl-C already cleaned up."""
    out = tmp_path / "exports" / "model"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SIGTERM_MID_WRITE, str(tiny_llama_dir), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode in (143, -15), proc.stderr[-2000:]
    assert list(out.parent.iterdir()) == [], [p.name for p in out.parent.iterdir()]
    assert "Traceback" not in proc.stderr


def test_a_moved_base_is_named_once(adapters, tmp_path):
    """adapter_config.json and the run's tuneforge_config.yaml both name the base: a moved base was listed twice
    ("it names /gone/base, /gone/base, which does not exist")."""
    _, lora = adapters["lora-llama"]
    run = tmp_path / "run"
    run.mkdir()
    config = json.loads((lora / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "/gone/base"}))
    (run / "tuneforge_config.yaml").write_text("method: lora\nmodel:\n  name_or_path: /gone/base\n")
    with pytest.raises(UserError) as raised:
        source.base_reference(run)
    assert str(raised.value).count("/gone/base") == 1 and "(it names /gone/base, which does not exist" in str(
        raised.value)
