"""Names users bring from other tools, and where TuneForge keeps the same setting.

People arrive with Hugging Face `TrainingArguments`, LLaMA-Factory, TRL, PEFT or torchtune configs in their heads (or
in their files). An unknown key that is one of those names gets "did you mean `training.lr`" plus what differs, and a
key put in the wrong section (`training.output_dir`, `data.lr`) gets its right place, instead of a letter-by-letter
guess. `tuneforge convert-config` (tuneforge/configs/llamafactory.py) translates whole LLaMA-Factory files.
"""

from __future__ import annotations

from functools import lru_cache

# foreign name -> (our dotted key, what differs; empty when the meaning is the same)
FOREIGN: dict[str, tuple[str, str]] = {
    # Hugging Face TrainingArguments (LLaMA-Factory and TRL inherit them)
    "learning_rate": ("training.lr", ""),
    "num_train_epochs": ("training.epochs", ""),
    "per_device_train_batch_size": ("training.batch_size", "In grpo it counts prompts, each sampled "
                                                           "grpo.num_generations times (TRL's counts completions)."),
    "train_batch_size": ("training.batch_size", ""),
    "micro_batch_size": ("training.batch_size", ""),
    "per_device_eval_batch_size": ("training.batch_size", "Evaluation uses the training batch size."),
    "gradient_accumulation_steps": ("training.grad_accum", ""),
    "lr_scheduler_type": ("training.scheduler", "Choices: linear, cosine, constant."),
    "lr_scheduler": ("training.scheduler", "Choices: linear, cosine, constant."),
    "adam_beta1": ("training.adam_betas", "A list of both betas, e.g. [0.9, 0.999]."),
    "adam_beta2": ("training.adam_betas", "A list of both betas, e.g. [0.9, 0.999]."),
    "bf16": ("training.precision", "Write `training.precision: bf16` (fp32, bf16, fp16 or auto)."),
    "fp16": ("training.precision", "Write `training.precision: fp16` (fp32, bf16, fp16 or auto)."),
    "torch_dtype": ("training.precision", "Write `training.precision: bf16` (fp32, bf16, fp16 or auto)."),
    "dtype": ("training.precision", "Write `training.precision: bf16` (fp32, bf16, fp16 or auto)."),
    "eval_strategy": ("training.eval_steps", "Evaluation runs every eval_steps steps (0: only at the end)."),
    "evaluation_strategy": ("training.eval_steps", "Evaluation runs every eval_steps steps (0: only at the end)."),
    "save_strategy": ("training.save_steps", "Checkpoints are written every save_steps steps (0: none)."),
    "resume_from_checkpoint": ("training.resume", "auto or a checkpoint folder."),
    "dataloader_num_workers": ("training.num_workers", ""),
    "neftune_noise_alpha": ("training.neftune_alpha", ""),
    "use_cpu": ("training.device", "Write `training.device: cpu`."),
    "no_cuda": ("training.device", "Write `training.device: cpu`."),
    "max_seq_length": ("data.max_length", ""),
    "model_max_length": ("data.max_length", ""),
    "max_seq_len": ("data.max_length", ""),
    "dataset_text_field": ("data.train", "Map the column per dataset: `columns: {text: your_field}`."),
    # LLaMA-Factory
    "model_name_or_path": ("model.name_or_path", ""),
    "flash_attn": ("model.attn_implementation", "sdpa, eager or flash_attention_2 (LLaMA-Factory's fa2)."),
    "finetuning_type": ("method", "TuneForge names the method directly: full, freeze, lora, qlora, dora, ..."),
    "lora_rank": ("lora.rank", ""),
    "lora_alpha": ("lora.alpha", "LLaMA-Factory defaults it to 2 x rank; TuneForge to 16."),
    "lora_dropout": ("lora.dropout", ""),
    "lora_target": ("lora.target_modules", "A list; LLaMA-Factory's `all` is [all-linear]."),
    "additional_target": ("lora.modules_to_save", ""),
    "use_dora": ("method", "Write `method: dora`."),
    "use_rslora": ("method", "Write `method: rslora`."),
    "pissa_init": ("method", "Write `method: pissa`."),
    "loraplus_lr_ratio": ("lora_plus.ratio", "With `method: lora_plus`."),
    "quantization_bit": ("method", "Write `method: qlora` (4-bit; `qlora.load_in_8bit: true` for 8-bit)."),
    "quantization_type": ("qlora.quant_type", ""),
    "double_quantization": ("qlora.double_quant", ""),
    "freeze_trainable_layers": ("freeze.trainable_layers", ""),
    "freeze_extra_modules": ("freeze.trainable_modules", ""),
    "disable_gradient_checkpointing": ("training.gradient_checkpointing", "Inverted: LLaMA-Factory checkpoints by "
                                                                        "default, TuneForge only when set to true."),
    "dataset": ("data.train", "A list of files, folders or registry names (set `data.registry` for names)."),
    "eval_dataset": ("data.eval", ""),
    "dataset_dir": ("data.registry", "The path of the dataset_info.json file itself."),
    "template": ("model.chat_template", "TuneForge uses the tokenizer's own chat template; set this only to "
                                        "override it (chatml, llama3, qwen, default or a .jinja file)."),
    "cutoff_len": ("data.max_length", ""),
    "max_samples": ("data.train", "Per dataset: `train: [{path: ..., max_samples: 1000}]`."),
    "val_size": ("data.eval_ratio", "A share in [0, 1); an absolute count has no equivalent."),
    "train_on_prompt": ("data.loss_on", "Write `data.loss_on: all`."),
    "mask_history": ("data.loss_on", "Write `data.loss_on: last`."),
    "pref_beta": ("dpo.beta", "`kto.beta` for stage kto."),
    "pref_loss": ("dpo.loss", "sigmoid, ipo, hinge, robust, simpo or orpo."),
    "pref_ftx": ("dpo.sft_weight", ""),
    "dpo_label_smoothing": ("dpo.label_smoothing", ""),
    "kto_chosen_weight": ("kto.desirable_weight", ""),
    "kto_rejected_weight": ("kto.undesirable_weight", ""),
    "ppo_epochs": ("ppo.epochs", ""),
    "reward_model": ("ppo.reward", "A map of rewards to weights: `{path/to/rm_output: 1.0}`."),
    # PEFT / torchtune / TRL spellings
    "lora_r": ("lora.rank", ""),
    "r": ("lora.rank", "PEFT's LoraConfig name."),
    "lora_attn_modules": ("lora.target_modules", ""),
}

