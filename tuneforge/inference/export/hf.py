"""Hugging Face folders: merged models, adapter folders for methods that cannot merge, bitsandbytes-quantized models.

A merged folder is what `save_pretrained` writes, made complete for plain `transformers` users: safetensors
shards no larger than `max_shard_size` (with model.safetensors.index.json when there are several), config.json,
the tokenizer with its chat template, and generation_config.json whose `eos_token_id` lists every stop token
(eos and the end-of-turn tokens such as <|im_end|> or <|eot_id|>), so `model.generate` stops where chat stops.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import tempfile
from pathlib import Path

import torch

from tuneforge.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9,
              "T": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_shard_size(text: str) -> int:
    """Bytes in "2GB", "500MB", "1GiB", "2G" or "1000000B". Parsed here (not by huggingface_hub, whose parser is
    private and takes no GiB) so a typo is a UserError naming the option before any model loads. A bare number is
    refused: LLaMA-Factory's `export_size: 5` means 5 GB, and read as 5 bytes it wrote one file per tensor."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if match and not match.group(2):
        raise UserError(f"--max-shard-size {text!r} has no unit; write {match.group(1)}GB for gigabytes "
                        f"(LLaMA-Factory's export_size counts GB), or a size like 500MB or 1GiB.")
    unit = match.group(2).upper() if match else None
    if unit not in SIZE_UNITS or float(match.group(1)) <= 0:
        raise UserError(f"--max-shard-size {text!r} is not a size; write it like 2GB, 500MB or 1GiB.")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def export_generation_config(model, tokenizer):
    """The model's generation config with every stop token as `eos_token_id` (and the pad/bos ids filled in)."""
    from tuneforge.inference import stop_token_ids

    config = copy.deepcopy(model.generation_config)
    stops = stop_token_ids(model, tokenizer)
    config.eos_token_id = stops[0] if len(stops) == 1 else stops
    if tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    return config


def write_hf_folder(model, tokenizer, folder: Path, dtype: torch.dtype, max_shard_size: int) -> list[Path]:
    """Write the (merged) model in `dtype` with its tokenizer and stop tokens into `folder`; returns the files."""
    from tuneforge.models.presets import write_model

    model = model.to(dtype)
    model.generation_config = export_generation_config(model, tokenizer)
    model.config.use_cache = True  # training switches the cache off; inference wants it back
    write_model(model, tokenizer, folder, max_shard_size=max_shard_size)
    return sorted(folder.iterdir())


def write_adapter_folder(adapter: Path, tokenizer, folder: Path, base: str | None) -> list[Path]:
    """Copy an adapter that cannot merge (its weights and config, untouched) with the base's tokenizer, so the
    folder is all a PEFT user needs next to the base model. `base` (when given) becomes its recorded base."""
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    if base:
        config["base_model_name_or_path"] = base
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for weights in sorted(adapter.glob("adapter_model*.safetensors")):
        shutil.copy2(weights, folder / weights.name)
    tokenizer.save_pretrained(folder, save_jinja_files=False)
    return sorted(folder.iterdir())


def check_bitsandbytes() -> None:
    """bitsandbytes quantizes while it places weights on a CUDA GPU; say so up front, before any model loads."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise UserError("--quant nf4/int8 writes a bitsandbytes-quantized model and needs bitsandbytes: "
                        "pip install 'tuneforge[qlora]'.") from e
    if not torch.cuda.is_available():
        raise UserError("--quant nf4/int8 needs a CUDA GPU: bitsandbytes quantizes the weights as it moves them to "
                        "the GPU, and a 4-bit/8-bit checkpoint quantized elsewhere is not what GPU users load. Run "
                        "the export on a machine with a GPU, or export bf16/fp16 here (--dtype bf16) and let the "
                        "user quantize at load time (from_pretrained(..., quantization_config=BitsAndBytesConfig("
                        "load_in_4bit=True))), or use --format gguf --quant q8_0 for CPU inference.")


def bnb_config(quant: str):
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def write_bnb_folder(model, tokenizer, folder: Path, quant: str, max_shard_size: int) -> list[Path]:
    """A bitsandbytes 4-bit (nf4) or 8-bit model folder: the merged model is written in bf16 to a scratch folder,
    loaded back quantized on the GPU (the only way bitsandbytes quantizes), then saved with its quantization
    config, which `from_pretrained` reads back without further arguments."""
    from transformers import AutoModelForCausalLM

    from tuneforge.models.presets import write_model

    check_bitsandbytes()
    with tempfile.TemporaryDirectory(prefix=".tuneforge-bnb-", dir=folder.parent) as scratch:
        write_hf_folder(model, tokenizer, Path(scratch), torch.bfloat16, max_shard_size)
        quantized = AutoModelForCausalLM.from_pretrained(scratch, quantization_config=bnb_config(quant),
                                                         device_map={"": torch.cuda.current_device()})
        write_model(quantized, tokenizer, folder, max_shard_size=max_shard_size)
    return sorted(folder.iterdir())
