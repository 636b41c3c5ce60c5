"""`tuneforge convert-config`: translate a LLaMA-Factory training YAML into a TuneForge config.

    tuneforge convert-config examples/train_lora/llama3_lora_sft.yaml --out llama3_lora_sft.tuneforge.yaml
    tuneforge train llama3_lora_sft.tuneforge.yaml

What LLaMA-Factory leaves at a default that TuneForge sets differently is written out explicitly, so the converted
run trains the same way: Hugging Face's learning rate (5e-5), epochs (3), batch size (8) and linear schedule,
LLaMA-Factory's cutoff_len (2048), lora_alpha (2 x rank), lora_target (all) and gradient checkpointing (on).
Dataset names stay names and `data.registry` points at `<dataset_dir>/dataset_info.json`, which TuneForge reads in
LLaMA-Factory's own format. Every key without an equivalent is listed (in the output file's header and on the
terminal) with the reason; nothing is dropped silently.

Stages pt, sft, rm, dpo, kto and ppo convert (`_alignment`): pref_beta, pref_loss, pref_ftx, simpo_gamma and
dpo_label_smoothing become the `dpo:` section; pref_beta and kto_chosen/rejected_weight the `kto:` section;
reward_model, ppo_epochs, the PPO batch layout (ppo_buffer_size) and the generation settings the `ppo:` section,
with TRL's PPO defaults that differ from TuneForge's written out. A separate reference model, BCO, LD-DPO, adaptive
KL control and score normalisation have no equivalent and are listed as such.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from tuneforge.configs.foreign import FOREIGN, NO_EQUIVALENT
from tuneforge.configs.llamafactory_keys import LLAMAFACTORY_KEYS, training_argument_names
from tuneforge.configs.typed import opt
from tuneforge.configs.yaml_file import read_yaml_mapping
from tuneforge.errors import ConfigError, UserError, cannot_write, closest

# LLaMA-Factory key -> TuneForge dotted key, where the value carries over as it is
RENAMES = {
    "model_name_or_path": "model.name_or_path", "trust_remote_code": "model.trust_remote_code",
    "output_dir": "output_dir", "seed": "seed",
    "warmup_ratio": "training.warmup_ratio", "warmup_steps": "training.warmup_steps",
    "weight_decay": "training.weight_decay", "max_grad_norm": "training.max_grad_norm",
    "logging_steps": "training.logging_steps", "save_steps": "training.save_steps",
    "save_total_limit": "training.save_total_limit", "dataloader_num_workers": "training.num_workers",
    "neftune_noise_alpha": "training.neftune_alpha", "plot_loss": "training.plot_loss",
    "group_by_length": "data.group_by_length", "packing": "data.packing",
    "freeze_trainable_layers": "freeze.trainable_layers",
    "lora_dropout": "lora.dropout", "loraplus_lr_ratio": "lora_plus.ratio",
    "quantization_type": "qlora.quant_type", "double_quantization": "qlora.double_quant",
}
# Hugging Face / LLaMA-Factory defaults that differ from TuneForge's, written out so the run matches
DEFAULTS = {"learning_rate": 5e-5, "num_train_epochs": 3.0, "per_device_train_batch_size": 8,
            "lr_scheduler_type": "linear", "cutoff_len": 2048, "lora_rank": 8, "lora_target": "all"}
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}
ATTENTION = {"auto": "sdpa", "sdpa": "sdpa", "fa2": "flash_attention_2", "disabled": "eager", "eager": "eager"}
STAGES = ("pt", "sft", "rm", "dpo", "kto", "ppo")
PREF_LOSSES = {"sigmoid": "sigmoid", "ipo": "ipo", "hinge": "hinge", "orpo": "orpo", "simpo": "simpo"}
# the alignment keys that do not carry over (when set to something other than their no-op value), and why
ALIGN_NO_EQUIVALENT = {
    "ref_model": "TuneForge's reference is the model training starts from (its adapters switched off, or a frozen "
                 "copy); a separate reference model is not supported. Start from that model instead, or leave it "
                 "out to use the base model as LLaMA-Factory does by default.",
    "ref_model_adapters": "the reference is the starting model; reference adapters are not supported.",
    "ref_model_quantization_bit": "the reference is the starting model, in the training precision.",
    "pref_bco_weight": "BCO (binary classifier optimisation) is not implemented.",
    "ld_alpha": "LD-DPO's length-desensitised log-probs are not implemented.",
    "pref_ftx": "TuneForge's kto has no SFT-loss term (dpo.sft_weight exists for dpo only).",
    "ppo_score_norm": "TuneForge does not normalise reward-model scores (TRL's use_score_norm/use_score_scaling).",
    "ppo_whiten_rewards": "TuneForge whitens the advantages (ppo.whiten_advantages), not the rewards.",
    "ppo_target": "TuneForge keeps a fixed KL coefficient (ppo.kl_coef); TRL's adaptive KL controller that steers "
                  "towards this target is not implemented (converted: kl_coef 0.2, TRL's starting value).",
    "reward_model_adapters": "the reward is a whole `rm` output folder (TuneForge merges the adapter into it).",
    "reward_model_quantization_bit": "the reward model runs in the training precision.",
    "reward_model_type": "TuneForge reads a reward-model folder written by its own `stage: rm`.",
}
# LLaMA-Factory features TuneForge does not implement, by the key (`use_X`) or prefix (`X_`) that names them: why, and
# the nearest TuneForge way
FEATURE_NO_EQUIVALENT = {
    "galore": "GaLore's low-rank gradient projection is not implemented, so this converts to a full fine-tune with "
              "AdamW, which needs far more optimizer memory. For less memory use `method: lora` or `method: freeze`.",
    "badam": "BAdam (block-wise Adam) is not implemented, so this converts to a full fine-tune updating every block "
             "each step, with far more optimizer memory. Nearest: `method: freeze` with freeze.trainable_layers.",
    "apollo": "APOLLO's low-rank optimizer state is not implemented, so this converts to a full fine-tune with "
              "AdamW, which needs far more optimizer memory. For less memory use `method: lora` or `method: freeze`.",
    "adam_mini": "Adam-mini is not implemented; AdamW runs (more optimizer memory).",
    "muon": "the Muon optimizer is not implemented; AdamW runs.",
    "mixture_of_depths": "Mixture-of-Depths conversion is not implemented; the model trains as it is.",
    "llama_pro": "TuneForge's freeze trains the last N blocks (freeze.trainable_layers), not LLaMA Pro's expanded "
                 "blocks spread through the model (every (layers / N)-th block). To train those, set "
                 "freeze.trainable_layers: 0 and name them in freeze.trainable_modules, e.g. "
                 "['re:.*layers\\.(3|7|11)\\..*'].",
    "pissa_iter": "TuneForge's pissa initialises from PEFT's exact SVD, not the fast randomized one of pissa_iter "
                  "steps: the same start up to the SVD's precision, slower to set up on big models.",
    "resize_vocab": "TuneForge resizes the embeddings itself when the tokenizer has more tokens than the model (and "
                    "saves them with the adapter).",
}
# the alignment keys and the LLaMA-Factory stages that read them: in a config of another stage they do nothing
STAGE_OF = {"pref_beta": ("dpo", "kto"), "pref_ftx": ("dpo", "kto"), "pref_loss": ("dpo",),
            "dpo_label_smoothing": ("dpo",), "simpo_gamma": ("dpo",), "pref_bco_weight": ("dpo",),
            "ld_alpha": ("dpo",), "kto_chosen_weight": ("kto",), "kto_rejected_weight": ("kto",),
            "ref_model": ("dpo", "kto", "ppo"), "ref_model_adapters": ("dpo", "kto", "ppo"),
            "ref_model_quantization_bit": ("dpo", "kto", "ppo"),
            **{k: ("ppo",) for k in ("reward_model", "reward_model_adapters", "reward_model_quantization_bit",
                                     "reward_model_type", "ppo_buffer_size", "ppo_epochs", "ppo_score_norm",
                                     "ppo_target", "ppo_whiten_rewards")}}
# TRL's PPOTrainer (the one LLaMA-Factory runs) defaults that differ from TuneForge's, and LLaMA-Factory's
# generation defaults (GeneratingArguments), written out so the converted PPO run samples and updates the same way
PPO_DEFAULTS = {"kl_coef": 0.2, "max_new_tokens": 1024, "temperature": 0.95, "top_p": 0.7, "top_k": 50}


@dataclass
class ConvertArgs:
    source: str = dataclasses.field(metadata={"positional": True, "help": "The LLaMA-Factory training YAML."})
    out: str | None = opt(None, "Write the TuneForge YAML here (default: print it).")


@dataclass
class Conversion:
    config: dict  # the TuneForge config, plain data
    dropped: list[str]  # "key: value (why)" for every key without an equivalent
    notes: list[str]  # where the meaning differs or a default was written out


def _split(value) -> list[str]:
    """LLaMA-Factory writes lists as comma-separated strings (`q_proj,v_proj`)."""
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(v).strip() for v in items if str(v).strip()]


def _feature(key: str) -> str | None:
    """The FEATURE_NO_EQUIVALENT entry a key belongs to: `use_galore` and `galore_rank` both name galore."""
    name = key.removeprefix("use_")
    return next((f for f in FEATURE_NO_EQUIVALENT if name == f or key.startswith(f + "_")), None)


def _put(config: dict, dotted: str, value) -> None:
    node = config
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


class _Converter:
    def __init__(self, lf: dict, source: Path | None):
        self.lf = {k: v for k, v in lf.items() if v is not None}  # `key: null` means LLaMA-Factory's default
        self.source = source
        self.config: dict = {}
        self.notes: list[str] = []
        self.used: set[str] = set()

    def take(self, key: str, default=None):
        self.used.add(key)
        return self.lf.get(key, default)

    def run(self) -> Conversion:
        self._stage_and_method()
        self._model()
        self._data()
        self._training()
        self._alignment(self.config["stage"])
        for key, dotted in RENAMES.items():
            if key in self.lf and key not in self.used:
                _put(self.config, dotted, self.take(key))
        return Conversion(self.config, self._dropped(), self.notes)

    def _dropped(self) -> list[str]:
        """"key: value (why)" for every key not carried over; a feature's other keys point at its first one."""
        dropped, first_of = [], {}
        for key in (k for k in self.lf if k not in self.used):
            feature = _feature(key)
            why = f"see {first_of[feature]}" if feature in first_of else self._why(key)
            if feature:
                first_of.setdefault(feature, key)
            dropped.append(f"{key}: {self.lf[key]!r} ({why})")
        return dropped

    def _why(self, key: str) -> str:
        stage = self.config["stage"]
        if stage not in STAGE_OF.get(key, (stage,)):
            return f"only LLaMA-Factory's stage {' and '.join(STAGE_OF[key])} reads it; this config is stage {stage}"
        if key in ALIGN_NO_EQUIVALENT:
            return ALIGN_NO_EQUIVALENT[key]
        feature = _feature(key)
        if feature:
            return FEATURE_NO_EQUIVALENT[feature]
        if key in NO_EQUIVALENT:
            return NO_EQUIVALENT[key]
        if FOREIGN.get(key, ("", ""))[1]:
            return FOREIGN[key][1]
        known = LLAMAFACTORY_KEYS | training_argument_names()
        typo = None if key in known else closest(key, known - set(self.lf))
        if typo:
            return f"not a LLaMA-Factory key: did you mean `{typo}`? Fix it in the source config and convert again"
        return "no TuneForge equivalent"

    def _stage_and_method(self) -> None:
        if self.lf.get("do_predict") or self.lf.get("do_train") is False:
            raise UserError("This LLaMA-Factory config predicts or evaluates (do_predict, or do_train: false); "
                            "convert-config translates training configs. Chat with a trained adapter through "
                            "`tuneforge chat --adapter DIR`.")
        stage = self.take("stage", "sft")
        if stage not in STAGES:
            raise UserError(f"LLaMA-Factory `stage: {stage}` has no TuneForge recipe: convert-config handles the "
                            f"stages {', '.join(STAGES)}.")
        ftype = self.take("finetuning_type", "lora")
        if ftype not in ("lora", "freeze", "full"):
            raise UserError(f"LLaMA-Factory `finetuning_type: {ftype}` has no TuneForge equivalent; use lora, freeze "
                            f"or full (see `tuneforge methods`).")
        self.config.update(stage=stage, method=ftype)
        if ftype == "lora":
            self._lora()
        elif ftype == "freeze":
            self._freeze()

    def _lora(self) -> None:
        rank = self.take("lora_rank", DEFAULTS["lora_rank"])
        target = _split(self.take("lora_target", DEFAULTS["lora_target"]))
        lora = {"rank": rank, "alpha": self.take("lora_alpha", 2 * rank),
                "target_modules": ["all-linear"] if target == ["all"] else target}
        if self.lf.get("additional_target"):
            lora["modules_to_save"] = _split(self.take("additional_target"))
        self.config["lora"] = lora
        self.take("pissa_convert")  # TuneForge always saves a PiSSA adapter as a plain LoRA (what this asks for)
        variants = [name for key, name in (("use_dora", "dora"), ("use_rslora", "rslora"), ("pissa_init", "pissa"))
                    if self.take(key, False)]
        if self.lf.get("loraplus_lr_ratio"):
            variants.append("lora_plus")
        bits = self.take("quantization_bit")
        if bits:
            self._quantized(int(bits), variants)
        elif variants:
            self.config["method"] = variants[0]
            if len(variants) > 1:
                self.notes.append(f"LLaMA-Factory combined {' + '.join(variants)}; TuneForge runs one method: "
                                  f"{variants[0]}.")
                if "lora_plus" in variants[1:]:
                    self.take("loraplus_lr_ratio")  # said in the note; a lora_plus section beside another method
                    # would be a section the run ignores

    def _quantized(self, bits: int, variants: list[str]) -> None:
        method = self.take("quantization_method", "bitsandbytes")
        if method != "bitsandbytes" or bits not in (4, 8):
            raise UserError(f"LLaMA-Factory `quantization_bit: {bits}` with `quantization_method: {method}` has no "
                            f"TuneForge equivalent: QLoRA uses bitsandbytes 4-bit or 8-bit.")
        self.config["method"] = "qlora"
        if bits == 8:
            _put(self.config, "qlora.load_in_8bit", True)
        if variants:
            self.notes.append(f"QLoRA does not combine with {', '.join(variants)} here; converted to plain qlora.")

    def _freeze(self) -> None:
        modules = _split(self.take("freeze_trainable_modules", "all"))
        if modules != ["all"]:
            self.notes.append(f"freeze_trainable_modules {modules}: TuneForge trains whole blocks "
                              f"(freeze.trainable_layers); the modules were not carried over.")
        extra = self.take("freeze_extra_modules")
        _put(self.config, "freeze.trainable_layers", self.take("freeze_trainable_layers", 2))
        if extra:
            _put(self.config, "freeze.trainable_modules", _split(extra))

    def _model(self) -> None:
        attn = self.take("flash_attn", "auto")
        if attn not in ATTENTION:
            raise ConfigError(f"LLaMA-Factory `flash_attn: {attn}` is not one of {', '.join(ATTENTION)}.")
        if ATTENTION[attn] != "sdpa":
            _put(self.config, "model.attn_implementation", ATTENTION[attn])
        template = self.take("template")
        if template:
            self.notes.append(f"template {template}: TuneForge renders with the tokenizer's own chat template (the "
                              f"one the model was trained with); set model.chat_template to override it (a .jinja "
                              f"file, or TuneForge's own chatml, llama3, qwen or default: these are not LLaMA-Factory's "
                              f"templates of those names, e.g. its `default` is another layout).")
        self.config.setdefault("model", {})

    def _data(self) -> None:
        dataset_dir = str(self.take("dataset_dir", "data"))
        max_samples = self.take("max_samples")
        for key, section in (("dataset", "train"), ("eval_dataset", "eval")):
            names = _split(self.take(key, ""))
            specs = [{"path": n, "max_samples": max_samples} if max_samples else n for n in names]
            if specs:
                _put(self.config, f"data.{section}", specs)
        if dataset_dir != "ONLINE":  # LLaMA-Factory's marker for hub names without a registry
            registry = f"{dataset_dir}/dataset_info.json"
            _put(self.config, "data.registry", registry)
            self._check_registry(registry)
        _put(self.config, "data.max_length", self.take("cutoff_len", DEFAULTS["cutoff_len"]))
        val_size = self.take("val_size", 0.0)
        if 0 < float(val_size) < 1:
            _put(self.config, "data.eval_ratio", float(val_size))
        elif val_size:
            self.notes.append(f"val_size {val_size}: TuneForge holds out a share (data.eval_ratio), not a count; "
                              f"set data.eval_ratio yourself.")
        if self.take("neat_packing", False):
            _put(self.config, "data.packing", True)  # TuneForge's packing never attends across examples
        if not self.lf.get("mask_history"):
            self.take("mask_history")  # false: LLaMA-Factory's default, nothing to carry over
        if self.take("train_on_prompt", False):
            _put(self.config, "data.loss_on", "all")
        elif self.take("mask_history", False):
            _put(self.config, "data.loss_on", "last")

    def _check_registry(self, registry: str) -> None:
        """Name the datasets the registry lacks now, not at training time. Relative to where `tuneforge train`
        runs, like LLaMA-Factory's dataset_dir; the source file's folder is tried as well."""
        candidates = [Path(registry)] + ([self.source.parent / registry] if self.source else [])
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            self.notes.append(f"data.registry {registry} does not exist here: copy LLaMA-Factory's data folder next "
                              f"to where you run `tuneforge train`, or fix the path.")
            return
        try:
            entries = json.loads(found.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            self.notes.append(f"data.registry {found} is not readable as JSON ({e}).")
            return
        data = self.config.get("data", {})
        names = [s if isinstance(s, str) else s["path"] for s in data.get("train", []) + data.get("eval", [])]
        missing = [n for n in names if n not in entries]
        if missing:
            self.notes.append(f"datasets {', '.join(missing)} are not in {found}.")

    def _training(self) -> None:
        t = {"lr": self.take("learning_rate", DEFAULTS["learning_rate"]),
             "batch_size": self.take("per_device_train_batch_size", DEFAULTS["per_device_train_batch_size"]),
             "grad_accum": self.take("gradient_accumulation_steps", 1)}
        max_steps = self.take("max_steps", -1)
        if max_steps > 0:
            t["max_steps"] = max_steps
        if max_steps <= 0 or "num_train_epochs" in self.lf:  # beside max_steps: kept; max_steps wins, as in HF
            t["epochs"] = self.take("num_train_epochs", DEFAULTS["num_train_epochs"])
        scheduler = self.take("lr_scheduler_type", DEFAULTS["lr_scheduler_type"])
        t["scheduler"] = SCHEDULERS.get(scheduler, "cosine")
        if scheduler not in SCHEDULERS:
            self.notes.append(f"lr_scheduler_type {scheduler}: not available; converted to cosine.")
        if self.take("bf16", False) | self.take("pure_bf16", False):  # both taken: either means bf16
            t["precision"] = "bf16"
        elif self.take("fp16", False):
            t["precision"] = "fp16"
        if "adam_beta1" in self.lf or "adam_beta2" in self.lf:
            t["adam_betas"] = [self.take("adam_beta1", 0.9), self.take("adam_beta2", 0.999)]
        t["gradient_checkpointing"] = not self.take("disable_gradient_checkpointing", False)
        self._warmup(t)
        self._deepspeed(t)
        self._eval_and_resume(t)
        self.config["training"] = {**self.config.get("training", {}), **t}

    def _warmup(self, t: dict) -> None:
        """Hugging Face reads a `warmup_steps` below 1 as a share of the steps (transformers 5), as LLaMA-Factory's
        galore example uses it (`warmup_steps: 0.1`); it wins over warmup_ratio, as there."""
        steps = self.lf.get("warmup_steps")
        if not isinstance(steps, float):
            return  # an integer count (or none) carries over as it is (RENAMES)
        self.take("warmup_steps")
        if 0 < steps < 1:
            t["warmup_ratio"] = steps
            self.notes.append(f"warmup_steps {steps}: a share of the training steps, as Hugging Face reads a value "
                              f"below 1; converted to training.warmup_ratio {steps}.")
            if "warmup_ratio" in self.lf:
                self.notes.append(f"warmup_ratio {self.take('warmup_ratio')} dropped: warmup_steps wins, as in "
                                  f"Hugging Face.")
        else:
            t["warmup_steps"] = round(steps)

    def _deepspeed(self, t: dict) -> None:
        """LLaMA-Factory's DeepSpeed JSONs are Hugging Face style ("auto" values, no optimizer section), which
        training.deepspeed reads as they are."""
        ds = self.take("deepspeed")
        if not ds:
            return
        t["distributed"], t["deepspeed"] = "deepspeed", str(ds)
        self.notes.append(f"deepspeed {ds}: runs under torchrun (`torchrun --nproc-per-node N -m tuneforge train "
                          f"FILE`); the path counts from where you run it, as in LLaMA-Factory.")
        if not any(p.is_file() for p in [Path(ds)] + ([self.source.parent / ds] if self.source else [])):
            self.notes.append(f"deepspeed {ds} does not exist here: copy LLaMA-Factory's JSON next to where you run "
                              f"`tuneforge train`, fix the path, or set training.deepspeed to a ZeRO stage (2 or 3).")

    def _eval_and_resume(self, t: dict) -> None:
        strategy = self.take("eval_strategy", self.take("evaluation_strategy", "no"))
        eval_steps = self.take("eval_steps")  # Hugging Face ignores it unless the strategy is steps
        if strategy == "steps" and eval_steps:
            t["eval_steps"] = eval_steps
        elif strategy == "epoch":
            self.notes.append("eval_strategy epoch: TuneForge evaluates every training.eval_steps steps and at the "
                              "end; set eval_steps yourself.")
        resume = self.take("resume_from_checkpoint")
        if resume:
            t["resume"] = "auto" if resume is True else str(resume)
        ours = _our_key("overwrite_output_dir")  # a TuneForge key of that name, wherever it lives, when there is one
        if ours and "overwrite_output_dir" in self.lf:
            _put(self.config, ours, bool(self.take("overwrite_output_dir")))


    # ---- alignment stages ---------------------------------------------------------------------------------------
    def _alignment(self, stage: str) -> None:
        """The stage's own section. Keys of another stage, and settings TuneForge cannot honour, are left untaken:
        they are listed as not carried over (ALIGN_NO_EQUIVALENT says why)."""
        if stage in ("dpo", "kto", "ppo"):
            self._reference_model()
        if stage == "dpo":
            self._dpo()
        elif stage == "kto":
            kto = {"beta": self.take("pref_beta", 0.1), "desirable_weight": self.take("kto_chosen_weight", 1.0),
                   "undesirable_weight": self.take("kto_rejected_weight", 1.0)}
            self.config["kto"] = kto
            self._kto_batch()
            if not self.lf.get("pref_ftx"):
                self.take("pref_ftx")  # 0: nothing to carry over
        elif stage == "ppo":
            self._ppo()
        for key in ("pref_bco_weight", "ppo_score_norm", "ppo_whiten_rewards"):
            if not self.lf.get(key):
                self.take(key)  # off: LLaMA-Factory does what TuneForge does

    def _reference_model(self) -> None:
        """LLaMA-Factory's default reference is the starting model, as TuneForge's; naming that same model is fine."""
        if self.lf.get("ref_model") in (None, self.lf.get("model_name_or_path")):
            self.take("ref_model")
        if not self.lf.get("ref_model_adapters"):
            self.take("ref_model_adapters")
        if not self.lf.get("ld_alpha"):
            self.take("ld_alpha")

    def _kto_batch(self) -> None:
        """TuneForge's KTO estimates its KL reference point from the other rows of a micro-batch, so it needs 2 rows
        per micro-batch; LLaMA-Factory's examples use 1 with gradient accumulation. Keep the global batch."""
        t = self.config["training"]
        if t["batch_size"] >= 2:
            return
        t["batch_size"] = 2
        if t["grad_accum"] % 2 == 0:
            t["grad_accum"] //= 2
            self.notes.append(f"per_device_train_batch_size 1: TuneForge's kto needs at least 2 rows per "
                              f"micro-batch (its KL reference point); converted to batch_size 2 x grad_accum "
                              f"{t['grad_accum']}, the same global batch.")
        else:
            self.notes.append("per_device_train_batch_size 1: TuneForge's kto needs at least 2 rows per micro-batch "
                              "(its KL reference point); converted to batch_size 2, which doubles the global batch.")

    def _dpo(self) -> None:
        loss = self.take("pref_loss", "sigmoid")
        if loss not in PREF_LOSSES:
            raise UserError(f"LLaMA-Factory `pref_loss: {loss}` has no TuneForge equivalent (TRL removed kto_pair): "
                            f"use `stage: kto` for unpaired feedback, or one of {', '.join(PREF_LOSSES)}.")
        dpo = {"loss": PREF_LOSSES[loss], "beta": self.take("pref_beta", 0.1), "sft_weight": self.take("pref_ftx", 0.0)}
        smoothing = self.take("dpo_label_smoothing", 0.0)
        if smoothing:
            dpo["label_smoothing"] = smoothing  # cDPO for sigmoid, as LLaMA-Factory (TRL) applies it
        if loss == "simpo":
            dpo["simpo_gamma"] = self.take("simpo_gamma", 0.5)  # LLaMA-Factory's default; TuneForge's is 1.0
        else:
            self.take("simpo_gamma")  # only SimPO reads it, in LLaMA-Factory too
        if loss == "orpo":
            self.notes.append("pref_loss orpo: TuneForge's dpo.beta is ORPO's lambda (the odds-ratio weight), as "
                              "pref_beta is in LLaMA-Factory.")
        self.config["dpo"] = dpo

    def _ppo(self) -> None:
        reward = self.take("reward_model")
        if not reward:
            raise UserError("LLaMA-Factory `stage: ppo` needs `reward_model` (it refuses to run without one too). Add "
                            "the path of a reward model trained with `stage: rm`.")
        kind = self.lf.get("reward_model_type", "lora")
        if kind == "api":
            raise UserError("LLaMA-Factory `reward_model_type: api` (a reward served over HTTP) has no TuneForge "
                            "equivalent: write a Python reward function (`ppo.reward: {'module:function': 1.0}`) "
                            "that calls your server, or train a reward model with `stage: rm`.")
        self.notes.append(f"reward_model {reward}: TuneForge reads the output folder of its own `stage: rm` run "
                          f"(a sequence classifier), not LLaMA-Factory's value-head checkpoint. Convert and run "
                          f"the rm config first, then point ppo.reward at its output_dir.")
        t = self.config["training"]
        buffer = int(self.take("ppo_buffer_size", 1))
        # TRL's PPO: a rollout of batch x grad_accum x buffer prompts, each update on batch x grad_accum of them
        ppo = {"reward": {str(reward): 1.0}, "epochs": self.take("ppo_epochs", 4),
               "mini_batch_size": t["batch_size"] * t["grad_accum"], "kl_coef": PPO_DEFAULTS["kl_coef"]}
        if buffer > 1:
            t["grad_accum"] *= buffer
        for key in ("max_new_tokens", "temperature", "top_p", "top_k"):
            ppo[key] = self.take(key, PPO_DEFAULTS[key])
        if self.take("do_sample", True) is False:
            self.notes.append("do_sample false: PPO needs sampled rollouts; TuneForge samples at ppo.temperature.")
        if "ppo_target" not in self.lf:
            self.notes.append("TRL's PPO adapts the KL coefficient (from 0.2 towards ppo_target 6.0); TuneForge keeps "
                              "ppo.kl_coef fixed at 0.2.")
        self.config["ppo"] = ppo


def loadable(config: dict) -> dict:
    """The converted config as `load_train_config` can check it now. What exists only where the run will happen is
    swapped for a stand-in: a PPO reward-model folder not trained yet (from the converted rm config) for a built-in
    reward, a DeepSpeed JSON not copied here yet for a ZeRO stage (the notes say so); the rest is unchanged."""
    ppo = config.get("ppo")
    if ppo and not all(Path(name).is_dir() for name in ppo["reward"]):
        config = {**config, "ppo": {**ppo, "reward": {"exact_match": 1.0}}}
    ds = config.get("training", {}).get("deepspeed")
    if isinstance(ds, str) and not Path(ds).is_file():
        config = {**config, "training": {**config["training"], "deepspeed": 2}}
    return config


def _our_key(name: str) -> str | None:
    from tuneforge.configs.foreign import known_keys

    return next((k for k in known_keys() if k.rsplit(".", 1)[-1] == name), None)


def convert(lf: dict, source: Path | None = None) -> Conversion:
    """The TuneForge config for a LLaMA-Factory training config (a mapping), with what did not carry over."""
    if not isinstance(lf, dict):
        raise ConfigError("A LLaMA-Factory config is a mapping of keys at the top level.")
    return _Converter(lf, source).run()


def render(conv: Conversion, source: str) -> str:
    """The converted config as YAML, with a header that says where it came from and what did not carry over."""
    from tuneforge import __version__

    lines = [f"# Converted from {source} by `tuneforge convert-config` (TuneForge {__version__}).",
             "# Run it with: tuneforge train THIS_FILE"]
    if conv.dropped:
        lines += ["# Not carried over (no TuneForge equivalent):"] + [f"#   {d}" for d in conv.dropped]
    if conv.notes:
        lines += ["# Differences to check:"] + [f"#   {n}" for n in conv.notes]
    order = ["stage", "method", "output_dir", "model", "data", "training", "rm", "dpo", "kto", "ppo"]
    config = {k: conv.config[k] for k in order if k in conv.config} | conv.config  # readable order, nothing lost
    return "\n".join(lines) + "\n" + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def _write_whole(out: Path, text: str) -> None:
    """Write `out` through a temp file beside it (a reader never sees half a config), creating missing parent
    folders as `output_dir` is; a path that cannot be written is the user's to change, said without a traceback."""
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)
    except OSError as e:
        if tmp.is_file():  # no half-written temp file left beside the user's files
            tmp.unlink()
        raise cannot_write(out, e, "--out") from None