# foreign names TuneForge has no setting for -> why, and what to do instead
NO_EQUIVALENT: dict[str, str] = {
    "do_train": "TuneForge always trains.",
    "do_eval": "evaluation runs when there is held-out data (`data.eval` or `data.eval_ratio`).",
    "overwrite_cache": "TuneForge keeps no preprocessing cache.",
    "preprocessing_num_workers": "rows are encoded in the training process.",
    "ddp_timeout": "not configurable.",
    "report_to": "TuneForge always writes metrics.jsonl and TensorBoard files into output_dir.",
    "logging_dir": "TensorBoard files go to output_dir/tensorboard.",
    "save_only_model": "checkpoints always hold what resume needs.",
    "adapter_name_or_path": "training starts a new adapter; to build on an earlier one (e.g. DPO after SFT), merge "
                            "it first (`tuneforge export --adapter ADAPTER --out MERGED`) and set "
                            "model.name_or_path to MERGED.",
    "optim": "AdamW always (`qlora.optimizer` picks 8-bit/paged AdamW for QLoRA).",
}

# Keys only LLaMA-Factory configs have: two or more at the top level mean "this is a LLaMA-Factory file".
LLAMAFACTORY_MARKERS = {"model_name_or_path", "finetuning_type", "lora_target", "cutoff_len", "template", "dataset",
                        "dataset_dir", "do_train", "quantization_bit", "val_size", "max_samples", "lora_rank"}


@lru_cache(maxsize=1)
def known_keys() -> tuple[str, ...]:
    """Every dotted key of the training config (method sections included)."""
    from tuneforge.configs.schema import TrainConfig, _method_sections
    from tuneforge.configs.typed import field_help_rows

    keys = [key for key, *_ in field_help_rows(TrainConfig) if key != "method_options"]
    for section, cls in _method_sections().items():
        keys += [key for key, *_ in field_help_rows(cls, prefix=section + ".")]
    return tuple(keys)


def foreign_hint(prefix: str, key: str) -> str | None:
    """' Did you mean `training.lr`? ...' for a key in the wrong section or from another tool, else None. Our own
    keys come first, so a key added to TuneForge later wins over the table of foreign names."""
    name = str(key).lower().replace("-", "_")
    full = f"{prefix}.{key}" if prefix else str(key)
    elsewhere = [k for k in known_keys() if k.rsplit(".", 1)[-1] == name and k != full]
    if len(elsewhere) == 1:
        where = "a top-level key" if "." not in elsewhere[0] else f"in section `{elsewhere[0].rsplit('.', 1)[0]}`"
        return f" Did you mean `{elsewhere[0]}` ({where})?"
    if elsewhere:
        return " Did you mean " + " or ".join(f"`{k}`" for k in elsewhere[:3]) + " (it belongs to a section)?"
    if name in FOREIGN and FOREIGN[name][0] != full:
        target, note = FOREIGN[name]
        return f" Did you mean `{target}`? (`{key}` is another tool's name.{' ' + note if note else ''})"
    if name in NO_EQUIVALENT:
        return f" `{key}` (another tool's name) has no TuneForge equivalent: {NO_EQUIVALENT[name]} Remove it."
    return None
