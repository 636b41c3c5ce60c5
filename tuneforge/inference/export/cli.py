"""`tuneforge export`: a trained model as a Hugging Face folder or a GGUF file, ready to ship.

    tuneforge export --adapter outputs/lora-run --out exported/hf              # base recorded in the adapter
    tuneforge export --model builtin:smollm2-135m-instruct --adapter outputs/lora-run --out exported/hf --dtype bf16
    tuneforge export --adapter outputs/lora-run --out exported/gguf --format gguf --quant q8_0
    tuneforge export --model outputs/full-run --out exported/full --max-shard-size 500MB

Mergeable adapters (LoRA and its variants, IA3, ...) are folded into the base weights; methods that cannot merge
(prompt/prefix tuning, llama_adapter, bottleneck adapters) are written as adapter folders with a note. The output
is built in a temp folder next to --out and renamed into place at the end, so an interrupted export leaves nothing
half-written; an existing non-empty --out is refused unless --overwrite.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from tuneforge.configs.schema import ModelConfig
from tuneforge.configs.typed import opt
from tuneforge.errors import UserError
from tuneforge.models.adapter_loading import (
    adapter_folder,
    check_base_matches,
    check_model_folder,
    recorded_base,
    trained_template,
)


@dataclass
class ExportArgs:
    out: str = opt(help="Folder to write. Must be absent or empty unless --overwrite.")
    model: str | None = opt(None, "Base model (local folder, hub id or builtin:<name>), or the output folder of a "
                                  "full/freeze/bitfit run (an adapter folder here is taken as --adapter). Default: the base "
                                  "recorded in --adapter.")
    adapter: str | None = opt(None, "Adapter folder (output_dir of an adapter run) to merge into the base.")
    format: Literal["hf", "gguf"] = opt("hf", "hf: a Hugging Face folder (safetensors); gguf: one .gguf file for "
                                              "llama.cpp / Ollama (llama and qwen2 architectures).")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = opt(
        "auto", "Weight dtype written. auto: the base model's own dtype (from its config.json), fp32 when unknown. "
                "The merge is computed in fp32 when this is fp32, else in this dtype.")
    quant: Literal["none", "q8_0", "nf4", "int8"] = opt(
        "none", "Quantize: q8_0 (GGUF, 8-bit blocks of 32, runs on CPU), nf4 or int8 (Hugging Face folder through "
                "bitsandbytes; needs a CUDA GPU).")
    max_shard_size: str = opt("2GB", "Largest safetensors file in a Hugging Face folder, with its unit (e.g. 500MB, "
                                     "5GB, 2GiB; a bare number is refused).")
    overwrite: bool = opt(False, "Replace --out when it exists and is not empty (a folder of files, such as an earlier "
                                 "export; one that holds folders is never deleted).")
    trust_remote_code: bool = opt(False, "Run Python code shipped with the model (only for sources you trust).")
    allow_pickle: bool = opt(False, "Allow pickle (.bin/.pt) weights, which can execute code when loaded.")


def check_args(args: ExportArgs) -> None:
    if args.quant == "q8_0" and args.format != "gguf":
        raise UserError("--quant q8_0 is a GGUF type; add --format gguf (or use --quant nf4/int8 for a "
                        "bitsandbytes-quantized Hugging Face folder).")
    if args.quant in ("nf4", "int8") and args.format != "hf":
        raise UserError(f"--quant {args.quant} writes a bitsandbytes Hugging Face folder; use --format hf, or "
                        f"--quant q8_0 for GGUF.")
    from tuneforge.inference.export.hf import parse_shard_size

    parse_shard_size(args.max_shard_size)
    if args.model is None and args.adapter is None:
        raise UserError("Nothing to export: pass --model (a model folder, hub id or builtin:<name>) and/or "
                        "--adapter (a trained adapter folder).")


def check_out(out: Path, overwrite: bool, sources: list[Path]) -> None:
    """Refuse to clobber: a file, a non-empty folder (unless --overwrite), or a folder we read from."""
    if out.is_file():
        raise UserError(f"--out {out} is a file; give a folder path.")
    for source in sources:
        resolved = source.expanduser().resolve()
        if out.resolve() == resolved or out.resolve() in resolved.parents:
            raise UserError(f"--out {out} is (or contains) the folder being exported ({source}); write to "
                            f"another folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} already exists and is not empty. Choose another folder or pass --overwrite "
                        f"to replace it.")
    folders = sorted(p.name for p in out.iterdir() if p.is_dir()) if out.is_dir() else []
    if folders:  # --overwrite deletes the whole folder: never a project or home folder given by mistake
        raise UserError(f"--out {out} holds folders ({', '.join(folders[:5])}), so it is not an earlier export "
                        f"(an export is a folder of files only), and --overwrite would delete all of it. Choose a "
                        f"new folder such as {out / 'export'}, or remove {out} yourself if it may go.")
    from tuneforge.models.loading import check_can_create

    check_can_create(out, "--out")  # a read-only place or a file on the way: say so before loading and merging


def target_dtype(args: ExportArgs, source_folder: Path) -> torch.dtype:
    from tuneforge.inference.export.hf import DTYPES

    return DTYPES[args.dtype] if args.dtype != "auto" else config_dtype(source_folder)


def config_dtype(folder: Path) -> torch.dtype:
    """The dtype written in a model folder's config.json (`dtype`, or `torch_dtype` before transformers 5)."""
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return torch.float32
    name = config.get("dtype") or config.get("torch_dtype")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


