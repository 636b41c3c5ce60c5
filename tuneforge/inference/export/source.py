"""What is being exported: the base model, the adapter on it (if any) and the method that wrote that adapter.

    method = adapter_method(Path("outputs/lora-run"))          # a registered Method, e.g. METHODS["lora"]
    base = base_reference(Path("outputs/lora-run"))            # "builtin:smollm2-135m-instruct", a folder or hub id
    model, tokenizer = load_merged(base, Path("outputs/lora-run"), method, model_cfg, torch.float32)

Merging goes through the method registry (`Method.mergeable`, `Method.merge`), so a method decides once how it
folds into the base weights and export never re-implements it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tuneforge.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
RUN_CONFIG = "tuneforge_config.yaml"  # written by `tuneforge train` next to the adapter
# PEFT's `peft_type` -> the TuneForge method that writes it (for adapter folders written outside TuneForge)
PEFT_TYPE_METHODS = {"LORA": "lora", "IA3": "ia3", "PROMPT_TUNING": "prompt_tuning", "P_TUNING": "p_tuning",
                     "PREFIX_TUNING": "prefix_tuning", "ADAPTION_PROMPT": "llama_adapter"}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"Could not read {path}: {e}. Pass an adapter folder written by `tuneforge train` or "
                        f"PEFT's save_pretrained.") from e
    return data if isinstance(data, dict) else {}


def _run_config(folder: Path) -> dict:
    """The resolved training config next to the adapter ({} when the folder did not come from `tuneforge train`)."""
    import yaml

    path = folder / RUN_CONFIG
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def adapter_method(folder: Path):
    """The registered method that wrote the adapter folder: TuneForge's own key, else the training run's config
    (which tells LoRA variants apart), else PEFT's `peft_type`."""
    from tuneforge.methods import METHODS, get_method

    config = _read_json(folder / ADAPTER_CONFIG)
    name = config.get("tuneforge_method") or _run_config(folder).get("method")
    if name in METHODS:
        return get_method(name)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type in PEFT_TYPE_METHODS:
        return get_method(PEFT_TYPE_METHODS[peft_type])
    raise UserError(f"{folder / ADAPTER_CONFIG} has peft_type {config.get('peft_type')!r}, which TuneForge does not "
                    f"know how to export. Supported: {', '.join(sorted(PEFT_TYPE_METHODS))} and TuneForge's own "
                    f"adapters.")


def _usable(ref: str) -> bool:
    return ref.startswith("builtin:") or Path(ref).expanduser().is_dir()


def base_reference(folder: Path) -> str:
    """The base model an adapter folder names: PEFT's `base_model_name_or_path`, or the training run's
    `model.name_or_path`; a built-in name or an existing folder wins over a hub id."""
    from tuneforge.models.loading import HUB_ID

    recorded = _read_json(folder / ADAPTER_CONFIG).get("base_model_name_or_path")
    run_model = (_run_config(folder).get("model") or {}).get("name_or_path")
    refs = list(dict.fromkeys(str(r) for r in (recorded, run_model) if r))  # both usually name the same base
    for ref in refs:
        if _usable(ref):
            return ref
    for ref in refs:
        if HUB_ID.match(ref):
            return ref
    named = f" (it names {' and '.join(refs)}, which {'do' if len(refs) > 1 else 'does'} not exist here)" if refs else ""
    raise UserError(f"Cannot tell which base model the adapter in {folder} belongs to{named}. Pass it with "
                    f"--model (the folder, hub id or builtin:<name> the adapter was trained on).")


def load_base(base: str, model_cfg, dtype: torch.dtype):
    """(model, tokenizer) in `dtype` on the CPU, through the one loading path."""
    from dataclasses import replace

    from tuneforge.models.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(replace(model_cfg, name_or_path=base), dtype=dtype, device="cpu")
    return model.eval(), tokenizer


def load_with_adapter(base: str, adapter: Path, model_cfg, dtype: torch.dtype):
    """(base model with the adapter applied, tokenizer): what chat/eval run, and the reference for the merge."""
    from tuneforge.models.adapter_loading import load_adapter

    model, tokenizer = load_base(base, model_cfg, dtype)
    model = load_adapter(model, str(adapter), base)  # chat's loader: a mismatch is one error naming both models
    return model.eval(), tokenizer


def load_merged(base: str, adapter: Path | None, method, model_cfg, dtype: torch.dtype):
    """(plain transformers model with the adapter folded into its weights, tokenizer). No adapter: the base itself
    (e.g. the output folder of a full or freeze run)."""
    if adapter is None:
        return load_base(base, model_cfg, dtype)
    model, tokenizer = load_with_adapter(base, adapter, model_cfg, dtype)
    with torch.no_grad():
        merged = method.merge(model)
    return merged.eval(), tokenizer
