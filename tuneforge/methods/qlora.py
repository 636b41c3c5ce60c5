"""QLoRA: LoRA on a base model loaded quantized through bitsandbytes (Dettmers et al., 2023, "QLoRA: Efficient
Finetuning of Quantized LLMs", https://arxiv.org/abs/2305.14314): 4-bit NormalFloat weights with double quantization
(about 4.13 bits per parameter), a bf16 or fp32 compute dtype, optional paged/8-bit AdamW. 8-bit loading (LLM.int8(),
Dettmers et al., 2022) is the same method with `qlora.load_in_8bit: true`. Also `loftq`: QLoRA with LoftQ init.

Hooks for the rest of TuneForge:
- `load_kwargs(opts, cfg)`: extra `from_pretrained` arguments for the model loader (`quantization_config` from
  `quantization_config(opts)`, plus a device map on CUDA); the base must be LOADED quantized.
- `optimizer_class(opts)`: None (the loop's AdamW) or a bitsandbytes optimizer class.

The adapter saved is a plain PEFT LoRA: it loads onto the 4-bit base or onto the bf16/fp32 base. Merge into an
unquantized base (merging into 4-bit weights would re-quantize them and lose most of the update).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from tuneforge.configs.typed import opt
from tuneforge.errors import ConfigError, UserError
from tuneforge.kernels.onednn_linear import checkpointing_kwargs
from tuneforge.methods import get_method, register
from tuneforge.methods.base import unwrap
from tuneforge.methods.lora import Lora

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class QLoraOptions:
    load_in_8bit: bool = opt(False, "Load the base in 8-bit (LLM.int8()) instead of 4-bit.")
    quant_type: Literal["nf4", "fp4"] = opt("nf4", "4-bit data type: nf4 (NormalFloat, the QLoRA default) or fp4.")
    double_quant: bool = opt(True, "Quantize the 4-bit block scales too (saves about 0.37 bits per parameter).")
    compute_dtype: Literal["bf16", "fp32", "fp16"] = opt(
        "bf16", "Dtype the 4-bit weights are dequantized to for matmuls: bf16 (GPUs from Ampere on), fp16 (with "
                "training.precision fp16, which scales the loss: T4, V100) or fp32.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = opt(
        "adamw", "adamw (torch), adamw_8bit (bitsandbytes 8-bit states), or the paged versions that spill optimizer "
                 "state to CPU memory under GPU memory pressure (CUDA only).")


OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw": "PagedAdamW", "paged_adamw_8bit": "PagedAdamW8bit"}
# fp16 compute needs loss scaling, which the loop runs only under training.precision fp16 (training/distributed.py)
FP16_REFUSED = ("`qlora.compute_dtype: fp16` needs `training.precision: fp16` (this run has `{precision}`): only "
                "then does TuneForge scale the loss (torch GradScaler), and without scaling, gradients below fp16's "
                "range (about 6e-8) flush to zero inside the dequantized matmuls, so the LoRA weights learn less or "
                "nothing. Set `training.precision: fp16` too (GPUs before Ampere: T4, V100), or use "
                "`qlora.compute_dtype: bf16` on GPUs that have it (Ampere or newer: A100, RTX 30xx/40xx, H100) and "
                "`fp32` on CPUs.")


def is_quantized(model: torch.nn.Module) -> bool:
    """True when bitsandbytes 4-bit or 8-bit layers hold the base weights."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())