GGUF_KINDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def unused_options(args: ExportArgs, mergeable: bool) -> list[str]:
    """Options the chosen export has no use for, said instead of silently dropped."""
    notes = []
    if not mergeable and args.dtype != "auto":
        notes.append(f"--dtype {args.dtype} does not apply to an adapter folder: its weights are copied as trained "
                     f"(load them in another dtype with from_pretrained(..., dtype=...)).")
    shard_default = ExportArgs.__dataclass_fields__["max_shard_size"].default
    if args.max_shard_size != shard_default and (not mergeable or args.format == "gguf"):
        what = "a GGUF export is one file" if mergeable else "an adapter folder keeps the adapter's own file"
        notes.append(f"--max-shard-size {args.max_shard_size} does not apply: {what}.")
    return notes


def _report(out: Path, started: float) -> None:
    files = sorted(p for p in out.iterdir() if p.is_file())
    total = sum(p.stat().st_size for p in files)
    print(f"Wrote {out} ({len(files)} files, {total / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s:")
    for p in files:
        print(f"  {p.name:<40} {p.stat().st_size / 1e6:10.1f} MB")


def _export_adapter(args: ExportArgs, base: str, adapter: Path, method, model_cfg, out: Path) -> None:
    """A method that cannot merge: check the adapter loads on the base, then write it as an adapter folder."""
    from tuneforge.inference.export.hf import write_adapter_folder
    from tuneforge.inference.export.source import load_with_adapter
    from tuneforge.models.loading import atomic_folder

    if args.format != "hf" or args.quant != "none":
        raise UserError(f"`{method.name}` adapters cannot be merged into the base weights (they add computation "
                        f"with no weight equivalent), so there is no single {args.format.upper()} model to write. "
                        f"Export them as an adapter folder (--format hf, no --quant), or train a mergeable method "
                        f"(lora, dora, ia3, ...) for GGUF/quantized export.")
    _, tokenizer = load_with_adapter(base, adapter, model_cfg, torch.float32)
    how = adapter_load_hint(method, base, out)
    note = (f"`{method.name}` cannot be merged into the base weights (it adds computation with no weight "
            f"equivalent), so {out} is an adapter folder for the base model, not a standalone model. Load it with: "
            f"{how}")
    with atomic_folder(out) as tmp:
        write_adapter_folder(adapter, tokenizer, tmp, args.model)
        write_export_card(tmp, adapter, note)  # library_name stays: it is still the run's PEFT/TuneForge adapter
    print(f"note: {note}")


def adapter_load_hint(method, base: str, out: Path) -> str:
    """How to load an exported adapter folder. Plain transformers cannot read `builtin:<name>`, so the PEFT line
    names the built-in's cached Hugging Face folder instead (tuneforge chat reads either)."""
    if method.name == "adapter":
        return f"tuneforge chat --model {base} --adapter {out}"
    if base.startswith("builtin:"):
        from tuneforge.models.loading import resolve_source

        base = resolve_source(base)
    return f"peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), {str(out)!r})"


USE_IT = re.compile(r"^## Use it\n.*?(?=^## |\Z)", re.S | re.M)  # the training card's section on loading the run


def write_export_card(folder: Path, source: Path | None, how: str, library: str | None = None) -> None:
    """README.md of an export: the training run's model card where the source has one (what was trained, on what,
    with which losses), and an Export section saying what this folder is and how to load it. The card's "Use it"
    section is left out (it loads the training folder, e.g. as an adapter, which a merged folder is not), and
    `library` (transformers, gguf) replaces its library_name when the export is another kind of folder. The run's
    tuneforge_config.yaml comes along: the card names it, and chat reads the run's chat template from it."""
    card = source / "README.md" if source is not None else None
    text = card.read_text(encoding="utf-8") if card is not None and card.is_file() else ""
    text = USE_IT.sub("", text).rstrip()
    if library:
        text = re.sub(r"^library_name: .*$", f"library_name: {library}", text, count=1, flags=re.M)
    text = text + "\n\n" if text else ""
    (folder / "README.md").write_text(f"{text}## Export\n\nWritten by `tuneforge export`. {how}\n", encoding="utf-8")
    run_config = source / "tuneforge_config.yaml" if source is not None else None
    if run_config is not None and run_config.is_file():
        shutil.copy2(run_config, folder / run_config.name)


def gguf_name_of(model, adapter: Path | None) -> str:
    """The GGUF file's stem and `general.name`: the fine-tune's own folder name (the merged model's config still
    names the base, so every fine-tune of one base would be called the same), else the model folder's."""
    source = adapter.resolve() if adapter is not None else Path(str(getattr(model.config, "_name_or_path", "")))
    return source.name or "model"