def convert_cli(args: ConvertArgs) -> int:
    from tuneforge.configs.schema import load_train_config

    path = Path(args.source)
    lf = read_yaml_mapping(args.source, "LLaMA-Factory config", "examples/train_lora/llama3_lora_sft.yaml from the "
                           "LLaMA-Factory repository")
    if isinstance(lf, dict) and ("method" in lf or isinstance(lf.get("training"), dict)
                                 or isinstance(lf.get("data"), dict)):
        raise UserError(f"{args.source} is already a TuneForge config (it has `method`, `training:` or `data:`): "
                        f"run it with `tuneforge train {args.source}`.")
    if args.out is not None and Path(args.out).resolve() == path.resolve():
        raise UserError(f"--out {args.out} is the LLaMA-Factory config being converted: writing there would replace "
                        f"it. Write the TuneForge config to another file.")
    if args.out is not None and Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a folder; --out takes the file to write: e.g. "
                        f"`--out {Path(args.out) / 'tuneforge.yaml'}`.")
    conv = convert(lf, path)
    text = render(conv, args.source)
    load_train_config(None, base=loadable(yaml.safe_load(text)))  # what we write must load; else it is our bug
    if args.out is None:
        print(text, end="")
        return 0
    _write_whole(Path(args.out), text)
    print(f"wrote {args.out}; run it with `tuneforge train {args.out}`")
    for title, items in (("not carried over (no TuneForge equivalent)", conv.dropped),
                         ("differences to check", conv.notes)):
        if items:
            print(f"{title}:\n" + "\n".join(f"  {item}" for item in items))
    return 0