def keep_4bit_training_layout(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking this model's 4-bit weights for CPU inference; returns the layers guarded.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight IN PLACE into an inference layout the first time
    the layer runs in eval mode on an input without grad (any eval or generate). That layout's kernel (`gemv_4bit`)
    has no autograd, so every later training step silently drops the gradient through the base weights and the
    adapters stop learning. Converting back is not exact either: the repack rounds the block scales to bf16, so the
    frozen base would drift with every eval. So for a model being trained (or loaded by us) we switch the repack off
    (`support_avx512bf16_for_cpu`, the flag its forward checks): eval then runs the same dequantize+matmul path as
    training, the base stays bit-identical, and eval logits equal training-mode logits. Cost: CPU evaluation does
    not use the faster inference kernel. Weights already repacked (an eval before this call) are converted back.

    Also gives each frozen bias the compute dtype up front: bitsandbytes casts it in place at the first forward
    (after PEFT made it fp32), which would silently change a frozen tensor during training.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for module in layers:
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
            module.quant_state = weight.quant_state
        if module.bias is not None and module.compute_dtype is not None:
            module.bias.data = module.bias.data.to(module.compute_dtype)
    return len(layers)


class QLora(Lora):
    """LoRA (shape from the `lora` section) on a base model loaded in 4-bit NF4 or 8-bit (options: `qlora`)."""

    name = "qlora"
    section = "qlora"
    Options = QLoraOptions
    uses_sections = ("lora", "qlora")
    summary = "LoRA on a 4-bit NF4 (or 8-bit) quantized base via bitsandbytes: the least memory for LoRA."
    guide = "The model does not fit for LoRA in 16-bit: 4-bit base, LoRA on top (CUDA for speed; CPU works)."

    def validate(self, cfg):
        get_method("lora").validate(cfg)
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"`method: {self.name}` needs bitsandbytes: pip install 'tuneforge[qlora]'.") from e
        o = cfg.options("qlora")
        if o.compute_dtype == "fp16" and cfg.training.precision != "fp16":
            raise ConfigError(FP16_REFUSED.format(precision=cfg.training.precision))
        if o.optimizer.startswith("paged") and not _cuda_training(cfg):
            raise ConfigError(f"`qlora.optimizer: {o.optimizer}` pages optimizer state between GPU and CPU memory "
                              f"and needs CUDA; on CPU use `adamw_8bit` or `adamw`.")

    def quantization_config(self, opts: QLoraOptions):
        """What the model loader passes to `from_pretrained(quantization_config=...)`."""
        from transformers import BitsAndBytesConfig

        if opts.load_in_8bit:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=opts.quant_type,
                                  bnb_4bit_use_double_quant=opts.double_quant,
                                  bnb_4bit_compute_dtype=DTYPES[opts.compute_dtype])

    def load_kwargs(self, opts: QLoraOptions, cfg) -> dict:
        """Extra `from_pretrained` arguments for the model loader: the quantization config, and on CUDA a device
        map that puts the whole model on the current GPU (bitsandbytes quantizes while placing the weights)."""
        kwargs = {"quantization_config": self.quantization_config(opts)}
        if _cuda_training(cfg):
            device = cfg.training.device
            kwargs["device_map"] = {"": torch.device(device) if device.startswith("cuda:") else
                                    torch.cuda.current_device()}
        return kwargs

    def optimizer_class(self, opts: QLoraOptions):
        """None (use the loop's torch AdamW) or the bitsandbytes optimizer class to build instead."""
        if opts.optimizer == "adamw":
            return None
        import bitsandbytes as bnb

        return getattr(bnb.optim, OPTIMIZERS[opts.optimizer])

    def apply(self, model, opts, cfg):
        from peft import prepare_model_for_kbit_training

        if not is_quantized(model):
            raise ConfigError(f"`method: {self.name}` needs the base model loaded quantized, but it has no "
                              f"bitsandbytes layers. Load it with `from_pretrained(quantization_config="
                              f"method.quantization_config(opts))` (the model loader does this for {self.name}).")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.training.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=checkpointing_kwargs())
        model = get_method("lora").apply(model, cfg.options("lora"), cfg)
        keep_4bit_training_layout(model)
        return model

    def load(self, base_model, path):
        model = super().load(base_model, path)
        if is_quantized(model):  # evaluate exactly as during training (see keep_4bit_training_layout)
            keep_4bit_training_layout(model)
        return model

    def merge(self, model):
        if is_quantized(unwrap(model)):
            raise UserError(f"`{self.name}` adapters merge into an unquantized base: load the base model in bf16 or "
                            f"fp32 (without quantization), load the adapter onto it, then merge. Merging into the "
                            f"quantized weights would re-quantize them and lose most of the update.")
        return super().merge(model)


def _cuda_training(cfg) -> bool:
    device = cfg.training.device
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


class LoftQ(QLora):
    """LoftQ (Li et al., 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models",
    https://arxiv.org/abs/2310.08659): QLoRA whose LoRA matrices start as the best rank-r fix of the 4-bit
    quantization error (SVD of W - dequant(Q(W))), via `peft.replace_lora_weights_loftq`.

    PEFT runs LoftQ's SVD on CUDA/XPU only (it hard-codes the device), so on a CPU-only machine this method is refused
    with a ConfigError. It reads the original weights from the base model's local safetensors files.
    """

    name = "loftq"
    summary = "QLoRA with LoRA initialised to cancel the 4-bit quantization error (PEFT LoftQ; needs CUDA)."
    guide = "QLoRA at low bit-widths or low ranks where quantization error hurts (CUDA only)."

    def validate(self, cfg):
        super().validate(cfg)
        if not _cuda_training(cfg):
            raise ConfigError("`method: loftq` needs a CUDA GPU: PEFT computes the LoftQ initialisation on CUDA/XPU "
                              "only. On CPU use `method: qlora` (same 4-bit base, plain LoRA init) or `pissa`.")
        if cfg.options("qlora").load_in_8bit:
            raise ConfigError("`method: loftq` works on a 4-bit base; set `qlora.load_in_8bit: false`.")

    def apply(self, model, opts, cfg):
        from pathlib import Path

        from peft import replace_lora_weights_loftq

        folder = unwrap(model).name_or_path
        if not folder or not Path(folder).is_dir():
            raise ConfigError(f"`method: loftq` reads the original weights from the model's local safetensors files, "
                              f"but the model came from {folder!r}, which is not a local folder.")
        model = super().apply(model, opts, cfg)
        replace_lora_weights_loftq(model, model_path=str(folder))
        undo_lora_scaling(model)
        return model


@torch.no_grad()
def undo_lora_scaling(model: torch.nn.Module) -> None:
    """`replace_lora_weights_loftq` sets B @ A to the rank-r fix of the quantization error but LoRA multiplies
    B @ A by its scaling (alpha/r); unless alpha == r the fix would be over- or under-applied. Divide B by it."""
    for module in model.modules():
        if hasattr(module, "lora_B") and hasattr(module, "scaling"):
            for adapter, layer in module.lora_B.items():
                layer.weight.div_(module.scaling[adapter])


register(QLora())
register(LoftQ())