def _write_merged(args: ExportArgs, model, tokenizer, dtype: torch.dtype, tmp: Path, adapter: Path | None) -> None:
    from tuneforge.inference.export import hf
    from tuneforge.inference.export.gguf_file import ollama_modelfile, write_gguf

    shard = hf.parse_shard_size(args.max_shard_size)
    if args.format == "hf" and args.quant == "none":
        hf.write_hf_folder(model, tokenizer, tmp, dtype, shard)
    elif args.format == "hf":
        hf.write_bnb_folder(model, tokenizer, tmp, args.quant, shard)
    else:
        kind = "q8_0" if args.quant == "q8_0" else GGUF_KINDS[dtype]
        name = gguf_name_of(model, adapter)
        gguf_name = f"{name}-{kind}.gguf"
        write_gguf(model, tokenizer, tmp / gguf_name, kind, name=name)
        stops = hf.export_generation_config(model, tokenizer).eos_token_id
        stops = stops if isinstance(stops, list) else [stops]
        (tmp / "Modelfile").write_text(ollama_modelfile(gguf_name, tokenizer, stops), encoding="utf-8")


def _loading_note(args: ExportArgs, method, adapter: Path | None, base: str, out: Path) -> str:
    merged = f"The `{method.name}` adapter {adapter} merged into {base}" if method is not None else f"{base}"
    if args.format == "gguf":
        return (f"{merged}, as a GGUF file for llama.cpp and Ollama: `llama-cli -m {out}/<file>.gguf -cnv`, or "
                f"`ollama create mymodel -f Modelfile` in this folder.")
    quant = f", quantized to {args.quant} by bitsandbytes (needs a CUDA GPU to load)" if args.quant != "none" else ""
    return (f"{merged}{quant}, as a Hugging Face folder: `AutoModelForCausalLM.from_pretrained({str(out)!r})`, or "
            f"`tuneforge chat --model {out}`.")


@contextlib.contextmanager
def stop_cleanly_on_sigterm():
    """SIGTERM (`kill`, a scheduler's time limit) ends Python without unwinding, which left the half-written temp
    folder next to --out behind; as an exception it goes through atomic_folder's clean-up, as Ctrl-C does."""
    def stop(signum, frame):
        print("interrupted (SIGTERM): the export stops and removes its temp folder", file=sys.stderr)
        raise SystemExit(128 + signum)  # the exit status a process killed by the signal has

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def export_cli(args: ExportArgs) -> int:
    with stop_cleanly_on_sigterm():
        return _export(args)


def _export(args: ExportArgs) -> int:
    from tuneforge.inference.export import source
    from tuneforge.models.loading import atomic_folder, resolve_source

    started = time.perf_counter()
    check_args(args)
    adapter = Path(args.adapter).expanduser() if args.adapter else None
    if adapter is None and (Path(args.model).expanduser() / source.ADAPTER_CONFIG).is_file():
        adapter, args.model = Path(args.model).expanduser(), None  # `--model outputs/lora-run`: meant as adapter
    method = None
    if adapter is not None:
        adapter_folder(adapter, "export it with `tuneforge export --model {folder} --out DIR` (no --adapter).")
        method = source.adapter_method(adapter)
    base = args.model or source.base_reference(adapter)
    check_model_folder(base)  # a stopped run or a checkpoint-N: say how to finish it, not "no config.json"
    if adapter is not None:  # a base of another shape: refused before minutes of loading, as chat does
        check_base_matches(adapter, recorded_base(adapter), base)
    out = Path(args.out).expanduser()
    check_out(out, args.overwrite, [p for p in (adapter, Path(base)) if p is not None and p.exists()])
    if args.quant in ("nf4", "int8"):
        from tuneforge.inference.export.hf import check_bitsandbytes

        check_bitsandbytes()  # before minutes of loading and merging
    model_cfg = ModelConfig(name_or_path=base, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
                            chat_template=trained_template(adapter) if adapter is not None else None)  # as trained
    for note in unused_options(args, method is None or method.mergeable):
        print(f"note: {note}", file=sys.stderr)
    if method is not None and not method.mergeable:
        _export_adapter(args, base, adapter, method, model_cfg, out)
        _report(out, started)
        return 0
    dtype = target_dtype(args, Path(resolve_source(base)))
    model, tokenizer = source.load_merged(base, adapter, method, model_cfg, dtype)
    with atomic_folder(out) as tmp:
        _write_merged(args, model, tokenizer, dtype, tmp, adapter)
        write_export_card(tmp, adapter or Path(resolve_source(base)), _loading_note(args, method, adapter, base, out),
                          library="gguf" if args.format == "gguf" else "transformers")
    if method is not None:
        print(f"Merged the `{method.name}` adapter from {adapter} into {base}.")
    _report(out, started)
    if args.format == "gguf":
        gguf_file = next(out.glob("*.gguf")).name
        print(f"Run it: llama-cli -m {out / gguf_file} -cnv    or    cd {out} && ollama create mymodel -f Modelfile "
              f"&& ollama run mymodel")
    return 0
